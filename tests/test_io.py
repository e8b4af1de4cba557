"""Record I/O: the four formats agree (records and ids), Beam ReadExamples == read_records, bad input
becomes error records, writers round-trip."""
from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import struct
import sys

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_influence.io import (
    ERROR_KEY,
    FORMATS,
    MAX_RAW,
    RAW_KEY,
    ReadExamples,
    convert,
    convert_digits,
    derive_id,
    infer_format,
    is_error_record,
    iter_records,
    read_records,
    shard_basename,
    write_records,
)
from beam_influence.io import formats as F

HAS_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="TFRecord needs the beam-influence[tf] extra")
AVAILABLE = [f for f in FORMATS if f != "tfrecord" or HAS_TF]
ALL_FORMATS = [pytest.param(f, marks=needs_tf) if f == "tfrecord" else f for f in FORMATS]


def _pipeline() -> beam.Pipeline:
    # FnApiRunner: in-process; Beam 2.77's DirectRunner may try to download Prism.
    return beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))


def _value_key(v):
    if isinstance(v, np.ndarray):
        return ("array", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, bool):  # tf.Example has no bools: compare them as 0/1
        return int(v)
    if isinstance(v, list):
        return ("list", tuple(_value_key(x) for x in v))
    return v


def _norm(rec):
    """A hashable, order-free, exact form of a record (arrays compared by dtype, shape and bytes)."""
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
    return F.canonical_record(rec, rec.get("id", ""))


def _write_lines(path, lines: list[bytes]):
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return str(path)


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


def test_read_records_matching(tmp_path):
    assert read_records(str(tmp_path / "nothing-*.jsonl")) == []
    with pytest.raises(FileNotFoundError):
        read_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(ValueError, match="infer"):
        read_records(str(tmp_path / "*.csv"))
    with pytest.raises(ValueError, match="unknown record format"):
        iter_records(str(tmp_path / "a.csv"), format="csv")


def test_writers_reject_bad_records(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        write_records([{"id": "a", "x": 1}, {"id": "b"}], str(tmp_path / "n"), "npz")
    with pytest.raises(ValueError, match="error record"):
        write_records([F.error_record("a", "bad")], str(tmp_path / "j"), "jsonl")
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
        b'{"x": {"nested": 1}}',       # unsupported value type
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


@needs_tf
def test_corrupt_tfrecord_becomes_error_records(tmp_path):
    good = write_records(_sample(2), str(tmp_path / "g"), "tfrecord")[0]
    with open(good, "rb") as f:
        frames = f.read()
    framing = F._framing()

    class Buf:
        def __init__(self):
            self.parts = []

        def write(self, b):
            self.parts.append(b)

    garbage = Buf()
    framing.write_record(garbage, b"definitely not a tf.Example \xff\xff")
    half = len(frames) // 2  # the two good records are the same size
    path = tmp_path / "c.tfrecord"
    path.write_bytes(frames[:half] + b"".join(garbage.parts) + frames[half:] + frames[:7])  # + torn frame
    got = list(iter_records(str(path)))
    assert [r["id"] for r in got] == ["ex-000", "c:1", "ex-001", "c:3"]
    assert [is_error_record(r) for r in got] == [False, True, False, True]
    assert "tf.train.Example" in got[1][ERROR_KEY] and got[1][RAW_KEY] == b"definitely not a tf.Example \xff\xff"
    assert "framing" in got[3][ERROR_KEY]
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


def test_corrupt_parquet_is_an_error_record(tmp_path):
    (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    got = list(iter_records(str(tmp_path / "c.parquet")))
    assert len(got) == 1 and got[0]["id"] == "c:file" and "Parquet" in got[0][ERROR_KEY]


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


# ---- Beam ---------------------------------------------------------------------------------------------------
def test_read_examples_equals_read_records(tmp_path):
    patterns = {}
    for fmt in AVAILABLE:
        write_records(_sample(9, ids=(fmt != "npz")), str(tmp_path / fmt / "data"), fmt, num_shards=3)
        patterns[fmt] = str(tmp_path / fmt / "data-*")
    _write_lines(tmp_path / "jsonl" / "data-bad.jsonl", [b'{"x": 1}', b"not json", b'{"x": [[1], [2, 3]]}'])
    write_records(_sample(3, ids=False), str(tmp_path / "jsonl" / "data-gz"), "jsonl", compression="gzip")
    expected = {fmt: read_records(pattern) for fmt, pattern in patterns.items()}
    n_bad = sum(is_error_record(r) for recs in expected.values() for r in recs)
    n_good = sum(not is_error_record(r) for recs in expected.values() for r in recs)
    assert n_bad == 2 and any(r["id"] == "data-bad:1" for r in expected["jsonl"])
    assert any(r["id"] == "data-gz-00000-of-00001:2" for r in expected["jsonl"])

    p = _pipeline()
    for fmt, pattern in patterns.items():
        out = p | f"Read_{fmt}" >> ReadExamples(pattern) | f"Norm_{fmt}" >> beam.Map(_norm)
        assert_that(out, equal_to([_norm(r) for r in expected[fmt]]), label=f"Check_{fmt}")
    result = p.run()
    result.wait_until_finish()

    def counter(name):
        res = result.metrics().query(MetricsFilter().with_name(name))["counters"]
        return sum(c.committed for c in res)

    assert counter("bad_records") == n_bad and counter("records") == n_good
    assert counter("files") == 3 * len(patterns) + 2


def test_read_examples_rejects_unknown_format():
    with pytest.raises(ValueError, match="unknown record format"):
        ReadExamples("x-*", format="csv")


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

    assert convert.main(["--out", str(tmp_path / "cli"), "--formats", "jsonl", "--num-shards", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"jsonl"}
    assert len(read_records(printed["jsonl"]["test"])) == len(data.test)
