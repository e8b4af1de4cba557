"""beam_influence.formats: the four formats agree (records and ids), bad input becomes error records,
writers round-trip (ported from test_io); plus the columnar API: Parquet splits, truncated gzip, strict
matching, counts, chunk sizes, column conventions, and the Arrow fast paths agreeing with the
per-record reference."""
from __future__ import annotations

import gzip
import importlib.util
import io
import json
import math
import pickle
import sys
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_influence.formats import (
    ERROR_KEY,
    FORMATS,
    MAX_RAW,
    RAW_KEY,
    Chunk,
    ErrorRecord,
    Split,
    canonical_record,
    derive_id,
    error_record,
    infer_format,
    is_error_record,
    iter_chunks,
    iter_records,
    match_files,
    read_records,
    read_split,
    shard_basename,
    splits,
    write_records,
    write_table,
)
from beam_influence.formats import _columns as C
from beam_influence.formats import base as B
from beam_influence.cli import main as cli_main
from beam_influence.formats import convert
from beam_influence.formats import tfrecord as T
from beam_influence.formats.convert import convert_digits

HAS_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="TFRecord needs the beam-influence[tf] extra")
AVAILABLE = [f for f in FORMATS if f != "tfrecord" or HAS_TF]
ALL_FORMATS = [pytest.param(f, marks=needs_tf) if f == "tfrecord" else f for f in FORMATS]


def _value_key(v):
    if isinstance(v, np.ndarray):
        return ("array", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, bool):  # tf.Example has no bools: compare them as 0/1
        return ("int", int(v))
    if isinstance(v, float) and math.isnan(v):
        return ("nan",)
    if isinstance(v, list):
        return ("list", tuple(_value_key(x) for x in v))
    return (type(v).__name__, v)


def _norm(rec):
    """A hashable, order-free, exact form of a record (arrays by dtype, shape and bytes; scalars by type)."""
    return (rec["id"], tuple(sorted((k, _value_key(v)) for k, v in rec.items())))


def _sample(n=7, ids=True):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        rec = {"x": rng.random(64, dtype=np.float32), "y": int(i % 10), "true_y": int((i + 3) % 10),
               "flipped": bool(i % 3 == 0)}
        if ids:
            rec = {"id": f"ex-{i:03d}", **rec}
        out.append(rec)
    return out


def _canonical(rec):
    return canonical_record(rec, rec.get("id", ""))


def _write_lines(path, lines: list[bytes]):
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return str(path)


def _chunks(path, fmt=None, **kw):
    return [c for s in splits(path, fmt, rows_per_split=kw.pop("rows_per_split", 65536))
            for c in read_split(s, **kw)]


def _check_chunks(chunks):
    """Chunk invariants: contiguous, id column first (string, non-null), errors inside the range."""
    for c in chunks:
        assert isinstance(c, Chunk) and isinstance(c.batch, pa.RecordBatch)
        f0 = c.batch.schema.field(0)
        assert f0.name == "id" and f0.type == pa.string() and not f0.nullable
        assert c.batch.column(0).null_count == 0
        for e in c.errors:
            assert isinstance(e, ErrorRecord) and len(e.raw) <= MAX_RAW
            assert e.offset is None or c.offset <= e.offset < c.offset + c.records
    return chunks


# ---- names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, fmt, base", [
    ("gs://b/d/train-00000-of-00002.parquet", "parquet", "train-00000-of-00002"),
    ("/d/a.jsonl", "jsonl", "a"), ("a.json", "jsonl", "a"), ("a.jsonl.gz", "jsonl", "a"),
    ("a.npz", "npz", "a"), ("a.tfrecord", "tfrecord", "a"), ("a.tfrec", "tfrecord", "a"),
    ("a.tfrecords.gz", "tfrecord", "a"), ("A.PARQUET", "parquet", "A"),
])
def test_infer_format_and_shard_basename(path, fmt, base):
    assert infer_format(path) == fmt
    assert shard_basename(path) == base
    assert derive_id(path, 3) == f"{base}:3"


@pytest.mark.parametrize("path", ["a.csv", "a.npz.gz", "a.parquet.gz", "parquet"])
def test_infer_format_rejects(path):
    with pytest.raises(ValueError):
        infer_format(path)


def test_formats_come_from_the_registry():
    assert FORMATS == ("parquet", "jsonl", "npz", "tfrecord") == B.registered_formats()
    with pytest.raises(ValueError, match="already registered"):
        B.register(T.TFRecord)


# ---- the four formats agree ------------------------------------------------------------------------
def test_formats_agree_with_given_ids(tmp_path):
    recs = _sample(11)
    expected = [_norm(_canonical(r)) for r in recs]
    for fmt in AVAILABLE:
        paths = write_records(recs, str(tmp_path / fmt / "data"), fmt, num_shards=3)
        got = read_records(str(tmp_path / fmt / "data-*"))
        assert [_norm(r) for r in got] == expected, fmt
        r0 = got[0]
        assert r0["id"] == "ex-000" and isinstance(r0["y"], int)
        assert isinstance(r0["x"], np.ndarray) and r0["x"].dtype == np.float32 and r0["x"].shape == (64,)
        np.testing.assert_array_equal(r0["x"], recs[0]["x"])
        assert len(paths) == 3


def test_formats_agree_with_derived_ids(tmp_path):
    recs = _sample(5, ids=False)
    ids_by_format = {}
    for fmt in AVAILABLE:
        write_records(recs, str(tmp_path / fmt / "data"), fmt, num_shards=2)
        got = read_records(str(tmp_path / fmt / "*"))
        assert not any(is_error_record(r) for r in got)
        ids_by_format[fmt] = [r["id"] for r in got]
        assert [_norm({**r, "id": ""}) for r in got] == [_norm(_canonical(r)) for r in recs]
    want = ["data-00000-of-00002:0", "data-00000-of-00002:1", "data-00000-of-00002:2",
            "data-00001-of-00002:0", "data-00001-of-00002:1"]
    assert all(ids == want for ids in ids_by_format.values()), ids_by_format


# ---- write -> read round trips ------------------------------------------------------------------------
def _rich(n=4):
    out = []
    for i in range(n):
        out.append({
            "id": f"r{i}",
            "img": np.arange(6, dtype=np.float32).reshape(2, 3) * (i + 1) / 8,
            "counts": [i, -i, 2**40],
            "mask": np.array([True, i % 2 == 0]),
            "tags": ["a", f"t{i}"],
            "label": i - 2,
            "weight": 0.25 * i,
            "name": f"example {i} ✓",
            "ok": i % 2 == 1,
            "empty": np.zeros(0, np.float32),
        })
    return out


def _expected_after(fmt, rec):
    canon = _canonical(rec)
    if fmt != "tfrecord":
        return canon
    # tf.train.Example: arrays flattened, bools as int64.
    out = {}
    for k, v in canon.items():
        if isinstance(v, np.ndarray):
            v = v.ravel().astype(np.int64 if v.dtype.kind in "bi" else np.float32)
        out[k] = int(v) if isinstance(v, bool) else v
    return out


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_roundtrip(tmp_path, fmt):
    recs = _rich()
    paths = write_records(recs, str(tmp_path / "rich"), fmt, num_shards=2)
    got = [r for p in paths for r in iter_records(p)]
    assert [_norm(r) for r in got] == [_norm(_expected_after(fmt, r)) for r in recs]
    if fmt != "tfrecord":
        assert got[1]["img"].shape == (2, 3) and got[1]["mask"].dtype == bool and got[1]["ok"] is True
    assert got[1]["counts"].dtype == np.int64 and got[1]["tags"] == ["a", "t1"]
    assert got[1]["name"] == "example 1 ✓" and got[1]["weight"] == 0.25


@pytest.mark.parametrize("fmt", ["jsonl", pytest.param("tfrecord", marks=needs_tf)])
def test_gzip_roundtrip(tmp_path, fmt):
    recs = _sample(4)
    paths = write_records(recs, str(tmp_path / "z"), fmt, compression="gzip")
    assert paths == [str(tmp_path / f"z-00000-of-00001.{fmt}.gz")]
    with gzip.open(paths[0]) as f:
        assert f.read(1)  # really gzip
    assert [_norm(r) for r in read_records(paths[0])] == [_norm(_canonical(r)) for r in recs]
    assert read_records(paths[0])[0]["id"] == "ex-000"


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_sharding_is_contiguous_and_empty_shards_read(tmp_path, fmt):
    recs = _sample(5)
    paths = write_records(recs, str(tmp_path / "s"), fmt, num_shards=3)
    ext = {"parquet": "parquet", "jsonl": "jsonl", "npz": "npz", "tfrecord": "tfrecord"}[fmt]
    assert paths == [str(tmp_path / f"s-{i:05d}-of-00003.{ext}") for i in range(3)]
    assert [[r["id"] for r in iter_records(p)] for p in paths] == [["ex-000", "ex-001"], ["ex-002", "ex-003"],
                                                                  ["ex-004"]]
    paths = write_records(recs[:1], str(tmp_path / "e"), fmt, num_shards=3)
    assert [len(list(iter_records(p))) for p in paths] == [1, 0, 0]
    assert [sum(c.records for c in iter_chunks(p)) for p in paths] == [1, 0, 0]


