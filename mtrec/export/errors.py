"""The error of export and of loading an exported model (no heavy imports)."""


class ExportError(RuntimeError):
    """Export or loading an exported model failed; the message names the file and the fix.

    A failed export writes nothing.
    """
