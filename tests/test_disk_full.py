"""A full disk (issue 21, class 5), through the command line: each job that writes gets ``ENOSPC`` partway
through its writes (``FileSystems.create`` makes the file, as a full disk does, then fails; the in-process
FnApiRunner runs the monkeypatched writer), and

* ``beam-influence <job>`` exits 2 with one error line naming the path and "no space left" (no traceback);
* nothing the failed run wrote remains (no ``data-<run>/`` folder, staging folder or 0-byte result file);
* the previously published index / results are byte-identical, and a rerun without the fault succeeds.

The mechanism: ``beam_influence.beam.cleanup`` (``removed_on_failure``, ``staged``); its unit tests are in
test_cleanup.py. Tiny data: the digits logistic regression.
"""
from __future__ import annotations

import errno
import json
import os

import pytest
from apache_beam.io.filesystems import FileSystems

from beam_influence.cli import main as cli_main
from beam_influence.core.estimate import EigensystemArgs
from beam_influence.formats import write_records

RUNNER = "--runner=FnApiRunner"


@pytest.fixture(scope="module")
def dws(tmp_path_factory, logreg_trained, logreg_files):
    """200 training rows (2 Parquet shards), 10 queries, the model files (test_faults' eigensystem arguments,
    so the session computes it once)."""
    t = logreg_trained
    root = tmp_path_factory.mktemp("disk_full")
    write_records(t.data.train[:200], str(root / "train"), "parquet", num_shards=2)
    write_records(t.data.test[:10], str(root / "test"), "parquet", num_shards=1)
    _, model = logreg_files(root, EigensystemArgs(num_iters=30, top_k=10, batch_size=2048, residuals=False))
    return root, model


