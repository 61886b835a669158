"""Errors raised for bad input data (defined in :mod:`mtrec.errors`)."""

from mtrec.errors import DataError

__all__ = ["DataError"]
