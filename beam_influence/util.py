"""Small helpers shared by the package, the pipelines and the benchmarks: JSON files, line counts,
what machine a result was measured on.

Paths: local paths use Python's own files (no Beam import, so the benchmarks can use this module
on a machine without Apache Beam); paths with a scheme (``gs://``, ``s3://``, ...) go through Beam's
``FileSystems``, imported only for them (``beam_influence.core.files``).

Writes are atomic: a temporary sibling, then a rename over the target (``os.replace`` for local
files; object stores publish an object only when it is complete).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import uuid
from typing import Any, Callable

from beam_influence.core.files import _remote, read_bytes, write_bytes

_REQUIRED = object()  # read_jsonl's default: a missing file is an error


# ---- files ----------------------------------------------------------------------------------------
def exists(path: str | None) -> bool:
    """Whether ``path`` names an existing file or directory (False for None or '')."""
    if not path:
        return False
    if _remote(path):
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.exists(path)
    return os.path.exists(path)


def read_text(path: str) -> str:
    """The UTF-8 text of ``path`` (``FileNotFoundError`` naming it when it cannot be opened)."""
    return read_bytes(path).decode("utf-8")


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; parent directories are created as needed."""
    data = text.encode("utf-8")
    if not _remote(path):
        write_bytes(path, data)  # temporary sibling + os.replace
        return
    from apache_beam.io.filesystems import FileSystems

    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(tmp) as f:
        f.write(data)
    if FileSystems.exists(path):  # object stores: rename = copy, which refuses to overwrite on some
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def read_json(path: str | None, default: Any = None) -> Any:
    """The JSON value in ``path``; ``default`` when the path is None or does not exist."""
    if not exists(path):
        return default
    return json.loads(read_bytes(path))


def read_jsonl(path: str | None, default: Any = _REQUIRED) -> list:
    """The rows of a JSONL file (blank lines skipped).

    A missing file (or ``path`` None) gives ``default`` when one is passed, else ``FileNotFoundError``.
    """
    if default is not _REQUIRED and not exists(path):
        return default
    if not path:
        raise FileNotFoundError("no JSONL path given")
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def write_json(path: str, obj: Any, *, indent: int | None = 2, sort_keys: bool = True,
               default: Callable[[Any], Any] | None = str) -> None:
    """Write ``obj`` as JSON (and a final newline) to ``path`` atomically (see ``write_text``).

    ``default``: how values JSON does not know are written (``str`` by default; ``json_default`` for
    numpy/JAX arrays and scalars as numbers and lists).
    """
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n")


def count_lines(path: str) -> int:
    """Non-blank lines of a text file; 0 when it does not exist."""
    if not exists(path):
        return 0
    return sum(1 for line in read_text(path).splitlines() if line.strip())


def json_default(obj: Any) -> Any:
    """A ``json.dumps(default=...)`` for arrays and scalars: numpy/JAX values as lists and numbers
    (``.tolist()``), anything else as ``str``."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def jsonable(obj: Any) -> Any:
    """``obj`` with every value JSON does not know replaced as ``json_default`` writes it."""
    return json.loads(json.dumps(obj, default=json_default))


# ---- the machine ----------------------------------------------------------------------------------
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, for _git


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
        head = subprocess.run(["git", "-C", _SOURCE_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", _SOURCE_ROOT, "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"commit": head or None, "dirty": dirty}
    except Exception:  # noqa: BLE001 - not a checkout (e.g. a copied tree)
        return {"commit": None, "dirty": None}


def _proc_field(path: str, prefix: str) -> str | None:
    """The rest of the first line of ``path`` (e.g. /proc/cpuinfo) that starts with ``prefix``."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str | None:
    model = _proc_field("/proc/cpuinfo", "model name")
    return model.lstrip(":").strip() if model is not None else (platform.processor() or None)


def mem_total_gb() -> float | None:
    """Total memory of this machine in GiB (Linux ``/proc/meminfo``; None elsewhere)."""
    kb = _proc_field("/proc/meminfo", "MemTotal:")
    return int(kb.split()[0]) / 2**20 if kb else None


def machine_info() -> dict:
    """What the numbers were measured on: CPUs, memory, platform, JAX backend and devices, versions,
    load average, date, git commit."""
    import jax

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    mem = mem_total_gb()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "mem_total_gb": round(mem, 1) if mem is not None else None,
        "loadavg": loadavg(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": _versions(),
        "git": _git(),
        "env": {k: os.environ[k] for k in ("XLA_FLAGS", "JAX_PLATFORMS", "OMP_NUM_THREADS") if k in os.environ},
    }


__all__ = ["count_lines", "exists", "json_default", "jsonable", "loadavg", "machine_info", "mem_total_gb",
           "read_json", "read_jsonl", "read_text", "write_json", "write_text"]
