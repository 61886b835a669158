"""Loading an experiment: YAML (1.2 numbers, ``!replace`` / ``!delete``), ``extends:``,
``--set`` overrides, dataset paths and the ``imports:`` of user blocks.

Example::

    cfg = load_config("configs/census_kdd/mmoe.yaml", overrides=["training.epochs=3"])
    cfg.model.multitask.num_experts  # -> 4
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from mtrec.config.builder import build
from mtrec.config.checks import check_config
from mtrec.config.errors import ConfigError
from mtrec.config.schema import ExperimentConfig

__all__ = [
    "DELETE",
    "ConfigLoader",
    "Replace",
    "deep_merge",
    "import_modules",
    "load_config",
    "parse_config",
    "rebuild_config",
    "strip_tags",
]


class Replace:
    """A value tagged ``!replace`` in a file that ``extends:`` another: it replaces the
    inherited value whole instead of merging into it."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Replace({self.value!r})"


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


# a key tagged ``!delete`` (any or no value) removes the inherited key
DELETE = _Delete()


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 floats and the merge tags.

    PyYAML resolves YAML 1.1, where a float needs a dot and a signed exponent: ``1e-3``
    and ``1.0e6`` would load as strings. Here they (and ``.5``, ``1E3``) are floats, as in
    YAML 1.2 and as anyone writing a learning rate expects. Integers are unchanged.
    """


_FLOAT_TAG = "tag:yaml.org,2002:float"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*\.(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_replace(loader: yaml.SafeLoader, node: yaml.Node) -> Replace:
    if isinstance(node, yaml.MappingNode):
        return Replace(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Replace(loader.construct_sequence(node, deep=True))
    # a scalar keeps the type it would have untagged (replacing a scalar is what merging
    # does anyway; the tag is accepted for uniformity)
    tag = loader.resolve(yaml.ScalarNode, node.value, (True, False))
    return Replace(loader.construct_object(yaml.ScalarNode(tag, node.value)))


ConfigLoader.add_constructor("!replace", _construct_replace)
ConfigLoader.add_constructor("!delete", lambda loader, node: DELETE)


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PATH_KEYS = ("train", "valid", "test")


def _default_data_dir() -> str:
    # ../shared/data relative to the repository root (where this package lives)
    return str(Path(__file__).resolve().parents[3] / "shared" / "data")


def _expand(value: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "MTREC_DATA_DIR":
            return os.environ.get(name, _default_data_dir())
        if name == "MTREC_SYNTH_DIR":
            # where `make demo` writes its planted data (configs/synthetic/*.yaml extend it)
            return os.environ.get(name, str(Path("demo_out/data").resolve()))
        if name not in os.environ:
            raise KeyError(name)
        return os.environ[name]

    return _ENV_PATTERN.sub(repl, value)


def _read_yaml(path: Path, where: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file {path} does not exist") from None
    try:
        data = yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: malformed YAML{at}: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping of experiment keys")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``: mappings recursively, other values replace. In
    ``over``, a value tagged ``!replace`` replaces the inherited one whole (no merge) and
    a key tagged ``!delete`` removes the inherited key."""
    out = dict(base)
    for key, value in over.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, Replace):
            out[key] = strip_tags(value.value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def strip_tags(value: Any) -> Any:
    """``value`` without ``!replace`` / ``!delete`` markers (nothing left to merge into)."""
    if isinstance(value, Replace):
        return strip_tags(value.value)
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items() if v is not DELETE}
    if isinstance(value, list):
        return [strip_tags(v) for v in value if v is not DELETE]
    return value


def _resolve_dataset_paths(raw: dict[str, Any], base_dir: Path, path: Path) -> None:
    ds = raw.get("dataset")
    if not isinstance(ds, dict):
        return
    for key in _PATH_KEYS:
        value = ds.get(key)
        if isinstance(value, str) and value:
            try:
                expanded = _expand(value)
            except KeyError as exc:
                raise ConfigError(
                    f"{path}: dataset.{key}: environment variable {exc.args[0]} is not set"
                ) from None
            p = Path(expanded)
            ds[key] = str(p if p.is_absolute() else (base_dir / p).resolve())


