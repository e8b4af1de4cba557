"""Fault injection for the Beam jobs: each class of fault found by a hostile tester, with exact counts.

Classes (issue "Reliability"), and where each is covered:
  1 silent empty/partial results   test_pipelines.py::test_index_is_verified_and_published_atomically (relative
                                   index dir, missing/altered shard, killed rerun); here: empty results refused
  2 artefact integrity             test_integrity.py (eigensystem id over every tensor, basis, checkpoints)
  3 truncated compressed input     test_truncated_gzip_is_counted_and_named,
                                   test_corrupt_gzip_member_reaches_the_index_with_none_of_its_rows
  4 empty inputs                   test_pipelines.py::test_empty_and_missing_inputs_are_errors
  5 the recurring audit            test_audit_faults.py
  6 values and ids                 test_duplicate_ids_are_refused, test_bad_values_are_dead_lettered_with_reasons
  7 up-front checks                test_up_front_checks
  8 faults survived                test_sigkill_then_rerun_is_byte_identical
  counts (every format)            test_records_in_equal_rows_plus_dead_letters_for_every_format
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from beam_influence.beam.outputs import read_jsonl
from beam_influence.core.estimate import EigensystemArgs
from beam_influence.formats import write_records
from pipelines import index, query

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fws(tmp_path_factory, logreg_trained, logreg_files):
    t = logreg_trained
    root = tmp_path_factory.mktemp("faults")
    write_records(t.data.train[:400], str(root / "train"), "parquet", num_shards=2)
    write_records(t.data.test[:20], str(root / "test"), "parquet", num_shards=1)
    _, model = logreg_files(root, EigensystemArgs(num_iters=30, top_k=10, batch_size=2048, residuals=False))
    return root, model


def _three_members(recs, tmp_path) -> tuple[str, list[bytes]]:
    """``recs`` (300) as one .jsonl.gz shard of three gzip members of 100 records each."""
    parts = []
    for j in range(3):
        (p,) = write_records(recs[100 * j:100 * (j + 1)], str(tmp_path / f"m{j}"), "jsonl", num_shards=1,
                             compression="gzip")
        parts.append(open(p, "rb").read())
    return str(tmp_path / "gz-00000-of-00001.jsonl.gz"), parts


def test_truncated_gzip_is_counted_and_named(fws, tmp_path, logreg_trained):
    """A .jsonl.gz cut inside its third member: the records of the two whole members are indexed, the cut
    member (whose CRC cannot be checked) and the rest are one dead letter naming the shard, and records read =
    rows + dead letters."""
    root, model = fws
    path, parts = _three_members(logreg_trained.data.train[:300], tmp_path)
    with open(path, "wb") as f:
        f.write(parts[0] + parts[1] + parts[2][: len(parts[2]) // 2])
    m = index.run(model + ["--train_data", path, "--index_dir", str(tmp_path / "idx")])
    dead = read_jsonl(os.path.join(tmp_path / "idx", m["dead_letter_file"]))
    assert m["rows"] == 200 and m["records"] == m["rows"] + m["dead_letters"] == 201
    assert len(dead) == 1 and dead[0]["id"] == "gz-00000-of-00001:200" and "lost" in dead[0]["reason"]


def test_corrupt_gzip_member_reaches_the_index_with_none_of_its_rows(fws, tmp_path, logreg_trained):
    """One bit flipped inside the deflate data of the second of three members: member 1's 100 rows are indexed,
    none of member 2's (decoded before the error, or not), and the dead letter names the member; a bad CRC alone
    (member 2's trailer) withholds exactly that member's 100 records and does not claim any were lost."""
    root, model = fws
    path, parts = _three_members(logreg_trained.data.train[:300], tmp_path)
    flipped = bytearray(parts[1])
    flipped[len(flipped) // 2] ^= 0x08
    with open(path, "wb") as f:
        f.write(parts[0] + bytes(flipped) + parts[2])
    m = index.run(model + ["--train_data", path, "--index_dir", str(tmp_path / "idx")])
    (dead,) = read_jsonl(os.path.join(tmp_path / "idx", m["dead_letter_file"]))
    assert m["rows"] == 100 and m["records"] == 101 and dead["id"] == "gz-00000-of-00001:100"
    assert "gzip member 2" in dead["reason"] and ("is indexed" in dead["reason"] or "inflated" in dead["reason"])
    bad_crc = bytearray(parts[1])
    bad_crc[-6] ^= 0xFF
    last = bytes(parts[0] + parts[2] + bad_crc)  # the bad member last: nothing after it is unread
    with open(path, "wb") as f:
        f.write(last)
    m = index.run(model + ["--train_data", path, "--index_dir", str(tmp_path / "idx2")])
    (dead,) = read_jsonl(os.path.join(tmp_path / "idx2", m["dead_letter_file"]))
    assert m["rows"] == 200 and m["dead_letters"] == 1 and dead["id"] == "gz-00000-of-00001:200"
    assert "CRC" in dead["reason"] and "(records 200..299) is unreadable" in dead["reason"]
    assert "100 records" in dead["reason"] and "lost" not in dead["reason"]


def test_duplicate_ids_are_refused(fws, tmp_path, logreg_trained):
    root, model = fws
    recs = list(logreg_trained.data.train[:200])
    write_records(recs, str(tmp_path / "a"), "parquet", num_shards=1)
    write_records(recs[:3], str(tmp_path / "b"), "jsonl", num_shards=1)  # the same ids in another shard
    with pytest.raises(ValueError, match="3 training ids occur more than once"):
        index.run(model + ["--train_data", str(tmp_path / "[ab]-*"), "--index_dir", str(tmp_path / "idx")])
    assert not os.path.exists(tmp_path / "idx" / "manifest.json")  # nothing published
    dup_q = [dict(r) for r in logreg_trained.data.test[:4]] + [dict(logreg_trained.data.test[0])]
    write_records(dup_q, str(tmp_path / "q"), "jsonl", num_shards=1)
    idx = str(tmp_path / "idx2")
    index.run(model + ["--train_data", str(root / "train-*"), "--index_dir", idx])
    with pytest.raises(Exception, match="query ids occur more than once"):
        query.run(model + ["--test_data", str(tmp_path / "q-*"), "--index_dir", idx, "--output", str(tmp_path / "o")])


def test_bad_values_are_dead_lettered_with_reasons(fws, tmp_path, logreg_trained):
    """Integers beyond int32, NaN labels, a lone surrogate in an id: each one record's dead letter with its real
    reason (never a crash of the job, never a silent wrap-around); extra columns (nested, timestamps) travel
    into the index as columns."""
    root, model = fws
    good = [dict(r, meta={"a": 1, "b": [1, 2]}, when="2026-01-01T00:00:00") for r in logreg_trained.data.train[:50]]
    x = [0.1] * 64
    path = tmp_path / "v-00000-of-00001.jsonl"
    with open(path, "w") as f:
        for r in good:
            f.write(json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}) + "\n")
        f.write(json.dumps({"id": "big", "x": x, "y": 2 ** 40}) + "\n")
        f.write('{"id": "nan-label", "x": %s, "y": NaN}\n' % json.dumps(x))
        f.write('{"id": "surrogate-\\ud800", "x": %s, "y": 1}\n' % json.dumps(x))
    m = index.run(model + ["--train_data", str(path), "--index_dir", str(tmp_path / "idx")])
    dead = {d["id"]: d["reason"] for d in read_jsonl(os.path.join(tmp_path / "idx", m["dead_letter_file"]))}
    assert m["rows"] == 50 and m["dead_letters"] == 3 == len(dead) and m["records"] == 53
    assert "int32" in dead["big"]
    nan_reason = next(v for k, v in dead.items() if "nan" in k or k.endswith(":51"))
    assert "-2147483648" not in nan_reason
    from beam_influence.beam.index import read_index_table

    t = read_index_table(str(tmp_path / "idx"))
    assert {"meta", "when"} <= set(t.column_names)  # record fields travel as Arrow columns


def test_up_front_checks(fws, tmp_path, monkeypatch):
    root, model = fws
    # an unknown flag is refused (Beam would log and drop it, and the job would run with defaults)
    with pytest.raises(ValueError, match="unknown option.*--tpo_k"):
        index.run(model + ["--train_data", str(root / "train-*"), "--index_dir", str(tmp_path / "i"),
                           "--tpo_k", "5"])
    # a non-scalar (per-class) loss is refused before any work, with a clear message
    (tmp_path / "vecspec.py").write_text(textwrap.dedent('''
        import dataclasses
        from beam_influence.models import digits

        def make():
            s = digits.logreg()
            def loss(params, ex):
                return s.apply(params, ex)  # logits: one value per class, not a scalar
            return dataclasses.replace(s, loss=loss)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = ["--spec", "vecspec:make"] + model[2:]
    with pytest.raises(Exception, match="scalar|fingerprint"):
        index.run(bad + ["--train_data", str(root / "train-*"), "--index_dir", str(tmp_path / "j")])
    # an unwritable output location is found before the pipeline runs
    ro = tmp_path / "ro"
    ro.write_text("a file, not a directory")
    with pytest.raises(ValueError, match="not writable"):
        query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", str(tmp_path / "i"),
                           "--output", str(ro / "out")])


def _job(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> bool:
    """SIGKILL the job's whole process group once ``ready()`` holds; False if it finished first."""
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    return False


def test_sigkill_then_rerun_is_byte_identical(fws, tmp_path):
    """SIGKILL of `index` (parts written, manifest not yet) and of `query` (mid-job), then a rerun: the results are
    byte-identical to an uninterrupted run, and the killed index run left the previous index usable."""
    root, model = fws
    base = model + ["--train_data", str(root / "train-*"), "--batch_rows", "50"]
    ref_idx, ref_q = str(tmp_path / "ref_idx"), str(tmp_path / "ref_q")
    index.run(base + ["--index_dir", ref_idx])
    query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", ref_idx, "--output", ref_q, "--top_k", "5"])
    idx = str(tmp_path / "idx")
    index.run(base + ["--index_dir", idx])  # a first, complete index
    before = open(os.path.join(idx, "manifest.json")).read()

    def parts_written():
        return any(d.startswith("data-") and any(f.startswith("part-") for f in os.listdir(os.path.join(idx, d)))
                   for d in os.listdir(idx) if os.path.isdir(os.path.join(idx, d)) and d != before)

    old = {d for d in os.listdir(idx) if d.startswith("data-")}
    proc = _job(["-m", "pipelines.index", *base, "--index_dir", idx])
    killed = _kill_when(proc, lambda: any(d not in old and d.startswith("data-") and os.listdir(os.path.join(idx, d))
                                          for d in os.listdir(idx)))
    assert killed, "the index job finished before it could be killed"
    assert open(os.path.join(idx, "manifest.json")).read() == before  # the old index is untouched and usable
    q = str(tmp_path / "q")
    query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", idx, "--output", q, "--top_k", "5"])
    assert open(os.path.join(q, "topk.jsonl"), "rb").read() == open(os.path.join(ref_q, "topk.jsonl"), "rb").read()
    index.run(base + ["--index_dir", idx])  # the rerun completes and cleans the killed run's folder
    assert len([d for d in os.listdir(idx) if d.startswith("data-")]) == 1
    # a killed query, rerun
    q2 = str(tmp_path / "q2")
    proc = _job(["-m", "pipelines.query", *model, "--test_data", str(root / "test-*"), "--index_dir", idx,
                 "--output", q2, "--top_k", "5"])
    _kill_when(proc, lambda: os.path.isdir(q2))
    query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", idx, "--output", q2, "--top_k", "5"])
    for name in ("topk.jsonl", "topk.parquet"):
        assert open(os.path.join(q2, name), "rb").read() == open(os.path.join(ref_q, name), "rb").read(), name


def test_same_named_files_in_two_folders_do_not_merge_silently(fws, tmp_path, logreg_trained):
    """Derived ids (<shard>:<offset>) of same-named files in different folders collide: refused, not merged."""
    root, model = fws
    recs = [{k: v for k, v in r.items() if k != "id"} for r in logreg_trained.data.train[:30]]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_records(recs, str(tmp_path / folder / "part"), "jsonl", num_shards=1)
    with pytest.raises(ValueError, match="share a name"):
        index.run(model + ["--train_data", str(tmp_path / "*" / "part-*.jsonl"), "--index_dir", str(tmp_path / "i")])


@pytest.mark.parametrize("fmt", ["npz", "tfrecord", "parquet", "jsonl"])
def test_records_in_equal_rows_plus_dead_letters_for_every_format(fws, tmp_path, logreg_trained, fmt):
    if fmt == "tfrecord":
        pytest.importorskip("tensorflow")
    root, model = fws
    recs = [dict(r) for r in logreg_trained.data.train[:120]]
    if fmt != "npz":  # npz holds one regular array per field: no room for a bad shape
        recs[5] = dict(recs[5], x=np.asarray(recs[5]["x"])[:63])
        recs[9] = dict(recs[9], y=12345)
    write_records(recs, str(tmp_path / "d"), fmt, num_shards=2)
    m = index.run(model + ["--train_data", str(tmp_path / "d-*"), "--index_dir", str(tmp_path / "idx"),
                           "--batch_rows", "40"])
    bad = 0 if fmt == "npz" else 2
    assert m["records"] == 120 == m["rows"] + m["dead_letters"] and m["dead_letters"] == bad
