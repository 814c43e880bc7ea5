"""rag stage (being built)."""