def test_read_records_matching(tmp_path):
    # New: an empty match is an error, wildcard or not.
    with pytest.raises(FileNotFoundError, match="nothing-"):
        read_records(str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(ValueError, match="infer"):
        read_records(str(tmp_path / "*.csv"))
    with pytest.raises(ValueError, match="infer"):
        iter_chunks(str(tmp_path / "*.csv"))  # checked at the call, not at the first next()
    with pytest.raises(ValueError, match="unknown record format"):
        iter_records(str(tmp_path / "a.csv"), format="csv")


def test_match_files(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.parquet"):
        (tmp_path / name).write_text("")
    (tmp_path / "sub").mkdir()
    assert match_files(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert match_files(str(tmp_path / "c.parquet")) == [str(tmp_path / "c.parquet")]
    for pattern in (tmp_path / "x-*.jsonl", tmp_path / "?.npz", tmp_path / "sub" / "*"):
        with pytest.raises(FileNotFoundError, match="no files match") as e:
            match_files(str(pattern))
        assert str(pattern) in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        match_files(str(tmp_path / "nope.parquet"))
    assert "nope.parquet" in str(e.value)


def test_writers_reject_bad_records(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        write_records([{"id": "a", "x": 1}, {"id": "b"}], str(tmp_path / "n"), "npz")
    with pytest.raises(ValueError, match="error record"):
        write_records([error_record("a", "bad")], str(tmp_path / "j"), "jsonl")
    with pytest.raises(ValueError, match="ragged|regular"):
        write_records([{"x": [[1, 2], [3]]}], str(tmp_path / "j"), "jsonl")
    with pytest.raises(ValueError, match="unknown record format"):
        write_records([], str(tmp_path / "j"), "csv")


# ---- bad input -> error records, never exceptions ---------------------------------------------------------
def test_bad_jsonl_lines_become_error_records(tmp_path):
    long_bad = b"{" + b"x" * 50_000
    path = _write_lines(tmp_path / "bad.jsonl", [
        b'{"id": "good", "x": [1, 2], "y": 1}',
        b'{"x": [1, 2], "y": ',        # truncated JSON
        b"",                           # blank: skipped, not a record
        b"[1, 2, 3]",                  # JSON but not an object
        b'{"x": "\xff\xfe"}',          # not UTF-8
        b'{"x": [[1, 2], [3]]}',       # ragged list
        b'{"x": [1, "a"]}',            # a list mixing numbers and strings
        b'{"id": [1], "x": 1}',        # unusable id
        b'{"__error__": "x"}',         # reserved field name
        long_bad,
        b'{"x": 3, "y": 2}',           # good, derived id
    ])
    got = list(iter_records(path))
    assert [r["id"] for r in got] == ["good"] + [f"bad:{i}" for i in range(1, 10)]
    assert [is_error_record(r) for r in got] == [False] + [True] * 8 + [False]
    reasons = [r.get(ERROR_KEY, "") for r in got]
    assert "invalid JSON" in reasons[1] and "object" in reasons[2] and "UTF-8" in reasons[3]
    assert "'x'" in reasons[4] and "'x'" in reasons[5] and "'id'" in reasons[6] and "reserved" in reasons[7]
    assert got[1][RAW_KEY] == '{"x": [1, 2], "y": '
    assert got[3][RAW_KEY] == b'{"x": "\xff\xfe"}'
    assert "invalid JSON" in reasons[8] and len(got[8][RAW_KEY]) == MAX_RAW
    assert got[9] == {"id": "bad:9", "x": 3, "y": 2}
    assert set(got[1]) == {"id", ERROR_KEY, RAW_KEY}
    chunks = _check_chunks(_chunks(path))
    assert sum(c.records for c in chunks) == 10
    assert [e.offset for c in chunks for e in c.errors] == list(range(1, 9))


@needs_tf
def test_corrupt_tfrecord_becomes_error_records(tmp_path):
    good = write_records(_sample(2), str(tmp_path / "g"), "tfrecord")[0]
    with open(good, "rb") as f:
        frames = f.read()
    garbage = io.BytesIO()
    T._framing().write_record(garbage, b"definitely not a tf.Example \xff\xff")
    half = len(frames) // 2  # the two good records are the same size
    path = tmp_path / "c.tfrecord"
    path.write_bytes(frames[:half] + garbage.getvalue() + frames[half:] + frames[:7])  # + torn frame
    got = list(iter_records(str(path)))
    assert [r["id"] for r in got] == ["ex-000", "c:1", "ex-001", "c:3"]
    assert [is_error_record(r) for r in got] == [False, True, False, True]
    assert "tf.train.Example" in got[1][ERROR_KEY] and got[1][RAW_KEY] == b"definitely not a tf.Example \xff\xff"
    assert "framing" in got[3][ERROR_KEY]
    assert sum(c.records for c in _check_chunks(_chunks(str(path)))) == 4
    # Corrupted bytes inside a frame fail its CRC: the rest of the shard is reported, not dropped silently.
    bad = bytearray(frames)
    bad[20] ^= 0xFF
    path.write_bytes(bytes(bad))
    got = list(iter_records(str(path)))
    assert len(got) == 1 and got[0]["id"] == "c:0" and "framing" in got[0][ERROR_KEY]


def test_npz_with_pickled_objects_is_an_error_record(tmp_path):
    np.savez(tmp_path / "obj.npz", id=np.array(["a", "b"]), x=np.array([{"evil": 1}, None], dtype=object))
    got = list(iter_records(str(tmp_path / "obj.npz")))
    assert len(got) == 1 and got[0]["id"] == "obj:file" and "allow_pickle" in got[0][ERROR_KEY]

    (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"x": 1}))
    got = list(iter_records(str(tmp_path / "pickle.npz")))
    assert len(got) == 1 and is_error_record(got[0]) and "allow_pickle" in got[0][ERROR_KEY]

    np.savez(tmp_path / "ragged.npz", id=np.array(["a", "b"]), x=np.zeros((3, 2)))
    got = list(iter_records(str(tmp_path / "ragged.npz")))
    assert len(got) == 1 and "leading lengths" in got[0][ERROR_KEY]

    np.save(tmp_path / "plain.npy", np.zeros(3))
    (tmp_path / "plain.npz").write_bytes((tmp_path / "plain.npy").read_bytes())
    got = list(iter_records(str(tmp_path / "plain.npz")))
    assert len(got) == 1 and "not an .npz archive" in got[0][ERROR_KEY]
    chunks = _check_chunks(_chunks(str(tmp_path / "plain.npz")))
    assert len(chunks) == 1 and chunks[0].records == 1 and chunks[0].errors[0].offset is None


def test_corrupt_parquet_is_an_error_record(tmp_path):
    (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    got = list(iter_records(str(tmp_path / "c.parquet")))
    assert len(got) == 1 and got[0]["id"] == "c:file" and "Parquet" in got[0][ERROR_KEY]
    assert splits(str(tmp_path / "c.parquet")) == [Split(str(tmp_path / "c.parquet"), "parquet", 0)]
    with pytest.raises(FileNotFoundError):
        splits(str(tmp_path / "missing.parquet"))


def test_missing_tensorflow_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "t.tfrecord").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorflow.core.example.example_pb2", None)
    with pytest.raises(ImportError, match=r"beam-influence\[tf\]"):
        list(iter_records(str(tmp_path / "t.tfrecord")))
    with pytest.raises(ImportError, match=r"beam-influence\[tf\]"):
        write_records(_sample(1), str(tmp_path / "w"), "tfrecord")


@needs_tf
def test_tfrecord_interoperates_with_tensorflow(tmp_path):
    import tensorflow as tf

    recs = _sample(3)
    path = write_records(recs, str(tmp_path / "ours"), "tfrecord")[0]
    parsed = [tf.train.Example.FromString(b) for b in tf.compat.v1.io.tf_record_iterator(path)]
    assert [e.features.feature["id"].bytes_list.value[0].decode() for e in parsed] == ["ex-000", "ex-001", "ex-002"]
    np.testing.assert_array_equal(parsed[1].features.feature["x"].float_list.value, recs[1]["x"])
    assert list(parsed[2].features.feature["y"].int64_list.value) == [2]

    theirs = str(tmp_path / "theirs.tfrecord")
    with tf.io.TFRecordWriter(theirs) as w:
        for e in parsed:
            w.write(e.SerializeToString())
    assert [_norm(r) for r in iter_records(theirs)] == [_norm(_canonical(r)) for r in recs]


# ---- digits conversion ------------------------------------------------------------------------------------------
def test_convert_digits(tmp_path, capsys):
    from beam_influence.models.digits import load_digits

    patterns = convert_digits(str(tmp_path), formats=AVAILABLE, num_shards=2, label_noise=0.1, seed=0)
    data = load_digits(label_noise=0.1, seed=0)
    want = {"train": [_norm(_canonical(r)) for r in data.train], "test": [_norm(_canonical(r)) for r in data.test]}
    for fmt in AVAILABLE:
        assert patterns[fmt]["train"] == str(tmp_path / fmt / "train-*")
        for split in ("train", "test"):
            assert [_norm(r) for r in read_records(patterns[fmt][split])] == want[split], (fmt, split)
    meta = json.loads((tmp_path / convert.META_FILE).read_text())
    assert meta["flipped_ids"] == data.flipped_ids and len(meta["flipped_ids"]) > 0

    assert cli_main(["digits-data", "--output", str(tmp_path / "cli"), "--formats", "jsonl", "--num_shards", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"jsonl"}
    assert len(read_records(printed["jsonl"]["test"])) == len(data.test)


# ---- new: Parquet splits --------------------------------------------------------------------------------------
def _many_groups(path, n=1000, group=70, ids=True):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    cols = {"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8).cast(pa.list_(pa.float32())),
            "y": pa.array(np.arange(n) % 7)}
    if ids:
        cols = {"id": pa.array([f"r{i}" for i in range(n)]), **cols}
    pq.write_table(pa.table(cols), path, row_group_size=group)
    return x


@pytest.mark.parametrize("ids", [True, False])
def test_parquet_splits_read_like_the_whole_file(tmp_path, ids):
    path = str(tmp_path / "big.parquet")
    x = _many_groups(path, ids=ids)
    assert pq.ParquetFile(path).num_row_groups == 15
    sp = splits(path, rows_per_split=200)
    assert len(sp) == 7 and [s.index for s in sp] == list(range(7))
    assert all(s.num_rows <= 200 for s in sp) and sum(s.num_rows for s in sp) == 1000
    assert [s.row_groups for s in sp][:2] == [(0, 1), (2, 3)]
    assert [s.start for s in sp] == [0] + list(np.cumsum([s.num_rows for s in sp])[:-1])
    assert pickle.loads(pickle.dumps(sp[1])) == sp[1]
    whole = _check_chunks(_chunks(path, rows_per_split=10**9))
    assert len(whole) == 1 and whole[0].batch.num_rows == 1000
    parts = []
    for s in sp:
        chunks = _check_chunks(list(read_split(s, batch_rows=64)))
        assert chunks[0].offset == s.start and sum(c.records for c in chunks) == s.num_rows
        assert all(c.records <= 64 for c in chunks)
        assert [c.offset for c in chunks] == list(range(s.start, s.start + s.num_rows, 64))
        parts.extend(chunks)
    together = pa.Table.from_batches([c.batch for c in parts])
    assert together.equals(pa.Table.from_batches([whole[0].batch]))
    want_ids = [f"r{i}" for i in range(1000)] if ids else [f"big:{i}" for i in range(1000)]
    assert together.column("id").to_pylist() == want_ids
    np.testing.assert_array_equal(np.stack(together.column("x").to_numpy(zero_copy_only=False)), x)
    assert [r["id"] for r in read_records(path)] == want_ids


def test_parquet_row_groups_are_rebatched(tmp_path):
    path = str(tmp_path / "g.parquet")
    _many_groups(path, n=1000, group=30, ids=False)
    chunks = _check_chunks(_chunks(path, batch_rows=100, rows_per_split=10**9))
    assert [c.records for c in chunks] == [100] * 10
    assert chunks[3].batch.column("id")[0].as_py() == "g:300"


def test_parquet_200k_rows_in_few_chunks(tmp_path):
    path = str(tmp_path / "p.parquet")
    n = 200_000
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * 64, np.float32)), 64),
                             "y": pa.array(np.zeros(n, np.int64))}), path)
    chunks = list(iter_chunks(path))
    assert len(chunks) <= 4 and all(c.batch.num_rows <= 65536 for c in chunks)
    assert sum(c.batch.num_rows for c in chunks) == n and not any(c.errors for c in chunks)
    b = chunks[-1].batch
    assert b.schema.names == ["id", "x", "y"] and b.schema.field("x").type == pa.list_(pa.float32())
    assert b.column("id")[b.num_rows - 1].as_py() == f"p:{n - 1}"