def _resolve_imports(raw: dict[str, Any], base_dir: Path, where: str) -> None:
    """``imports: [my_blocks, pkg.mod]`` → the absolute path of ``my_blocks.py`` (or of a
    package directory) when it lies next to the file that lists it; other names stay
    module names, imported from ``sys.path``. Recording the path makes a run's stored
    config.yaml re-import the same file from any working directory."""
    if "imports" not in raw:
        return
    names = raw["imports"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(
            f"{where}: imports: expected a list of module names (e.g. [my_blocks]), got {names!r}"
        )
    out = []
    for name in names:
        if name.endswith(".py") or "/" in name:
            candidates = [base_dir / name]
        else:
            rel = Path(*name.split("."))
            candidates = [base_dir / f"{rel}.py", base_dir / rel / "__init__.py"]
        found = next((c.resolve() for c in candidates if c.is_file()), None)
        if found is None:
            out.append(name)
        else:
            out.append(str(found.parent if found.name == "__init__.py" else found))
    raw["imports"] = out


def import_modules(names: Any, source: str) -> None:
    """Import the ``imports:`` of a config: absolute paths (files or package directories)
    by location, other entries by module name. A module already imported from the same
    file is not run again."""
    if not names:
        return
    if not isinstance(names, list):
        raise ConfigError(f"{source}: imports: expected a list of module names, got {names!r}")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{source}: imports[{i}]: expected a module name, got {name!r}")
        try:
            if os.path.isabs(name):
                _import_path(Path(name))
            else:
                importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name.split(".")[0] and not os.path.isabs(name):
                raise ConfigError(f"{source}: imports[{i}]: importing {name}: {exc}") from exc
            raise ConfigError(
                f"{source}: imports[{i}]: no module {name!r} next to the YAML file that lists "
                "it nor on sys.path; put my_blocks.py beside the YAML or on PYTHONPATH"
            ) from None
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"{source}: imports[{i}]: importing {name} failed: {type(exc).__name__}: {exc}"
            ) from exc


