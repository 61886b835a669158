"""Training: losses, optimizers, the train step, the epoch ledger, the local loop and the
Ray Train workers. The run directory they write is :mod:`mtrec.run`'s."""
