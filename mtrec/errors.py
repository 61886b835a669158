"""Every error mtrec reports to a user, in one place.

Each is raised with a message that names the file, key or column and the fix; the CLI
prints it as one ``mtrec: error: ...`` line and exits with status 2 (:func:`user_errors`).
The modules that raised them before this one existed re-export them, so
``from mtrec.train.loop import RunError`` and the like keep working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtrec.config import ConfigError

__all__ = [
    "CheckpointError",
    "ClusterError",
    "ConfigError",
    "DataError",
    "DivergenceError",
    "ExportError",
    "RunError",
    "RunLockedError",
    "user_errors",
]


class DataError(ValueError):
    """Bad input data; the message names the file, the column (and row when known) and the fix."""


class RunError(RuntimeError):
    """A problem with a run directory (exists, mismatched, incomplete, in use)."""


class RunLockedError(RunError):
    """Another command holds the run directory's lock; the message names the holder."""


class ClusterError(RunError):
    """The Ray cluster cannot run the job (unreachable, too small); says why and the fix."""


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatched checkpoint; the message names the file."""


class ExportError(RuntimeError):
    """Export or loading an exported model failed; the message names the file and the fix.

    A failed export writes nothing.
    """


class DivergenceError(FloatingPointError):
    """Training diverged (a non-finite loss); the last good checkpoint is kept."""


def user_errors() -> tuple[type[BaseException], ...]:
    """What the CLI turns into one error line and exit status 2 (``FloatingPointError``: a
    diverged training, raised as :class:`DivergenceError` or by a library)."""
    from mtrec.config import ConfigError

    return (ConfigError, DataError, RunError, CheckpointError, ExportError, FloatingPointError)


def __getattr__(name: str) -> Any:
    # ConfigError lives in mtrec.config (which must not import this module's users);
    # resolved on first use so that mtrec.config may itself import mtrec.errors
    if name == "ConfigError":
        from mtrec.config import ConfigError

        return ConfigError
    raise AttributeError(f"module 'mtrec.errors' has no attribute {name!r}")
