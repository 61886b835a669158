"""Scoring a split moved to :mod:`mtrec.scoring` (the training loop validates with it too)."""

from mtrec.scoring import collect_scores, evaluate_split, score_batches

__all__ = ["collect_scores", "evaluate_split", "score_batches"]
