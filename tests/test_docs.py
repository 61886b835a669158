"""User documentation: the generated configuration reference is current, links and
config keys in the docs resolve, every command the docs show exists and parses, and the
tutorial runs end to end.

The command checker here (:func:`command_problems`) is shared with ``test_docker.py``:
it validates ``mtrec ...`` against the CLI parser, ``python pipelines/X.py`` against the
files and the CLI, ``ray ...`` against Ray's own click commands, and ``docker compose
run/exec SERVICE ...`` against ``docker/compose.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import re
import runpy
import shlex
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtrec import docs
from mtrec.cli import _parser
from mtrec.config import ExperimentConfig

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
CONFIG_MD = DOCS / "configuration.md"
# pages whose commands and key paths are checked (docs/ue_pareto.md is a results note)
PAGES = [
    DOCS / "tutorial.md",
    DOCS / "model_zoo.md",
    DOCS / "ray_cluster.md",
    DOCS / "gpu.md",
    REPO / "docker" / "README.md",
    REPO / "README.md",
]
CLI_SUBCOMMANDS = ("train", "evaluate", "export", "predict", "compare")


# --------------------------------------------------------------------------- markdown


@dataclasses.dataclass
class Block:
    lang: str
    text: str
    line: int
    save_as: str | None  # set by a preceding "<!-- file: NAME -->"


def fenced_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    pending: str | None = None
    while i < len(lines):
        m = re.match(r"<!--\s*file:\s*(\S+)\s*-->", lines[i].strip())
        if m:
            pending = m.group(1)
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence:
            start = i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append(Block(fence.group(1), "\n".join(body) + "\n", start + 1, pending))
            pending = None
        elif lines[i].strip() and not m:
            pending = None
        i += 1
    return blocks


def shell_commands(script: str) -> list[str]:
    """Logical lines of a shell snippet: continuations joined, comments and blanks dropped."""
    out: list[str] = []
    current = ""
    for raw in script.splitlines():
        line = raw.rstrip()
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        out.append((current + line).strip())
        current = ""
    if current:
        out.append(current.strip())
    return out


def _prose(text: str) -> str:
    """The text outside fenced blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def inline_commands(text: str) -> list[str]:
    """Inline code spans in prose and tables that quote a command."""
    spans = re.findall(r"`([^`\n]+)`", _prose(text))
    starts = ("mtrec ", "ray ", "python pipelines/", "docker ")
    return [s for s in spans if s.startswith(starts)]


def doc_commands(path: Path) -> Iterator[tuple[str, bool]]:
    """(command, strict): whole commands from shell blocks, quoted ones from the prose."""
    text = path.read_text()
    for b in fenced_blocks(text):
        if b.lang in ("bash", "sh", "shell") and b.save_as is None:
            yield from ((c, True) for c in shell_commands(b.text))
    yield from ((c, False) for c in inline_commands(text))


# ------------------------------------------------------------------- command checking


@cache
def schema_keys() -> frozenset[str]:
    """Every dotted key ``--set`` can address (sections too; list entries cannot be set)."""
    keys: set[str] = set()
    for s in docs.config_sections(ExperimentConfig):
        for k in s.keys:
            if "[]" not in k.path:
                keys.add(k.path)
    return frozenset(keys)


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())


@cache
def _ray_cli() -> Any:
    from ray.scripts.scripts import cli

    return cli


