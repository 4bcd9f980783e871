"""Data files bundled with vdjax (see README.md here)."""
