"""The audit's durable state: which input shards are indexed under which eigensystem, and the runs.

Layout under ``audit_root`` (any Beam filesystem: local, ``gs://``, ...)::

    indexes/<eigensystem id>/audit_manifest.json        input shard path → its index dir, rows, checksum
    indexes/<eigensystem id>/shards/<shard key>/         one influence index per input shard:
        manifest.json, data-<run>/part-*.parquet,         (what ``pipelines.index`` writes)
        data-<run>/dead_letter.jsonl
        _COMPLETED                                        written last: the shard's index is complete
    runs/<run id>/report.json, report.md, self_influence_top.{jsonl,parquet}, topk.{jsonl,parquet}
    state.json                                           the last finished run (the baseline of the next diff)
    audit.lock                                           held while a run is going (``beam_influence.audit.lock``)

Crash safety (any step may be killed, SIGKILL included; the next run repairs and resumes):

* a shard enters ``audit_manifest.json`` only after its index is published (``manifest.json``, replaced
  atomically by ``beam_influence.beam.index.publish``) and its ``_COMPLETED`` marker is written; both
  name the manifest they describe (``manifest_written_at``), and a recorded shard whose directory no
  longer holds that manifest is re-indexed (``repaired``), so an entry never points at missing parts;
* before a shard is (re-)indexed, its entry is removed from the audit manifest, then its marker, then
  whatever an earlier attempt left in its directory (``remove_tree``: a missing or half-deleted
  directory is fine);
* a shard directory with a marker of the same content and manifest but missing from the audit
  manifest (a kill between the two writes) is adopted without work;
* ``state.json`` only ever names a run whose folder is complete: it is written after the run's report,
  and a retry under the same run id first points it back at that run's own baseline;
* JSON state files are written to a temporary name and renamed.

Change detection reads content: a local input's checksum is the SHA-256 of its bytes (streamed) and
its size; on an object store the store's own checksum (GCS: CRC32C/MD5) and the size, or the SHA-256
where the store has none. Size and modification time are never trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from typing import Any, Iterable

from apache_beam.io.filesystems import FileSystems

from beam_influence.audit import faults
from beam_influence.audit.config import AuditInputError, AuditUsageError, check_run_id  # noqa: F401 - re-exported
from beam_influence.util import read_json, read_jsonl, write_json as write_json_atomic  # atomic: temp + rename

AUDIT_MANIFEST = "audit_manifest.json"
COMPLETED = "_COMPLETED"
STATE = "state.json"
FORMAT_VERSION = 1


def join(*parts: str) -> str:
    """Join path parts with '/' (works for local paths and object-store URIs)."""
    head, *rest = parts
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in rest)])


def shard_key(path: str) -> str:
    """A stable directory name for an input shard: its basename (sanitised) + a hash of the full path."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:80] or "shard"
    return f"{base}-{hashlib.sha1(path.encode()).hexdigest()[:10]}"


def _sha256_stream(f) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    while True:
        block = f.read(1 << 22)
        if not block:
            return n, h.hexdigest()
        h.update(block)
        n += len(block)


def input_fingerprint(path: str) -> tuple[int, str]:
    """(size in bytes, checksum) of an input file, from its content.

    Local files: ``"<size>:sha256:<hex>"`` of the bytes (streamed). Object stores: ``"<size>:<store
    checksum>"`` (GCS: the object's CRC32C/MD5, which changes with the content), or the streamed
    SHA-256 where the store reports none."""
    if "://" not in path:
        with open(path, "rb") as f:
            size, digest = _sha256_stream(f)
        return size, f"{size}:sha256:{digest}"
    size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    try:
        checksum = FileSystems.checksum(path)
    except Exception:  # noqa: BLE001 - a filesystem without checksums
        checksum = ""
    if checksum and str(checksum) != str(size):  # (some filesystems answer the size as the "checksum")
        return size, f"{size}:{checksum}"
    with FileSystems.open(path) as f:
        size, digest = _sha256_stream(f)
    return size, f"{size}:sha256:{digest}"


def input_checksum(path: str) -> str:
    """The content checksum of an input file (see ``input_fingerprint``)."""
    return input_fingerprint(path)[1]


def match_input_shards(patterns: Iterable[str], field: str = "train_data") -> list[str]:
    """All files matched by the patterns, sorted, deduplicated. A pattern that matches nothing is an
    ``AuditInputError`` naming it (training data that vanished must never read as "nothing new")."""
    from beam_influence.formats import match_files

    out: set[str] = set()
    for pattern in patterns:
        try:
            out.update(match_files(pattern))
        except FileNotFoundError:
            raise AuditInputError(f"{field} pattern {pattern!r} matches no files: the data is gone or the "
                                  "pattern is wrong; no run was recorded") from None
    return sorted(out)


def remove_tree(path: str) -> None:
    """Remove a directory (or object-store prefix) and everything under it; a missing or partly
    removed one is fine (what a killed earlier attempt leaves behind). Raises only if something that
    exists cannot be removed."""
    path = path.rstrip("/")
    if "://" not in path:
        def ignore_missing(func, p, exc_info):
            if not isinstance(exc_info[1], FileNotFoundError):
                raise exc_info[1]

        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=ignore_missing)
        elif os.path.lexists(path):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        return
    found = [m.path for m in FileSystems.match([path + "/**"])[0].metadata_list]
    if not found:
        return
    try:
        FileSystems.delete(found)
    except Exception:  # noqa: BLE001 - some were gone already: fine if nothing is left
        left = [p for p in found if FileSystems.exists(p)]
        if left:
            raise


