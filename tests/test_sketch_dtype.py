"""The index's gradient sketch stored in float16 / bfloat16 (``--sketch_dtype``): per-row scaling round trip within
the dtype's unit roundoff, no overflow or underflow; a float16 index answers queries like the float32 one (scores
within the dtype's error, the same top-k) on the digits logistic regression; the manifest records dtype and scaling;
the sketch column's bytes per example halve; an index written before the option (no dtype) reads as float32."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_influence import options as O
from beam_influence.beam.index import read_index_table, read_manifest
from beam_influence.beam.outputs import read_jsonl
from beam_influence.beam.project import encode_sketch_column, sketch_matrix, sketch_storage
from beam_influence.core.estimate import EigensystemArgs
from beam_influence.core.sketch import (STORAGE_DTYPES, UNIT_ROUNDOFF, decode_rows, encode_rows, storage_bytes)
from beam_influence.formats import write_records
from pipelines import index, query, self_influence

K = 5
D = 256  # < p = 650: a real CountSketch


def _rows(n=64, d=300, seed=0):
    """Rows whose magnitudes span 1e-30 … 1e30 (float16 itself would underflow / overflow), one zero row,
    one row with a single non-zero."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, d)) * np.logspace(-30, 30, n)[:, None]
    s[5] = 0.0
    s[6] = 0.0
    s[6, 7] = -3e-20
    return s.astype(np.float32)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_round_trip_error_is_within_the_dtype_roundoff_per_row(dtype):
    s = _rows()
    codes, scales = encode_rows(s, dtype)
    back = decode_rows(codes, scales)
    assert back.dtype == np.float32 and back.shape == s.shape and np.all(np.isfinite(back))
    if dtype == "float32":
        assert scales is None and np.array_equal(back, s)
        return
    assert codes.dtype.itemsize == 2 and scales.dtype == np.float32
    assert np.all(np.abs(codes.astype(np.float32)) <= 1.0)
    s64 = s.astype(np.float64)
    row_max = np.max(np.abs(s64), axis=1)
    np.testing.assert_array_equal(scales, row_max.astype(np.float32))
    err = np.max(np.abs(back - s64), axis=1)
    # half an ulp of the code (relative to the row's max), plus float16's subnormal spacing and one float32 rounding
    bound = (UNIT_ROUNDOFF[dtype] + 2.0 ** -24 + (2.0 ** -25 if dtype == "float16" else 0.0)) * row_max
    assert np.all(err <= bound * (1 + 1e-6)), (err / np.where(row_max > 0, row_max, 1)).max()
    assert np.all(back[5] == 0) and back[6, 7] == np.float32(-3e-20) and np.count_nonzero(back[6]) == 1
    # the typical (not worst) relative error is what the dtype promises: float16 ~1e-4, bfloat16 ~1e-3
    rel = np.linalg.norm(back - s64, axis=1)[row_max > 0] / np.linalg.norm(s64, axis=1)[row_max > 0]
    assert np.median(rel) < 2 * UNIT_ROUNDOFF[dtype]
    with pytest.raises(ValueError, match="non-finite"):
        encode_rows(np.array([[1.0, np.inf]], np.float32), dtype)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_the_parquet_column_round_trips_and_is_self_describing(dtype, tmp_path):
    s = _rows(n=40, d=96, seed=1)
    table = pa.table({"id": pa.array([str(i) for i in range(len(s))]),
                      "sketch": pa.FixedSizeListArray.from_arrays(pa.array(s.ravel()), s.shape[1])})
    enc = encode_sketch_column(table, dtype)
    path = str(tmp_path / "part.parquet")
    pq.write_table(enc, path)
    pf = pq.ParquetFile(path)
    assert sketch_storage(pf.schema_arrow) == dtype
    for batch in pf.iter_batches(batch_size=16):  # batches keep the field metadata and slice offsets
        ids = np.asarray(batch.column(0).to_pylist(), int)
        np.testing.assert_array_equal(sketch_matrix(batch), decode_rows(*encode_rows(s[ids], dtype)))
    if dtype != "float32":
        assert enc.column_names == ["id", "sketch", "sketch_scale"]
        with pytest.raises(ValueError, match="sketch_scale"):
            sketch_matrix(enc.drop_columns(["sketch_scale"]))
        assert storage_bytes(1024, dtype) == 2052
    else:
        assert enc is table and storage_bytes(1024, dtype) == 4096


