"""PyTorch checkpoints -> vdjax parameters: layout transforms and one key map per format."""
