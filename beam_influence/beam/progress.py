"""Progress of a running Beam job on a local runner: rows done, rows/s and an ETA, printed by the launcher.

Beam's metrics are only queryable once the in-process runner has finished, so the workers (threads of the
FnApiRunner, or the processes of ``--direct_running_mode=multi_processing``) report what they finished
through a folder named by ``$BEAM_INFLUENCE_PROGRESS_DIR``: one small file per worker holding its running
total, replaced atomically. The launcher (:class:`ProgressReporter`) sums them every few seconds. Remote
runners (Flink, Dataflow) have no such folder: ``add`` is then a no-op and their own UIs show progress.
The totals are for display only (a retried bundle counts twice); the job's results never depend on them.
"""
from __future__ import annotations

import glob
import os
import sys
import tempfile
import threading
import time
from typing import TextIO

ENV = "BEAM_INFLUENCE_PROGRESS_DIR"
_lock = threading.Lock()
_totals: dict[tuple[int, int], int] = {}


def add(rows: int) -> None:
    """Count ``rows`` finished by this worker (no-op unless the launcher asked for progress)."""
    folder = os.environ.get(ENV)
    if not folder or rows <= 0:
        return
    key = (os.getpid(), threading.get_ident())
    with _lock:
        total = _totals[key] = _totals.get(key, 0) + int(rows)
    path = os.path.join(folder, f"{key[0]}-{key[1]}.rows")
    try:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(str(total))
        os.replace(tmp, path)
    except OSError:  # the launcher removed the folder (job over) or the disk is full: progress is optional
        pass


def rows_done(folder: str) -> int:
    """The sum of every worker's total in ``folder``."""
    done = 0
    for path in glob.glob(os.path.join(folder, "*.rows")):
        try:
            with open(path) as f:
                done += int(f.read() or 0)
        except (OSError, ValueError):
            continue
    return done


def format_line(label: str, done: int, total: int | None, seconds: float) -> str:
    """``index: 12,288 / 100,000 rows (12%) · 2,340 rows/s · ETA 38s``."""
    rate = done / seconds if seconds > 0 else 0.0
    text = f"{label}: {done:,}" + (f" / {total:,} rows ({100 * done / total:.0f}%)" if total else " rows")
    text += f" · {rate:,.0f} rows/s" if done else " · waiting for the first rows (loading, compiling)"
    if total and done and rate > 0 and done < total:
        text += f" · ETA {_duration((total - done) / rate)}"
    return text + f" · {_duration(seconds)} elapsed"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressReporter:
    """Context manager around a local pipeline run: sets ``$BEAM_INFLUENCE_PROGRESS_DIR`` (inherited by local
    worker processes) and prints a progress line every ``interval`` seconds, and a last one at the end."""

    def __init__(self, label: str, total: int | None = None, *, interval: float = 10.0, out: TextIO | None = None):
        self.label, self.total, self.interval = label, total, interval
        self.out = out or sys.stdout
        self._stop = threading.Event()
        self.done = 0

    def __enter__(self) -> "ProgressReporter":
        self.folder = tempfile.mkdtemp(prefix="beam-influence-progress-")
        self._saved = os.environ.get(ENV)
        os.environ[ENV] = self.folder
        with _lock:
            _totals.clear()
        self.t0 = time.time()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._print()

    def _print(self) -> None:
        self.done = rows_done(self.folder)
        print(format_line(self.label, self.done, self.total, time.time() - self.t0), file=self.out, flush=True)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self._print()
        if self._saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self._saved
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def parquet_rows(paths) -> int | None:
    """Rows of the Parquet files among ``paths`` from their footers (None when any file is not Parquet)."""
    import pyarrow.parquet as pq

    total = 0
    for path in paths:
        if not str(path).endswith(".parquet"):
            return None
        try:
            total += pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 - a bad file is the job's to report, not the progress line's
            return None
    return total


__all__ = ["ENV", "ProgressReporter", "add", "format_line", "parquet_rows", "rows_done"]
