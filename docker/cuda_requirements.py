"""Derive the CUDA image's pins from the CPU pins in requirements/ (the one source of truth).

``requirements/torch.txt`` pins torch's CPU build (``torch==2.13.0+cpu``) and
``requirements/cpu.txt`` the CPU build of FBGEMM (``fbgemm-gpu-cpu==1.8.0``). The CUDA
image needs the CUDA builds of the same two versions, from the PyTorch index of one
CUDA variant, and everything else in cpu.txt unchanged:

    python docker/cuda_requirements.py cuda requirements   # torch==2.13.0, fbgemm-gpu==1.8.0
    python docker/cuda_requirements.py rest requirements   # cpu.txt without fbgemm-gpu-cpu

Only the standard library: it runs in the image before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# PEP 503 normalised name, then an exact pin; the local label (+cpu) is dropped
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([0-9][^\s;+]*)(\+[^\s;]+)?\s*(;.*)?$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"{path}: not found; run from the repository root with 'requirements'")
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def _pinned(path: Path, name: str) -> str:
    """The exact version ``name`` is pinned to in ``path`` (no local label)."""
    for line in _lines(path):
        m = _PIN.match(line)
        if m and _norm(m.group(1)) == name:
            return m.group(2)
    raise SystemExit(f"{path}: no exact pin '{name}==VERSION'; add one (see shared/STACK.md)")


def cuda_pins(req_dir: Path) -> list[str]:
    """torch and fbgemm-gpu (CUDA builds) at the versions of their CPU pins."""
    torch = _pinned(req_dir / "torch.txt", "torch")
    fbgemm = _pinned(req_dir / "cpu.txt", "fbgemm-gpu-cpu")
    return [f"torch=={torch}", f"fbgemm-gpu=={fbgemm}"]


def rest_pins(req_dir: Path) -> list[str]:
    """cpu.txt less its CPU-only FBGEMM line (replaced by the CUDA build in cuda_pins)."""
    keep = []
    for line in _lines(req_dir / "cpu.txt"):
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m and _norm(m.group(1)) == "fbgemm-gpu-cpu":
            continue
        keep.append(line)
    return keep


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("cuda", "rest"):
        print(__doc__, file=sys.stderr)
        return 2
    req_dir = Path(argv[1])
    pins = cuda_pins(req_dir) if argv[0] == "cuda" else rest_pins(req_dir)
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
