"""TorchScript export for serving, and batch prediction through the exported file.

``exporter`` scripts a run's best model (parity-checked, signature inside the file),
``serving`` holds the scripted module, ``predictor`` streams files through an export.
Client-side helpers (raw rows → input tensors) are in :mod:`mtrec.serving`.
"""