def _interpolate(text: str) -> str:
    """Compose-style ``${VAR:-default}`` → default (``${VAR}`` → VAR)."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or m.group(1), text)


def _subparser(args: list[str]) -> tuple[argparse.ArgumentParser | None, list[str]]:
    """The (sub)parser ``args`` selects (``data synth`` nests) and the arguments after it."""
    parser: argparse.ArgumentParser = _parser()
    while args:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or args[0].startswith("-"):
            break
        if args[0] not in subs[0].choices:
            return None, args
        parser, args = subs[0].choices[args[0]], args[1:]
    return parser, args


def _option_values(args: list[str], option: str) -> list[str]:
    """Values given to ``option`` (``--opt v`` or ``--opt=v``)."""
    out = []
    for i, a in enumerate(args):
        if a == option and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith(option + "="):
            out.append(a.split("=", 1)[1])
    return out


def _check_mtrec(args: list[str], where: str, strict: bool = True) -> list[str]:
    """``strict``: the whole command parses. Otherwise (a command quoted in prose, such as
    `mtrec train --workers N`) the subcommand and every option name must exist. Both
    check that ``--config configs/...`` exists and that ``--set`` keys are config keys."""
    shown = f"`mtrec {' '.join(args)}`"
    parser, rest = _subparser(args)
    if parser is None:
        return [f"{where}: {shown}: no such subcommand"]
    if strict:
        try:
            with contextlib.redirect_stderr(_Sink()), contextlib.redirect_stdout(_Sink()):
                _parser().parse_args(args)
        except SystemExit as exc:  # --help exits 0
            if exc.code:
                return [f"{where}: {shown} does not parse (see `mtrec --help`)"]
    else:
        known = parser._option_string_actions
        names = [a.split("=")[0] for a in rest if a.startswith("--")]
        unknown = [n for n in names if n not in known]
        if unknown:
            return [f"{where}: {shown}: unknown option {u}" for u in unknown]
    problems: list[str] = []
    for config in _option_values(rest, "--config"):
        if config.startswith("configs/") and not (REPO / config).exists():
            problems.append(f"{where}: --config {config} does not exist in the repository")
    for item in _option_values(rest, "--set"):
        key, eq, value = item.partition("=")
        if not eq:
            problems.append(f"{where}: --set {item!r} is not KEY=VALUE")
        elif key not in schema_keys():
            problems.append(f"{where}: --set {key}: not a config key (docs/configuration.md)")
        else:
            try:
                yaml.safe_load(value)
            except yaml.YAMLError:
                problems.append(f"{where}: --set {item!r}: the value is not valid YAML")
    return problems


class _Sink:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def _check_ray(args: list[str], where: str, strict: bool = True) -> list[str]:
    """The ray (group) command exists; ``strict``: its options parse with Ray's own CLI."""
    import click

    cli = _ray_cli()
    if not args or args[0] not in cli.commands:
        return [f"{where}: `ray {' '.join(args[:1])}` is not a ray command"]
    cmd, rest, name = cli.commands[args[0]], args[1:], f"ray {args[0]}"
    if isinstance(cmd, click.Group):
        if not rest or not re.match(r"^[a-z-]+$", rest[0]):
            return [] if not strict else [f"{where}: `{name}` needs a subcommand"]
        if rest[0] not in cmd.commands:
            return [f"{where}: `{name} {rest[0]}` is not a ray command"]
        cmd, name, rest = cmd.commands[rest[0]], f"{name} {rest[0]}", rest[1:]
    if not strict:
        return []
    try:
        ctx = cmd.make_context(name, list(rest))
    except click.exceptions.ClickException as exc:
        return [f"{where}: `{name}`: {exc.format_message()}"]
    entry = ctx.params.get("entrypoint")
    if entry:  # ray job submit ... -- COMMAND
        return _check_argv(list(entry), where)
    return []


def _check_docker(args: list[str], where: str) -> list[str]:
    opts_with_value = {"-f", "--file", "-e", "--env", "-v", "--volume", "-w", "--workdir"}
    opts_with_value |= {"--name", "-p", "--publish", "--gpus", "--user", "-u", "--entrypoint"}
    if args[:1] == ["build"]:
        problems = []
        for i, a in enumerate(args):
            if a in ("-f", "--file") and not (REPO / args[i + 1]).exists():
                problems.append(f"{where}: docker build -f {args[i + 1]}: no such file")
        return problems
    if args[:1] == ["compose"]:
        rest = args[1:]
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in opts_with_value else rest[1:]
        if not rest or rest[0] not in ("run", "exec"):
            return []
        rest = rest[1:]
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in opts_with_value else rest[1:]
        services = compose()["services"]
        if not rest or rest[0] not in services:
            return [f"{where}: docker compose: no service {rest[:1]} in docker/compose.yaml"]
        return _check_argv(rest[1:], where) if rest[1:] else []
    if args[:1] == ["run"]:
        rest = args[1:]
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in opts_with_value else rest[1:]
        return _check_argv(rest[1:], where) if rest[1:] else []  # after the image
    return []


