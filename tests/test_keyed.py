"""values_in_order: pooled values of a (sharded) collection in the caller's key order."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

from mtrec.embeddings.keyed import values_in_order


def _rank_ordered() -> KeyedTensor:
    """Features f0..f3 (widths 2, 1, 2, 1) as a sharded collection over ranks 0 1 0 1
    returns them: f0 f2 f1 f3; every column holds its feature's index."""
    widths = {"f0": 2, "f1": 1, "f2": 2, "f3": 1}
    keys = ["f0", "f2", "f1", "f3"]
    values = torch.cat([torch.full((3, widths[k]), float(k[1])) for k in keys], 1)
    return KeyedTensor(keys=keys, length_per_key=[widths[k] for k in keys], values=values)


def test_reorders_the_columns_by_key() -> None:
    got = values_in_order(_rank_ordered(), ["f0", "f1", "f2", "f3"])
    expected = torch.tensor([0.0, 0.0, 1.0, 2.0, 2.0, 3.0]).expand(3, -1)
    assert torch.equal(got, expected)


def test_the_collection_order_is_read_as_is() -> None:
    kt = _rank_ordered()
    assert values_in_order(kt, ["f0", "f2", "f1", "f3"]) is kt.values()


def test_scripted_equals_eager() -> None:
    scripted = torch.jit.script(values_in_order)
    keys = ["f0", "f1", "f2", "f3"]
    assert torch.equal(scripted(_rank_ordered(), keys), values_in_order(_rank_ordered(), keys))


def test_gradients_return_to_their_own_columns() -> None:
    kt = _rank_ordered()
    source = kt.values().clone().requires_grad_(True)
    ordered = values_in_order(
        KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(), values=source),
        ["f0", "f1", "f2", "f3"],
    )
    # weight each output column by its position: f0 f0 f1 f2 f2 f3 → 0 1 2 3 4 5
    (ordered * torch.arange(6.0)).sum().backward()
    assert source.grad is not None
    # source columns are f0 f0 f2 f2 f1 f3: their output positions 0 1 3 4 2 5
    assert torch.equal(source.grad, torch.tensor([0.0, 1.0, 3.0, 4.0, 2.0, 5.0]).expand(3, -1))
