"""Local (non-Beam) loading of decoded examples for the one-host jobs (training, eigensystem).

Both entry points stream the columnar chunks of ``beam_influence.formats`` (``match_files`` →
``splits`` → ``read_split``) and decode each chunk column-wise (``ModelSpec.decode_batch``):

* ``load_examples(spec, pattern)`` keeps every decodable record (training, evaluation);
* ``sample_examples(spec, pattern, size=, seed=)`` keeps a seeded sample of ``size`` records and never
  holds more than the sample plus one chunk (the eigensystem job; memory independent of N).

Bad records (unparsable, or rejected by the spec's decoding) are counted and returned with their
reasons in ``LoadedData.bad``, never dropped silently.

Token sequences come back padded to the largest bucket, with their ``<name>_mask`` and the ``bucket``
index of each example (``beam_influence.core.buckets``); the model-running code groups by bucket.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from beam_influence.core.buckets import decoded_keys
from beam_influence.core.model_spec import ModelSpec
from beam_influence.core.types import Example

DEFAULT_BATCH_ROWS = 65536  # rows per chunk read (and decoded) at a time
DEFAULT_ROWS_PER_SPLIT = 65536
SAMPLE_BATCH_ROWS = 8192  # smaller chunks for the sample: its working set stays a few MB whatever the row groups


@dataclasses.dataclass
class LoadedData:
    """Decoded examples (leading axis N), their ids, and the rejected records.

    ``records`` holds the raw records only when asked for (``load_examples(..., keep_records=True)``);
    ``stats`` says how the data was read: ``records_read`` (good + bad), ``decoded`` (good records
    seen), ``rejected`` (= ``len(bad)``), ``kept`` (= ``n``), ``files``, ``splits``, ``chunks``, and for a
    sample ``sample_size``, ``seed`` and ``peak_rows_held`` (most decoded rows in memory at once).
    """

    batch: Example
    ids: list[str]
    records: list[dict]
    bad: list[dict]  # {"id", "reason"}
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.ids)


# ---- the chunk reader shared by load_examples and sample_examples ---------------------------------
def _formats():
    """The columnar formats API (``beam_influence.formats``: match_files, splits, read_split)."""
    from beam_influence import formats

    return formats


def _decode_batch(spec: ModelSpec, batch):
    """Column-wise decode of one Arrow batch: ``spec.decode_batch`` (the one place to switch decoders)."""
    return spec.decode_batch(batch)


@dataclasses.dataclass
class _Decoded:
    """One decoded chunk: good rows (arrays, ids, file index, row position in file) and the bad ones."""

    arrays: dict[str, np.ndarray]
    ids: np.ndarray  # [n] str
    file: np.ndarray  # [n] int64: index of the file in match_files order
    pos: np.ndarray  # [n] int64: row position in the file
    bad: list[dict]
    batch: Any  # the Arrow batch (for keep_records)
    rows: np.ndarray  # positions of the good rows in ``batch``


def _iter_decoded(spec: ModelSpec, pattern: str, *, format: str | None, rows_per_split: int,
                  batch_rows: int, stats: dict) -> Iterator[_Decoded]:
    """Stream every file matching ``pattern`` split by split, chunk by chunk, decoded column-wise."""
    fm = _formats()
    paths = fm.match_files(pattern)
    if not paths:
        raise FileNotFoundError(f"no files match {pattern!r}")
    stats.update(files=len(paths), splits=0, chunks=0, records_read=0, decoded=0, rejected=0)
    for file_idx, path in enumerate(paths):
        for split in fm.splits(path, format, rows_per_split=rows_per_split):
            stats["splits"] += 1
            for chunk in fm.read_split(split, batch_rows=batch_rows):
                stats["chunks"] += 1
                bad = [{"id": str(e.id), "reason": str(e.reason)} for e in chunk.errors]
                batch = chunk.batch
                n_rows = 0 if batch is None else batch.num_rows
                dec = None
                if n_rows:
                    dec = _decode_batch(spec, batch)
                    bad.extend({"id": str(rid), "reason": str(reason)} for _, rid, reason in dec.rejected)
                    rows = np.asarray(dec.rows, np.int64)
                    arrays, ids = dec.arrays, np.asarray(dec.ids).astype(str)
                else:
                    rows = np.zeros(0, np.int64)
                    arrays, ids = None, np.zeros(0, str)
                stats["records_read"] += n_rows + len(chunk.errors)
                stats["decoded"] += len(rows)
                stats["rejected"] += len(bad)
                yield _Decoded(arrays=arrays, ids=ids, file=np.full(len(rows), file_idx, np.int64),
                               pos=chunk.row_offsets()[rows], bad=bad,
                               batch=batch, rows=rows)
                chunk = batch = dec = arrays = ids = rows = bad = None  # hold no chunk while reading the next


def _release_arrow_memory() -> None:
    """Hand Arrow's freed chunk buffers back to the OS (its allocator otherwise keeps a high-water mark)."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except Exception:  # noqa: BLE001 - best effort; older pyarrow or a pool without it
        pass


