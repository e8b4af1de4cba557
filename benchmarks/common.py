"""Shared helpers of the benchmarks: machine description, timing, peak memory, JSON results.

Light on purpose (numpy + the standard library at import time; jax only inside functions), so that
``benchmarks/gpu_projection.py`` can use it on a machine without Apache Beam.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")


# ---- machine ----------------------------------------------------------------------------------
def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("numpy", "jax", "jaxlib", "flax", "optax", "apache_beam", "pyarrow"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except Exception:  # noqa: BLE001 - absent on this machine (e.g. no Beam on the GPU box)
                continue
        out[name] = getattr(mod, "__version__", "?")
    return out


def _git() -> dict:
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip() != ""
        return {"commit": head or None, "dirty": dirty}
    except Exception:  # noqa: BLE001 - not a checkout (e.g. a copied tree)
        return {"commit": None, "dirty": None}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """What the numbers were measured on: CPUs, memory, platform, JAX backend and devices, versions,
    load average, date, git commit."""
    import jax

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "mem_total_gb": _mem_total_gb(),
        "loadavg": loadavg(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": _versions(),
        "git": _git(),
        "env": {k: os.environ[k] for k in ("XLA_FLAGS", "JAX_PLATFORMS", "OMP_NUM_THREADS") if k in os.environ},
    }


# ---- timing -----------------------------------------------------------------------------------
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
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, sort_keys=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


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
