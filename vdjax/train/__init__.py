"""Training: state, the jitted sharded step, checkpoints and the loop (one trainer for every family)."""
