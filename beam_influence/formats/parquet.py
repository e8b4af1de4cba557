"""Parquet: one row per record, (nested) list columns for arrays (float arrays written as float32).

Splits are runs of consecutive row groups (from the footer alone). A split is read row group by row
group, each streamed in record batches of at most ``batch_rows`` rows (``ParquetFile.iter_batches``, so a
chunk never needs a whole row group in memory), and re-batched into chunks of ``batch_rows`` rows (a
chunk may span row groups; a batch is sliced, not copied, unless a chunk joins pieces); the id column is
added vectorised. Only rows a vectorised check flags (nulls inside arrays, ragged nesting, bad ids,
reserved field names) go through the per-record reference, which turns them into error records with
today's reasons. Columns of other types — struct, map, timestamp, date, time, decimal, duration, ... and
lists of them — are metadata: passed through untouched (``_columns.is_passthrough``), never an error. An
unreadable file is one error record ``{shard}:file``; an unreadable row group one error record (the
derived id of its first record lost) standing for all its rows not read — all of them, or, when it fails
part-way, the rest of them after the good rows already read.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from beam_influence.formats import _columns as C
from beam_influence.formats.base import (
    ID_KEY,
    Chunk,
    ErrorRecord,
    Format,
    Split,
    derive_id,
    error_chunk,
    field_names,
    is_gzip_path,
    is_structured,
    is_local,
    open_shard,
    record_or_error,
    register,
    seekable,
)


_BUFFER_BYTES = 1 << 20  # read buffer of each column reader


@contextlib.contextmanager
def _source(path: str):
    """A pyarrow-readable source for ``path``: the local file natively, else a Beam FileSystems stream
    (decompressed into memory for a ``.gz`` path). Raises when the file cannot be opened."""
    if is_local(path) and not is_gzip_path(path):
        with pa.OSFile(path, "rb") as f:
            yield f
        return
    with open_shard(path) as f:
        yield io.BytesIO(f.read()) if is_gzip_path(path) else seekable(f)


def _open(src):
    import pyarrow.parquet as pq

    # No pre-buffering (pyarrow's default reads a whole row group's column chunks up front) and buffered column
    # reads: with ``iter_batches`` a row group then streams, holding about one batch of it in memory.
    pf = pq.ParquetFile(src, pre_buffer=False, buffer_size=_BUFFER_BYTES)
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    return pf, sizes


def _file_error(path: str, e: BaseException) -> ErrorRecord:
    return ErrorRecord(derive_id(path, "file"), f"not a readable Parquet file: {type(e).__name__}: {e}")


@register
class Parquet(Format):
    name = "parquet"
    extensions = (".parquet",)

    def splits(self, path: str, rows_per_split: int) -> list[Split]:
        with _source(path) as src:
            try:
                _, sizes = _open(src)
            except Exception:  # noqa: BLE001 - unreadable: one split, whose reading reports it
                return [Split(path, self.name, 0)]
        out: list[Split] = []
        groups: list[int] = []
        start = rows = 0
        for g, size in enumerate(sizes):
            if groups and rows + size > rows_per_split:
                out.append(Split(path, self.name, len(out), start, rows, tuple(groups)))
                start, groups, rows = start + rows, [], 0
            groups.append(g)
            rows += size
        if groups or not out:
            out.append(Split(path, self.name, len(out), start, rows, tuple(groups)))
        return out

    def read_split(self, split: Split, batch_rows: int) -> Iterator[Chunk]:
        path = split.path
        with _source(path) as src:
            try:
                pf, sizes = _open(src)
            except Exception as e:  # noqa: BLE001 - any failure here means the file is not readable Parquet
                yield error_chunk(path, 0, _file_error(path, e))
                return
            starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
            groups = split.row_groups if split.row_groups else tuple(range(len(sizes)))
            pending = _Pending(path, batch_rows)
            for g in groups:
                size, offset = sizes[g], starts[g]
                if pending.rows and pending.end != offset:
                    yield from pending.drain(final=True)  # row groups not consecutive: keep chunks contiguous
                if size == 0:
                    continue
                got = 0
                try:
                    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], use_threads=True):
                        if got + batch.num_rows > size:
                            raise ValueError(f"row group has more rows than its metadata's {size}")
                        if batch.num_rows:
                            pending.add(batch, offset + got)
                            got += batch.num_rows
                            yield from pending.drain(final=False)
                    if got != size:
                        raise ValueError(f"row group has {got} rows, metadata says {size}")
                except Exception as e:  # noqa: BLE001 - a corrupt row group loses its rows not read, reported once
                    yield from pending.drain(final=True)
                    lost = offset + got
                    err = ErrorRecord(
                        derive_id(path, lost),
                        f"Parquet row group {g} (records {lost}..{offset + size - 1}) is unreadable: "
                        f"{type(e).__name__}: {e}",
                        offset=lost)
                    yield error_chunk(path, lost, err, pending.schema_batch)
            yield from pending.drain(final=True)

    def writer(self, records: list[dict]) -> Callable[[int, int, Any], None]:
        table = _parquet_table(records)  # whole-data columns (types checked across records), sliced per shard

        def write(start: int, end: int, f) -> None:
            import pyarrow.parquet as pq

            buf = io.BytesIO()
            pq.write_table(table.slice(start, end - start), buf)
            f.write(buf.getvalue())

        return write

    def write_table(self, table: pa.Table, f) -> None:
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf)
        f.write(buf.getvalue())


class _Pending:
    """Record batches read but not yet yielded (consecutive records from ``start``), cut into chunks of
    ``batch_rows``: holds at most ``batch_rows`` rows between ``drain`` calls (plus the batch just added)."""

    def __init__(self, path: str, batch_rows: int):
        self.path, self.batch_rows = path, batch_rows
        self.pieces: list[pa.RecordBatch] = []
        self.start = self.rows = 0
        self.schema_batch = None  # an empty batch with the file's normalised schema, for error chunks

    @property
    def end(self) -> int:
        return self.start + self.rows

    def add(self, batch: pa.RecordBatch, offset: int) -> None:
        if not self.pieces:
            self.start = offset
        self.pieces.append(batch)
        self.rows += batch.num_rows

    def _take(self, k: int) -> pa.RecordBatch:
        """The first ``k`` pending rows as one batch (a slice when one piece holds them, else one copy)."""
        out, got = [], 0
        while got < k:
            piece = self.pieces[0]
            need = k - got
            if piece.num_rows <= need:
                out.append(self.pieces.pop(0))
                got += piece.num_rows
            else:
                out.append(piece.slice(0, need))
                self.pieces[0] = piece.slice(need)
                got = k
        self.rows -= k
        return out[0] if len(out) == 1 else pa.concat_batches(out)

    def drain(self, final: bool) -> Iterator[Chunk]:
        while self.rows >= self.batch_rows or (final and self.rows):
            take = min(self.batch_rows, self.rows)
            start = self.start
            raw = self._take(take)
            self.start += take
            chunk = C.arrow_chunk(raw, self.path, start, _reference(raw, self.path, start))
            if self.schema_batch is None:
                self.schema_batch = _empty_like(chunk.batch)
            yield chunk


def _empty_like(batch: pa.RecordBatch) -> pa.RecordBatch:
    """An empty batch with ``batch``'s schema that holds none of its buffers (a zero-row slice would keep the
    whole chunk alive)."""
    try:
        return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in batch.schema], schema=batch.schema)
    except (pa.ArrowException, TypeError, ValueError):  # a type pa.array cannot make empty
        return batch.slice(0, 0)


def _reference(raw: pa.RecordBatch, path: str, start: int):
    """The per-record reader for suspect row ``i`` of ``raw`` (python values → ``canonical_record``).

    Pass-through columns (struct, timestamp, ..., lists of them) never make a row bad: a value with content
    is left out of what the reference checks (only one holding nothing but nested lists and nulls, which
    the column check flags like any array, is checked)."""
    names = raw.schema.names
    passthrough = {j for j, f in enumerate(raw.schema)
                   if f.name != ID_KEY and f.name not in C.RESERVED and C.is_passthrough(f.type)}
    checked = raw.select([j for j in range(raw.num_columns) if j not in passthrough]) if passthrough else raw
    lists = {j for j in passthrough if C.is_listlike(raw.schema.field(j).type)}

    def ref(i: int) -> dict:
        try:
            py = checked.slice(i, 1).to_pylist()[0]
        except Exception as e:  # noqa: BLE001 - a value pyarrow cannot turn into python
            return {"id": derive_id(path, start + i), "__error__": f"unconvertible value: {type(e).__name__}: {e}",
                    "__raw__": b""}
        if not passthrough:
            return record_or_error(py, path, start + i, lambda: repr(py))
        row = {}
        for j, name in enumerate(names):  # in column order (the reason names the first bad field)
            if j not in passthrough:
                row[name] = py[name]
                continue
            if j not in lists:
                continue
            try:
                v = raw.column(j)[i].as_py()
            except Exception:  # noqa: BLE001 - only a value with content can fail to convert: kept
                continue
            if not C.has_content(v):  # nested lists and nulls only: checked like any array
                row[name] = v

        def raw_row():
            try:
                return repr(raw.slice(i, 1).to_pylist()[0])
            except Exception:  # noqa: BLE001 - a pass-through value python cannot hold: the checked fields
                return repr(row)

        return record_or_error(row, path, start + i, raw_row)

    return ref


# ---- writing ---------------------------------------------------------------------------------------------
def _parquet_table(records: list[dict]) -> pa.Table:
    columns = {}
    for key in field_names(records):
        values = [rec.get(key) for rec in records]
        present = [v for v in values if v is not None]
        arrays = [isinstance(v, (np.ndarray, list)) for v in present]
        try:
            if any(is_structured(v) for v in present):  # dicts, datetimes, lists of dicts: as Arrow types them
                columns[key] = pa.array([v.tolist() if isinstance(v, np.ndarray) else v for v in values])
            elif any(arrays):
                if not all(arrays):
                    raise ValueError("mixes scalars and arrays")
                columns[key] = _parquet_list_column(values, present)
            else:
                columns[key] = pa.array(values)
        except (ValueError, TypeError, pa.ArrowException) as e:
            raise ValueError(f"field {key!r} cannot be written to Parquet: {e}") from None
    if not columns:
        return pa.table({})
    return pa.table(columns)


def _parquet_list_column(values: list, present: list) -> pa.Array:
    ndims, kinds = set(), set()
    for v in present:
        if isinstance(v, np.ndarray):
            ndims.add(v.ndim)
            kinds.add(v.dtype.kind)
        else:  # list of str (possibly nested)
            ndims.add(np.asarray(v).ndim)
            kinds.add("U")
    if len(ndims) != 1:
        raise ValueError(f"arrays of different ranks {sorted(ndims)}")
    if "U" in kinds or "S" in kinds:
        if kinds - {"U", "S"}:
            raise ValueError("mixes string and numeric arrays")
        leaf = pa.string() if kinds == {"U"} else pa.binary()
    elif "f" in kinds:
        leaf = pa.float32()
    elif "i" in kinds:
        leaf = pa.int64()
    else:
        leaf = pa.bool_()
    ndim = ndims.pop()
    if leaf != pa.string() and leaf != pa.binary() and all(isinstance(v, np.ndarray) for v in present):
        # numeric arrays: flat values + offsets (no per-element python objects)
        rows = [i for i, v in enumerate(values) if v is not None]
        shapes = np.asarray([v.shape for v in present], np.int64).reshape(len(present), ndim)
        np_leaf = {pa.float32(): np.float32, pa.int64(): np.int64, pa.bool_(): np.bool_}[leaf]
        flat = np.concatenate([v.reshape(-1).astype(np_leaf, copy=False) for v in present])
        return C.nested_column(len(values), rows, shapes, pa.array(flat, leaf))
    typ = leaf
    for _ in range(ndim):
        typ = pa.list_(typ)
    py = [v.tolist() if isinstance(v, np.ndarray) else v for v in values]
    return pa.array(py, type=typ)
