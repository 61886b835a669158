"""Errors and warnings about input data (the error itself is defined in :mod:`mtrec.errors`)."""

from mtrec.errors import DataError

__all__ = ["DataError", "DataWarning"]


class DataWarning(UserWarning):
    """Data that trains, but probably not as intended (the message says why and the fix)."""
