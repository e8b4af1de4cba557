"""Messages that mislead (issue 21, class 7), each now says what is wrong: random bytes in a ``.npz`` (no
``allow_pickle`` hint), gzip bytes in a ``.jsonl`` (rename to ``.gz``), a pattern mixing ``train-*`` and
``test-*`` (a warning), marker files beside shards (``_SUCCESS``, ``.crc``: skipped and counted), JSON ``true``
as a number or label (a dead letter), an ``audit_root`` that is a file (a configuration error)."""
from __future__ import annotations

import gzip
import json
import logging
import os

import pyarrow as pa
import pytest

from beam_influence.core.decode import decode_columns
from beam_influence.core.model_spec import FeatureSpec
from beam_influence.formats import ERROR_KEY, match_files, read_records, write_records

RECS = [{"id": f"r{i}", "x": [0.5, 1.5], "y": i % 3} for i in range(6)]


def test_random_bytes_in_an_npz_do_not_suggest_allow_pickle(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"\x00" + os.urandom(63))
    (rec,) = read_records(str(path))
    assert rec["id"] == "junk:file" and "not an .npz file" in rec[ERROR_KEY], rec
    assert "allow_pickle" not in rec[ERROR_KEY]
    path.write_bytes(gzip.compress(b"hello"))
    (rec,) = read_records(str(path))
    assert "gzip-compressed" in rec[ERROR_KEY]


@pytest.mark.parametrize("fmt", ["jsonl", "tfrecord"])
def test_gzip_bytes_under_a_plain_name_say_rename_to_gz(tmp_path, fmt):
    if fmt == "tfrecord":
        pytest.importorskip("tensorflow")
    (path,) = write_records(RECS, str(tmp_path / "z"), fmt, compression="gzip")
    plain = path[:-3]
    os.rename(path, plain)
    (rec,) = read_records(plain)
    assert rec["id"].endswith(":file") and "gzip-compressed" in rec[ERROR_KEY]
    assert f"rename it to {os.path.basename(plain)}.gz" in rec[ERROR_KEY]


def test_marker_files_beside_shards_are_skipped_and_counted(tmp_path, caplog):
    from beam_influence.beam.read import ReadChunks

    write_records(RECS, str(tmp_path / "train"), "parquet", num_shards=2)
    for name in ("_SUCCESS", ".train-00000-of-00002.parquet.crc", "train-00001-of-00002.parquet.crc", "_committed_1"):
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        read = ReadChunks(str(tmp_path / "*"))
    assert [os.path.basename(p) for p in read.paths] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert len(read.skipped) == 4 and "skipped 4 marker file(s)" in caplog.text
    assert len(read_records(str(tmp_path / "*"))) == 6
    with pytest.raises(FileNotFoundError, match="only 1 marker file"):
        match_files(str(tmp_path / "_SUC*"))


def test_a_pattern_mixing_name_prefixes_warns(tmp_path, caplog):
    write_records(RECS, str(tmp_path / "train"), "parquet", num_shards=2)
    write_records(RECS[:2], str(tmp_path / "test"), "parquet", num_shards=1)
    with caplog.at_level(logging.WARNING):
        assert len(match_files(str(tmp_path / "train-*"))) == 2
    assert "different name prefixes" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert len(match_files(str(tmp_path / "*.parquet"))) == 3
    assert "2 different name prefixes (test: 1 file(s), train: 2 file(s))" in caplog.text


def test_json_true_is_neither_a_number_nor_a_label(tmp_path):
    path = tmp_path / "b.jsonl"
    lines = [{"id": "ok", "x": [0.5, 1.5], "y": 1}, {"id": "lab", "x": [0.5, 1.5], "y": True},
             {"id": "feat", "x": [True, False], "y": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    features = {"x": FeatureSpec(shape=(2,), dtype="float32"), "y": FeatureSpec(shape=(), dtype="int32", min=0, max=2)}
    from beam_influence.formats import iter_chunks

    good, reasons = [], {}
    for chunk in iter_chunks(str(path)):
        dec = decode_columns(features, chunk.batch)
        good += dec.ids.tolist()
        reasons.update({rid: r for _, rid, r in dec.rejected})
    assert good == ["ok"]
    assert "feature 'y' holds booleans (true/false)" in reasons["lab"]
    assert "feature 'x' holds booleans (true/false)" in reasons["feat"]
    flag = decode_columns({"f": FeatureSpec(shape=(), dtype="bool")}, pa.RecordBatch.from_pylist([{"id": "a", "f": True}]))
    assert flag.ids.tolist() == ["a"]  # a bool feature takes booleans


def test_an_audit_root_that_is_a_file_is_a_configuration_error(tmp_path):
    from beam_influence.audit.config import AuditConfigError
    from beam_influence.audit.lock import AuditLock

    f = tmp_path / "state"
    f.write_text("not a directory")
    with pytest.raises(AuditConfigError, match="is a file, not a directory"):
        with AuditLock(str(f)):
            pass
    with pytest.raises(AuditConfigError, match="cannot be created as a directory"):
        with AuditLock(str(f / "below")):
            pass
