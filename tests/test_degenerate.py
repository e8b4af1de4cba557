"""Degenerate records (issue 21, class 3): a sequence shorter than its feature's ``min_length`` is a dead letter
with the reason (the built-in sequence specs declare 1: an empty target has a loss and gradient of exactly 0);
a record whose loss is constant in θ (zero gradient) is counted by the index job, never silently ranked last."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from beam_influence.beam.index import ENTRIES, WriteIndexPartFn, collect
from beam_influence.beam.project import ProjectedChunk
from beam_influence.core.model_spec import FeatureSpec
from beam_influence.models import sequence


@pytest.mark.parametrize("make,short", [(sequence.translation, ("src", "tgt")), (sequence.lm, ("prompt", "completion"))])
def test_builtin_sequence_specs_reject_empty_sequences_with_the_reason(make, short):
    spec = make()
    ok = {k: [5, 6, sequence.EOS] for k in spec.features}
    rows = [dict(ok, id="good")] + [dict(ok, id=f"empty-{k}", **{k: []}) for k in short]
    dec = spec.decode_batch(pa.RecordBatch.from_pylist(rows))
    assert dec.ids.tolist() == ["good"]
    reasons = {rid: reason for _, rid, reason in dec.rejected}
    for k in short:
        assert f"feature {k!r} has length 0, shorter than its minimum length 1" in reasons[f"empty-{k}"]
    with pytest.raises(ValueError, match="minimum length 1"):
        spec.decode(dict(ok, **{short[-1]: []}))


def test_min_length_is_checked_where_it_is_declared():
    fs = FeatureSpec(shape=(None,), dtype="int32", buckets=(4, 8), min_length=3)
    assert fs.min_length == 3
    with pytest.raises(ValueError, match="sequence features only"):
        FeatureSpec(shape=(2,), dtype="float32", min_length=1)
    with pytest.raises(ValueError, match="exceeds its largest bucket"):
        FeatureSpec(shape=(None,), dtype="int32", buckets=(4,), min_length=5)
    with pytest.raises(ValueError, match="int ≥ 0"):
        FeatureSpec(shape=(None,), dtype="int32", buckets=(4,), min_length=-1)
    from beam_influence.core.decode import decode_columns

    batch = pa.RecordBatch.from_pylist([{"id": "a", "t": [1, 2]}, {"id": "b", "t": [1, 2, 3]}, {"id": "c", "t": None}])
    dec = decode_columns({"t": fs}, batch)
    assert dec.ids.tolist() == ["b"]
    reasons = dict((rid, r) for _, rid, r in dec.rejected)
    assert "has length 2, shorter than its minimum length 3" in reasons["a"]
    assert "missing" in reasons["c"]  # a null row is missing, not "too short"


def _chunk(ids, sq, offset=0):
    n = len(ids)
    table = pa.table({"id": pa.array(ids, pa.string()), "loss": pa.array(np.ones(n)),
                      "grad_sq_norm": pa.array(np.asarray(sq, np.float64))})
    return ProjectedChunk("src.jsonl", offset, n, table)


def test_zero_gradient_rows_are_counted_in_the_manifest(tmp_path):
    """Rows with ∇ℓ = 0 exactly are counted per part and in total, with their first ids; the "jvp" method's NaN
    norms mean "not known" (None), never zero."""
    fn = WriteIndexPartFn(str(tmp_path))
    entries = list(fn.process(_chunk(["a", "b", "c"], [0.5, 0.0, 2.0])))
    entries += list(fn.process(_chunk(["d", "e"], [0.0, 0.0], offset=3)))
    (tmp_path / (ENTRIES + ".jsonl")).write_text("".join(json.dumps(e) + "\n" for e in entries))
    got = collect(str(tmp_path))
    assert got["zero_gradient_rows"] == 3 and got["zero_gradient_ids"] == ["b", "d", "e"] and got["rows"] == 5
    nan = list(fn.process(_chunk(["f"], [float("nan")], offset=9)))
    assert "zero_gradient" not in nan[0]
    (tmp_path / (ENTRIES + ".jsonl")).write_text(json.dumps(nan[0]) + "\n")
    assert collect(str(tmp_path))["zero_gradient_rows"] is None
