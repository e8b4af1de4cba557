"""NumPy ``.npz``: one array per field with leading axis N (ids as a unicode array); every record has the
same fields with equal shapes. Always loaded with ``allow_pickle=False`` (files are untrusted).

Chunks are column-wise slices of the arrays (numeric arrays of rank ≥ 2 become nested list columns built
from the flat buffer). A file-level problem (not an archive, a pickled array, unequal lengths, an
unsupported dtype) is one error record ``{shard}:file``.
"""
from __future__ import annotations

import io
import zipfile
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa

from beam_influence.formats import _columns as C
from beam_influence.formats.base import (
    ID_KEY,
    BadValue,
    Chunk,
    ErrorRecord,
    Format,
    Split,
    canonical_value,
    derive_id,
    error_chunk,
    field_names,
    is_structured,
    open_shard,
    record_or_error,
    register,
    seekable,
)


@register
class Npz(Format):
    name = "npz"
    extensions = (".npz",)
    empty_lists_float32 = False  # an (N, 0) integer array reads back as int64 rows, as before

    def read_split(self, split: Split, batch_rows: int) -> Iterator[Chunk]:
        if split.index != 0:
            raise ValueError(f"{split.path!r}: .npz files have one split, got index {split.index}")
        path = split.path
        with open_shard(path) as f:
            loaded = _load(seekable(f), path)
        if isinstance(loaded, ErrorRecord):
            yield error_chunk(path, 0, loaded)
            return
        columns, n = loaded
        for start in range(0, n, batch_rows):
            end = min(n, start + batch_rows)
            raw = pa.RecordBatch.from_arrays([_column(arr[start:end]) for arr in columns.values()],
                                             names=list(columns))
            yield C.arrow_chunk(raw, path, start, _reference(columns, path, start))

    def writer(self, records: list[dict]) -> Callable[[int, int, Any], None]:
        arrays = _npz_arrays(records) if records else {}

        def write(start: int, end: int, f) -> None:
            f.write(_npz_bytes({k: v[start:end] for k, v in arrays.items()}))

        return write


def _load(f, path: str) -> tuple[dict[str, np.ndarray], int] | ErrorRecord:
    """The archive's arrays (numeric ones of rank ≥ 2 already cast to their canonical dtype), or the
    whole-file error record."""

    def fail(reason: str) -> ErrorRecord:
        return ErrorRecord(derive_id(path, "file"), reason)

    head = f.read(6)
    f.seek(0)
    if head[:2] != b"PK" and head != b"\x93NUMPY":
        # np.load would take anything else for a pickle and suggest allow_pickle=True: never for a data file
        if head[:1] == b"\x80":
            hint = " (it looks like a Python pickle, which is never loaded: allow_pickle=False)"
        elif head[:2] == b"\x1f\x8b":
            hint = " (it is gzip-compressed: .npz files are zip archives; decompress it)"
        else:
            hint = ""
        return fail(f"not an .npz file: it starts with {head[:4]!r}, not a zip archive's b'PK'{hint}")
    try:
        npz = np.load(f, allow_pickle=False)  # files are untrusted: never unpickle
    except Exception as e:  # noqa: BLE001 - not a zip / .npy / refuses pickled data
        return fail(f"not a readable .npz file (loaded with allow_pickle=False): {type(e).__name__}: {e}")
    if not isinstance(npz, np.lib.npyio.NpzFile):
        return fail("not an .npz archive (a single .npy array?); expected one array per field")
    columns: dict[str, np.ndarray] = {}
    with npz:
        for name in npz.files:
            try:
                arr = npz[name]
            except Exception as e:  # noqa: BLE001 - object (pickled) arrays refuse to load
                return fail(f"array {name!r} cannot be loaded with allow_pickle=False: {type(e).__name__}: {e}")
            if arr.ndim == 0:
                return fail(f"array {name!r} is 0-d; every field needs a leading record axis")
            if arr.dtype.kind not in "biufUS":
                return fail(f"array {name!r} has unsupported dtype {arr.dtype}")
            columns[name] = arr
    lengths = {name: len(arr) for name, arr in columns.items()}
    if len(set(lengths.values())) > 1:
        return fail(f"arrays have different leading lengths {lengths}")
    for name, arr in columns.items():
        if arr.ndim > 1 and arr.dtype.kind not in "US":
            try:
                columns[name] = canonical_value(arr)  # one cast for the whole column
            except BadValue as e:
                return fail(f"array {name!r}: {e}")
    return columns, next(iter(lengths.values()), 0)


def _column(arr: np.ndarray) -> pa.Array:
    """An Arrow column of rows ``arr[i]``: scalars for 1-d arrays, nested lists otherwise (from the flat
    buffer, no per-element python)."""
    if arr.ndim == 1:
        if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and len(arr) and arr.max() <= np.iinfo(np.int64).max:
            return pa.array(arr.astype(np.int64))
        return pa.array(arr)
    n = len(arr)
    shapes = np.tile(np.asarray(arr.shape[1:], np.int64), (n, 1))
    flat = arr.reshape(-1)
    if arr.dtype.kind == "U":
        leaf = pa.array(flat, pa.string())
    elif arr.dtype.kind == "S":
        leaf = pa.array(flat, pa.binary())
    else:
        leaf = pa.array(flat)
    return C.nested_column(n, np.arange(n), shapes, leaf)


def _row_value(arr: np.ndarray, i: int) -> Any:
    if arr.ndim == 1 or arr.dtype.kind in "US":
        return arr[i].tolist()  # python scalars (or nested lists of str)
    return arr[i]


def _reference(columns: Mapping[str, np.ndarray], path: str, start: int):
    """The per-record reader of row ``start + i`` (python values → ``canonical_record``)."""

    def ref(i: int) -> dict:
        row = {name: _row_value(arr, start + i) for name, arr in columns.items()}
        return record_or_error(row, path, start + i, lambda: repr(row))

    return ref


# ---- writing ---------------------------------------------------------------------------------------
def _npz_arrays(records: list[dict]) -> dict[str, np.ndarray]:
    keys = field_names(records)
    arrays = {}
    for key in keys:
        missing = [i for i, rec in enumerate(records) if key not in rec]
        if missing:
            raise ValueError(f"npz needs every field in every record: field {key!r} is missing from record "
                             f"{missing[0]} (id {records[missing[0]].get(ID_KEY)!r})")
        values = [rec[key] for rec in records]
        bad = next((i for i, v in enumerate(values) if is_structured(v)), None)
        if bad is not None:
            raise ValueError(f"field {key!r} of record {bad} (id {records[bad].get(ID_KEY)!r}) is a "
                             f"{type(values[bad]).__name__} (a structured value); npz stores plain arrays only")
        n_str = sum(isinstance(v, (str, bytes)) for v in values)
        if 0 < n_str < len(values):
            raise ValueError(f"field {key!r} mixes strings and non-strings; npz stores plain arrays only")
        try:
            arr = np.stack([np.asarray(v) for v in values]) if isinstance(values[0], np.ndarray) \
                else np.asarray(values)
        except ValueError as e:
            raise ValueError(f"field {key!r} cannot be stacked into one array: {e}") from None
        if arr.dtype.kind not in "biufUS":
            raise ValueError(f"field {key!r} mixes types (numpy dtype {arr.dtype}); npz stores plain arrays only")
        arrays[key] = arr
    return arrays


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz archive (what np.savez writes) without pickling, for any field names."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()