def remove_file(path: str) -> None:
    """Remove one file; a missing one is fine."""
    if "://" not in path:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        return
    if FileSystems.exists(path):
        try:
            FileSystems.delete([path])
        except Exception:  # noqa: BLE001
            if FileSystems.exists(path):
                raise


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
        """input path → {"key", "index_dir", "checksum", "size", "rows", "dead_letters", "records", "parts",
        "losses", "manifest_written_at", "completed_at"}."""
        return self.data["shards"]

    def shard_dir(self, path: str) -> str:
        return join(self.root, "shards", shard_key(path))

    def marker(self, path: str) -> dict | None:
        try:
            return read_json(join(self.shard_dir(path), COMPLETED))
        except ValueError:  # a garbled marker is no marker
            return None

    def intact(self, path: str, entry: dict) -> bool:
        """Whether the shard's directory still holds the index that ``entry`` (or a marker) describes."""
        from beam_influence.beam.index import read_manifest

        d = self.shard_dir(path)
        try:
            manifest = read_manifest(d)
        except (FileNotFoundError, ValueError):
            return False
        if manifest.get("eigensystem_id") != self.eigensystem_id:
            return False
        if "manifest_written_at" in entry:
            return manifest.get("written_at") == entry["manifest_written_at"]
        from beam_influence.beam.index import shard_refs  # entries of older versions: compare the parts

        return sorted(s["path"] for s in shard_refs(d, manifest)) == sorted(p["path"] for p in entry.get("parts", []))

    def pending(self, inputs: list[str], checksums: dict[str, str]
                ) -> tuple[list[str], list[str], list[str], list[str]]:
        """(to index, adopted from a marker, changed since indexed, repaired) among ``inputs``.

        Adopts complete shard indexes that a crash left out of the manifest; a recorded shard whose
        index directory no longer matches its entry (deleted, damaged, half-rebuilt) is ``repaired``:
        indexed again."""
        todo, adopted, changed, repaired = [], [], [], []
        for path in inputs:
            entry = self.shards.get(path)
            if entry is not None:
                if entry["checksum"] != checksums[path]:
                    changed.append(path)
                    todo.append(path)
                elif not self.intact(path, entry):
                    repaired.append(path)
                    todo.append(path)
                continue
            mark = self.marker(path)
            if mark is not None and mark.get("checksum") == checksums[path] \
                    and mark.get("eigensystem_id") == self.eigensystem_id and self.intact(path, mark):
                self.shards[path] = mark
                adopted.append(path)
            else:
                todo.append(path)
        if adopted:
            self.save()
        return todo, adopted, changed, repaired

    def forget(self, paths: Iterable[str]) -> None:
        """Drop shards from the audit manifest (before their directories are rebuilt)."""
        gone = [p for p in paths if self.shards.pop(p, None) is not None]
        if gone:
            self.save()

    def clear_shard_dir(self, path: str) -> None:
        """Remove whatever an earlier attempt left in a shard's index dir: its marker first, then the
        rest. Idempotent: a missing, empty or half-deleted directory is fine."""
        d = self.shard_dir(path)
        remove_file(join(d, COMPLETED))
        remove_tree(d)

    def complete(self, path: str, entry: dict) -> None:
        """Mark one shard's index complete: marker first, then the manifest (both atomic)."""
        entry = {**entry, "eigensystem_id": self.eigensystem_id, "completed_at": time.time()}
        write_json_atomic(join(self.shard_dir(path), COMPLETED), entry)
        faults.point("after_marker")
        self.shards[path] = entry
        self.save()

    def save(self) -> None:
        write_json_atomic(self.manifest_path, self.data)

    def parts(self, inputs: Iterable[str]) -> list[dict]:
        """The Parquet files of the given (indexed) input shards."""
        return [p for path in inputs for p in self.shards[path]["parts"]]

    def losses(self, path: str) -> list[dict]:
        """The read-stage losses of an indexed shard (entries of older versions: from its dead letters)."""
        entry = self.shards[path]
        if "losses" not in entry:
            entry["losses"] = read_losses(self.shard_dir(path))
        return entry["losses"]


def read_losses(index_dir: str, manifest: dict | None = None) -> list[dict]:
    """The unreadable files / lost ranges among a shard index's dead letters (``losses.shard_losses``)."""
    from beam_influence.audit.losses import shard_losses
    from beam_influence.beam.index import read_manifest

    manifest = manifest if manifest is not None else read_manifest(index_dir)
    name = manifest.get("dead_letter_file")
    if not name:
        return []
    return shard_losses(read_jsonl(join(index_dir, name), default=[]))


def read_state(audit_root: str) -> dict:
    return read_json(join(audit_root, STATE), default={})


def write_state(audit_root: str, state: dict) -> None:
    write_json_atomic(join(audit_root, STATE), state)


def state_of_run(audit_root: str, run_id: str | None) -> dict:
    """The ``state.json`` that names the finished run ``run_id`` (``{"last_run_id": None}`` for none)."""
    if run_id is None:
        return {"last_run_id": None}
    report = read_json(join(audit_root, "runs", run_id, "report.json")) or {}
    return {"last_run_id": run_id, "previous_run_id": report.get("previous_run_id"),
            "eigensystem_id": report.get("eigensystem_id"), "finished_at": report.get("finished_at"),
            "exit_code": report.get("exit_code")}


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
