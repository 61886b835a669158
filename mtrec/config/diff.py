"""Which keys differ between two resolved configs (plain dicts, e.g. two config.yaml)."""

from __future__ import annotations

from typing import Any

__all__ = ["diff_configs"]


def diff_configs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted key paths whose values differ between ``a`` and ``b``, in order of first
    appearance; a key present on one side only counts as differing. Mappings are compared
    key by key, lists of equal length item by item (``features[2].buckets``), other
    lists whole.

    Example::

        diff_configs({"training": {"epochs": 3, "seed": 1}}, {"training": {"epochs": 5}})
        # -> ["training.epochs", "training.seed"]
    """
    out: list[str] = []
    _diff(a, b, "", out)
    return out


def _diff(a: Any, b: Any, key: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for name in list(dict.fromkeys([*a, *b])):
            sub = f"{key}.{name}" if key else str(name)
            if name not in a or name not in b:
                out.append(sub)
            else:
                _diff(a[name], b[name], sub, out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{key}[{i}]", out)
    elif a != b or (type(a) is not type(b) and not _same_number(a, b)):
        out.append(key or "<top>")


def _same_number(a: Any, b: Any) -> bool:
    # 1 and 1.0 are the same setting (YAML writes a float field's 1.0 back as 1.0, a
    # hand-written file may say 1)
    numbers = (int, float)
    return isinstance(a, numbers) and isinstance(b, numbers) and a == b