def _no_records(pattern: str, bad: list[dict], stats: dict) -> ValueError:
    return ValueError(
        f"no decodable records in {pattern!r} ({stats.get('records_read', 0)} read, {len(bad)} bad; "
        f"first reasons: {[b['reason'] for b in bad[:3]]})"
    )


def load_examples(spec: ModelSpec, pattern: str, *, max_examples: int | None = None, seed: int = 0,
                  format: str | None = None, keep_records: bool = False,
                  batch_rows: int = DEFAULT_BATCH_ROWS) -> LoadedData:
    """Read and decode every record of every file matching ``pattern`` (files sorted, rows in file order).

    ``max_examples``: keep only a seeded sample of that many (``sample_examples``; kept for callers of
    the old API). ``keep_records``: also return each kept record as a dict (Arrow's ``to_pylist`` form).
    Raises FileNotFoundError when nothing matches and ValueError (naming the pattern) when no record decodes.
    """
    if max_examples is not None:
        return sample_examples(spec, pattern, size=max_examples, seed=seed, format=format, batch_rows=batch_rows)
    stats: dict = {}
    parts: list[dict[str, np.ndarray]] = []
    ids: list[str] = []
    bad: list[dict] = []
    records: list[dict] = []
    for d in _iter_decoded(spec, pattern, format=format, rows_per_split=DEFAULT_ROWS_PER_SPLIT,
                           batch_rows=batch_rows, stats=stats):
        bad.extend(d.bad)
        if len(d.ids):
            parts.append(d.arrays)
            ids.extend(d.ids.tolist())
            if keep_records:
                records.extend(d.batch.take(d.rows).to_pylist())
    if not ids:
        raise _no_records(pattern, bad, stats)
    batch = {k: np.concatenate([p[k] for p in parts]) for k in decoded_keys(spec.features)}
    stats["kept"] = len(ids)
    return LoadedData(batch, ids, records, bad, stats)


