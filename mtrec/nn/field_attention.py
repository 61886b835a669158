"""Fused self-attention over field tokens for training on CPU (``csrc/field_attention.cpp``).

AutoInt's attention is B·H problems of F x F scores from F x d_h queries and keys, with
F ~ 15-45 and d_h 4-32. ATen runs each pass (QKᵀ, softmax, PV, and five more in the
backward) over the whole batch, streaming B x H x F x F scores through memory between
them, as B·H batched GEMMs too small for the BLAS to reach its speed. The kernel takes
eight rows at a time, one per lane of a vector register, and finishes their attention
while it sits in cache; its backward recomputes the probabilities from the saved
log-sum-exp rather than storing them. Measured on census AutoInt+ training steps (2
threads, ``bench/autoint.py --ref``): 1.62x the per-head ATen path with d_h = 8, 1.33x
with d_h = 16 (``bench/README.md``).

Input is one projection ``qkv = x W_qkvᵀ`` (B x F x 3A: queries, keys, values, heads in
order within each); output is B x F x A, the heads' outputs concatenated per field, the
same as ``InteractingLayer``'s per-head path up to float rounding.
Each group of rows is computed by one thread in a fixed order: the result does not depend
on the thread count.

The kernel is compiled on first use with the machine's C++ compiler
(``torch.utils.cpp_extension``, ~20 s, cached in ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``; GCC >= 9 or clang, C++17). A process killed mid-build can
leave cpp_extension's ``lock`` file in that directory, on which the next build waits:
delete it. Where it cannot be built (no compiler, no ninja) the
layers use the ATen path and one warning says why. ``MTREC_FIELD_ATTENTION=aten`` selects
the ATen path without trying. Only training forwards use it (``InteractingLayer`` in train
mode with gradients on and no attention dropout): every score (validation, evaluation,
TorchScript export, serving) comes from the ATen path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["HEAD_DIMS", "attend", "kernel", "usable"]

log = logging.getLogger(__name__)

#: head dims the kernel is compiled for (others use the ATen path)
HEAD_DIMS: tuple[int, ...] = (4, 8, 16, 32)
ENV_SWITCH = "MTREC_FIELD_ATTENTION"
# one extension: the attention and the residual + LayerNorm + ReLU after it (residual_norm.py)
_SOURCES = tuple(
    Path(__file__).with_name("csrc") / name for name in ("field_attention.cpp", "residual_norm.cpp")
)
# -fno-trapping-math lets the compiler vectorise the exp's float -> int conversion
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]

_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "ops": None}


def _cpu_signature() -> str:
    """What ``-march=native`` compiled for: a cached build is reused on this CPU only."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return torch.backends.cpu.get_cpu_capability() + flags


def _build() -> Any:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the pip wheel's ninja sits beside the interpreter
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + path
    text = "".join(src.read_text() for src in _SOURCES) + " ".join(_CFLAGS) + _cpu_signature()
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    cpp_extension.load(
        name=f"mtrec_field_attention_{digest}",
        sources=[str(src) for src in _SOURCES],
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.mtrec_field_attention


def kernel() -> Any:
    """The compiled ops (``forward`` / ``backward``, ``norm_relu_forward`` /
    ``norm_relu_backward``), or None where they cannot be built
    or ``MTREC_FIELD_ATTENTION=aten``; built once per process, on first call."""
    if _state["tried"]:
        return _state["ops"]
    with _lock:
        if not _state["tried"]:
            choice = os.environ.get(ENV_SWITCH, "auto").strip().lower()
            if choice not in ("auto", "aten"):
                raise ValueError(f"{ENV_SWITCH}={choice!r}: expected 'auto' or 'aten'")
            if choice == "auto":
                try:
                    log.info("loading the fused field-attention kernel (built on first use)")
                    _state["ops"] = _build()
                except Exception as err:  # no compiler / ninja / headers: ATen path
                    log.warning(
                        "fused field attention unavailable (%s: %s); AutoInt trains on the "
                        "ATen path. Install a C++ compiler and ninja to enable it, or set "
                        "%s=aten to skip the attempt.",
                        type(err).__name__,
                        str(err).splitlines()[0] if str(err) else "",
                        ENV_SWITCH,
                    )
            _state["tried"] = True
    return _state["ops"]


def usable(x: torch.Tensor, head_dim: int) -> bool:
    """Whether to call ``attend`` for input ``x``: eager (torch.fx traces and torch.compile
    record the ATen path), float32 CPU without autocast, gradients on, a compiled head dim,
    and the kernel built. Callers
    call it under ``if not torch.jit.is_scripting()``."""
    return (
        not isinstance(x, torch.fx.Proxy)
        and not torch.compiler.is_compiling()  # (training.compile: Inductor's own code)
        and not torch.is_autocast_enabled("cpu")  # (training.precision: bf16)
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and head_dim in HEAD_DIMS
        and kernel() is not None
    )


class _FieldAttention(torch.autograd.Function):
    """Saves qkv and the B x H x F log-sum-exp; the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:  # type: ignore[override]
        out, lse = kernel().forward(qkv, heads, scale)
        ctx.save_for_backward(qkv, lse)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    @once_differentiable  # no second-order terms: a double backward raises
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        qkv, lse = ctx.saved_tensors
        return kernel().backward(grad, qkv, lse, ctx.heads, ctx.scale), None, None


def attend(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """softmax(Q Kᵀ · scale) V per head on the fused kernel: B x F x 3A → B x F x A.
    Callers check :func:`usable` first."""
    return _FieldAttention.apply(qkv, heads, scale)