# ---- truncated and corrupt gzip: no record of an unverified member is read as good ------------------------------
def _gzip_members(data: bytes, pieces: int) -> tuple[bytes, list[int], list[int]]:
    """gzip ``data`` as ``pieces`` members (cut at line/frame boundaries given by the caller's data):
    (stream, compressed end of each member, inflated end of each member)."""
    out, marks, ends = b"", [], []
    step = -(-len(data) // pieces)
    for i in range(0, len(data), step):
        out += gzip.compress(data[i:i + step], mtime=0)
        marks.append(len(out))
        ends.append(min(i + step, len(data)))
    return out, marks, ends


def _assert_truncation_keeps_whole_members(tmp_path, fmt, lines: list[bytes], good: list):
    """One member per 8 records; every cut keeps exactly the records of the members before it and ends with
    one error record for the rest (at the first record of the cut member)."""
    groups = [b"".join(lines[i:i + 8]) for i in range(0, len(lines), 8)]
    whole, marks = b"", []
    for g in groups:
        whole += gzip.compress(g, mtime=0)
        marks.append(len(whole))
    path = tmp_path / f"t.{fmt}.gz"
    path.write_bytes(whole)
    assert [_norm(r) for r in read_records(str(path))] == good
    rng = np.random.default_rng(0)
    cuts = sorted(set(marks[:-1]) - {0} | set(m + d for m in marks[:-1] for d in (-3, 1, 9))
                  | set(range(1, 12)) | set(range(len(whole) - 9, len(whole)))
                  | set(rng.integers(12, len(whole) - 9, 20).tolist()))
    for cut in cuts:
        path.write_bytes(whole[:cut])
        chunks = _check_chunks(_chunks(str(path)))
        recs = [r for c in chunks for r in B.chunk_records(c)]
        members = sum(m <= cut for m in marks)
        k = 8 * members
        if cut in marks:  # a cut between members: a shorter but valid stream
            assert [_norm(r) for r in recs] == good[:k], cut
            continue
        assert recs and is_error_record(recs[-1]), cut
        last = chunks[-1].errors[-1]
        assert str(path) in last.reason and "rest of the shard is lost" in last.reason, last.reason
        assert f"at record {k}" in last.reason and f"gzip member {members + 1}" in last.reason, last.reason
        assert last.id == f"t:{k}" and last.offset == k
        assert [_norm(r) for r in recs[:-1]] == good[:k], cut
        assert sum(c.records for c in chunks) == k + 1


def test_truncated_jsonl_gz_keeps_only_whole_members(tmp_path):
    recs = _sample(40)
    write_records(recs, str(tmp_path / "w"), "jsonl")
    lines = (tmp_path / "w-00000-of-00001.jsonl").read_bytes().splitlines(keepends=True)
    _assert_truncation_keeps_whole_members(tmp_path, "jsonl", lines, [_norm(_canonical(r)) for r in recs])


@needs_tf
def test_truncated_tfrecord_gz_keeps_only_whole_members(tmp_path):
    recs = _sample(40)
    lines = []
    for r in recs:
        write_records([r], str(tmp_path / "one"), "tfrecord")
        lines.append((tmp_path / "one-00000-of-00001.tfrecord").read_bytes())
    _assert_truncation_keeps_whole_members(tmp_path, "tfrecord", lines, [_norm(_expected_after("tfrecord", r)) for r in recs])


def test_corrupt_gzip_crc_withholds_the_member_and_claims_no_loss(tmp_path):
    """A bad CRC (in the trailer) alone: the member's 5 records are withheld, counted, not "lost"."""
    write_records(_sample(5), str(tmp_path / "z"), "jsonl", compression="gzip")
    path = tmp_path / "z-00000-of-00001.jsonl.gz"
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # the CRC32 in the trailer
    path.write_bytes(bytes(data))
    recs = read_records(str(path))
    assert len(recs) == 1 and is_error_record(recs[0]), recs
    reason = recs[0][ERROR_KEY]
    assert "fails its CRC check" in reason and "(records 0..4) is unreadable" in reason and "5 records" in reason
    assert "lost" not in reason
    from beam_influence.audit.losses import classify

    assert classify({"id": recs[0]["id"], "stage": "read", "reason": reason})["records"] == 5


@pytest.mark.parametrize("fmt", ["jsonl", pytest.param("tfrecord", marks=needs_tf)])
def test_a_flipped_bit_in_deflate_data_lets_no_record_of_its_member_through(tmp_path, fmt):
    """Three members of 100 records; one bit flipped inside member 2's deflate data, at many places: the 100
    records of member 1 come back, none of member 2 or 3, and one error record says so (member, count), or,
    for a bit that changes nothing (padding), every record comes back intact."""
    recs = [{"id": f"r{i}", "x": [float(i), i / 7.0, -1.0], "y": i % 10} for i in range(300)]
    parts = []
    for j in range(3):
        (p,) = write_records(recs[100 * j: 100 * (j + 1)], str(tmp_path / f"m{j}"), fmt, compression="gzip")
        parts.append(open(p, "rb").read())
    start, end = len(parts[0]), len(parts[0]) + len(parts[1])
    path = tmp_path / f"f.{fmt}.gz"
    rng = np.random.default_rng(1)
    for pos in sorted(set(rng.integers(start + 20, end - 8, 12).tolist()) | {end - 9, end - 8, end - 5, end - 1}):
        data = bytearray(b"".join(parts))
        data[pos] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
        out = read_records(str(path))
        good = [r for r in out if not is_error_record(r)]
        errors = [r for r in out if is_error_record(r)]
        if not errors:  # a flipped padding bit after the last deflate block changes nothing: all is good
            assert [_norm(r) for r in out] == [_norm(_canonical(r)) for r in recs], pos
            continue
        assert [r["id"] for r in good] == [f"r{i}" for i in range(100)], pos
        assert len(errors) == 1 and errors[0]["id"] == "f:100", (pos, errors)
        reason = errors[0][ERROR_KEY]
        assert "gzip member 2" in reason and str(path) in reason, reason
        assert "record" in reason and ("is indexed" in reason or "inflated from it" in reason), reason


def test_gzip_verification_counts_records_of_the_bad_member(tmp_path):
    """The count in the dead letter is the member's records (JSONL: non-blank lines; TFRecord: frames)."""
    from beam_influence.formats._gzip import FrameCounter, LineCounter

    c = LineCounter()
    for piece in (b'{"a":1}\n\n  \n{"a"', b':2}\n{"a":3}', b"\n", b"   ", b'\n{"b":1}'):
        c.feed(piece)
    assert c.count == 4
    f = FrameCounter()
    frame = lambda n: len(n).to_bytes(8, "little") + b"cccc" + n + b"dddd"  # noqa: E731
    stream = frame(b"abc") + frame(b"") + frame(b"x" * 300)
    for i in range(0, len(stream), 5):
        f.feed(stream[i:i + 5])
    assert f.count == 3


# ---- new: counts add up -------------------------------------------------------------------------------------------
def _bad_files(tmp_path) -> dict[str, tuple[str, int]]:
    """A file per format with good and bad records: {format: (path, number of records)}."""
    out = {}
    out["jsonl"] = (_write_lines(tmp_path / "b.jsonl", [
        b'{"x": [1.5, 2.5]}', b"nope", b"", b'{"x": [[1], [2, 3]]}', b'{"id": "", "x": [0.5]}', b"  ",
        b'{"x": [1.5, null]}', b'{"x": [3.5, 4.5], "y": 3}']), 6)
    t = pa.table({"id": pa.array(["a", "", None, "d", "e"]),
                  "x": pa.array([[1.0, 2.0], [3.0], [None, 1.0], [4.0], None], pa.list_(pa.float64())),
                  "m": pa.array([[[1, 2], [3, 4]], [[1], [2]], [[1, 2], [3]], [[5, 6]], [[7]]], pa.list_(pa.list_(pa.int32())))})
    pq.write_table(t, tmp_path / "b.parquet", row_group_size=2)
    out["parquet"] = (str(tmp_path / "b.parquet"), 5)
    np.savez(tmp_path / "b.npz", id=np.array(["a", "", "c"]), x=np.zeros((3, 2), np.float32))
    out["npz"] = (str(tmp_path / "b.npz"), 3)
    if HAS_TF:
        good = write_records(_sample(3), str(tmp_path / "tg"), "tfrecord")[0]
        frames = open(good, "rb").read()
        g = io.BytesIO()
        T._framing().write_record(g, b"\xff not an example")
        third = len(frames) // 3
        (tmp_path / "b.tfrecord").write_bytes(frames[:third] + g.getvalue() + frames[third:])
        out["tfrecord"] = (str(tmp_path / "b.tfrecord"), 4)
    return out


@pytest.mark.parametrize("batch_rows", [1, 2, 65536])
def test_counts_add_up(tmp_path, batch_rows):
    for fmt, (path, n) in _bad_files(tmp_path).items():
        chunks = _check_chunks(_chunks(path, batch_rows=batch_rows, rows_per_split=2))
        assert sum(c.records for c in chunks) == n, fmt
        offs = np.concatenate([c.row_offsets() for c in chunks] + [[e.offset for c in chunks for e in c.errors]])
        assert sorted(offs.tolist()) == list(range(n)), fmt  # rows and errors tile the offsets
        assert all(c.records <= batch_rows for c in chunks), fmt
        nxt = 0
        for c in chunks:  # chunks tile the file's records
            assert c.offset == nxt, fmt
            nxt = c.offset + c.records
        recs = read_records(path)
        assert len(recs) == n and sum(map(is_error_record, recs)) == sum(len(c.errors) for c in chunks), fmt
        assert sum(map(is_error_record, recs)) >= 1


def test_parquet_bad_rows_match_the_reference(tmp_path):
    path = _bad_files(tmp_path)["parquet"][0]
    got = read_records(path)
    table = pq.read_table(path)
    want = [B.record_or_error(row, path, i, repr(row)) for i, row in enumerate(table.to_pylist())]
    assert [_norm(r) if not is_error_record(r) else (r["id"], r[ERROR_KEY]) for r in got] == \
        [_norm(r) if not is_error_record(r) else (r["id"], r[ERROR_KEY]) for r in want]
    assert [r["id"] for r in got] == ["a", "b:1", "b:2", "d", "e"]
    assert "'id'" in got[1][ERROR_KEY] and "'x'" in got[2][ERROR_KEY]


# ---- new: column conventions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_chunk_columns(tmp_path, fmt):
    recs = _rich(3)
    if fmt != "npz":
        recs[1] = {k: v for k, v in recs[1].items() if k != "weight"}  # a field absent from one record
    path = write_records(recs, str(tmp_path / "c"), fmt)[0]
    (chunk,) = _check_chunks(_chunks(path))
    b = chunk.batch
    types = dict(zip(b.schema.names, b.schema.types))
    assert b.schema.names[0] == "id" and b.column("id").to_pylist() == ["r0", "r1", "r2"]
    assert types["label"] == pa.int64() and types["name"] == pa.string()
    assert types["counts"] == pa.list_(pa.int64()) and types["tags"] == pa.list_(pa.string())
    if fmt == "tfrecord":
        assert types["img"] == pa.list_(pa.float32()) and types["weight"] == pa.float32()
    else:
        assert types["img"] == pa.list_(pa.list_(pa.float32())) and types["mask"] == pa.list_(pa.bool_())
        assert types["ok"] == pa.bool_() and types["weight"] in (pa.float32(), pa.float64())
    if fmt != "npz":
        assert b.column("weight").to_pylist()[1] is None


def test_write_table_roundtrips_chunks(tmp_path):
    recs = _rich(5)
    path = write_records(recs, str(tmp_path / "src"), "parquet")[0]
    batches = [c.batch for c in iter_chunks(path)]
    for fmt in AVAILABLE:
        ext = {"parquet": "parquet", "jsonl": "jsonl.gz", "npz": "npz", "tfrecord": "tfrecord"}[fmt]
        out = str(tmp_path / f"copy.{ext}")
        write_table(pa.Table.from_batches(batches), out)
        assert [_norm(r) for r in read_records(out)] == [_norm(_expected_after(fmt, r)) for r in recs], fmt
    with pytest.raises(ValueError, match="gzip"):
        write_table(pa.Table.from_batches(batches), str(tmp_path / "x.npz.gz"), "npz")


# ---- new: the JSONL fast path agrees with json.loads line by line ----------------------------------------------
def _reference_jsonl(path) -> list[dict]:
    """Today's record-at-a-time JSONL reader."""
    out, offset = [], 0
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            rid = derive_id(path, offset)
            try:
                text = line.decode("utf-8")
                obj = json.loads(text)
            except UnicodeDecodeError as e:
                out.append(error_record(rid, f"line is not valid UTF-8: {e}", line))
            except (ValueError, RecursionError) as e:
                out.append(error_record(rid, f"invalid JSON: {type(e).__name__}: {e}", text))
            else:
                rec = B.record_or_error(obj, path, offset, text)
                if not is_error_record(rec):  # the one deviation: values Arrow cannot hold
                    try:
                        C.canonical_cells(rec)
                    except B.BadValue as e:
                        rec = error_record(rid, str(e), text)
                out.append(rec)
            offset += 1
    return out


def _cmp(r):
    return (r["id"], r[ERROR_KEY]) if is_error_record(r) else _norm(r)


JSONL_CASES = {
    "plain floats": [b'{"x": [0.5, 1.25], "y": 1}', b'{"x": [2.5, 3.75], "y": 2}'],
    "integral floats": [b'{"x": [0.0, 1.0]}', b'{"x": [2.0, 16.0], "y": 3}'],
    "ints then floats": [b'{"x": [0, 1], "s": 1}', b'{"x": [0.5, 1.5], "s": 2.5}'],
    "int mixed in a row": [b'{"x": [0, 0.5]}', b'{"x": [1, 1.5]}'],
    "big int": [b'{"n": 99999999999999999999, "id": 1}', b'{"n": 1, "id": 2}'],
    "big int id": [b'{"id": 99999999999999999999}', b'{"id": 7}'],
    "float id": [b'{"id": 1.5}', b'{"id": "a"}'],
    "nan and inf": [b'{"x": NaN}', b'{"x": Infinity}', b'{"x": -Infinity}', b'{"x": Inf}'],
    "bom": [b'\xef\xbb\xbf{"x": 1}', b'{"x": 2}'],
    "whitespace": [b'  {"x": 1}  ', b'\t{"x": 2}\r', b'{"x": 3}\x0c', b'\x0b', b'{"x":\t4}'],
    "carriage returns": [b'{"a": 1,\r"b": 2}', b'{\r}', b'{"a": 3}\r', b'{"a": 4}\r\r'],
    "two objects": [b'{"x": 1}{"x": 2}', b'{"x": 3}'],
    "split object": [b'{"x":', b'1}', b'{"a": 1}{"a": 2}'],
    "dates": [b'{"d": "2021-01-01", "id": "2021-01-02"}', b'{"d": "2021-01-01T10:00:00"}'],
    "nested objects": [b'{"o": {"a": 1}}', b'{"o": null, "x": 1}'],
    "duplicate keys": [b'{"x": 1, "x": 2}', b'{"x": 3}'],
    "mixed types": [b'{"x": 1}', b'{"x": "a"}', b'{"x": [1]}', b'{"x": true}', b'{"x": 2}'],
    "nulls": [b'{"x": null, "y": [1, null]}', b'{"x": [null]}', b'{"y": [[1], null]}', b'{}'],
    "empty lists": [b'{"x": []}', b'{"x": [[], []]}', b'{"x": [1, 2]}', b'{"x": [[1.5]]}'],
    "strings": [b'{"s": "a\\u00e9\\ud83d\\ude00", "t": ["a", "b"]}', b'{"s": "\\ud800"}', b'{"t": [["a"], ["b", "c"]]}'],
    "control chars": [b'{"s": "a\tb"}', b'{"s": "ok"}'],
    "bools": [b'{"b": true, "c": [true, false]}', b'{"b": false, "c": [false]}', b'{"c": [true, 1]}'],
    "ids": [b'{"id": ""}', b'{"id": 3}', b'{"id": "x"}', b'{"id": null}', b'{"id": [1]}', b'{"id": true}'],
    "reserved": [b'{"__raw__": null}', b'{"x": 1}'],
    "deep": [b'{"x": ' + b"[" * 3000 + b"]" * 3000 + b"}", b'{"x": 1}'],
    "garbage": [b"not json", b"[1, 2]", b'"s"', b"1", b"{", b"}", b'{"x": 1,}', b"{}"],
    "exponents": [b'{"x": [1e5, 2E-3, -0, -0.0, 1.5e+2]}', b'{"x": [10, -3]}'],
    # pyarrow.json builds invalid list columns when a list starts with nulls (its element type not yet known)
    "leading nulls": [b'{"x": [null, 2.5]}', b'{"y": [null, [1]]}', b'{"x": [1.5], "y": [[2]]}'],
}


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_jsonl_agrees_with_the_reference(tmp_path, case):
    lines = JSONL_CASES[case]
    path = _write_lines(tmp_path / "j.jsonl", lines)
    ref = _reference_jsonl(path)
    want = [_cmp_structured(r, r) for r in ref]
    for batch_rows in (1, 2, 65536):
        chunks = _check_chunks(_chunks(path, batch_rows=batch_rows))
        got = [r for c in chunks for r in B.chunk_records(c)]
        assert len(got) == len(ref) and [_cmp_structured(g, w) for g, w in zip(got, ref)] == want, (case, batch_rows)
        assert sum(c.records for c in chunks) == len(want)


def test_jsonl_random_blocks_agree_with_the_reference(tmp_path):
    rng = np.random.default_rng(3)
    pool = [line for lines in JSONL_CASES.values() for line in lines if len(line) < 1000]
    pool += [json.dumps({"x": rng.random(4).tolist(), "y": int(rng.integers(9))}).encode() for _ in range(60)]
    pool += [b""] * 5
    for trial in range(12):
        lines = [pool[i] for i in rng.integers(len(pool), size=int(rng.integers(1, 40)))]
        path = _write_lines(tmp_path / f"r{trial}.jsonl", lines)
        ref = _reference_jsonl(path)
        want = [_cmp_structured(r, r) for r in ref]
        for batch_rows in (3, 65536):
            got = [r for c in _chunks(path, batch_rows=batch_rows) for r in B.chunk_records(c)]
            assert len(got) == len(ref) and [_cmp_structured(g, w) for g, w in zip(got, ref)] == want, (trial, lines)


def test_jsonl_fast_path_is_used_for_clean_blocks(tmp_path, monkeypatch):
    from beam_influence.formats import jsonl as J

    write_records(_sample(50), str(tmp_path / "w"), "jsonl")
    digits = [{**r, "x": np.floor(r["x"] * 16)} for r in _sample(50)]  # integral floats, written "16.0"
    write_records(digits, str(tmp_path / "w-digits"), "jsonl")
    calls = []
    monkeypatch.setattr(J, "_slow_block", lambda *a, **k: calls.append(a) or iter(()))
    chunks = list(iter_chunks(str(tmp_path / "w-*")))
    assert not calls and sum(c.records for c in chunks) == 100
    assert all(c.batch.schema.field("x").type == pa.list_(pa.float32()) for c in chunks)
    assert [_norm(r) for c in chunks for r in B.chunk_records(c)] == \
        [_norm(_canonical(r)) for r in _sample(50) + digits]


def test_jsonl_values_arrow_cannot_hold_are_error_records(tmp_path):
    # Deviation from the record-at-a-time reader: an integer beyond int64 and a lone surrogate (a JSON
    # escape like \ud800) cannot be Arrow values, so those records are error records.
    path = _write_lines(tmp_path / "d.jsonl", [b'{"n": 99999999999999999999}', b'{"s": "\\ud800"}',
                                              b'{"id": 99999999999999999999}', b'{"n": -9223372036854775808}'])
    got = read_records(path)
    assert "out of the int64 range" in got[0][ERROR_KEY] and "not valid Unicode" in got[1][ERROR_KEY]
    assert got[2] == {"id": "99999999999999999999"} and got[3] == {"id": "d:3", "n": -2**63}


# ---- new: the Parquet and npz column paths agree with the per-record reference ---------------------------------
def _reference_parquet(path) -> list[dict]:
    """Today's Parquet reader: rows as python values, then ``canonical_record``."""
    rows = pq.read_table(path).to_pylist()
    return [B.record_or_error(row, path, i, repr(row)) for i, row in enumerate(rows)]


PARQUET_COLUMNS = {
    "dict": pa.array(["a", "b", None, "a"]).dictionary_encode(),
    "fixed": pa.array([[1, 2], [3, 4], [0, 0], [5, 6]], pa.list_(pa.int16(), 2)),
    "large": pa.array([[1.5], [], None, [2.5, 3.5]], pa.large_list(pa.float64())),
    "i32": pa.array([1, -2, None, 4], pa.int32()),
    "u64": pa.array([1, 2**64 - 1, None, 3], pa.uint64()),
    "u64s": pa.array([[1], [2**63], None, [3]], pa.list_(pa.uint64())),
    "f16": pa.array(np.array([0.5, 1.5, 2.5, 3.5], np.float16)),
    "ts": pa.array([None, 1, None, 2], pa.timestamp("s")),
    "st": pa.array([None, {"a": 1}, None, None], pa.struct([("a", pa.int64())])),
    "lst": pa.array([None, None, [{"a": 1}], []], pa.list_(pa.struct([("a", pa.int64())]))),
    "ln": pa.array([[], None, [None], []], pa.list_(pa.null())),
    "nul": pa.nulls(4),
    "bin": pa.array([b"\xff", b"", None, b"x"]),
    "ls": pa.array([["a"], ["b", None], None, []], pa.list_(pa.large_string())),
    "nest": pa.array([[[1.0, 2.0]], [[1.0], [2.0]], [[1.0], None], [[], []]], pa.list_(pa.list_(pa.float32()))),
    "bools": pa.array([[True], [False, True], None, [True, None]]),
}


@pytest.mark.parametrize("ids", ["none", "str", "int", "bin", "dict"])
def test_parquet_agrees_with_the_reference(tmp_path, ids):
    cols = dict(PARQUET_COLUMNS)
    if ids != "none":
        cols["id"] = {"str": pa.array(["a", "", None, "d"]), "int": pa.array([7, None, -1, 2**40]),
                      "bin": pa.array([b"a", b"\xff", None, b""]),
                      "dict": pa.array(["a", "b", "a", None]).dictionary_encode()}[ids]
    want_all = None
    for name in ["all"] + [k for k in cols if k != "id"]:
        sub = cols if name == "all" else {k: v for k, v in cols.items() if k in (name, "id")}
        path = str(tmp_path / f"{ids}-{name}.parquet")
        pq.write_table(pa.table(sub), path)
        want = [_cmp(r) for r in _reference_parquet(path)]
        got = [_cmp(r) for r in read_records(path)]
        assert got == want, name
        chunks = _check_chunks(_chunks(path, batch_rows=3))
        assert sum(c.records for c in chunks) == 4
        if name == "all":
            want_all = want
    assert any(isinstance(r[1], str) for r in want_all)  # some rows are bad


def _reference_npz(path) -> list[dict]:
    with np.load(path, allow_pickle=False) as z:
        cols = {k: z[k] for k in z.files}
    per_row = {k: (a.tolist() if a.ndim == 1 or a.dtype.kind in "US" else B.canonical_value(a)) for k, a in cols.items()}
    n = len(next(iter(cols.values())))
    return [B.record_or_error({k: v[i] for k, v in per_row.items()}, path, i, "") for i in range(n)]


def test_npz_agrees_with_the_reference(tmp_path):
    arrays = {
        "f64": np.array([0.5, 1.0, 2.0]), "f16": np.array([1, 2, 3], np.float16), "u8": np.array([1, 2, 3], np.uint8),
        "u64": np.array([1, 2**64 - 1, 3], np.uint64), "b": np.array([True, False, True]),
        "s": np.array(["a", "", "c"]), "by": np.array([b"a", b"\xff", b""]), "img": np.ones((3, 2, 2), np.float64),
        "e": np.zeros((3, 0), np.int32), "es": np.zeros((3, 0), "U1"), "ss": np.array([["a", "b"], ["c", "d"], ["e", "f"]]),
        "bb": np.ones((3, 4), bool),
    }
    for ids in (None, np.array(["x", "", "z"]), np.array([5, 6, 7]), np.array([b"a", b"\xff", b"c"]), np.array([1.5, 2, 3])):
        d = dict(arrays)
        if ids is not None:
            d["id"] = ids
        path = str(tmp_path / "n.npz")
        np.savez(path, **d)
        want = [_cmp(r) for r in _reference_npz(path)]
        assert [_cmp(r) for r in read_records(path)] == want, ids
        assert sum(c.records for c in _check_chunks(_chunks(path, batch_rows=2))) == 3


@needs_tf
def test_tfrecord_agrees_with_the_reference(tmp_path):
    from tensorflow.core.example import example_pb2

    def ex(**feats):
        e = example_pb2.Example()
        for k, (kind, vals) in feats.items():
            f = e.features.feature[k]
            if kind == "none":
                f.SetInParent()
            else:
                getattr(f, kind).SetInParent()
                getattr(f, kind).value.extend(vals)
        return e.SerializeToString()

    F, I, S = "float_list", "int64_list", "bytes_list"
    payloads = [
        ex(id=(S, [b"a"]), x=(F, [0.5, 1.5]), y=(I, [1])),
        ex(id=(S, [b"b"]), x=(F, [2.5]), y=(I, [2, 3])),          # kinds change: scalar x, array y
        ex(x=(F, []), y=(I, []), s=(S, []), n=("none", None)),     # empties, derived id
        ex(id=(I, [7]), s=(S, [b"\xff"]), t=(S, [b"a", b"b"])),   # int id, non-UTF-8 scalar, string list
        ex(id=(S, [b""]), x=(F, [1.0])),                           # bad id
        ex(id=(S, [b"\xff"])),                                     # non-UTF-8 id
        ex(id=(F, [1.0])),                                         # float id
        ex(__raw__=(I, [1])),                                      # reserved name
        ex(t=(S, [b"a", b"\xff"])),                               # mixed list
        ex(id=(S, [b"c"]), x=(F, [0.5, 1.5]), y=(I, [4])),
    ]
    path = tmp_path / "v.tfrecord"
    buf = io.BytesIO()
    for p in payloads:
        T._framing().write_record(buf, p)
    path.write_bytes(buf.getvalue())
    want = [_cmp(B.record_or_error(T._fields(example_pb2.Example.FromString(p)), str(path), i, p))
            for i, p in enumerate(payloads)]
    for batch_rows in (1, 3, 65536):
        chunks = _check_chunks(_chunks(str(path), batch_rows=batch_rows))
        assert [_cmp(r) for c in chunks for r in B.chunk_records(c)] == want, batch_rows
        assert sum(c.records for c in chunks) == len(payloads)


# ---- new: fields the model does not use travel (objects, timestamps, decimals), never kill a row ---------------
def _tiles(chunks, n):
    """Chunks tile records 0..n-1: contiguous, rows and errors cover every offset once."""
    nxt = 0
    for c in chunks:
        assert c.offset == nxt
        nxt = c.offset + c.records
    assert nxt == n
    offs = np.concatenate([c.row_offsets() for c in chunks] + [[e.offset for c in chunks for e in c.errors]])
    assert sorted(offs.astype(int).tolist()) == list(range(n))


@pytest.mark.parametrize("batch_rows", [7, 65536])
def test_jsonl_objects_and_timestamp_strings_travel(tmp_path, batch_rows, monkeypatch):
    from beam_influence.formats import jsonl as J

    n = 40
    lines = [json.dumps({"id": f"r{i}", "x": [0.5 * i, 1.5], "y": i % 3,
                         "meta": {"a": i, "b": [1, 2], "when": "2026-01-01T00:00:00", "tags": [{"k": "v"}]},
                         "when": f"2026-01-{i % 28 + 1:02d}T00:00:00", "day": "2026-01-01"}).encode()
             for i in range(n)]
    path = _write_lines(tmp_path / "m.jsonl", lines)
    calls = []
    real_slow = J._slow_block
    monkeypatch.setattr(J, "_slow_block", lambda *a, **k: calls.append(1) or real_slow(*a, **k))
    chunks = _check_chunks(_chunks(path, batch_rows=batch_rows))
    assert not calls  # Arrow parses these blocks: objects are struct columns
    assert not any(c.errors for c in chunks) and sum(c.records for c in chunks) == n
    assert all(c.records <= batch_rows for c in chunks)
    _tiles(chunks, n)
    b = pa.Table.from_batches([c.batch for c in chunks])
    assert b.column("id").to_pylist() == [f"r{i}" for i in range(n)]
    assert pa.types.is_struct(b.schema.field("meta").type)
    assert b.schema.field("meta").type.field("when").type == pa.string()  # a timestamp-like string stays a string
    assert b.schema.field("when").type == pa.string() and b.schema.field("day").type == pa.string()
    assert b.schema.field("x").type == pa.list_(pa.float32())
    recs = read_records(path)
    assert len(recs) == n and not any(map(is_error_record, recs))
    assert recs[3]["meta"] == {"a": 3, "b": [1, 2], "when": "2026-01-01T00:00:00", "tags": [{"k": "v"}]}
    assert recs[3]["when"] == "2026-01-04T00:00:00" and recs[3]["y"] == 0
    np.testing.assert_array_equal(recs[3]["x"], np.array([1.5, 1.5], np.float32))


def test_jsonl_a_field_that_is_an_object_in_one_row_and_a_number_in_another(tmp_path):
    lines = [b'{"id": "a", "x": [1.5], "meta": {"a": 1}}',
             b'{"id": "b", "x": [2.5], "meta": 7}',
             b'{"id": "c", "x": [3.5], "meta": [{"a": 1}, 2]}',   # a list holding an object
             b'{"id": "d", "x": [4.5], "meta": "2026-01-01T00:00:00"}',
             b'{"id": "e", "x": [5.5], "meta": {"a": {"b": "\\u00e9\\ud800"}}}',  # a lone surrogate, nested
             b'{"id": "f", "x": [6.5]}']
    path = _write_lines(tmp_path / "mix.jsonl", lines)
    for batch_rows in (1, 2, 65536):
        chunks = _check_chunks(_chunks(path, batch_rows=batch_rows))
        assert not any(c.errors for c in chunks), batch_rows
        assert sum(c.records for c in chunks) == 6
        _tiles(chunks, 6)
        recs = [r for c in chunks for r in B.chunk_records(c)]
        assert [r["id"] for r in recs] == list("abcdef")
        meta = [r.get("meta") for r in recs]
        assert meta[1] == 7 and meta[3] == "2026-01-01T00:00:00" and meta[5] is None
        # objects: a struct's python value where Arrow parsed the block, else the compact JSON text
        assert meta[0] in ({"a": 1}, '{"a":1}')
        assert meta[2] == '[{"a":1},2]'
        assert json.loads(meta[4]) == {"a": {"b": "\u00e9\ud800"}}
        assert [float(r["x"][0]) for r in recs] == [1.5, 2.5, 3.5, 4.5, 5.5, 6.5]
    # read line by line (the block mixes types): a chunk is cut where the field's type changes
    types = [c.batch.schema.field("meta").type for c in _chunks(path) if "meta" in c.batch.schema.names]
    assert pa.string() in types and pa.int64() in types


def test_jsonl_bad_values_next_to_objects_stay_errors(tmp_path):
    lines = [b'{"x": [[1, 2], [3]], "meta": {"a": 1}}',  # ragged feature: still an error, whatever else
             b'{"x": [1, null], "meta": {"a": 2}}',       # a null in an array
             b'{"x": [1, "a"], "meta": {"a": 3}}',        # mixed list
             b'{"__raw__": 1, "meta": {"a": 4}}',         # reserved name
             b'{"id": {"a": 1}}',                          # an object is no id
             b'{"x": [1, 2], "meta": {"a": 5}}']
    path = _write_lines(tmp_path / "e.jsonl", lines)
    got = read_records(path)
    assert [is_error_record(r) for r in got] == [True] * 5 + [False]
    reasons = [r.get(ERROR_KEY, "") for r in got]
    assert all("'x'" in r for r in reasons[:3]) and "reserved" in reasons[3] and "'id'" in reasons[4]
    assert got[5]["meta"] in ({"a": 5}, '{"a":5}')
    assert [_cmp(r) for r in got[:5]] == [_cmp(r) for r in _reference_jsonl(path)[:5]]


def _metadata_table(n, x=None):
    import datetime
    import decimal

    t0 = datetime.datetime(2026, 1, 1)
    cols = {
        "id": pa.array([f"p{i}" for i in range(n)]),
        "x": x if x is not None else pa.array([[float(i), 0.5] for i in range(n)], pa.list_(pa.float32())),
        "meta": pa.array([{"a": i, "b": [1, 2], "s": f"s{i}"} if i % 5 else None for i in range(n)]),
        "when": pa.array([t0 + datetime.timedelta(hours=i) for i in range(n)], pa.timestamp("us", tz="UTC")),
        "price": pa.array([decimal.Decimal(f"{i}.25") for i in range(n)], pa.decimal128(10, 2)),
        "day": pa.array([datetime.date(2026, 1, 1 + i % 28) for i in range(n)]),
        "kv": pa.array([[("k", i)] for i in range(n)], pa.map_(pa.string(), pa.int64())),
        "boxes": pa.array([[{"w": i}] * (i % 3) for i in range(n)]),
        "dur": pa.array([datetime.timedelta(seconds=i) for i in range(n)], pa.duration("s")),
    }
    return pa.table(cols)


@pytest.mark.parametrize("batch_rows", [3, 65536])
def test_parquet_struct_timestamp_decimal_columns_travel(tmp_path, batch_rows):
    import datetime
    import decimal

    n = 20
    table = _metadata_table(n)
    path = str(tmp_path / "meta.parquet")
    pq.write_table(table, path, row_group_size=8)
    chunks = _check_chunks(_chunks(path, batch_rows=batch_rows, rows_per_split=8))
    assert not any(c.errors for c in chunks) and sum(c.records for c in chunks) == n
    assert all(c.records <= batch_rows for c in chunks)
    _tiles(chunks, n)
    got = pa.Table.from_batches([c.batch for c in chunks])
    assert got.column("id").to_pylist() == [f"p{i}" for i in range(n)]
    file_schema = pq.read_schema(path)
    for name in ("meta", "when", "price", "day", "kv", "boxes", "dur"):  # passed through untouched
        assert got.schema.field(name).type == file_schema.field(name).type, name
        assert got.column(name).equals(pq.read_table(path).column(name)), name
    recs = read_records(path)
    assert len(recs) == n and not any(map(is_error_record, recs))
    r = recs[6]
    assert r["meta"] == {"a": 6, "b": [1, 2], "s": "s6"} and "meta" not in recs[5]
    assert r["when"] == datetime.datetime(2026, 1, 1, 6, tzinfo=datetime.timezone.utc)
    assert r["price"] == decimal.Decimal("6.25") and r["day"] == datetime.date(2026, 1, 7)
    assert r["kv"] == [("k", 6)] and r["boxes"].shape == (0,)  # an empty list reads as an empty array
    assert recs[7]["boxes"] == [{"w": 7}] * 1 and recs[8]["boxes"] == [{"w": 8}] * 2
    assert r["dur"] == datetime.timedelta(seconds=6)
    np.testing.assert_array_equal(r["x"], np.array([6.0, 0.5], np.float32))


def test_parquet_bad_features_next_to_metadata_stay_errors(tmp_path):
    x = pa.array([[1.0, 2.0], [None, 1.0], [3.0], [4.0, 5.0]], pa.list_(pa.float32()))
    table = _metadata_table(4, x=x)
    table = table.set_column(0, "id", pa.array(["a", "", "c", "d"]))
    table = table.append_column("lst", pa.array([[{"a": 1}], [None], [None], []], pa.list_(pa.struct([("a", pa.int64())]))))
    path = str(tmp_path / "bad.parquet")
    pq.write_table(table, path)
    got = read_records(path)
    assert [is_error_record(r) for r in got] == [False, True, True, False]
    assert "'id'" in got[1][ERROR_KEY]
    assert "'lst'" in got[2][ERROR_KEY]  # a list of objects holding only a null: checked like any array
    assert got[0]["lst"] == [{"a": 1}] and got[3]["lst"].shape == (0,)
    assert got[3]["meta"] == {"a": 3, "b": [1, 2], "s": "s3"}
    chunks = _check_chunks(_chunks(path, batch_rows=2))
    assert sum(c.records for c in chunks) == 4 and [e.offset for c in chunks for e in c.errors] == [1, 2]


def test_structured_values_in_record_dicts():
    import datetime

    rec = canonical_record({"id": "a", "meta": {"a": [1, {"b": 2}]}, "t": datetime.date(2026, 1, 1),
                            "boxes": [{"w": 1}, {"w": 2}], "ragged_objs": [[{"w": 1}], []]}, "")
    assert rec["meta"] == {"a": [1, {"b": 2}]} and rec["t"] == datetime.date(2026, 1, 1)
    assert rec["boxes"] == [{"w": 1}, {"w": 2}] and rec["ragged_objs"] == [[{"w": 1}], []]
    for bad in ([[1, 2], [3]], [1, None], [1, "a"], object()):
        with pytest.raises(B.BadValue):
            canonical_record({"x": bad}, "")


def test_structured_values_are_written(tmp_path):
    recs = [{"id": "a", "x": np.ones(2, np.float32), "meta": {"a": 1, "b": [1, 2]}},
            {"id": "b", "x": np.zeros(2, np.float32), "meta": {"a": 2, "b": []}}]
    for fmt in ("parquet", "jsonl"):
        path = write_records(recs, str(tmp_path / fmt), fmt)[0]
        got = read_records(path)
        assert [r["meta"] for r in got] == [{"a": 1, "b": [1, 2]}, {"a": 2, "b": []}], fmt
    with pytest.raises(ValueError, match="structured"):
        write_records(recs, str(tmp_path / "n"), "npz")


# ---- new: a Parquet row group is read in batches of batch_rows (bounded memory) ------------------------------
def test_parquet_row_groups_are_streamed_in_batches(tmp_path, monkeypatch):
    path = str(tmp_path / "s.parquet")
    x = _many_groups(path, n=3500, group=1000, ids=False)
    whole = pa.Table.from_batches([c.batch for c in _chunks(path, rows_per_split=10**9)])
    asked = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **k):
        asked.append(k.get("batch_size"))
        for b in real(self, *a, **k):
            assert b.num_rows <= 300
            yield b

    def no_whole_groups(self, *a, **k):
        raise AssertionError("a whole row group was read")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", no_whole_groups)
    for rows_per_split in (1000, 10**9):
        chunks = _check_chunks(_chunks(path, batch_rows=300, rows_per_split=rows_per_split))
        assert all(c.records <= 300 for c in chunks) and not any(c.errors for c in chunks)
        _tiles(chunks, 3500)
        if rows_per_split == 10**9:  # chunks span row groups: all of 300 rows but the last
            assert [c.records for c in chunks] == [300] * 11 + [200]
        else:  # a split per row group: chunks stay inside it
            assert [c.offset for c in chunks] == [o + k for o in (0, 1000, 2000) for k in (0, 300, 600, 900)] + \
                [3000, 3300]
        together = pa.Table.from_batches([c.batch for c in chunks])
        assert together.equals(whole)
        assert together.column("id").to_pylist() == [f"s:{i}" for i in range(3500)]
        np.testing.assert_array_equal(np.stack(together.column("x").to_numpy(zero_copy_only=False)), x)
    assert asked and set(asked) == {300}


