"""What a hostile tester did to the recurring audit (pipelines.audit), each as a test:

1. SIGKILL at every step of a run (a real ``kill -9`` of ``python -m pipelines.audit``), rerun after
   each: the final results and index manifests equal an uninterrupted run's;
2. an input shard rewritten with the same size (and mtime) but other content is re-indexed;
3. an unreadable shard (corrupt Parquet, truncated .jsonl.gz) is counted in records and always alerts;
4. overlapping runs on one audit_root: the second one stops, naming the lock; a stale lock is taken over;
5. ``--run_id ../x`` is refused (nothing is written outside the audit root);
6. record ids with Markdown/HTML in them are inert in report.md;
7. training data that vanished is an error (exit 2, one line), never "status: ok".

Tiny data: digits logistic regression, FnApiRunner.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from beam_influence.audit import (ALERT_EXIT_CODE, UNREADABLE_SHARDS, AuditLock, AuditLockedError, AuditUsageError,
                                  check_run_id, md_text)
from beam_influence.audit import faults
from beam_influence.cli import main as cli_main
from beam_influence.audit.losses import classify, records_lost
from beam_influence.audit.report import render_markdown
from beam_influence.audit.state import COMPLETED, IndexState, input_checksum
from beam_influence.beam.index import read_manifest
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.formats import read_records, write_records
from pipelines import audit

SPEC = "beam_influence.models.digits:logreg"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIL_ID = "x|y`<b>[a](b)\n"


# ------------------------------------------------------------------ workspace
@pytest.fixture(scope="module")
def fws(tmp_path_factory, logreg_trained):
    """Pool shards (4 Parquet, 4 JSONL, 4 JSONL.gz of the same records), queries, checkpoint, eigensystem."""
    t = logreg_trained
    root = tmp_path_factory.mktemp("audit_faults")
    pool = root / "pool"
    pool.mkdir()
    parquet = write_records(t.data.train, str(pool / "train"), "parquet", num_shards=4)
    jsonl = write_records(t.data.train, str(pool / "plain"), "jsonl", num_shards=4)
    gz = write_records(t.data.train, str(pool / "gz"), "jsonl", num_shards=4, compression="gzip")
    write_records(t.data.test[:6], str(root / "queries"), "parquet", num_shards=1)
    t.spec.save_params(str(root / "ckpt.msgpack"), t.params)
    es = compute_eigensystem(t.spec, t.params, t.train_batch,
                             EigensystemArgs(num_iters=30, top_k=10, batch_size=2048, residuals=False))
    es.save(str(root / "eig.safetensors"))
    return {"root": root, "parquet": parquet, "jsonl": jsonl, "gz": gz, "es": es, "trained": t}


def make_audit(fws, name: str, files: list[str], *, queries: bool = False, **overrides) -> dict:
    """``<root>/<name>/{data/, audit.json}`` with copies of ``files`` as ``data/train-<i>.<ext>``."""
    base = fws["root"] / name
    data = base / "data"
    data.mkdir(parents=True)
    for i, src in enumerate(files):
        ext = os.path.basename(src).split(".", 1)[1]
        shutil.copy(src, data / f"train-{i}.{ext}")
    cfg = {"audit_root": "state", "spec": SPEC, "checkpoint": str(fws["root"] / "ckpt.msgpack"),
           "eigensystem": str(fws["root"] / "eig.safetensors"), "train_data": ["data/train-*"],
           "standing_queries": str(fws["root"] / "queries-*.parquet") if queries else None,
           "top_k": 4, "self_influence_top": 20, "projection_batch_size": 64, "batch_rows": 256,
           "beam_args": ["--runner=FnApiRunner"], **overrides}
    path = base / "audit.json"
    path.write_text(json.dumps(cfg))
    return {"config": str(path), "data": str(data), "root": str(base / "state"), "base": str(base)}


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def shard_manifest_rows(audit_root: str, es_id: str) -> dict[str, int]:
    """{input basename: rows} from every shard's published index manifest."""
    state = IndexState(audit_root, es_id)
    return {os.path.basename(p): read_manifest(state.shard_dir(p))["rows"] for p in state.shards}


