"""Shared helpers of the benchmarks: machine description, timing, peak memory, JSON results.

Light on purpose (numpy, the standard library and ``beam_influence.util`` at import time; no Apache
Beam), so that ``benchmarks/gpu_projection.py`` can use it on a machine without Beam. The machine
description (``machine_info``, ``loadavg``) and the JSON writer are ``beam_influence.util``'s.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Iterable

import numpy as np

from beam_influence.util import json_default, loadavg, machine_info, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")

__all__ = ["LDS_TASKS", "REPO", "RESULTS_DIR", "PeakRSS", "block", "cpu_seconds", "fmt_table", "loadavg", "log",
           "machine_info", "max_rss_self_mb", "results_path", "time_calls", "time_interleaved", "tree_rss",
           "write_result"]

# ``evaluate``'s digits LDS tasks (``EvalArgs`` fields beside ``spec``): the CNN trains with its own schedule
LDS_TASKS = {"logreg": {}, "mlp": {}, "cnn": dict(steps=1500, learning_rate=0.003, train_batch_size=128)}


# ---- timing -----------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children so far."""
    import resource

    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def block(x):
    import jax

    return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], *, reps: int = 5, budget_s: float | None = None,
               warm: bool = True) -> dict:
    """Median wall time of ``fn()`` (blocked until ready) over ``reps`` calls after one warm call.

    With ``budget_s`` the number of timed calls is cut so that they fit the budget (at least 1),
    judged from the warm call. Returns {"median_s", "min_s", "max_s", "reps", "warm_s"}.
    """
    warm_s = None
    if warm:
        t = time.perf_counter()
        block(fn())
        warm_s = time.perf_counter() - t
    if budget_s is not None and warm_s:
        reps = max(1, min(reps, int(budget_s / max(warm_s, 1e-9))))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        block(fn())
        ts.append(time.perf_counter() - t)
    return {"median_s": float(np.median(ts)), "min_s": float(np.min(ts)), "max_s": float(np.max(ts)),
            "reps": len(ts), "warm_s": warm_s}


def time_interleaved(fns: dict[str, Callable[[], Any]], *, reps: int = 5, budget_s: float | None = None) -> dict:
    """Median wall time of each ``fns[name]()`` with the calls interleaved (a, b, a, b, ...) after one warm
    call each, so that a ratio of two medians sees the same machine load (a shared, busy machine drifts).

    With ``budget_s`` the rounds are cut to fit it (at least 1), judged from the warm calls.
    Returns {name: {"median_s", "min_s", "max_s", "reps", "warm_s"}}.
    """
    warm = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        block(fn())
        warm[name] = time.perf_counter() - t
    if budget_s is not None:
        reps = max(1, min(reps, int(budget_s / max(sum(warm.values()), 1e-9))))
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            block(fn())
            ts[name].append(time.perf_counter() - t)
    return {name: {"median_s": float(np.median(v)), "min_s": float(np.min(v)), "max_s": float(np.max(v)),
                   "reps": len(v), "warm_s": warm[name]} for name, v in ts.items()}


# ---- memory -----------------------------------------------------------------------------------
def _rss_of(pid: int) -> int:
    """Resident set size in bytes of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (Linux /proc; psutil when available)."""
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - no psutil, or the process is gone
        pass
    kids: dict[int, list[int]] = {}
    try:
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    kids.setdefault(ppid, []).append(int(name))
                except (OSError, ValueError, IndexError):
                    continue
    except OSError:
        return []
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def tree_rss(pid: int) -> int:
    """RSS of ``pid`` plus all its descendants, bytes (shared pages are counted once per process)."""
    return _rss_of(pid) + sum(_rss_of(c) for c in _children(pid))


class PeakRSS:
    """Poll the RSS of a process tree in a thread; ``peak`` is the largest sum seen (bytes).

        with PeakRSS() as mem:   # this process and its children
            work()
        mem.peak, mem.samples
    """

    def __init__(self, pid: int | None = None, interval_s: float = 0.2):
        self.pid = os.getpid() if pid is None else pid
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self.start_rss = tree_rss(self.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))

    def start(self):
        return self.__enter__()

    def stop(self):
        self.__exit__(None, None, None)


def max_rss_self_mb() -> float:
    """ru_maxrss of this process (and, separately, of waited-for children), MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- results ----------------------------------------------------------------------------------
def results_path(name: str, out_dir: str | None = None) -> str:
    out_dir = out_dir or os.environ.get("BENCH_RESULTS_DIR") or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, f"{name}.json")


def write_result(name: str, result: dict, out_dir: str | None = None) -> str:
    """Write ``result`` (plus the load average at the end) to ``<out_dir>/<name>.json``; return the path."""
    result = dict(result)
    result.setdefault("machine", machine_info())
    result["loadavg_end"] = loadavg()
    path = results_path(name, out_dir)
    write_json(path, result, indent=1, sort_keys=False, default=json_default)  # atomic
    return path


def fmt_table(rows: Iterable[dict], cols: list[str], floatfmt: str = "{:.3g}") -> str:
    """A small markdown table of dict rows (for printing progress)."""
    rows = list(rows)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(floatfmt.format(v) if isinstance(v, float) else ("" if v is None else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)
