"""Reading and writing videos and frames."""