# ------------------------------------------------------------------ 1. SIGKILL at every step
def _subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (faults.KILL_ENV, faults.CRASH_ENV)}
    env.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _start(config: str, log_dir: str, n: int, *args: str, kill_at: str | None = None) -> tuple[subprocess.Popen, str]:
    env = _subprocess_env(**({faults.KILL_ENV: kill_at} if kill_at else {}))
    log = os.path.join(log_dir, f"run{n}.log")
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.audit", "--config", config, *args],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    return proc, log


def _run(config: str, log_dir: str, n: int, *args: str, kill_at: str | None = None) -> tuple[int, str]:
    proc, log = _start(config, log_dir, n, *args, kill_at=kill_at)
    try:
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open(log) as f:
        return rc, f.read()


def test_sigkill_at_every_step_then_rerun_equals_an_uninterrupted_run(fws, capsys):
    shards = fws["parquet"][:2]
    ref = make_audit(fws, "kill_ref", shards, queries=True, shards_per_job=1)
    reference = audit.run(["--config", ref["config"]])
    a = make_audit(fws, "kill", shards, queries=True, shards_per_job=1)
    logs, es_id = a["base"], fws["es"].id
    state = lambda: IndexState(a["root"], es_id)  # noqa: E731
    first, second = sorted(glob.glob(os.path.join(a["data"], "*")))

    # run 1: SIGKILL from outside as soon as the first index job has written into its data folder;
    # meanwhile a second, overlapping run on the same audit_root is refused, naming the lock.
    proc, log = _start(a["config"], logs, 1)
    deadline = time.time() + 240
    while not glob.glob(os.path.join(a["root"], "indexes", "*", "shards", "*", "data-*", "*")):
        assert proc.poll() is None, open(log).read()
        assert time.time() < deadline, "the first index job never wrote anything"
        time.sleep(0.01)
    capsys.readouterr()
    assert audit.main(["--config", a["config"]]) == audit.USAGE_EXIT_CODE
    err = capsys.readouterr().err
    assert "another audit is running" in err and os.path.join(a["root"], "audit.lock") in err
    assert len(err.strip().splitlines()) == 1
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert os.path.exists(os.path.join(a["root"], "audit.lock"))  # a killed run leaves its lock
    assert not state().shards

    # runs 2-7: each killed at the next step by the test hook; each rerun first repairs what the
    # previous kill left (stale lock, half-written shard folders, unpublished or unrecorded indexes).
    rc, out = _run(a["config"], logs, 2, kill_at="before_publish")
    assert rc == -signal.SIGKILL and "SIGKILL at before_publish" in out
    assert "taking over the stale lock" in out and "No files found" not in out
    rc, out = _run(a["config"], logs, 3, kill_at="after_publish")
    assert rc == -signal.SIGKILL and "SIGKILL at after_publish" in out, out
    assert read_manifest(state().shard_dir(first))["rows"] > 0  # published ...
    assert not os.path.exists(os.path.join(state().shard_dir(first), COMPLETED))  # ... but not recorded
    rc, out = _run(a["config"], logs, 4, kill_at="after_marker")
    assert rc == -signal.SIGKILL and "SIGKILL at after_marker" in out, out
    assert os.path.exists(os.path.join(state().shard_dir(first), COMPLETED)) and not state().shards
    rc, out = _run(a["config"], logs, 5, "--run_id", "weekly", kill_at="during_refresh")
    assert rc == -signal.SIGKILL and "SIGKILL at during_refresh" in out, out
    assert "indexing 1 shard(s) (1/1)" in out  # the first shard was adopted from its marker
    assert sorted(state().shards) == [first, second]
    rc, out = _run(a["config"], logs, 6, "--run_id", "weekly", kill_at="before_report")
    assert rc == -signal.SIGKILL and "SIGKILL at before_report" in out, out
    run_dir = os.path.join(a["root"], "runs", "weekly")
    assert os.path.exists(os.path.join(run_dir, "topk.jsonl"))
    assert not os.path.exists(os.path.join(run_dir, "report.json"))
    rc, out = _run(a["config"], logs, 7, "--run_id", "weekly", kill_at="before_state")
    assert rc == -signal.SIGKILL and "SIGKILL at before_state" in out, out
    assert os.path.exists(os.path.join(run_dir, "report.json"))
    assert not os.path.exists(os.path.join(a["root"], "state.json"))  # no run is finished yet

    # run 8: uninterrupted; its results equal the reference run's byte for byte
    rc, out = _run(a["config"], logs, 8, "--run_id", "weekly")
    assert rc == 0, out
    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert report["previous_run_id"] is None and report["exit_code"] == 0 and report["shards"]["indexed_this_run"] == []
    for name in ("self_influence_top.jsonl", "topk.jsonl"):
        assert read_bytes(os.path.join(run_dir, name)) == read_bytes(os.path.join(reference["run_dir"], name)), name
    assert shard_manifest_rows(a["root"], es_id) == shard_manifest_rows(ref["root"], es_id)
    assert report["rows"] == reference["rows"]
    assert {os.path.basename(p): e["rows"] for p, e in state().shards.items()} == \
        {os.path.basename(p): e["rows"] for p, e in IndexState(ref["root"], es_id).shards.items()}
    assert json.load(open(os.path.join(a["root"], "state.json")))["last_run_id"] == "weekly"
    assert not os.path.exists(os.path.join(a["root"], "audit.lock"))
    # each shard directory holds exactly one data folder: the leftovers of killed jobs are gone
    for p in (first, second):
        assert len(glob.glob(os.path.join(state().shard_dir(p), "data-*"))) == 1