def _check_argv(argv: list[str], where: str, strict: bool = True) -> list[str]:
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # leading VAR=value
        argv = argv[1:]
    if not argv:
        return []
    prog, args = Path(argv[0]).name, argv[1:]
    if prog == "mtrec":
        return _check_mtrec(args, where, strict)
    if prog.startswith("python"):
        if args[:1] == ["-m"]:
            module = args[1] if len(args) > 1 else ""
            ok = importlib.util.find_spec(module.split(".")[0]) is not None
            return [] if ok else [f"{where}: python -m {module}: no such module"]
        if args and args[0].startswith("pipelines/"):
            script = REPO / args[0]
            if not script.exists():
                return [f"{where}: {args[0]} does not exist"]
            sub = script.stem
            if sub not in CLI_SUBCOMMANDS:
                return []
            return _check_mtrec([sub, *args[1:]], where, strict)
        return []
    if prog == "ray":
        return _check_ray(args, where, strict)
    if prog == "docker":
        return _check_docker(args, where)
    return []


def split_pipeline(command: str) -> list[list[str]]:
    """Shell words of each simple command in ``command``: split at unquoted ``&&``,
    ``||``, ``;`` and ``|``, quotes respected, redirections (``> f``, ``2>&1``) dropped."""
    parts, current, quote, i = [], "", "", 0
    while i < len(command):
        c = command[i]
        if c == "\\" and quote != "'":
            current += command[i : i + 2]
            i += 2
            continue
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in ";|&" and not (c == "&" and current.endswith(">")):
            if command[i : i + 2] in ("&&", "||"):
                i += 1
            parts.append(current)
            current = ""
            i += 1
            continue
        current += c
        i += 1
    parts.append(current)
    out = []
    for part in parts:
        words, skip = [], False
        for w in shlex.split(part, comments=True):
            if skip:
                skip = False
            elif re.fullmatch(r"\d*(>>?|<)(&\d+)?", w):  # a redirection: "> file" takes
                skip = not w[-1].isdigit()  # the next word, "2>&1" does not
            else:
                words.append(w)
        if words:
            out.append(words)
    return out


def command_problems(command: str, where: str, strict: bool = True) -> list[str]:
    """What is wrong with one shell command line (empty: nothing found). ``strict``: the
    whole command must parse; otherwise only its subcommand and option names are checked."""
    try:
        parts = split_pipeline(_interpolate(command))
    except ValueError as exc:
        return [f"{where}: cannot split {command!r}: {exc}"]
    return [p for argv in parts for p in _check_argv(argv, where, strict)]


# ------------------------------------------------------------------------------- tests


def test_configuration_reference_is_current() -> None:
    page = docs.render_config_reference()
    current = CONFIG_MD.read_text() if CONFIG_MD.exists() else ""
    assert current == page, (
        f"{CONFIG_MD.relative_to(REPO)} is stale (the config schema changed); "
        f"regenerate it with: .venv/bin/{docs.REGENERATE}"
    )


def test_check_mode_reports_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "configuration.md"
    assert docs.main(["--out", str(out)]) == 0
    assert docs.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace("| `seed` | int", "| `seed` | str"))
    assert docs.main(["--check", "--out", str(out)]) == 1
    assert docs.REGENERATE in capsys.readouterr().err


_TOY_SCHEMA = '''
from __future__ import annotations
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Inner:
    """Inner section with ``double`` backticks."""

    # how wide
    # (two lines)
    width: int = 4

    mode: Literal["a", "b"] = "a"  # trailing text
    tag: str = "x # not a comment"


@dataclass
class Item:
    name: str
    # ignored: a blank line separates it from the field

    weight: float = 1.0


@dataclass
class Root:
    items: list[Item]
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None
    sizes: list[int] = field(default_factory=lambda: [8, 4])
    table: dict[str, int] = field(
        default_factory=dict
    )  # spans lines
'''


