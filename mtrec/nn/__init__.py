"""Layers shared by the embeddings, interactions, multi-task blocks and towers."""

from mtrec.nn.layers import FastDropout, GroupedLinear, activation

__all__ = ["FastDropout", "GroupedLinear", "activation"]
