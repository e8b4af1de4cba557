"""A failed run removes what it wrote, never what was there before; a full disk is one line naming the path
(issue 21, class 5: ``beam_influence.beam.cleanup``)."""
from __future__ import annotations

import errno
import json
import os

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from beam_influence.beam.cleanup import DiskFullError, disk_full_path, removed_on_failure
from beam_influence.beam.index import MANIFEST, WriteIndexPartFn, new_data_dir, referenced
from beam_influence.beam.project import ProjectedChunk


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def test_a_full_disk_removes_only_what_the_run_wrote_and_names_the_path(tmp_path):
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    (out / "old" / "topk.jsonl").write_text("previous result\n")
    (out / "keep.json").write_text("{}")
    with pytest.raises(DiskFullError) as info:
        with removed_on_failure(str(out)):
            (out / "topk.jsonl").write_bytes(b"")  # the 0-byte file a full disk leaves
            (out / "beam-temp-x").mkdir()
            (out / "beam-temp-x" / "part").write_bytes(b"12")
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "topk.jsonl"))
    msg = str(info.value)
    assert "\n" not in msg and "no space left" in msg and str(out / "topk.jsonl") in msg
    assert isinstance(info.value, ValueError)  # the CLI's one-line, exit-2 errors
    assert _tree(out) == {"old/topk.jsonl", "keep.json"}


def test_other_failures_are_re_raised_after_the_cleanup(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(KeyError):
        with removed_on_failure(str(out)):
            out.mkdir()
            (out / "x").write_text("partial")
            raise KeyError("boom")
    assert not out.exists()  # the run created the folder: removed whole
    kept = tmp_path / "k"
    kept.mkdir()
    with pytest.raises(RuntimeError):
        with removed_on_failure(str(kept), keep=lambda name: name == "published"):
            (kept / "published").write_text("x")
            (kept / "partial").write_text("x")
            raise RuntimeError("late failure")
    assert _tree(kept) == {"published"}


def test_a_runner_error_text_about_a_full_disk_is_recognised():
    e = RuntimeError("Pipeline failed: OSError: [Errno 28] No space left on device: '/d/data-1/part-a.parquet' "
                     "[while running 'Index/WriteParts']")
    assert disk_full_path(e) == "/d/data-1/part-a.parquet"
    assert disk_full_path(ValueError("bad value")) is None
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert disk_full_path(outer) == ""


def test_an_index_job_on_a_full_disk_leaves_the_published_index_alone(tmp_path, monkeypatch):
    """Index parts written through Beam until the disk is full: DiskFullError naming the part, the failed run's
    data folder removed, the published manifest and its data folder untouched."""
    from apache_beam.io import filesystems

    idx = tmp_path / "idx"
    (idx / "data-old").mkdir(parents=True)
    (idx / "data-old" / "part-1.parquet").write_bytes(b"published")
    (idx / MANIFEST).write_text(json.dumps({"shards": [{"path": "data-old/part-1.parquet", "rows": 1}],
                                            "dead_letter_file": "data-old/dead_letter.jsonl"}))
    before = _tree(idx)
    assert referenced(str(idx)) == {MANIFEST, "data-old"}
    data_dir = new_data_dir(str(idx))
    real_create = filesystems.FileSystems.create
    calls = []

    def create(path, *a, **k):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_create(path, *a, **k)

    monkeypatch.setattr(filesystems.FileSystems, "create", staticmethod(create))
    chunks = [ProjectedChunk("s", i, 2, pa.table({"id": [f"{i}a", f"{i}b"], "loss": [1.0, 2.0]})) for i in range(3)]
    with pytest.raises(DiskFullError, match="no space left on device writing .*part-"):
        with removed_on_failure(str(idx), keep=lambda name: name in referenced(str(idx))):
            os.makedirs(data_dir)  # as the job does
            with BeamTestPipeline(runner="FnApiRunner") as p:
                _ = p | beam.Create(chunks) | beam.ParDo(WriteIndexPartFn(data_dir))
    assert _tree(idx) == before and not os.path.exists(data_dir)
