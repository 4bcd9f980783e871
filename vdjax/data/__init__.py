"""Training data: procedural and folder-based video sources."""
