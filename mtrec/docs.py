"""The configuration reference (``docs/configuration.md``), generated from the typed schema.

Every key of :class:`mtrec.config.ExperimentConfig` and of the sections below it is
listed with its YAML path, type, default and the text that documents it in
the schema (``mtrec/config/schema.py``, and each registered block's settings in the
block's own module, read from the block registry): the class docstring introduces a
section, and the ``#`` comment lines right above a field (or at the end of its line)
describe the key. So the
reference cannot drift from the schema; a test fails when the file is stale.

Regenerate after changing a config dataclass::

    python -m mtrec.docs --out docs/configuration.md

``python -m mtrec.docs`` alone prints the page; ``--check`` compares it with ``--out``
and exits 1 when the file is stale; ``--undocumented`` lists the keys that still lack a
comment in the schema.

Example::

    from mtrec.docs import config_sections, render_config_reference

    [s.path for s in config_sections()][:3]  # -> ['', 'dataset', 'features[]']
    page = render_config_reference()
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mtrec.config import ExperimentConfig

__all__ = [
    "REGENERATE",
    "KeyDoc",
    "SectionDoc",
    "config_sections",
    "field_comments",
    "main",
    "render_config_reference",
]

REGENERATE = "python -m mtrec.docs --out docs/configuration.md"


@dataclass(frozen=True)
class KeyDoc:
    """One YAML key: ``path`` like ``model.embedding.dim``, its type, default and text."""

    path: str
    type: str
    default: str
    text: str


@dataclass(frozen=True)
class SectionDoc:
    """One config dataclass at a YAML path (``""``: the top level; ``features[]``: a list
    entry), its docstring and its keys in declaration order."""

    path: str
    cls: type
    doc: str
    keys: list[KeyDoc]

    @property
    def title(self) -> str:
        return self.path or "top level"


# ------------------------------------------------------------------- reading the source


def field_comments(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``#`` comment lines directly above each annotated field
    of ``cls`` (no blank line between) and from a comment at the end of its line.

    Example::

        @dataclass
        class C:
            # rows per batch
            batch: int = 8  # must be > 0

        field_comments(C)  # -> {"batch": "rows per batch must be > 0"}
    """
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    own_line: dict[int, str] = {}  # line number → text of a comment alone on its line
    trailing: dict[int, str] = {}  # line number → text of a comment after code
    code_lines: set[int] = set()
    skip = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            row = tok.start[0]
            (trailing if row in code_lines else own_line)[row] = text
        elif tok.type not in skip:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef)
    out: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        row = stmt.lineno - 1
        while row in own_line:
            above.insert(0, own_line[row])
            row -= 1
        end = stmt.end_lineno or stmt.lineno
        after = [trailing[r] for r in range(stmt.lineno, end + 1) if r in trailing]
        text = " ".join(t for t in (*above, *after) if t)
        if text:
            out[stmt.target.id] = text
    return out


def _class_doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    # @dataclass invents "Name(field: type = ...)" for a class without a docstring
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return inspect.cleandoc(doc)


# --------------------------------------------------------------------- walking the schema


def _dataclass_in(tp: Any) -> tuple[type | None, str]:
    """The config dataclass a field opens (and the path suffix: ``""`` or ``"[]"``)."""
    if dataclasses.is_dataclass(tp):
        return tp, ""  # type: ignore[return-value]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _dataclass_in(inner[0])
    if origin is list and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    return None, ""