# ---- the seeded, order-independent sample ---------------------------------------------------------
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection of uint64), vectorised."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def id_hash(ids: np.ndarray | list[str], seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each id's UTF-8 bytes (uint64 [n]); platform- and chunking-independent."""
    ids = np.asarray(ids, dtype=str)
    n = len(ids)
    h = np.full(n, _mix(np.asarray([np.uint64(seed % 2**64) ^ _GOLDEN]))[0], np.uint64)
    if n == 0:
        return h
    raw = np.char.encode(ids, "utf-8")
    lengths = np.char.str_len(raw).astype(np.int64)
    width = -(-max(raw.dtype.itemsize, 1) // 8) * 8
    padded = np.zeros((n, width), np.uint8)
    padded[:, : raw.dtype.itemsize] = np.frombuffer(raw.tobytes(), np.uint8).reshape(n, raw.dtype.itemsize)
    words = padded.view("<u8")  # [n, width/8], little-endian on every platform
    with np.errstate(over="ignore"):
        for k in range(words.shape[1]):
            live = lengths > 8 * k
            if not live.any():
                break
            h = np.where(live, _mix((h ^ words[:, k].astype(np.uint64)) + _GOLDEN), h)
        return _mix(h ^ lengths.astype(np.uint64))


class _BottomK:
    """The ``size`` rows with the smallest (hash(seed, id), id, file, position): O(size + chunk) memory."""

    def __init__(self, size: int):
        self.size = size
        self.keys: dict[str, np.ndarray] | None = None  # hash, id, file, pos
        self.arrays: dict[str, np.ndarray] | None = None
        self.peak_rows = 0

    @property
    def n(self) -> int:
        return 0 if self.keys is None else len(self.keys["hash"])

    def threshold(self) -> np.uint64 | None:
        return self.keys["hash"].max() if self.n >= self.size else None

    def offer(self, h: np.ndarray, ids: np.ndarray, file: np.ndarray, pos: np.ndarray,
              arrays: dict[str, np.ndarray]) -> None:
        thr = self.threshold()
        if thr is not None:  # only rows that can beat the current worst (ties: ≤, decided below)
            cand = np.flatnonzero(h <= thr)
            if cand.size == 0:
                return
            h, ids, file, pos = h[cand], ids[cand], file[cand], pos[cand]
            arrays = {k: v[cand] for k, v in arrays.items()}
        keys = {"hash": h, "id": ids, "file": file, "pos": pos}
        if self.keys is not None:
            keys = {k: np.concatenate([self.keys[k], v]) for k, v in keys.items()}
            arrays = {k: np.concatenate([self.arrays[k], v]) for k, v in arrays.items()}
        self.peak_rows = max(self.peak_rows, len(keys["hash"]))
        if len(keys["hash"]) > self.size:
            order = np.lexsort((keys["pos"], keys["file"], keys["id"], keys["hash"]))[: self.size]
            keys = {k: v[order] for k, v in keys.items()}
            arrays = {k: v[order] for k, v in arrays.items()}
        self.keys, self.arrays = keys, arrays

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(keys, arrays) of the sample in file order (file, then position)."""
        order = np.lexsort((self.keys["pos"], self.keys["file"]))
        return ({k: v[order] for k, v in self.keys.items()}, {k: v[order] for k, v in self.arrays.items()})


def sample_examples(spec: ModelSpec, pattern: str, *, size: int, seed: int, format: str | None = None,
                    rows_per_split: int = DEFAULT_ROWS_PER_SPLIT, batch_rows: int = SAMPLE_BATCH_ROWS) -> LoadedData:
    """A seeded sample of ``size`` decodable records of the files matching ``pattern``, streamed.

    The sample is *bottom-k by hash*: the ``size`` good records with the smallest ``id_hash(id, seed)``
    (ties broken by id, then file and row position). It is uniform over the decodable records,
    deterministic for a seed, and does not depend on how files are split into splits or chunks (nor on
    their order). All records are kept when there are at most ``size``. Rows come back in file order.

    Memory: the sample plus one chunk (``batch_rows`` rows, and the reader's buffers of the row group being
    read) — independent of the number of records; Arrow's freed buffers are released after every chunk.
    Every split of every file is read once, streaming: none is skipped, since whether a record enters
    the sample depends on its id (not known from Parquet metadata) and every bad record must be counted.
    Each chunk is decoded column-wise; only its rows hashing at or below the current k-th smallest hash
    are merged into the sample.

    Bad records (unreadable, or rejected by the spec) are counted and returned in ``bad``; ``stats``
    holds ``records_read``, ``decoded``, ``rejected``, ``kept``, ``sample_size``, ``seed``, ``peak_rows_held``.
    Raises FileNotFoundError when nothing matches, ValueError (naming the pattern) when no record decodes.
    """
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ValueError(f"sample size must be an integer ≥ 1, got {size!r}")
    size = int(size)
    stats: dict = {}
    bad: list[dict] = []
    sampler = _BottomK(size)
    for d in _iter_decoded(spec, pattern, format=format, rows_per_split=rows_per_split, batch_rows=batch_rows,
                           stats=stats):
        bad.extend(d.bad)
        if len(d.ids):
            sampler.offer(id_hash(d.ids, seed), d.ids, d.file, d.pos, d.arrays)
        del d
        _release_arrow_memory()
    if sampler.n == 0:
        raise _no_records(pattern, bad, stats)
    keys, arrays = sampler.result()
    batch = {k: arrays[k] for k in decoded_keys(spec.features)}
    stats.update(kept=sampler.n, sample_size=size, seed=seed, peak_rows_held=sampler.peak_rows)
    return LoadedData(batch, keys["id"].tolist(), [], bad, stats)
