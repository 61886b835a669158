"""The logistic-regression floor: the experiment's own pipeline with only the linear term.

``mtrec baseline --config C --out R`` trains :func:`floor_config` of the experiment: the
same data, hashing, frequency filter, normalisation, training loop and run directory, with
a model that is one logistic regression per task over the one-hot hashed ids and the
normalised numerics (``model.deep: false``, ``model.linear.enabled: true``). The run's
``config.yaml`` records both keys, so ``evaluate``, ``export`` and ``compare`` read it like
any run, and ``mtrec evaluate --run R_MODEL --floor R`` sets the model beside it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mtrec.config import ExperimentConfig

__all__ = ["FLOOR_MIN_EPOCHS", "FLOOR_SUFFIX", "floor_config", "train_floor"]

# appended to the experiment's name, so `mtrec compare` tells the floor from the model
FLOOR_SUFFIX = "-floor"
# the floor trains until valid stops improving (patience >= 2) for at least this many
# epochs: with the deep model's budget (e.g. 4) its best epoch was the last (default
# preset, 60k rows: best epoch 6-7 of 20, mean test AUC 0.7604 -> 0.7648); a linear
# epoch costs little
FLOOR_MIN_EPOCHS = 20


def floor_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the deep part off and the linear term on (a copy; the ESMM chain,
    task weights, data and training settings stay as they are). The numerics enter as
    the normalised values alone (``numeric_bins: 0``): the floor is the one-hot logistic
    regression, not one with piecewise-linear numeric shapes, and without the dense weight
    average (``training.ema_decay: null``). It trains for at least
    :data:`FLOOR_MIN_EPOCHS` epochs with early stopping patience >= 2 (patience 0, never
    stop, stays 0): a floor left under-trained flatters the model beside it."""
    out = copy.deepcopy(cfg)
    out.model.deep = False
    out.model.linear.enabled = True
    out.model.embedding.numeric_bins = 0
    # a plain regression trained to its optimum: no dense weight average (its few dense
    # weights, the numerics' slopes and the biases, converge; nothing to smooth)
    out.training.ema_decay = None
    out.training.epochs = max(out.training.epochs, FLOOR_MIN_EPOCHS)
    if out.training.early_stopping_patience:
        out.training.early_stopping_patience = max(out.training.early_stopping_patience, 2)
    if not out.name.endswith(FLOOR_SUFFIX):
        out.name = out.name + FLOOR_SUFFIX
    return out


def train_floor(
    cfg: ExperimentConfig, out: str | Path | None = None, *, resume: bool = False
) -> dict[str, Any]:
    """Train the floor of ``cfg`` into ``out`` (local loop); returns ``train``'s summary."""
    from mtrec.train.loop import train

    return train(floor_config(cfg), out, resume=resume)
