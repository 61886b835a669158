"""Evaluation plots as PNG files: ROC, reliability, prediction histograms, heatmaps.

Headless by construction: figures are built with ``matplotlib.figure.Figure`` and
rendered by the Agg canvas, never through ``pyplot`` (no display, no global figure
state, safe in Ray workers and threads). Every function returns the Figure; ``save_png``
writes it atomically. Inputs are already-reduced arrays (curve points, bin means,
histogram counts), so plotting cost does not grow with the number of rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mtrec.io import atomic_path

__all__ = [
    "heatmap",
    "histograms",
    "reliability_diagram",
    "roc_figure",
    "save_png",
    "thin_curve",
]


def save_png(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Render ``fig`` with Agg and write it atomically to ``path``."""
    FigureCanvasAgg(fig)  # attaches the Agg canvas: no backend selection, no display
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def thin_curve(x: np.ndarray, y: np.ndarray, points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``2 * points`` points of a monotone curve, endpoints kept: evenly
    spaced by index and by x, so both dense and sparse stretches stay visible."""
    n = x.size
    if n <= 2 * points:
        return x, y
    by_index = np.linspace(0, n - 1, points).round().astype(np.int64)
    by_x = np.searchsorted(x, np.linspace(float(x[0]), float(x[-1]), points))
    keep = np.unique(np.concatenate([by_index, np.clip(by_x, 0, n - 1)]))
    return x[keep], y[keep]


def _grid(n: int, width: float = 4.2, height: float = 3.6) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> Figure:
    """One ROC curve per task on shared axes; ``curves[task] = (fpr, tpr, auc)``."""
    fig = Figure(figsize=(5.2, 4.8), layout="constrained")
    ax = fig.subplots()
    for task, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.6, label=f"{task} (AUC {auc:.4f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.005), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title("ROC")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def reliability_diagram(bins: dict[str, dict[str, np.ndarray]], ece: dict[str, float]) -> Figure:
    """Per task: mean label vs mean prediction per probability bin (marker area ~ rows),
    the diagonal of perfect calibration, and the ECE in the title."""
    fig, axes = _grid(len(bins))
    for ax, (task, b) in zip(axes, bins.items(), strict=True):
        ok = b["count"] > 0
        size = 12 + 200 * b["count"][ok] / max(int(b["count"].max()), 1)
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        ax.plot(b["mean_prob"][ok], b["mean_label"][ok], lw=1.0, color="C0")
        ax.scatter(b["mean_prob"][ok], b["mean_label"][ok], s=size, color="C0", zorder=3)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean prediction", ylabel="observed rate")
        ax.set_title(f"{task}: ECE {ece.get(task, float('nan')):.4f}", fontsize="medium")
        ax.grid(alpha=0.3)
    fig.suptitle("Reliability (equal-width bins; marker area ~ rows)")
    return fig


def histograms(hists: dict[str, dict[str, np.ndarray]]) -> Figure:
    """Per task: the distribution of predictions for positive and negative rows;
    ``hists[task] = {"edges", "pos", "neg"}`` (counts per bin). Log y: rare classes show."""
    fig, axes = _grid(len(hists))
    for ax, (task, h) in zip(axes, hists.items(), strict=True):
        for key, color in (("neg", "C0"), ("pos", "C3")):
            counts = h[key]
            if counts.sum() > 0:
                label = "negatives" if key == "neg" else "positives"
                ax.stairs(counts, h["edges"], color=color, lw=1.4, label=label)
        ax.set_yscale("log")
        ax.set(xlim=(0, 1), xlabel="predicted probability", ylabel="rows")
        ax.set_title(task, fontsize="medium")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle("Predictions by true label")
    return fig


def heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    xlabel: str,
    ylabel: str,
    annotate: bool | None = None,
) -> Figure:
    """A labelled heatmap (NaN cells blank); values are written in the cells when the
    matrix is small enough to read them (``annotate=None``: up to 12 x 12)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, cols = matrix.shape
    if (rows, cols) != (len(row_labels), len(col_labels)):
        raise ValueError(
            f"heatmap: matrix is {rows} x {cols} but got {len(row_labels)} row and "
            f"{len(col_labels)} column labels"
        )
    size = (max(4.0, 0.45 * cols + 2.5), max(3.0, 0.4 * rows + 1.8))
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.85)
    ax.set_xticks(range(cols), labels=list(col_labels), rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(rows), labels=list(row_labels), fontsize="small")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title)
    if annotate is None:
        annotate = rows <= 12 and cols <= 12
    if annotate and np.isfinite(matrix).any():
        mid = np.nanmean(matrix)
        for i in range(rows):
            for j in range(cols):
                v = matrix[i, j]
                if np.isfinite(v):
                    color = "black" if v > mid else "white"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    return fig
