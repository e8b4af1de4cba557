"""Input that could not be read at all: unreadable files and lost ranges, counted in records.

A reader reports a lost range as *one* dead letter (``beam_influence.formats``): a corrupt Parquet
file or a pickled ``.npz`` is one error record ``<shard>:file``, an unreadable Parquet row group one
record whose reason gives the range ("(records a..b) is unreadable"), a truncated ``.gz`` or a
broken TFRecord frame one record for "the rest of the shard is lost". Counted as one dead letter, a
quarter of the data lost reads as a fraction of a percent; here each such loss is counted in the
records it stands for:

* a row group: exactly (``records_lost_is: "exact"``);
* a whole file or the rest of a shard: estimated from the file's size and the records per byte of the
  fully readable shards of the same format (``"estimated"``); where no estimate is possible (no
  readable shard of that format, or the size says nothing is missing, as for a truncated file) the one
  record the reader reported is a lower bound (``"lower bound"``).

Any loss makes its input shard *unreadable*, which the audit always alerts on (``unreadable_shards``).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

RANGE_RE = re.compile(r"\(records (\d+)\.\.(\d+)\) is unreadable")
AT_RECORD_RE = re.compile(r"at record (\d+)")
REST_MARK = "the rest of the shard is lost"
FILE_MARKS = ("not a readable", "is unreadable", "cannot be loaded", "not an .npz archive")
MAX_REASON = 300


def classify(row: Mapping) -> dict | None:
    """A dead-letter row ``{id, stage, reason, raw}`` → a loss ``{id, kind, first, records, reason}``
    (kind ``"file"`` / ``"rest"`` / ``"range"``; ``records`` None when unknown), or None when the row
    is one bad record (a bad line, a value the spec rejects, a failed projection)."""
    if row.get("stage") != "read":
        return None
    rid, reason = str(row.get("id") or ""), str(row.get("reason") or "")
    loss = {"id": rid, "reason": reason[:MAX_REASON]}
    m = RANGE_RE.search(reason)
    if m:
        first, last = int(m.group(1)), int(m.group(2))
        return {**loss, "kind": "range", "first": first, "records": last - first + 1}
    if REST_MARK in reason:
        at = AT_RECORD_RE.search(reason)
        return {**loss, "kind": "rest", "first": int(at.group(1)) if at else None, "records": None}
    if rid.endswith(":file") or any(mark in reason for mark in FILE_MARKS):
        return {**loss, "kind": "file", "first": 0, "records": None}
    return None


def shard_losses(dead_letters: Iterable[Mapping]) -> list[dict]:
    """The losses among one shard's dead letters, in file order."""
    out = [loss for row in dead_letters if (loss := classify(row)) is not None]
    return sorted(out, key=lambda l: (l["first"] is None, l["first"] or 0, l["id"]))


def format_key(path: str) -> str:
    """The file's format for comparing sizes: its extension, with ``.gz`` kept (``.jsonl.gz``)."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] == "gz":
        return "." + ".".join(parts[-2:])
    return "." + parts[-1] if len(parts) > 1 else ""


def records_per_byte(entries: Mapping[str, Mapping], sizes: Mapping[str, int]) -> dict[str, float]:
    """Per format: records / bytes over the shards read completely (no loss)."""
    records: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for path, e in entries.items():
        size = sizes.get(path)
        if e.get("losses") or not size or not e.get("records"):
            continue
        key = format_key(path)
        records[key] = records.get(key, 0) + int(e["records"])
        nbytes[key] = nbytes.get(key, 0) + int(size)
    return {k: records[k] / nbytes[k] for k in records if nbytes[k]}


def records_lost(entry: Mapping, size: int | None, per_byte: Mapping[str, float], path: str) -> tuple[int, str]:
    """(records lost in one shard, how that number is known: "exact" / "estimated" / "lower bound")."""
    losses = entry.get("losses") or []
    if not losses:
        return 0, "exact"
    known = sum(l["records"] for l in losses if l["records"] is not None)
    unknown = [l for l in losses if l["records"] is None]
    if not unknown:
        return known, "exact"
    readable = int(entry.get("records", 0)) - len(losses)  # every loss is one error record in the count
    rate = per_byte.get(format_key(path))
    if rate and size:
        estimate = round(size * rate) - readable - known
        if estimate > len(unknown):
            return known + estimate, "estimated"
    return known + len(unknown), "lower bound"
