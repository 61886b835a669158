"""Training: losses, optimizers, checkpoints and the local loop."""