def _snapshot(root) -> dict[str, bytes]:
    """Every file under ``root`` (relative path → bytes); folders as ``path/``, so empty ones count too."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root) + "/"] = b""
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), root)] = f.read()
    return out


def _full_disk(monkeypatch, fails) -> list[str]:
    """From now on ``FileSystems.create(path)`` fails with ENOSPC when ``fails(path)`` holds, after making
    the file (a 0-byte file is what a full disk leaves). Returns the paths that failed."""
    real = FileSystems.create
    failed: list[str] = []

    def create(path, *args, **kwargs):
        if fails(path):
            failed.append(path)
            real(path, *args, **kwargs).close()
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(FileSystems, "create", staticmethod(create))
    return failed


def _nth(n: int, match):
    """A ``fails`` predicate: the ``n``-th and later paths for which ``match(path)`` holds (0-based)."""
    seen = []

    def fails(path: str) -> bool:
        if not match(path):
            return False
        seen.append(path)
        return len(seen) > n

    return fails


def _fails_with_one_line(capsys, argv: list[str], what: str) -> str:
    """Run the CLI, expect exit 2 and one error line naming a path with ``what`` in it; returns that path."""
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    assert f"{argv[0]}: error: no space left on device writing " in line, line  # (the audit says "audit: ...")
    path = line.split(" writing ", 1)[1].split(":", 1)[0]
    assert what in os.path.basename(path), line
    return path


def test_index_on_a_full_disk_keeps_the_published_index(dws, tmp_path, monkeypatch, capsys):
    root, model = dws
    idx = tmp_path / "idx"

    def index_argv(index_dir) -> list[str]:
        return ["index", *model, "--train_data", str(root / "train-*"), "--index_dir", str(index_dir),
                "--batch_rows", "50", RUNNER]

    argv = index_argv(idx)
    assert cli_main(argv) == 0
    published = _snapshot(idx)
    failed = _full_disk(monkeypatch, _nth(1, lambda p: "part-" in os.path.basename(p)))  # 1 part written, then full
    path = _fails_with_one_line(capsys, argv, "part-")
    assert path in failed
    assert _snapshot(idx) == published  # no data-<run>/ of the failed run, the published index byte-identical
    # a fresh index dir on a full disk: removed whole
    fresh = tmp_path / "fresh"
    _fails_with_one_line(capsys, index_argv(fresh), "part-")
    assert not fresh.exists()
    monkeypatch.undo()
    assert cli_main(argv) == 0  # the disk has room again: the rerun succeeds
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["rows"] == 200 and len([d for d in os.listdir(idx) if d.startswith("data-")]) == 1


def test_query_and_self_influence_on_a_full_disk_keep_the_previous_results(dws, tmp_path, monkeypatch, capsys):
    root, model = dws
    idx = str(tmp_path / "idx")
    assert cli_main(["index", *model, "--train_data", str(root / "train-*"), "--index_dir", idx, RUNNER]) == 0
    out = tmp_path / "q"
    q_argv = ["query", *model, "--test_data", str(root / "test-*"), "--index_dir", idx, "--output", str(out),
              "--top_k", "5", RUNNER]

    def self_argv(output) -> list[str]:
        return ["self-influence", *model, "--index_dir", idx, "--output", str(output), "--self_influence_top", "20",
                RUNNER]

    s_argv = self_argv(out)
    assert cli_main(q_argv) == 0 and cli_main(s_argv) == 0  # both results in one folder
    previous = _snapshot(out)
    assert {"topk.jsonl", "topk.parquet", "summary.json", "self_influence_top.jsonl"} <= set(previous)

    # the top-k JSONL is written, then the disk is full when its Parquet twin is created
    failed = _full_disk(monkeypatch, lambda p: p.endswith("topk.parquet"))
    assert _fails_with_one_line(capsys, q_argv, "topk.parquet") in failed
    assert _snapshot(out) == previous  # no 0-byte file, no staging folder; the previous results byte-identical
    # self-influence: full at its first result file
    monkeypatch.undo()
    _full_disk(monkeypatch, lambda p: p.endswith("self_influence_top.jsonl"))
    _fails_with_one_line(capsys, s_argv, "self_influence_top.jsonl")
    assert _snapshot(out) == previous
    # a fresh output folder: nothing left at all
    fresh = tmp_path / "fresh"
    _fails_with_one_line(capsys, self_argv(fresh), "self_influence_top.jsonl")
    assert not fresh.exists()

    monkeypatch.undo()
    assert cli_main(q_argv) == 0 and cli_main(s_argv) == 0  # room again: the reruns succeed ...
    again = _snapshot(out)
    for name in ("topk.jsonl", "topk.parquet", "self_influence_top.jsonl", "self_influence_top.parquet"):
        assert again[name] == previous[name], name  # ... with the same results
    assert not [n for n in again if n.startswith(".partial-")]


def test_fused_run_on_a_full_disk_keeps_the_previous_results(dws, tmp_path, monkeypatch, capsys):
    root, model = dws
    out = tmp_path / "run"
    argv = ["run", *model, "--train_data", str(root / "train-*"), "--test_data", str(root / "test-*"),
            "--output", str(out), "--top_k", "5", "--self_influence_top", "20", RUNNER]
    assert cli_main(argv) == 0
    previous = _snapshot(out)
    # the results are written, the disk is full when Beam writes the training dead letters' temporary file
    _full_disk(monkeypatch, lambda p: "dead_letter" in os.path.basename(p) and "query" not in p)
    _fails_with_one_line(capsys, argv, "")
    assert _snapshot(out) == previous
    monkeypatch.undo()
    assert cli_main(argv) == 0
    assert _snapshot(out)["topk.jsonl"] == previous["topk.jsonl"]


def test_audit_on_a_full_disk_keeps_the_published_shards_and_runs(dws, tmp_path, monkeypatch, capsys,
                                                                   logreg_trained):
    """The audit: a full disk in an index job (a new shard) or in the refresh job exits 2 with one line; the
    failed job's shard index and run folder are removed, state.json, the earlier run and the shard indexes
    already published are byte-identical; the rerun succeeds."""
    root, model = dws
    flags = dict(zip(model[::2], model[1::2]))
    data = tmp_path / "data"
    data.mkdir()
    write_records(logreg_trained.data.train[:100], str(data / "a"), "parquet", num_shards=1)
    cfg = {"audit_root": str(tmp_path / "state"), "spec": flags["--spec"], "checkpoint": flags["--checkpoint"],
           "eigensystem": flags["--eigensystem"], "train_data": [str(data / "*.parquet")],
           "self_influence_top": 20, "beam_args": [RUNNER]}
    (tmp_path / "audit.json").write_text(json.dumps(cfg))
    state = tmp_path / "state"

    def audit_argv(run_id: str) -> list[str]:
        return ["audit", "--config", str(tmp_path / "audit.json"), "--run_id", run_id]

    assert cli_main(audit_argv("a")) == 0
    before = _snapshot(state)
    write_records(logreg_trained.data.train[100:200], str(data / "b"), "parquet", num_shards=1)  # a new shard

    def unchanged() -> bool:
        now = _snapshot(state)
        kept = {k: v for k, v in before.items() if not k.endswith("audit_manifest.json")}
        return all(now.get(k) == v for k, v in kept.items()) and os.listdir(state / "runs") == ["a"] \
            and not [k for k in now if k not in before and "data-" in k]

    _full_disk(monkeypatch, lambda p: "part-" in os.path.basename(p))  # the new shard's index job
    _fails_with_one_line(capsys, audit_argv("b"), "part-")
    assert unchanged()
    monkeypatch.undo()
    _full_disk(monkeypatch, lambda p: p.endswith("self_influence_top.parquet"))  # the refresh job
    _fails_with_one_line(capsys, audit_argv("b"), "self_influence_top.parquet")
    # the new shard was indexed and recorded before the refresh (published: kept); no run was recorded
    assert os.listdir(state / "runs") == ["a"] and (state / "state.json").read_bytes() == before["state.json"]
    assert all(_snapshot(state)[k] == v for k, v in before.items() if k.startswith("runs/"))
    monkeypatch.undo()
    assert cli_main(audit_argv("b")) == 0
    report = json.loads((state / "runs" / "b" / "report.json").read_text())
    assert report["previous_run_id"] == "a" and report["rows"] == 200