def test_clearing_a_shard_dir_is_idempotent(tmp_path):
    state = IndexState(str(tmp_path), "es")
    path = "/data/train-0.parquet"
    state.clear_shard_dir(path)  # missing: fine
    d = state.shard_dir(path)
    os.makedirs(os.path.join(d, "data-x", "beam-temp-dead_letter-1"))  # what a SIGKILL left: empty folders only
    state.clear_shard_dir(path)
    assert not os.path.exists(d)
    os.makedirs(os.path.join(d, "data-y"))
    with open(os.path.join(d, COMPLETED), "w") as f:
        f.write("{")
    state.clear_shard_dir(path)
    state.clear_shard_dir(path)
    assert not os.path.exists(d)


# ------------------------------------------------------------------ 2. same size, other content
def _same_size_edit(path: str) -> None:
    """Change one label in a JSONL shard without changing its size or mtime."""
    st = os.stat(path)
    text = open(path).read()
    m = re.search(r'"y":(\d)', text)
    text = text[:m.start(1)] + str((int(m.group(1)) + 1) % 10) + text[m.end(1):]
    with open(path, "w") as f:
        f.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(path) == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_same_size_content_change_is_reindexed_and_a_stale_lock_is_recovered(fws, capsys):
    a = make_audit(fws, "content", fws["jsonl"][:2])
    # an evil record id among the data (atypical, so a self-influence suspect): inert in report.md
    evil = {"id": EVIL_ID, "x": [1.0] * 64, "y": 3}
    with open(os.path.join(a["data"], "train-1.jsonl"), "a") as f:
        f.write(json.dumps(evil) + "\n")
    # a stale lock of a process that is gone (its pid exited) is taken over with a warning
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(a["root"])
    lock_path = os.path.join(a["root"], "audit.lock")
    with open(lock_path, "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname(), "started_at": time.time() - 3600}, f)
    r1 = audit.run(["--config", a["config"]])
    assert "taking over the stale lock" in capsys.readouterr().err
    assert r1["lock"]["recovered_from"]["pid"] == dead.pid and not os.path.exists(lock_path)
    assert EVIL_ID in [s["id"] for s in r1["suspects"]]
    md = read_bytes(os.path.join(r1["run_dir"], "report.md")).decode()
    assert md_text(EVIL_ID) in md and "<b>" not in md and "[a](b)" not in md

    target = os.path.join(a["data"], "train-0.jsonl")
    before = input_checksum(target)
    _same_size_edit(target)
    assert input_checksum(target) != before
    r2 = audit.run(["--config", a["config"]])
    assert r2["shards"]["changed"] == [target] and r2["shards"]["indexed_this_run"] == [target]
    assert r2["refreshed"] and r2["results_key"] != r1["results_key"]

    # a recorded shard whose index folder was deleted behind the audit's back is rebuilt, not trusted
    other = os.path.join(a["data"], "train-1.jsonl")
    shutil.rmtree(IndexState(a["root"], fws["es"].id).shard_dir(other))
    r3 = audit.run(["--config", a["config"]])
    assert r3["shards"]["repaired"] == [other] and r3["shards"]["indexed_this_run"] == [other]
    assert r3["rows"] == r2["rows"]
    for name in ("self_influence_top.jsonl",):
        assert read_bytes(os.path.join(r3["run_dir"], name)) == read_bytes(os.path.join(r2["run_dir"], name))


# ------------------------------------------------------------------ 3. unreadable shards
def test_unreadable_shards_are_counted_in_records_and_alert(fws, capsys):
    files = [fws["parquet"][0], fws["parquet"][1], fws["gz"][2], fws["gz"][3]]
    a = make_audit(fws, "unreadable", files, shards_per_job=4,
                   thresholds={"max_dead_letter_fraction": 0.5})  # loose: only unreadable_shards may fire
    corrupt, truncated = os.path.join(a["data"], "train-1.parquet"), os.path.join(a["data"], "train-3.jsonl.gz")
    size = os.path.getsize(corrupt)
    with open(corrupt, "wb") as f:
        f.write(os.urandom(size))  # same size, not Parquet
    data = read_bytes(truncated)
    with open(truncated, "wb") as f:
        f.write(data[:len(data) // 2])
    true_lost = len(read_records(fws["parquet"][1]))

    capsys.readouterr()
    assert audit.main(["--config", a["config"], "--run_id", "r1"]) == ALERT_EXIT_CODE
    assert "could not be read completely" in capsys.readouterr().err
    r = json.load(open(os.path.join(a["root"], "runs", "r1", "report.json")))
    assert r["alerts"] == [UNREADABLE_SHARDS]
    lost = {u["path"]: u for u in r["unreadable_shards"]}
    assert sorted(lost) == [corrupt, truncated]
    assert lost[corrupt]["losses"][0]["kind"] == "file" and lost[corrupt]["records_lost_is"] == "estimated"
    assert abs(lost[corrupt]["records_lost"] - true_lost) <= 0.1 * true_lost  # from the size: ~ a quarter
    assert lost[truncated]["losses"][0]["kind"] == "rest" and lost[truncated]["records_lost"] >= 1
    assert lost[truncated]["records_lost_is"] in ("estimated", "lower bound")
    # the fraction counts the lost records, not one dead letter per lost file
    assert r["dead_letter_fraction_this_run"] > 0.2 and r["dead_letters_this_run"] == 2
    md = read_bytes(os.path.join(a["root"], "runs", "r1", "report.md")).decode()
    assert "ALERT" in md and "Unreadable input shards" in md
    # still unreadable at the next run (nothing new): the alert stands until the file is fixed or removed
    assert audit.main(["--config", a["config"], "--run_id", "r2"]) == ALERT_EXIT_CODE
    os.remove(corrupt)
    os.remove(truncated)
    assert audit.main(["--config", a["config"], "--run_id", "r3"]) == 0


def test_loss_classification_and_counts():
    rg = {"id": "s:100", "stage": "read", "reason": "Parquet row group 2 (records 100..163) is unreadable: OSError: x"}
    assert classify(rg)["kind"] == "range" and classify(rg)["records"] == 64
    whole = {"id": "s:file", "stage": "read", "reason": "not a readable Parquet file: ArrowInvalid"}
    assert classify(whole)["kind"] == "file"
    rest = {"id": "s:7", "stage": "read",
            "reason": "gzip stream of shard 's' is truncated or corrupt after 10 decompressed bytes (at record 7); "
                      "the rest of the shard is lost: EOFError"}
    assert classify(rest)["kind"] == "rest" and classify(rest)["first"] == 7
    assert classify({"id": "s:3", "stage": "read", "reason": "line is not a JSON object"}) is None
    assert classify({"id": "a", "stage": "decode", "reason": "not a readable thing"}) is None
    entry = {"records": 300 + 1, "losses": [classify(rg)]}
    assert records_lost(entry, 1000, {}, "/d/s.parquet") == (64, "exact")
    entry = {"records": 1, "losses": [classify({"id": "s:file", "stage": "read", "reason": "not a readable Parquet"})]}
    assert records_lost(entry, 1000, {".parquet": 0.36}, "/d/s.parquet") == (360, "estimated")
    assert records_lost(entry, 1000, {}, "/d/s.parquet") == (1, "lower bound")


# ------------------------------------------------------------------ 4. overlapping runs: the lock
def test_lock_is_exclusive_and_names_its_holder(tmp_path, capsys):
    root = str(tmp_path / "state")
    with AuditLock(root) as held:
        with pytest.raises(AuditLockedError, match=re.escape(held.path)):
            AuditLock(root).acquire()
    assert not os.path.exists(held.path)
    # another host's lock cannot be checked: never taken over
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "audit.lock"), "w") as f:
        json.dump({"pid": 1, "host": "elsewhere.example", "started_at": time.time()}, f)
    with pytest.raises(AuditLockedError, match="elsewhere.example"):
        AuditLock(root).acquire()
    # an empty lock file (creator killed between create and write): refused while fresh, taken over when old
    with open(os.path.join(root, "audit.lock"), "w"):
        pass
    with pytest.raises(AuditLockedError, match="empty or garbled"):
        AuditLock(root).acquire()
    old = time.time() - 3600
    os.utime(os.path.join(root, "audit.lock"), (old, old))
    with AuditLock(root) as lock:
        assert lock.recovered == {"garbled": True}
    # a pid that exists but was reused by another process (start time differs) is stale
    with open(os.path.join(root, "audit.lock"), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "proc_start": "1"}, f)
    with AuditLock(root) as lock:
        assert lock.recovered["pid"] == os.getpid()