def _toy_module(tmp_path: Path) -> Any:
    path = tmp_path / "toy_schema.py"
    path.write_text(_TOY_SCHEMA)
    spec = importlib.util.spec_from_file_location("toy_schema", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_schema"] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def test_field_comments_above_and_trailing(tmp_path: Path) -> None:
    toy = _toy_module(tmp_path)
    assert docs.field_comments(toy.Inner) == {
        "width": "how wide (two lines)",
        "mode": "trailing text",
    }
    assert docs.field_comments(toy.Item) == {}
    assert docs.field_comments(toy.Root) == {"table": "spans lines"}


def test_sections_walk_nested_optional_and_list_entries(tmp_path: Path) -> None:
    toy = _toy_module(tmp_path)
    sections = docs.config_sections(toy.Root)
    assert [s.path for s in sections] == ["", "items[]", "inner"]
    root = {k.path: k for k in sections[0].keys}
    assert root["items"].default == "**required**"
    assert root["items"].type == "list of mapping, see [items[]](#items)"
    assert root["inner"].default == "(section defaults)"
    assert root["maybe"].type == "mapping, see [inner](#inner) or `null`"
    assert root["sizes"].default == "`[8, 4]`"
    assert root["table"].type == "mapping str → int"
    inner = {k.path: k for k in sections[2].keys}
    assert inner["inner.mode"].type == "`a` \\| `b`"
    assert inner["inner.tag"].default == "`'x # not a comment'`"
    assert sections[2].doc == "Inner section with ``double`` backticks."
    page = docs.render_config_reference(toy.Root)
    assert "Inner section with `double` backticks." in page
    assert "| `inner.width` | int | `4` | how wide (two lines) |" in page


def test_reference_lists_every_schema_key() -> None:
    page = CONFIG_MD.read_text()

    def walk(cls: type, prefix: str) -> Iterator[str]:
        import typing

        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "sections" in f.metadata:  # each registered block's settings, by block name
                for name, section in f.metadata["sections"]().items():
                    if not section.__module__.startswith("mtrec."):
                        continue  # a block a test registered, not part of mtrec
                    yield f"{prefix}{name}"
                    yield from walk(section, f"{prefix}{name}.")
                continue
            path = f"{prefix}{f.name}"
            yield path
            sub, suffix = docs._dataclass_in(hints[f.name])
            if sub is not None:
                yield from walk(sub, f"{path}{suffix}.")

    missing = [k for k in walk(ExperimentConfig, "") if f"| `{k}` |" not in page]
    assert not missing, f"keys missing from docs/configuration.md: {missing}"


def _links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _prose(path.read_text()))


def _anchors(path: Path) -> set[str]:
    heads = re.findall(r"^#+\s+(.*)$", _prose(path.read_text()), flags=re.M)
    return {docs._anchor(h.strip()) for h in heads}


@pytest.mark.parametrize("page", [*PAGES, CONFIG_MD], ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page: Path) -> None:
    bad = []
    for link in _links(page):
        if re.match(r"^[a-z]+://", link) or link.startswith("mailto:"):
            continue
        target, _, anchor = link.partition("#")
        dest = (page.parent / target).resolve() if target else page
        if not dest.exists():
            bad.append(f"{link} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{link} (no heading #{anchor})")
    assert not bad, f"{page.relative_to(REPO)}: broken links: {bad}"


def test_readme_links_the_docs() -> None:
    links = set(_links(REPO / "README.md"))
    wanted = ["docs/tutorial.md", "docs/configuration.md", "docs/model_zoo.md"]
    wanted += ["docs/ray_cluster.md", "docs/gpu.md", "docker/README.md"]
    assert not [w for w in wanted if w not in links], f"README.md does not link {wanted}"


_KEY = re.compile(r"`((?:dataset|model|training)\.[a-z_][a-z0-9_.]*)")


@pytest.mark.parametrize("page", PAGES[:5], ids=lambda p: str(p.relative_to(REPO)))
def test_config_keys_named_in_docs_exist(page: Path) -> None:
    named = set(_KEY.findall(_prose(page.read_text())))
    unknown = sorted(k.rstrip(".") for k in named if k.rstrip(".") not in schema_keys())
    assert not unknown, f"{page.relative_to(REPO)} names keys the schema lacks: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_commands_in_docs_exist(page: Path) -> None:
    where = str(page.relative_to(REPO))
    problems = [p for c, strict in doc_commands(page) for p in command_problems(c, where, strict)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "command",
    [
        "mtrec trian --config configs/census_kdd/mmoe.yaml",
        "mtrec train --config configs/census_kdd/missing.yaml",
        "mtrec train --config x.yaml --set model.multitask.num_expert=4",
        "python pipelines/nope.py --config x.yaml",
        "ray start --head --dashbord-port=8265",
        "ray job submit --working-dir . -- mtrec evaluate --runs x",
        "docker compose run --rm no-such-service mtrec --help",
    ],
)
def test_command_checker_catches(command: str) -> None:
    assert command_problems(command, "t"), f"not caught: {command}"