def test_parquet_row_group_failing_part_way_loses_only_the_rest(tmp_path, monkeypatch):
    path = str(tmp_path / "f.parquet")
    _many_groups(path, n=3000, group=1000, ids=False)
    real = pq.ParquetFile.iter_batches

    def flaky(self, *a, **k):
        for i, b in enumerate(real(self, *a, **k)):
            if k.get("row_groups") == [1] and i == 1:
                raise OSError("disk went away")
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", flaky)
    chunks = _check_chunks(_chunks(path, batch_rows=400))
    errors = [e for c in chunks for e in c.errors]
    assert len(errors) == 1
    (err,) = errors
    assert err.id == "f:1400" and err.offset == 1400
    assert "row group 1 (records 1400..1999) is unreadable" in err.reason and "disk went away" in err.reason
    ids = [i for c in chunks for i in c.batch.column("id").to_pylist()]
    assert ids == [f"f:{i}" for i in range(1400)] + [f"f:{i}" for i in range(2000, 3000)]
    assert all(c.records <= 400 for c in chunks)
    assert sum(c.records for c in chunks) == 2400 + 1  # good rows + the one error record for the lost range


def test_reading_leaves_no_reference_cycles(tmp_path):
    """Chunks are freed as soon as they are dropped (a reference cycle would keep every chunk's arrays alive
    until the garbage collector runs: memory growing with the file)."""
    import gc

    path = str(tmp_path / "c.parquet")
    _many_groups(path, n=2000, group=500, ids=False)
    jpath = _write_lines(tmp_path / "c.jsonl", [json.dumps({"x": [[1.5, 2.5]], "m": {"a": i}}).encode()
                                               for i in range(50)])
    for p in (path, jpath):
        list(_chunks(p, batch_rows=128))  # warm-up (imports)
    gc.collect()
    gc.disable()
    try:
        for p in (path, jpath):
            for c in _chunks(p, batch_rows=128):
                assert c.records
        assert gc.collect() == 0
    finally:
        gc.enable()


