"""Data: feature spec, readers, stable hashing, encoding, the streaming batcher, synthetic data.

Submodules are imported explicitly (``from mtrec.data.batcher import iter_batches``)
so that light commands such as ``mtrec data synth`` do not pay for importing torch.
"""