def test_the_option_is_declared_once_with_its_choices():
    assert O.IndexOptions.__dataclass_fields__["sketch_dtype"].default == "float16"  # since the exact rerank
    with pytest.raises(O.OptionsError, match="--sketch_dtype must be one of float32, float16, bfloat16"):
        O.IndexOptions(spec="a:b", checkpoint="c", eigensystem="e", train_data="t", index_dir="i",
                       sketch_dtype="float64")


# ---- the jobs on the digits logistic regression (p = 650, d = 256) ----------------------------------------
@pytest.fixture(scope="module")
def dws(tmp_path_factory, logreg_trained, logreg_files):
    t = logreg_trained
    root = tmp_path_factory.mktemp("sketch_dtype")
    write_records(t.data.train[:600], str(root / "train"), "parquet", num_shards=2)
    write_records(t.data.test[:12], str(root / "test"), "parquet", num_shards=1)
    _, model = logreg_files(root, EigensystemArgs(num_iters=40, top_k=12, batch_size=4096))
    out = {}
    for dtype in ("float32", "float16"):
        idx = str(root / f"index_{dtype}")
        index.run(model + ["--train_data", str(root / "train-*"), "--index_dir", idx, "--sketch_dim", str(D),
                           "--sketch_dtype", dtype])
        q = str(root / f"q_{dtype}")
        summary = query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", idx, "--output", q,
                                     "--top_k", str(K)])
        out[dtype] = {"index": idx, "query": q, "summary": summary}
    return root, model, out


def _lists(path):
    got = {}
    for r in read_jsonl(os.path.join(path, "topk.jsonl")):
        got.setdefault((r["query_id"], r["kind"]), []).append((r["rank"], r["train_id"], r["score"]))
    return {key: sorted(v) for key, v in got.items()}


def _sketch_bytes_per_row(index_dir) -> tuple[float, float]:
    """(stored, before compression) bytes per indexed example of the sketch columns (``sketch``, ``sketch_scale``),
    from the part files' Parquet metadata."""
    m = read_manifest(index_dir)
    stored = raw = 0
    for s in m["shards"]:
        meta = pq.ParquetFile(os.path.join(index_dir, s["path"])).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                if col.path_in_schema.split(".")[0] in ("sketch", "sketch_scale"):
                    stored += col.total_compressed_size
                    raw += col.total_uncompressed_size
    return stored / m["rows"], raw / m["rows"]


def test_manifest_records_dtype_and_scaling(dws):
    _, _, out = dws
    sk32 = read_manifest(out["float32"]["index"])["args"]["sketch"]
    sk16 = read_manifest(out["float16"]["index"])["args"]["sketch"]
    assert sk32 == {"dim": D, "requested": D, "seed": 0, "method": "count", "space": "gradient", "dtype": "float32",
                    "scaling": "none", "bytes_per_example": 4 * D}
    assert sk16 == {**sk32, "dtype": "float16", "scaling": "row_max_abs", "bytes_per_example": 2 * D + 4}
    t = read_index_table(out["float16"]["index"], ["id", "sketch"])  # sketch_scale comes along
    assert t.column_names == ["id", "sketch", "sketch_scale"] and sketch_storage(t.schema) == "float16"
    assert sketch_matrix(t).shape == (600, D)


def test_float16_index_gives_the_float32_scores_and_top_k(dws):
    _, _, out = dws
    a, b = _lists(out["float32"]["query"]), _lists(out["float16"]["query"])
    assert a.keys() == b.keys() and len(a) == 2 * 12
    s32 = np.array([s for v in a.values() for _, _, s in v])
    s16 = np.array([s for v in b.values() for _, _, s in v])
    for key in a:
        assert [t for _, t, _ in a[key]] == [t for _, t, _ in b[key]], key  # the same top-k, same order
    # relative to the largest score: a few units of float16's roundoff (2⁻¹¹ ≈ 4.9e-4), far from float32's
    rel = np.max(np.abs(s16 - s32)) / np.max(np.abs(s32))
    assert 0 < rel < 4 * UNIT_ROUNDOFF["float16"], rel
    assert out["float16"]["summary"]["complement"]["mode"] == "sketch"
    assert out["float16"]["summary"]["index_sketch"]["dtype"] == "float16"
    # the index's sketch decoded against the float32 index's: per row within the dtype's roundoff of its max
    t32 = read_index_table(out["float32"]["index"], ["id", "sketch"])
    t16 = read_index_table(out["float16"]["index"], ["id", "sketch"])
    order32 = np.argsort(t32.column("id").to_pylist())
    order16 = np.argsort(t16.column("id").to_pylist())
    x32, x16 = sketch_matrix(t32)[order32], sketch_matrix(t16)[order16]
    err = np.max(np.abs(x16 - x32), axis=1) / np.max(np.abs(x32), axis=1)
    assert np.all(err <= (UNIT_ROUNDOFF["float16"] + 2.0 ** -23))


