"""The audit's durable state: which input shards are indexed under which eigensystem, and the runs.

Layout under ``audit_root`` (any Beam filesystem: local, ``gs://``, ...)::

    indexes/<eigensystem id>/audit_manifest.json        input shard path → its index dir, rows, checksum
    indexes/<eigensystem id>/shards/<shard key>/         one influence index per input shard:
        part-*.parquet, manifest.json, dead_letter.jsonl  (what ``pipelines.index`` writes)
        _COMPLETED                                        written last: the shard's index is complete
    runs/<run id>/report.json, report.md, self_influence_top.{jsonl,parquet}, topk.{jsonl,parquet}
    state.json                                           the last finished run (the baseline of the next diff)

Crash safety: a shard enters ``audit_manifest.json`` only after its ``_COMPLETED`` marker exists, and
the marker only after the shard's Parquet files and manifest are final; JSON state files are written
to a temporary name and renamed. A shard directory without a marker is rebuilt from scratch; one with
a marker but missing from the manifest (a crash between the two writes) is adopted without work.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from typing import Any, Iterable

from apache_beam.io.filesystems import FileSystems

AUDIT_MANIFEST = "audit_manifest.json"
COMPLETED = "_COMPLETED"
STATE = "state.json"
FORMAT_VERSION = 1


def join(*parts: str) -> str:
    """Join path parts with '/' (works for local paths and object-store URIs)."""
    head, *rest = parts
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in rest)])


def read_json(path: str, default: Any = None) -> Any:
    if not FileSystems.exists(path):
        return default
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode())


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to a temporary sibling, then rename it over ``path`` (atomic on local filesystems;
    object stores publish an object only when it is complete)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(tmp) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
    if FileSystems.exists(path) and "://" in path:  # object stores: rename = copy, which refuses to overwrite on some
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def shard_key(path: str) -> str:
    """A stable directory name for an input shard: its basename (sanitised) + a hash of the full path."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:80] or "shard"
    return f"{base}-{hashlib.sha1(path.encode()).hexdigest()[:10]}"


def input_checksum(path: str) -> str:
    """What identifies a shard's content without reading it: size + the filesystem's checksum
    (local: the size again; GCS: the object's CRC/MD5)."""
    size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    try:
        checksum = FileSystems.checksum(path)
    except Exception:  # noqa: BLE001 - a filesystem without checksums
        checksum = ""
    return f"{size}:{checksum}"


def match_input_shards(patterns: Iterable[str]) -> list[str]:
    """All files matched by the patterns, sorted, deduplicated. A pattern without '*' must match."""
    from beam_influence.io import match_files

    return sorted({p for pattern in patterns for p in match_files(pattern)})


class IndexState:
    """The per-eigensystem index of an audit: ``indexes/<eigensystem id>/``."""

    def __init__(self, audit_root: str, eigensystem_id: str):
        self.root = join(audit_root, "indexes", eigensystem_id)
        self.eigensystem_id = eigensystem_id
        self.manifest_path = join(self.root, AUDIT_MANIFEST)
        data = read_json(self.manifest_path)
        if data is None:
            data = {"format_version": FORMAT_VERSION, "eigensystem_id": eigensystem_id, "shards": {}}
        if data.get("eigensystem_id") != eigensystem_id:
            raise ValueError(f"{self.manifest_path} belongs to eigensystem {data.get('eigensystem_id')}, "
                             f"not {eigensystem_id}")
        self.data = data

    @property
    def shards(self) -> dict[str, dict]:
        """input path → {"key", "index_dir", "checksum", "rows", "dead_letters", "parts", "completed_at"}."""
        return self.data["shards"]

    def shard_dir(self, path: str) -> str:
        return join(self.root, "shards", shard_key(path))

    def marker(self, path: str) -> dict | None:
        return read_json(join(self.shard_dir(path), COMPLETED))

    def pending(self, inputs: list[str], checksums: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
        """(to index, adopted from a marker, changed since indexed) among ``inputs``; adopts complete
        shard indexes that a crash left out of the manifest."""
        todo, adopted, changed = [], [], []
        for path in inputs:
            entry = self.shards.get(path)
            if entry is not None:
                if entry["checksum"] == checksums[path]:
                    continue
                changed.append(path)
                todo.append(path)
                continue
            mark = self.marker(path)
            if mark is not None and mark.get("checksum") == checksums[path] \
                    and mark.get("eigensystem_id") == self.eigensystem_id:
                self.shards[path] = mark
                adopted.append(path)
            else:
                todo.append(path)
        if adopted:
            self.save()
        return todo, adopted, changed

    def clear_shard_dir(self, path: str) -> None:
        """Remove whatever an earlier, unfinished attempt left in a shard's index dir."""
        d = self.shard_dir(path)
        if FileSystems.exists(d):
            FileSystems.delete([d + "/"])  # the whole directory (local: rmtree; object stores: the prefix)

    def complete(self, path: str, entry: dict) -> None:
        """Mark one shard's index complete: marker first, then the manifest (both atomic)."""
        entry = {**entry, "eigensystem_id": self.eigensystem_id, "completed_at": time.time()}
        write_json_atomic(join(self.shard_dir(path), COMPLETED), entry)
        self.shards[path] = entry
        self.save()

    def save(self) -> None:
        write_json_atomic(self.manifest_path, self.data)

    def parts(self, inputs: Iterable[str]) -> list[str]:
        """The Parquet files of the given (indexed) input shards."""
        return [p for path in inputs for p in self.shards[path]["parts"]]


def read_state(audit_root: str) -> dict:
    return read_json(join(audit_root, STATE), default={})


def write_state(audit_root: str, state: dict) -> None:
    write_json_atomic(join(audit_root, STATE), state)


def new_run_id(audit_root: str, now: float | None = None) -> str:
    """``YYYYmmddTHHMMSSZ`` in UTC, with ``-N`` appended if that folder already exists."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
    run_id, n = stamp, 1
    while FileSystems.exists(join(audit_root, "runs", run_id)):
        run_id, n = f"{stamp}-{n}", n + 1
    return run_id


def fingerprint(obj: Any) -> str:
    """A short digest of a JSON-able value (used to see whether a run's inputs changed)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
