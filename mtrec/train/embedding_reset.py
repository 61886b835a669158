"""MEDA: the deep model's embedding tables drawn afresh at the start of every epoch after
the first (``training.reset_embeddings_each_epoch``).

Deep CTR models over-fit their id embeddings from the second pass over the data on (the
"one-epoch phenomenon"). MEDA (Fan et al., 2024, "Multi-Epoch learning with Data
Augmentation for Deep Click-Through Rate Prediction", its non-continual form) re-initialises
the embedding layer at the start of every epoch while the dense layers keep training:
each epoch's embeddings learn from one pass over the data, and the layers above meet a new
embedding space every epoch, which augments their data.

What is reset: every table of the deep model's embedding collections (every collection but
the linear term's, ``LINEAR_PREFIX``) to a new draw from the table's initial distribution
(uniform in its ``weight_init_min`` / ``weight_init_max``, torchrec's default init), and
its row-wise Adagrad state to zero. The linear term's per-id weights keep training: one
shrunk weight per id and task is a regression that needs the passes to converge, not a
row feeding an MLP (``docs/generalisation.md``).

The draw depends on the seed and the epoch only: not on the global generator (the epoch's
dropout stream is untouched) nor on where the tables live. A sharded run draws every whole
table on every rank and copies its own shards, so a local, a resumed and a Ray run reset
alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from mtrec.train.optim import LINEAR_PREFIX

__all__ = ["clear_sparse_state", "deep_tables", "fresh_tables"]


def deep_tables(paths: Iterable[str]) -> list[str]:
    """The module paths, of ``paths``, of the deep model's embedding collections (the ones
    MEDA resets): all but the linear term's."""
    return [p for p in paths if not p.startswith(LINEAR_PREFIX)]


def _generator(seed: int, epoch: int) -> torch.Generator:
    # a stream of its own: the loop seeds the global generator with seed * 1000 + epoch
    # for dropout, and the same seed here would replay dropout's first draws as weights
    digest = hashlib.sha256(f"mtrec/embedding-reset/{seed}/{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def fresh_tables(
    collections: Mapping[str, Iterable[EmbeddingBagConfig]], seed: int, epoch: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """New weights of the deep tables for ``epoch``, one table at a time (one table's
    memory at once, not all of them).

    Args:
        collections: module path → the collection's table configs, in the model's order
            (the linear term's are skipped).
        seed: the experiment's seed.
        epoch: the 0-based epoch about to start.

    Yields:
        ``(key, weight)``: ``key`` is ``{path}.embedding_bags.{table}.weight`` (the
        table's state-dict key under the model), ``weight`` a float32
        ``num_embeddings x embedding_dim`` tensor.
    """
    gen = _generator(seed, epoch)
    for path in deep_tables(collections):
        for table in collections[path]:
            weight = torch.empty(table.num_embeddings, table.embedding_dim)
            weight.uniform_(table.get_weight_init_min(), table.get_weight_init_max(), generator=gen)
            yield f"{path}.embedding_bags.{table.name}.weight", weight


def clear_sparse_state(states: Iterable[Mapping[str, object]]) -> None:
    """Zero every tensor of fused-optimizer states (row-wise Adagrad's accumulators), in
    place: a fresh table starts its steps as a new one does."""
    with torch.no_grad():
        for state in states:
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()