def test_a_run_while_the_lock_is_held_exits_2_without_touching_the_state(fws, capsys):
    a = make_audit(fws, "locked", fws["parquet"][:1])
    with AuditLock(a["root"]) as held:  # this process holds it: alive, same host
        content = read_bytes(held.path)
        capsys.readouterr()
        assert audit.main(["--config", a["config"]]) == audit.USAGE_EXIT_CODE
        err = capsys.readouterr().err.strip()
        assert err.startswith("audit: error: another audit is running") and held.path in err and "\n" not in err
        assert read_bytes(held.path) == content
    assert os.listdir(a["root"]) == []  # nothing written, the lock left as it was until its holder ended


# ------------------------------------------------------------------ 5. run ids
@pytest.mark.parametrize("bad", ["../x", "..", ".", "a/b", "", "x y", "/abs", "a\\b", "x" * 129])
def test_run_ids_must_be_plain_folder_names(bad):
    with pytest.raises(AuditUsageError, match="invalid run id"):
        check_run_id(bad)


def test_a_bad_run_id_is_refused_before_any_work(fws, capsys):
    a = make_audit(fws, "runid", fws["parquet"][:1])
    for bad in ("../x", ".."):
        assert audit.main(["--config", a["config"], "--run_id", bad]) == audit.USAGE_EXIT_CODE
        assert "invalid run id" in capsys.readouterr().err
    assert cli_main(["audit", "--config", a["config"], "--run_id", "../x"]) == audit.USAGE_EXIT_CODE
    assert not os.path.exists(a["root"]) and not os.path.exists(os.path.join(a["base"], "x"))
    for ok in ("20260105T060000", "weekly-1.retry_2"):
        assert check_run_id(ok) == ok


