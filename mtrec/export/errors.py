"""The error of export and of loading an exported model (defined in :mod:`mtrec.errors`)."""

from mtrec.errors import ExportError

__all__ = ["ExportError"]
