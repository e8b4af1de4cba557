"""A distributed worker dies mid-job (issue 21, class 1): the job either restarts the work and its result is the
one of an uninterrupted run, or it fails loudly; never a partial index published, never a partial result
reported as success. Then a rerun gives the uninterrupted run's result.

* ``multi_processing``: an SDK worker process of the ``index`` job (DirectRunner, 2 worker processes) is
  SIGKILLed while the job projects.
* Flink: the TaskManager JVM is SIGKILLed mid-job (``tools.flink.cluster.FlinkCluster.restart_taskmanager``)
  and a new one started; marked ``flink`` and ``slow`` (one more Flink job besides the reference).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest

from beam_influence.beam.index import read_index_table
from beam_influence.core.estimate import EigensystemArgs
from beam_influence.formats import write_records
from pipelines import index

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["id", "projection", "loss", "self_influence", "label", "grad_sq_norm"]


@pytest.fixture(scope="module")
def wws(tmp_path_factory, logreg_trained, logreg_files):
    t = logreg_trained
    root = tmp_path_factory.mktemp("worker_faults")
    write_records(t.data.train[:600], str(root / "train"), "parquet", num_shards=3)
    _, model = logreg_files(root, EigensystemArgs(num_iters=30, top_k=10, batch_size=2048, residuals=False))
    return root, model


def _rows(idx: str) -> pa.Table:
    t = read_index_table(idx, COLUMNS)
    return t.take(pa.compute.sort_indices(t, [("id", "ascending")]))


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every descendant of ``pid`` (Linux /proc)."""
    kids: dict[int, list[int]] = {}
    cmd: dict[int, str] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd[int(d)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, stack = [], [pid]
    while stack:
        for c in kids.get(stack.pop(), []):
            out.append((c, cmd.get(c, "")))
            stack.append(c)
    return out


def _data_dirs(idx: str) -> list[str]:
    return [d for d in os.listdir(idx) if d.startswith("data-")] if os.path.isdir(idx) else []


def test_a_killed_multi_processing_worker_fails_loudly_or_changes_nothing(wws, tmp_path):
    root, model = wws
    base = model + ["--train_data", str(root / "train-*"), "--batch_rows", "50"]
    ref = str(tmp_path / "ref")
    index.run(base + ["--index_dir", ref])
    expected = _rows(ref)

    idx = str(tmp_path / "idx")
    index.run(base + ["--index_dir", idx])  # a published index the killed run must leave usable
    before = open(os.path.join(idx, "manifest.json"), "rb").read()
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.index", *base, "--index_dir", idx,
                             "--runner=DirectRunner", "--direct_running_mode=multi_processing",
                             "--direct_num_workers=2"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    killed = None
    t0 = time.time()
    try:
        while proc.poll() is None and time.time() - t0 < 240 and killed is None:
            workers = [p for p, c in _children(proc.pid) if "sdk_worker_main" in c or "worker_pool_main" in c]
            if workers and len(_data_dirs(idx)) > 1:  # the job is writing its parts
                os.kill(workers[0], signal.SIGKILL)
                killed = workers[0]
            time.sleep(0.05)
        assert killed is not None, "the job ended before a worker could be killed"
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the job hung after one of its workers was killed (neither finished nor failed)")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    after = open(os.path.join(idx, "manifest.json"), "rb").read()
    if proc.returncode == 0:  # the runner redid the lost work: the result of an uninterrupted run
        assert _rows(idx).equals(expected)
    else:  # failed loudly, with the previous index untouched and usable
        assert err.strip(), "the job failed without a word"
        assert after == before and _rows(idx).equals(expected)
    index.run(base + ["--index_dir", idx])  # a rerun completes and is the uninterrupted result
    assert _rows(idx).equals(expected) and len(_data_dirs(idx)) == 1


@pytest.mark.flink
@pytest.mark.slow
def test_a_killed_flink_taskmanager_is_restarted_or_fails_loudly(wws, tmp_path, flink_env):
    """The TaskManager JVM is killed while the index job writes its parts, and a new one started: Flink restarts
    the tasks (restart strategy of the test cluster) and the index equals the FnApiRunner's uninterrupted one,
    or the job fails with an error and publishes nothing."""
    root, model = wws
    base = model + ["--train_data", str(root / "train-*"), "--batch_rows", "50"]
    ref = str(tmp_path / "ref")
    index.run(base + ["--index_dir", ref])
    expected = _rows(ref)
    idx = str(tmp_path / "idx")
    cluster = flink_env.cluster
    done = threading.Event()
    restarted: list[float] = []

    def kill_when_writing():
        while not done.is_set():
            if _data_dirs(idx) and any(os.listdir(os.path.join(idx, d)) for d in _data_dirs(idx)):
                cluster.restart_taskmanager(down_seconds=1.0)
                restarted.append(time.time())
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_writing, daemon=True)
    killer.start()
    try:
        manifest = index.run(base + flink_env.args + ["--index_dir", idx])
        error = None
    except Exception as e:  # noqa: BLE001 - a loud failure is one of the two allowed outcomes
        manifest, error = None, e
    finally:
        done.set()
        killer.join(timeout=240)
    assert restarted, "the job ended before the TaskManager could be killed"
    if error is None:
        assert manifest["rows"] == expected.num_rows
        got = _rows(idx)
        assert got.column("id").equals(expected.column("id"))
        for name in ("projection", "loss", "self_influence"):  # another runner: equal within float noise
            a = pa.compute.list_flatten(got.column(name)) if name == "projection" else got.column(name)
            b = pa.compute.list_flatten(expected.column(name)) if name == "projection" else expected.column(name)
            diff = pa.compute.max(pa.compute.abs(pa.compute.subtract(a, b))).as_py()
            assert diff <= 1e-6, (name, diff)
    else:
        assert str(error).strip()
        assert not os.path.exists(os.path.join(idx, "manifest.json"))  # nothing published