def test_model_zoo_covers_every_block() -> None:
    """Every registered built-in block has a ``###`` section in the model zoo whose keys
    line names it, and documents each key of its settings (read from the registry)."""
    import dataclasses

    from mtrec.multitask.registry import registered_blocks

    page = (DOCS / "model_zoo.md").read_text()
    heads = set(re.findall(r"^###\s+(.+)$", page, flags=re.M))
    sections = re.split(r"^###\s+", page, flags=re.M)[1:]
    blocks = registered_blocks()
    assert {"mmoe", "ple", "home", "apem", "task_expert", "shared_bottom"} <= set(blocks)
    for name, spec in blocks.items():
        if not spec.build.__module__.startswith("mtrec."):
            continue  # a test's own block
        own = [s for s in sections if f"`model.multitask.type: {name}`" in s]
        assert len(own) == 1, (
            f"model_zoo.md needs one ### section with `model.multitask.type: {name}`"
        )
        for f in dataclasses.fields(spec.config) if spec.config else []:
            assert f"model.multitask.{name}.{f.name}" in own[0] or f.name in own[0], (
                f"model_zoo.md section of {name!r} does not mention its key {f.name!r}"
            )
    for name in ("per_feature", "unified", "AutoInt", "AutoInt+", "Mixture-of-Head routing (MoH)"):
        assert name in heads, f"model_zoo.md has no section {name!r}"


# ---------------------------------------------------------------------- the tutorial

# a smoke run of each documented training command: one epoch of a few steps
_FAST_TRAIN = ["--set", "training.epochs=1", "--set", "training.max_steps_per_epoch=5"]
_FAST_TRAIN += ["--set", "training.threads=1", "--set", "training.progress=false"]


def _run_mtrec(argv: list[str], capsys: pytest.CaptureFixture) -> dict[str, Any]:
    from mtrec.cli import main

    if argv[0] == "train":
        argv = [*argv, *_FAST_TRAIN]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"mtrec {' '.join(argv)} failed:\n{err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.integration
def test_tutorial_runs_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    text = (DOCS / "tutorial.md").read_text()
    monkeypatch.chdir(tmp_path)
    summaries: dict[str, dict[str, Any]] = {}
    ran_python = 0
    for block in fenced_blocks(text):
        where = f"docs/tutorial.md:{block.line}"
        if block.save_as:
            (tmp_path / block.save_as).write_text(block.text)
        elif block.lang == "bash":
            for cmd in shell_commands(block.text):
                argv = shlex.split(cmd)
                if argv[0] == "mtrec":
                    summaries[argv[1]] = _run_mtrec(argv[1:], capsys)
                elif argv[0] == "python" and len(argv) == 2 and argv[1].endswith(".py"):
                    runpy.run_path(str(tmp_path / argv[1]), run_name="__main__")
                else:
                    pytest.fail(f"{where}: the tutorial test runs only mtrec / python: {cmd}")
        elif block.lang == "python":
            exec(compile(block.text, where, "exec"), {"__name__": "__main__"})
            ran_python += 1
    assert set(summaries) == {"train", "evaluate", "export", "predict"}
    assert ran_python >= 1
    run = Path(summaries["train"]["run_dir"])
    assert (run / "checkpoints" / "best.pt").exists()
    assert set(summaries["evaluate"]["tasks"]) == {"click", "purchase"}
    assert Path(summaries["export"]["model"]).exists()
    assert summaries["predict"]["rows"] == 3000

    # the error the tutorial quotes for a misspelt key is the one mtrec prints
    quoted = re.search(r"`(clicks\.yaml: model\.multitask\.num_expert: [^`]+)`", text)
    assert quoted, "docs/tutorial.md no longer quotes the misspelt-key error"
    bad = (tmp_path / "clicks.yaml").read_text().replace("num_experts:", "num_expert:")
    (tmp_path / "typo.yaml").write_text(bad)
    from mtrec.cli import main

    assert main(["train", "--config", "typo.yaml", "--out", "runs/typo"]) == 2
    err = capsys.readouterr().err
    assert quoted.group(1).replace("clicks.yaml", "typo.yaml") in err
