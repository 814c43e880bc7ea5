"""tools stage (being built)."""