# ------------------------------------------------------------------ 6. Markdown injection
def _report_with(ids: list[str]) -> dict:
    suspects = [{"rank": i + 1, "id": rid, "self_influence": 10.0 - i} for i, rid in enumerate(ids)]
    return {
        "run_id": "r1", "exit_code": 3, "eigensystem_id": "e<i>1</i>", "eigensystem_changed": False,
        "previous_run_id": "r0", "rows": 10, "dead_letters_this_run": 1, "dead_letter_fraction_this_run": 0.1,
        "dead_letters_total": 1, "changed": True, "top_k": 2, "suspects": suspects,
        "shards": {"total": 1, "indexed_this_run": [], "adopted": [], "changed": [], "repaired": [], "removed": []},
        "unreadable_shards": [{"path": "/d/|evil`<script>.parquet", "records_lost": 5, "records_lost_is": "exact",
                               "losses": [{"reason": "bad\n| injected | row |"}]}],
        "thresholds": [{"name": UNREADABLE_SHARDS, "value": 1, "limit": 0, "crossed": True}],
        "standing_queries": {"num_queries": 1},
        "diff": {"suspects": {"baseline": False, "num_new": len(ids), "num_dropped": 1,
                              "new": [{"id": s["id"], "rank": s["rank"]} for s in suspects],
                              "dropped": [{"id": "[link](javascript:alert(1))"}]},
                 "standing_queries": {"baseline": False, "num_changed": 1, "new_queries": [], "removed_queries": [],
                                      "changed_queries": {"q|<img src=x>": {"proponent": {"entered": ["a"],
                                                                                         "left": ["b"]}}}}},
    }


