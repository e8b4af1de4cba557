"""Parquet: one row per record, (nested) list columns for arrays (float arrays written as float32).

Splits are runs of consecutive row groups (from the footer alone). A split is read row group by row
group with pyarrow and re-batched into chunks of ``batch_rows`` rows; the id column is added vectorised.
Only rows a vectorised check flags (nulls inside arrays, ragged nesting, unsupported types, bad ids,
reserved field names) go through the per-record reference, which turns them into error records with
today's reasons. An unreadable file is one error record ``{shard}:file``; an unreadable row group one
error record (the derived id of its first record) standing for all its rows.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from beam_influence.formats import _columns as C
from beam_influence.formats.base import (
    Chunk,
    ErrorRecord,
    Format,
    Split,
    derive_id,
    error_chunk,
    field_names,
    is_gzip_path,
    is_local,
    open_shard,
    record_or_error,
    register,
    seekable,
)


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

    pf = pq.ParquetFile(src)
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
            pending: pa.Table | None = None
            pending_start = 0
            schema_batch = None  # an empty batch with the file's normalised schema, for error chunks

            def drain(final: bool):
                nonlocal pending, pending_start, schema_batch
                while pending is not None and (pending.num_rows >= batch_rows or (final and pending.num_rows)):
                    take = min(batch_rows, pending.num_rows)
                    raw = C.one_batch(pending.slice(0, take))
                    rest = pending.slice(take)
                    chunk = C.arrow_chunk(raw, path, pending_start, _reference(raw, path, pending_start))
                    if schema_batch is None:
                        schema_batch = chunk.batch.slice(0, 0)
                    yield chunk
                    pending_start += take
                    pending = rest if rest.num_rows else None

            for g in groups:
                size, offset = sizes[g], starts[g]
                if pending is not None and pending_start + pending.num_rows != offset:
                    yield from drain(final=True)  # row groups not consecutive: keep chunks contiguous
                if size == 0:
                    continue
                try:
                    table = pf.read_row_group(g)
                    if table.num_rows != size:
                        raise ValueError(f"row group has {table.num_rows} rows, metadata says {size}")
                except Exception as e:  # noqa: BLE001 - a corrupt row group loses its rows, reported once
                    yield from drain(final=True)
                    err = ErrorRecord(
                        derive_id(path, offset),
                        f"Parquet row group {g} (records {offset}..{offset + size - 1}) is unreadable: "
                        f"{type(e).__name__}: {e}",
                        offset=offset)
                    yield error_chunk(path, offset, err, schema_batch)
                    continue
                if pending is None:
                    pending, pending_start = table, offset
                else:
                    pending = pa.concat_tables([pending, table])
                yield from drain(final=False)
            yield from drain(final=True)

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


def _reference(raw: pa.RecordBatch, path: str, start: int):
    """The per-record reader for suspect row ``i`` of ``raw`` (python values → ``canonical_record``)."""

    def ref(i: int) -> dict:
        try:
            row = raw.slice(i, 1).to_pylist()[0]
        except Exception as e:  # noqa: BLE001 - a value pyarrow cannot turn into python
            return {"id": derive_id(path, start + i), "__error__": f"unconvertible value: {type(e).__name__}: {e}",
                    "__raw__": b""}
        return record_or_error(row, path, start + i, lambda: repr(row))

    return ref


# ---- writing ---------------------------------------------------------------------------------------------
def _parquet_table(records: list[dict]) -> pa.Table:
    columns = {}
    for key in field_names(records):
        values = [rec.get(key) for rec in records]
        present = [v for v in values if v is not None]
        arrays = [isinstance(v, (np.ndarray, list)) for v in present]
        try:
            if any(arrays):
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
