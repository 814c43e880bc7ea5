"""safety stage (being built)."""
