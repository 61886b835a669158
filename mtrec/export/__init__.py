"""TorchScript export for serving, and batch prediction through the exported file."""
