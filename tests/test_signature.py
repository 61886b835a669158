"""The typed export signature (:mod:`mtrec.export.signature`): the one definition the
exporter writes and the serving client reads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mtrec.export.errors import ExportError
from mtrec.export.signature import NumericFeature, Signature, SparseFeature

FULL = Signature(
    sparse_features=[
        SparseFeature("user", "user_id", "categorical", min_count=3),
        SparseFeature("tags", "tags", "multi_hot", delimiter="|", pooling="mean"),
    ],
    numeric_features=[NumericFeature("age", "age", "log1p_standardize", 1.5, 0.25)],
    tasks=["click", "like"],
    config_hash="abc",
    trained_epoch=2,
    requires=["torch"],
    chain=["click", "like"],
    model={"embedding": "unified", "interaction": "none", "multitask": "mmoe"},
    hash={"name": "fnv1a64-fmix64", "missing_id": 0, "examples": [{"value": None, "id": 0}]},
)


def test_json_round_trip_is_exact() -> None:
    text = FULL.to_json()
    back = Signature.from_json(text)
    assert back.to_dict() == FULL.to_dict() and back.to_json() == text
    assert back.sparse_features[1] == SparseFeature("tags", "tags", "multi_hot", "|", "mean", 0)
    assert back.numeric_features[0].mean == 1.5 and back.sparse_names == ["user", "tags"]


def test_the_mapping_view_is_the_json_form() -> None:
    raw = json.loads(FULL.to_json())
    assert FULL == raw and dict(FULL) == raw
    assert FULL["tasks"] == ["click", "like"] and FULL.get("nope", 7) == 7
    assert FULL["sparse_features"][0] == {
        "name": "user",
        "column": "user_id",
        "kind": "categorical",
        "delimiter": None,
        "pooling": "sum",
        "min_count": 3,
    }


def test_a_minimal_dict_parses_with_defaults_and_unknown_keys_are_ignored() -> None:
    sig = Signature.from_dict(
        {
            "sparse_features": [{"name": "u", "column": "u", "kind": "categorical"}],
            "numeric_features": [],
            "tasks": ["click"],
            "added_later": {"x": 1},
        }
    )
    assert sig.sparse_features[0].pooling == "sum" and sig.data_format == "parquet"
    # an export that predates the key: its graph called FBGEMM operators
    assert sig.requires == ["torch", "fbgemm_gpu"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"numeric_features": [], "tasks": []}, "missing or bad entry 'sparse_features'"),
        ({"sparse_features": [{"name": "u"}], "numeric_features": [], "tasks": []}, r"sparse\[0\]"),
        ({"sparse_features": {}, "numeric_features": [], "tasks": []}, "must be a list"),
        ({"sparse_features": [], "numeric_features": [], "tasks": "click"}, "'tasks' must be"),
        ([1, 2], "expected an object"),
    ],
)
def test_malformed_signatures_name_the_entry(raw: object, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        Signature.from_dict(raw)  # type: ignore[arg-type]


def test_the_client_module_imports_no_torchrec() -> None:
    code = "import sys, mtrec.export.signature; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # standard library only
