"""Errors raised for bad input data."""


class DataError(ValueError):
    """Bad input data; the message names the file, the column (and row when known) and the fix."""