def _structured_form(v):
    """A comparable form of a structured value: a dict / list as read (a struct's python value, whose absent
    keys are None) or as its JSON text (a block read line by line), nulls in objects left out."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(y) for k, y in x.items() if y is not None}
        if isinstance(x, list):
            return [strip(y) for y in x]
        return "nan" if isinstance(x, float) and math.isnan(x) else x

    if isinstance(v, str):
        v = json.loads(v)
    return ("structured", json.dumps(strip(v), sort_keys=True))


def _cmp_structured(got, want):
    """``_cmp`` of a record read, its structured values (those the reference has) in ``_structured_form``."""
    if is_error_record(got) or is_error_record(want):
        return _cmp(got)
    return _cmp({k: _structured_form(v) if B.is_structured(want.get(k)) else v for k, v in got.items()})


OBJECT_LINES = [
    b'{"o": {"a": 1}}', b'{"o": {"b": 2.5}}', b'{"o": {"a": 1.5}}', b'{"o": {}}', b'{"o": {"a": NaN}}',
    b'{"o": {"t": "2021-01-01T00:00:00"}}', b'{"o": [{"a": 1}, {"b": "x"}]}', b'{"o": [[{"a": 1}], []]}',
    b'{"o": [null, {"a": 1}]}', b'{"o": [null]}', b'{"o": [[], []]}', b'{"o": {"a": 99999999999999999999}}',
    b'{"o": {"a": {"a": {"a": [1, 2]}}}}', b'{"o": ' + b'{"a": ' * 100 + b'1' + b'}' * 100 + b'}',
    b'{"o": {"__error__": 1, "id": 5}}', b'{"o": {"a": 1, "a": 2}}', b'{"o": {"s": "\\ud800"}}', b'{"o": 3}',
    b'{"o": [1, {"a": 2}]}', b'{"o": {"a": [1, null]}}', b'{"o": {"a": [[1], [2, 3]]}}', b'{"o": {"l": [null, 1]}}',
    b'{"o": [{"a": 1}], "x": [1, 2]}', b'{"o": [{"a": 1}], "x": [1, null]}', b'{"id": "q", "o": {"a": -0}}',
    b'{"o": [null, [{"a": 1}]]}', b'{"o": {"l": [[null, {"a": [null, {"b": 1}]}]]}}', b'{"o": {"a": 1}, "id": {"b": 1}}',
]


def test_jsonl_objects_agree_with_the_reference(tmp_path):
    """Blocks with objects, Arrow-parsed (struct columns) or line by line (JSON text), give json.loads' values
    (up to the nulls a struct adds), and every feature error of the reference."""
    rng = np.random.default_rng(5)
    pool = OBJECT_LINES + [line for lines in JSONL_CASES.values() for line in lines if len(line) < 1000]
    blocks = [[line] for line in OBJECT_LINES] + [OBJECT_LINES]
    blocks += [[pool[i] for i in rng.integers(len(pool), size=int(rng.integers(2, 12)))] for _ in range(40)]
    for k, lines in enumerate(blocks):
        path = _write_lines(tmp_path / f"o{k}.jsonl", lines)
        ref = _reference_jsonl(path)
        want = [_cmp_structured(r, r) for r in ref]
        for batch_rows in (1, 3, 65536):
            chunks = _check_chunks(_chunks(path, batch_rows=batch_rows))
            got = [r for c in chunks for r in B.chunk_records(c)]
            assert len(got) == len(ref) == sum(c.records for c in chunks)
            assert [_cmp_structured(g, w) for g, w in zip(got, ref)] == want, (lines, batch_rows)
