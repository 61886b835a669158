"""Errors raised for bad input data."""


class DataError(ValueError):
    """Bad input data; the message names the file, the column (and row when known) and the fix."""


class DataWarning(UserWarning):
    """Data that trains, but probably not as intended (the message says why and the fix)."""
