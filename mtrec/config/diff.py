"""Which keys differ between two resolved configs (plain dicts, e.g. two config.yaml)."""

from __future__ import annotations

from typing import Any

__all__ = ["diff_configs"]


def diff_configs(a: Any, b: Any) -> list[str]:
    """Dotted key paths whose values differ between ``a`` and ``b``, in order of first
    appearance; a key present on one side only counts as differing. Mappings are compared
    key by key. Lists whose items all carry a distinct ``name`` are compared by name
    (``features[c3].min_count``: reordering them is no change), other lists item by item
    (``dnn[1]``). ``1`` and ``1.0`` are the same setting.

    Example::

        diff_configs({"training": {"epochs": 3, "seed": 1}}, {"training": {"epochs": 5}})
        # -> ["training.epochs", "training.seed"]
    """
    out: list[str] = []
    _diff(a, b, "", out)
    return out


def _by_name(items: list[Any]) -> dict[str, Any] | None:
    names = [i.get("name") if isinstance(i, dict) else None for i in items]
    if None in names or len(set(names)) != len(names):
        return None
    return {str(n): i for n, i in zip(names, items, strict=True)}


def _diff(a: Any, b: Any, key: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for name in dict.fromkeys([*a, *b]):
            sub = f"{key}.{name}" if key else str(name)
            if name not in a or name not in b:
                out.append(sub)
            else:
                _diff(a[name], b[name], sub, out)
    elif isinstance(a, list) and isinstance(b, list):
        left, right = _by_name(a), _by_name(b)
        if left is None or right is None:
            left = {str(i): v for i, v in enumerate(a)}
            right = {str(i): v for i, v in enumerate(b)}
        for name in dict.fromkeys([*left, *right]):
            sub = f"{key}[{name}]"
            if name not in left or name not in right:
                out.append(sub)
            else:
                _diff(left[name], right[name], sub, out)
    elif a != b or (type(a) is not type(b) and not _same_number(a, b)):
        out.append(key or "<top>")


def _same_number(a: Any, b: Any) -> bool:
    # 1 and 1.0 are the same setting (YAML writes a float field's 1.0 back as 1.0, a
    # hand-written file may say 1)
    numbers = (int, float)
    return isinstance(a, numbers) and isinstance(b, numbers) and a == b
