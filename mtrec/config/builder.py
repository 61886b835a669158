"""The typed builder: a plain (YAML) dict ↔ the schema dataclasses.

:func:`build` walks a dataclass's type hints and checks every value against its type
(errors name the source file and key path and suggest the closest valid key);
:func:`config_to_dict` turns a config back into the dict that builds it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from mtrec.config.errors import ConfigError
from mtrec.config.schema import ExperimentConfig

__all__ = ["build", "config_to_dict"]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _fail(source: str, key: str, tp: Any, value: Any) -> ConfigError:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return ConfigError(f"{source}: {key or '<top>'}: expected {_type_name(tp)}, got {shown}")


def _build(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(source, key, tp, value)
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        kwargs: dict[str, Any] = {}
        # a field with "sections" metadata (MultiTaskConfig.blocks) spreads its entries over
        # the mapping: each registered section name is a key of its own
        spread = [f for f in fields.values() if "sections" in f.metadata]
        sections: dict[str, type] = spread[0].metadata["sections"]() if spread else {}
        keys = [n for n in fields if not fields[n].metadata.get("sections")]
        for name, item in value.items():
            sub = f"{key}.{name}" if key else str(name)
            if name in sections:
                built = _build(sections[name], item, source, sub)
                kwargs.setdefault(spread[0].name, {})[name] = built
                continue
            if name not in keys:
                valid = keys + list(sections)
                close = difflib.get_close_matches(str(name), valid, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                more = ""
                if spread:
                    more = "; a block of your own needs its module under top-level `imports:`"
                raise ConfigError(
                    f"{source}: {sub}: unknown key{hint} (valid keys: {', '.join(valid)}){more}"
                )
            kwargs[name] = _build(hints[name], item, source, sub)
            choices = fields[name].metadata.get("choices")
            if choices is not None and kwargs[name] not in choices():
                names = choices()
                close = difflib.get_close_matches(str(item), names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"{source}: {sub}: unknown {item!r}{hint} (registered: {', '.join(names)}); "
                    "a block defined in your own file needs its module under the top-level "
                    "`imports:` key"
                )
        for name, f in fields.items():
            missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if missing and name not in kwargs:
                sub = f"{key}.{name}" if key else name
                raise ConfigError(
                    f"{source}: {sub}: required key is missing (expected {_type_name(hints[name])})"
                )
        return tp(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        concrete = [a for a in args if a is not type(None)]
        if len(concrete) == 1:
            # one real type (X | None): its own error is the precise one
            return _build(concrete[0], value, source, key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _build(arg, value, source, key)
            except ConfigError:
                continue
        raise _fail(source, key, tp, value)
    if origin is Literal:
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(
                str(value), [str(a) for a in typing.get_args(tp)], n=1
            )
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _fail(source, key, tp, value)
        (item_tp,) = typing.get_args(tp)
        return [_build(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, key, tp, value)
        k_tp, v_tp = typing.get_args(tp)
        return {
            _build(k_tp, k, source, f"{key}.{k}"): _build(v_tp, v, source, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(source, key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(source, key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(source, key, tp, value)
        return value
    raise ConfigError(f"{source}: {key}: unsupported schema type {tp!r}")  # pragma: no cover


def build(tp: Any, value: Any, source: str, key: str = "") -> Any:
    """``value`` (plain YAML data) as an instance of ``tp``, or a :class:`ConfigError`."""
    return _build(tp, value, source, key)


def config_to_dict(cfg: ExperimentConfig, drop_defaults: bool = False) -> dict[str, Any]:
    """Plain dict (YAML-safe) of a validated config; ``parse_config`` round-trips it.

    ``drop_defaults`` leaves out every key whose value is its schema default: what
    stays is what the experiment actually chose, so a later mtrec that adds keys with
    defaults describes an older experiment by the same dict.
    """
    return _to_dict(cfg, drop_defaults)  # type: ignore[no-any-return]


def _is_default(f: dataclasses.Field[Any], value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return bool(value == f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(value == f.default_factory())
    return False


def _to_dict(obj: Any, drop: bool) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if "sections" in f.metadata:
                # block settings come out as keys of their own, as YAML gives them
                for name, section in value.items():
                    if not (drop and section == type(section)()):
                        out[name] = _to_dict(section, drop)
                continue
            if drop and _is_default(f, value):
                continue
            item = _to_dict(value, drop)
            # a section whose keys are all defaults (it differed only by default block
            # settings looked up on it) says nothing: drop it as a default
            if drop and item == {} and f.default_factory is not dataclasses.MISSING:
                continue
            out[f.name] = item
        return out
    if isinstance(obj, list):
        return [_to_dict(v, drop) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_dict(v, drop) for k, v in obj.items()}
    return obj
