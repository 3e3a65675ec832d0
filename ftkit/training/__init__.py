"""The shared training loop, its checkpoints, metrics and progress."""