def test_record_ids_cannot_inject_markdown_or_html():
    ids = [EVIL_ID, "**bold** _it_ # h", "a\u2028b\rc\td", "plain-id"]
    md = render_markdown(_report_with(ids))
    unescaped_pipe = re.compile(r"(?<!\\)\|")
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert len(tables) == 3  # unreadable shards, thresholds, suspects
    for table in tables:  # every row has as many cells as its header: no value left its cell
        cells = {len(unescaped_pipe.findall(line)) for line in table}
        assert len(cells) == 1, table
    suspects = [line for line in md.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(suspects) == len(ids)
    for raw in ("<b>", "<script>", "<img", "<i>", "[a](b)", "[link]", "**bold**", "\u2028", "\r", "\t"):
        assert raw not in md
    assert re.search(r"(?<!\\)`", md) is None  # every backtick escaped: no code span can open
    assert md_text(EVIL_ID) == r"x\|y\`&lt;b&gt;\[a\]\(b\)\\n"
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(md)
    for tag in ("<b>", "<script", "<img", "<a ", "<i>", "<strong>bold", "<em>", "<code>", "<br"):
        assert tag not in html, tag
    rows = re.findall(r"<tr>(.*?)</tr>", html, re.S)
    assert all(len(re.findall(r"<t[dh]", row)) in (3, 4) for row in rows)
    assert "x|y`&lt;b&gt;[a](b)\\n" in html  # the id itself, shown literally


# ------------------------------------------------------------------ 7. vanished training data
def test_vanished_training_data_is_an_error_not_ok(fws, capsys):
    a = make_audit(fws, "vanished", fws["parquet"][:1], shards_per_job=1)
    assert audit.main(["--config", a["config"], "--run_id", "a"]) == 0
    state_before = read_bytes(os.path.join(a["root"], "state.json"))
    for f in os.listdir(a["data"]):
        os.remove(os.path.join(a["data"], f))
    capsys.readouterr()
    assert audit.main(["--config", a["config"], "--run_id", "b"]) == audit.USAGE_EXIT_CODE
    err = capsys.readouterr().err.strip()
    assert err.startswith("audit: error: train_data pattern") and os.path.join(a["data"], "train-*") in err
    assert "\n" not in err and "matches no files" in err
    assert read_bytes(os.path.join(a["root"], "state.json")) == state_before  # no run recorded
    assert sorted(os.listdir(os.path.join(a["root"], "runs"))) == ["a"]
    assert not os.path.exists(os.path.join(a["root"], "audit.lock"))
    with pytest.raises(FileNotFoundError, match="train_data pattern"):
        audit.run(["--config", a["config"]])


def test_a_retry_under_the_same_run_id_that_crashes_leaves_the_baseline_intact(fws, monkeypatch):
    a = make_audit(fws, "retry", fws["parquet"][:1])
    ra = audit.run(["--config", a["config"], "--run_id", "a"])
    rb = audit.run(["--config", a["config"], "--run_id", "b"])
    assert rb["previous_run_id"] == "a" and not rb["refreshed"]
    monkeypatch.setenv(faults.CRASH_ENV, "before_report")
    with pytest.raises(faults.SimulatedCrash):
        audit.run(["--config", a["config"], "--run_id", "b"])  # retry of b, killed while b is rewritten
    monkeypatch.delenv(faults.CRASH_ENV)
    state = json.load(open(os.path.join(a["root"], "state.json")))
    assert state["last_run_id"] == "a"  # never the half-rewritten b
    assert not os.path.exists(os.path.join(a["root"], "runs", "b", "report.json"))
    rc = audit.run(["--config", a["config"], "--run_id", "c"])
    assert rc["previous_run_id"] == "a" and not rc["changed"] and rc["exit_code"] == 0
    assert read_bytes(os.path.join(rc["run_dir"], "self_influence_top.jsonl")) == \
        read_bytes(os.path.join(ra["run_dir"], "self_influence_top.jsonl"))