def _import_path(path: Path) -> None:
    if not path.exists():
        raise ModuleNotFoundError(f"no file {path}", name=str(path))
    init = path / "__init__.py" if path.is_dir() else path
    name = path.stem if path.is_file() else path.name
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == init:
        return
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(path)] if path.is_dir() else None
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    # registered under its plain name, so pickles and TorchScript name its classes as usual
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def _load_raw(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: extends: circular chain {cycle}")
    where = str(chain[-1]) if chain else "config"
    raw = _read_yaml(path, where)
    _resolve_dataset_paths(raw, path.parent, path)
    _resolve_imports(raw, path.parent, str(path))
    parent = raw.pop("extends", None)
    if parent is None:
        return strip_tags(raw)  # type: ignore[no-any-return]
    if not isinstance(parent, str):
        raise ConfigError(
            f"{path}: extends: expected a file path (str), got {type(parent).__name__}"
        )
    try:
        parent_path = Path(_expand(parent))
    except KeyError as exc:
        raise ConfigError(
            f"{path}: extends: environment variable {exc.args[0]} is not set"
        ) from None
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    if not parent_path.exists():
        hint = ""
        if "MTREC_SYNTH_DIR" in parent:
            hint = (
                "; run `make demo` (or `mtrec data synth --out DIR` and set MTREC_SYNTH_DIR=DIR)"
                " to create the synthetic data first"
            )
        raise ConfigError(f"{path}: extends: base file {parent_path} does not exist{hint}")
    base = _load_raw(parent_path, (*chain, path))
    # imports accumulate along the chain (a child adds modules to its base's)
    imports = [*base.get("imports", []), *raw.pop("imports", [])]
    merged = deep_merge(base, raw)
    if imports:
        merged["imports"] = list(dict.fromkeys(imports))
    return merged


def _named_items(node: Any) -> list[str] | None:
    """The names of a list of named mappings (``features``, ``tasks``), else None."""
    if not isinstance(node, list) or not node:
        return None
    if not all(isinstance(item, dict) and isinstance(item.get("name"), str) for item in node):
        return None
    return [item["name"] for item in node]


def _named_item(
    items: list[dict[str, Any]], parts: list[str], start: int, override: str
) -> tuple[dict[str, Any], int]:
    """The item of ``items`` named by ``parts[start:]`` and the index of the first part
    after its name. A name may hold dots (``features.a.b.deep``): the longest name that
    leaves a key after it wins."""
    by_name = {item["name"]: item for item in items}
    for end in range(len(parts) - 1, start, -1):
        name = ".".join(parts[start:end])
        if name in by_name:
            return by_name[name], end
    where = ".".join(parts[:start])
    if ".".join(parts[start:]) in by_name:
        raise ConfigError(
            f"--set {override!r}: {where} items are set one key at a time "
            f"({where}.NAME.KEY=VALUE); edit the YAML to replace or remove a whole item"
        )
    close = difflib.get_close_matches(parts[start], list(by_name), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"--set {override!r}: {where} has no item named {parts[start]!r}{hint} "
        f"(names: {', '.join(by_name)}); set an item's key as {where}.NAME.KEY=VALUE"
    )


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected key.path=value")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
    try:
        value = strip_tags(yaml.load(text, Loader=ConfigLoader))
    except yaml.YAMLError:
        value = text
    node = raw
    i = 0  # parts[:i] name ``node``
    while i < len(parts) - 1:
        child = node.get(parts[i])
        if child is None:
            child = node[parts[i]] = {}
        i += 1
        if _named_items(child) is not None:
            # a list of named items (features, tasks): the next parts name one of them
            child, i = _named_item(child, parts, i, override)
        if not isinstance(child, dict):
            raise ConfigError(
                f"--set {override!r}: {'.'.join(parts[:i])} is not a mapping, cannot set {key}"
            )
        node = child
    if len(parts) == 2 and parts[0] == "dataset" and parts[1] in _PATH_KEYS:
        if isinstance(value, str) and value:
            # a path given on the command line is relative to where the command runs
            try:
                value = str(Path(_expand(value)).resolve())
            except KeyError as exc:
                raise ConfigError(
                    f"--set {override!r}: environment variable {exc.args[0]} is not set"
                ) from None
    if parts == ["imports"]:
        # modules named on the command line are looked up from where the command runs
        node["imports"] = value
        _resolve_imports(node, Path.cwd(), f"--set {override!r}")
        return
    if value is DELETE:  # --set key=!delete: as if the key were never given
        node.pop(parts[-1], None)
        return
    node[parts[-1]] = value


def load_config(
    path: str | os.PathLike[str], overrides: list[str] | None = None
) -> ExperimentConfig:
    """Load, merge (``extends:``), override (``key.path=value``) and validate a YAML experiment."""
    return parse_config(load_raw_config(path, overrides), source=str(path))


def load_raw_config(
    path: str | os.PathLike[str], overrides: list[str] | None = None
) -> dict[str, Any]:
    """The merged (``extends:``) and overridden YAML experiment as a plain dict, before
    validation and before its ``imports`` run (nothing here imports torch)."""
    raw = _load_raw(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    return raw


def parse_config(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Validate a plain dict (a loaded YAML experiment) into an :class:`ExperimentConfig`:
    import its ``imports`` (so their blocks are registered), build the typed config, then
    run the checks (ranges of every number, cross-key rules, the selected block's own)."""
    import_modules(raw.get("imports"), source)
    cfg = build(ExperimentConfig, raw, source)
    check_config(cfg, source)
    return cfg


def rebuild_config(raw: dict[str, Any]) -> ExperimentConfig:
    """A config from :func:`config_to_dict` output without re-running the checks (the
    unpickling side of ``ExperimentConfig.__reduce__``)."""
    import_modules(raw.get("imports"), "<pickled config>")
    return build(ExperimentConfig, raw, "<pickled config>")  # type: ignore[no-any-return]
