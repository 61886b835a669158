"""The one exception every configuration problem raises."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration problem; the message names file, key path and the fix."""