def test_sketch_column_bytes_per_example_halve(dws):
    _, _, out = dws
    (s32, r32), (s16, r16) = (_sketch_bytes_per_row(out[d]["index"]) for d in ("float32", "float16"))
    assert 4 * D <= r32 <= 4 * D + 8, r32  # before compression: 4 bytes a float (+ list levels)
    assert 2 * D + 4 <= r16 <= 2 * D + 8, r16  # codes + the float32 scale, no statistics of the codes
    # stored (snappy): the LR's sparse gradients leave empty buckets, so float32 compresses a little, float16 less
    assert s16 <= 2 * D + 8 and s16 / s32 < 0.65, (s16, s32)


def test_an_index_without_dtype_in_its_manifest_reads_as_float32(dws, tmp_path):
    """An index written before the option: the manifest's sketch has no dtype/scaling and the column is float32."""
    import shutil

    root, model, out = dws
    old = str(tmp_path / "old_index")
    shutil.copytree(out["float32"]["index"], old)
    path = os.path.join(old, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["args"]["sketch"] = {k: manifest["args"]["sketch"][k] for k in ("dim", "requested", "seed", "method")}
    with open(path, "w") as f:
        json.dump(manifest, f)
    q = str(tmp_path / "q_old")
    summary = query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", old, "--output", q,
                                 "--top_k", str(K)])
    assert summary["complement"]["mode"] == "sketch" and summary["index_sketch"]["dtype"] == "float32"
    assert _lists(q) == _lists(out["float32"]["query"])


def test_self_influence_reads_a_float16_index(dws, tmp_path):
    """Self-influence uses the exact ‖∇ℓ‖², never the sketch: the float16 index gives the float32 index's list."""
    root, model, out = dws
    got = {}
    for dtype in ("float32", "float16"):
        o = str(tmp_path / f"s_{dtype}")
        self_influence.run(model + ["--index_dir", out[dtype]["index"], "--output", o, "--self_influence_top", "20"])
        got[dtype] = [(r["id"], r["self_influence"]) for r in read_jsonl(os.path.join(o, "self_influence_top.jsonl"))]
    assert got["float16"] == got["float32"]


def test_audit_stores_float16_sketches_and_answers_like_float32(tmp_path, logreg_trained, logreg_files):
    """The audit config's sketch_dtype (the index option, same declaration) reaches every shard index; its standing
    queries' lists equal those of a float32 audit."""
    from pipelines import audit

    t = logreg_trained
    root = tmp_path / "ws"
    root.mkdir()
    write_records(t.data.train[:400], str(root / "train"), "parquet", num_shards=2)
    write_records(t.data.test[:6], str(root / "queries"), "parquet", num_shards=1)
    _, model = logreg_files(root, EigensystemArgs(num_iters=30, top_k=10, batch_size=2048, residuals=False))
    flags = dict(zip(model[::2], model[1::2]))
    lists, manifests = {}, {}
    for dtype in ("float32", "float16"):
        cfg = {"audit_root": str(tmp_path / f"audit_{dtype}"), "spec": flags["--spec"],
               "checkpoint": flags["--checkpoint"], "eigensystem": flags["--eigensystem"],
               "train_data": [str(root / "train-*.parquet")], "standing_queries": str(root / "queries-*.parquet"),
               "top_k": K, "self_influence_top": 10, "batch_rows": 256, "beam_args": ["--runner=FnApiRunner"],
               "sketch_dim": D, "sketch_dtype": dtype}
        path = tmp_path / f"audit_{dtype}.json"
        path.write_text(json.dumps(cfg))
        report = audit.run(["--config", str(path)])
        lists[dtype] = _lists(report["run_dir"])
        found = [os.path.join(d, f) for d, _, fs in os.walk(cfg["audit_root"]) for f in fs if f == "manifest.json"]
        assert len(found) == 2
        manifests[dtype] = [json.load(open(f))["args"]["sketch"] for f in found]
    assert all(m["dtype"] == "float16" and m["scaling"] == "row_max_abs" for m in manifests["float16"])
    assert all(m["dtype"] == "float32" for m in manifests["float32"])
    assert lists["float16"].keys() == lists["float32"].keys() and len(lists["float32"]) == 12
    for key, rows in lists["float32"].items():
        assert [r[1] for r in rows] == [r[1] for r in lists["float16"][key]], key