def _anchor(title: str) -> str:
    """The id GitHub gives a Markdown heading (lower case, punctuation dropped)."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def _type_label(tp: Any, section_of: dict[type, str]) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        path = section_of[tp]  # type: ignore[index]
        return f"mapping, see [{path}](#{_anchor(path)})"
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        parts = [_type_label(a, section_of) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or `null`" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_label(args[0], section_of)}"
    if origin is dict:
        return f"mapping {_type_label(args[0], section_of)} → {_type_label(args[1], section_of)}"
    return getattr(tp, "__name__", str(tp))


def _yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _default(f: dataclasses.Field[Any], opens: type | None) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "**required**"
    if opens is not None and f.default is dataclasses.MISSING:
        return "(section defaults)"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f"`{_yaml(value)}`"


def _shipped_blocks() -> set[str]:
    """Blocks defined in mtrec itself: the reference documents these, not blocks a user
    (or a test) registered in this process."""
    from mtrec.multitask.registry import registered_blocks

    return {n for n, s in registered_blocks().items() if s.build.__module__.startswith("mtrec.")}


def _shipped(sections: dict[str, type]) -> dict[str, type]:
    return {n: cls for n, cls in sections.items() if cls.__module__.startswith("mtrec.")}


def config_sections(root: type = ExperimentConfig) -> list[SectionDoc]:
    """Every config dataclass reachable from ``root`` with its keys, parents first."""
    order: list[tuple[str, type]] = []
    section_of: dict[type, str] = {}

    def visit(cls: type, path: str) -> None:
        if cls in section_of:
            return
        section_of[cls] = path
        order.append((path, cls))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "sections" in f.metadata:  # registered block settings, model.multitask.<name>
                for name, section in _shipped(f.metadata["sections"]()).items():
                    visit(section, f"{path}.{name}" if path else name)
                continue
            sub, suffix = _dataclass_in(hints[f.name])
            if sub is not None:
                visit(sub, f"{path}.{f.name}{suffix}" if path else f"{f.name}{suffix}")

    visit(root, "")
    sections: list[SectionDoc] = []
    for path, cls in order:
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        keys = []
        for f in dataclasses.fields(cls):
            if "sections" in f.metadata:
                keys += _section_keys(path, _shipped(f.metadata["sections"]()), section_of)
                continue
            tp = hints[f.name]
            opens, _ = _dataclass_in(tp)
            choices = f.metadata.get("choices")
            keys.append(
                KeyDoc(
                    path=f"{path}.{f.name}" if path else f.name,
                    type=(
                        " \\| ".join(f"`{c}`" for c in choices() if c in _shipped_blocks())
                        if choices is not None
                        else _type_label(tp, section_of)
                    )
                    + _range(f),
                    default=_default(f, opens),
                    text=comments.get(f.name, ""),
                )
            )
        sections.append(SectionDoc(path, cls, _class_doc(cls), keys))
    return sections


def _range(f: dataclasses.Field[Any]) -> str:
    """``, > 0`` for a field that declares a range (``num`` / ``bounds`` metadata)."""
    b = f.metadata.get("bounds")
    return (
        f", {b}" if b is not None and any(v is not None for v in (b.gt, b.ge, b.lt, b.le)) else ""
    )


def _section_keys(
    path: str, sections: dict[str, type], section_of: dict[type, str]
) -> list[KeyDoc]:
    """One key per registered block with settings: ``model.multitask.<name>``."""
    out = []
    for name, cls in sections.items():
        key = f"{path}.{name}" if path else name
        out.append(
            KeyDoc(
                path=key,
                type=_type_label(cls, section_of),
                default="(section defaults)",
                text=f"settings of `type: {name}` (`{cls.__module__}.{cls.__name__}`)",
            )
        )
    return out


# --------------------------------------------------------------------------- rendering


def _markdown(text: str) -> str:
    """Docstring reST to Markdown: ````x```` → ```x```; paragraphs kept."""
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r":(?:class|func|mod|meth|data):`~?([^`]+)`", r"`\1`", text)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "\n\n".join(paragraphs)


def _cell(text: str) -> str:
    return _markdown(text).replace("|", "\\|").replace("\n", " ")


_INTRO = """\
An experiment is one YAML file validated against the typed schema in
`mtrec/config/schema.py` (and each block's settings in its own module) before any work
starts: unknown keys (with the closest valid key), wrong types and missing required keys
fail with the file, the key path and what was expected; every number must be finite and
in the range its key lists below. Numbers are read as YAML 1.2: `1e-3` and `1.0e6` are
floats.

`extends: base.yaml` merges a base file: mappings merge key by key, lists are replaced
whole. To replace an inherited mapping whole instead of merging into it, tag it
`!replace` (`chunks: !replace {user: 2}` drops the base's other `chunks` entries); to
remove an inherited key, tag it `!delete` (`item_id: !delete`). `mtrec train --set
key.path=value` overrides any key below (the value is read as YAML and replaces the key
whole: `--set model.multitask.expert_hidden=[64,32]`); a feature or task is addressed
by its name (`--set features.user_id.deep=false`, `--set tasks.click.weight=2`). Dataset
paths may use
`${MTREC_DATA_DIR}` and are resolved relative to the YAML file that sets them (given
with `--set`, relative to the directory the command runs in).

`imports: [my_blocks]` loads your own multi-task blocks (`@register_block("tiny",
config=TinyConfig)` in `my_blocks.py`, see `mtrec/multitask/registry.py`): each name is
looked up as a file next to the YAML that lists it, then on `sys.path`; the run's
`config.yaml` records the resolved path, so `mtrec evaluate` / `export` re-import it from
any working directory. The block is then `model.multitask.type: tiny` with its settings
under `model.multitask.tiny`.

Keys are shown as full dotted paths; `features[]` and `tasks[]` are list entries."""


def render_config_reference(root: type = ExperimentConfig) -> str:
    """The whole ``docs/configuration.md`` page as a string."""
    sections = config_sections(root)
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from mtrec/config/schema.py and the block registry by `{REGENERATE}`;"
        " do not edit by hand. -->",
        "",
        _INTRO,
        "",
        "Sections: " + ", ".join(f"[{s.title}](#{_anchor(s.title)})" for s in sections) + ".",
    ]
    for s in sections:
        out += ["", f"## {s.title}", ""]
        if s.doc:
            out += [_markdown(s.doc), ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for k in s.keys:
            out.append(f"| `{k.path}` | {k.type} | {k.default} | {_cell(k.text)} |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtrec.docs", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the page here (atomically) instead of stdout")
    p.add_argument(
        "--check", action="store_true", help="exit 1 if --out differs from the generated page"
    )
    p.add_argument(
        "--undocumented",
        action="store_true",
        help="list the keys that have no comment in the schema yet, and exit",
    )
    args = p.parse_args(argv)
    if args.undocumented:
        for s in config_sections():
            for k in s.keys:
                if not k.text and "see [" not in k.type:
                    print(f"{k.path}  ({s.cls.__name__})")
        return 0
    page = render_config_reference()
    if args.check:
        if not args.out:
            p.error("--check needs --out FILE")
        path = Path(args.out)
        current = path.read_text() if path.exists() else None
        if current != page:
            state = "is missing" if current is None else "is stale"
            print(f"{path} {state}; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if args.out:
        from mtrec.io import atomic_write_text

        atomic_write_text(args.out, page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
