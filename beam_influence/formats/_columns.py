"""Columnar helpers shared by the formats: find the suspect rows of an Arrow batch (those the per-record
reference might reject), give a batch its ``id`` column and normalised types, build batches from
canonical values (formats that parse record by record). Type predicates and turning batches back into canonical records
(``read_records``) are in ``_arrow``, which ``base`` imports too (so ``base`` never imports this module).

Column conventions of a chunk's batch: ``id`` (string, non-null) first, then the fields in their order;
scalars keep natural types (integers → int64 where they fit, float32 / float64, bool, string, binary);
arrays are (nested) ``list<...>`` columns with float leaves as float32, integer leaves as int64; a field a
record lacks is null. *Pass-through* columns (``is_passthrough``: struct, map, timestamp, date, time,
decimal, duration, ... and lists of them) are metadata, not features: they are never suspect and are kept
untouched (zero-copy); records built value by value (``Builder``) hold a structured value (a dict, a list of
dicts, ...) as its compact JSON text in a ``string`` column.
"""
from __future__ import annotations

import itertools
import json
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beam_influence.formats._arrow import (  # noqa: F401 - is_passthrough, has_content: used as C.<name>
    _is_binaryish,
    _is_stringish,
    _leaf_ok,
    _lengths,
    _plain_list_type,
    _scalar_ok,
    _valid_mask,
    decode_dictionary,
    has_content,
    is_listlike,
    is_passthrough,
    plain_lists,
)
from beam_influence.formats.base import (
    ERROR_KEY,
    ID_FIELD,
    ID_KEY,
    RAW_KEY,
    BadValue,
    Chunk,
    ErrorRecord,
    as_error,
    empty_batch,
    is_structured,
    shard_basename,
)

_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min
RESERVED = (ERROR_KEY, RAW_KEY)


# ---- suspect rows -----------------------------------------------------------------------------------
def list_suspects(col: pa.Array) -> np.ndarray | None:
    """Rows of a (nested) list column that ``canonical_value`` might reject: nulls inside the array, ragged
    nesting, unsupported leaves, uint64 beyond int64. None when there are none (the usual case, found
    without touching the values: no per-element work unless something is wrong)."""
    n = len(col)
    bad = np.zeros(n, bool)
    found = False
    owners: list[np.ndarray | None] = [None]  # owners[d]: row of each element at depth d (lazy)
    lens: list[np.ndarray | None] = []  # lens[d]: lengths of the lists at depth d (lazy)
    levels = [col]

    def length(d):
        while len(lens) <= d:
            lens.append(None)
        if lens[d] is None:
            lens[d] = _lengths(levels[d])
        return lens[d]

    def owner(d):  # not recursive: a self-referencing closure is a reference cycle, which would keep this
        # chunk's arrays (``levels``) alive until the garbage collector runs (memory growing with the file)
        if d == 0:
            return np.arange(n)
        while len(owners) <= d:
            owners.append(None)
        j = d
        while j > 1 and owners[j - 1] is None:
            j -= 1
        prev = owners[j - 1] if j > 1 else np.arange(n)
        for k in range(j, d + 1):
            if owners[k] is None:
                owners[k] = np.repeat(prev, length(k - 1))
            prev = owners[k]
        return prev

    level, depth = col, 0
    while is_listlike(level.type):
        if depth > 0:
            if level.null_count:  # a null inner list
                bad[owner(depth)[~_valid_mask(level)]] = True
                found = True
            if len(level) > 1:  # ragged: lists at this depth of one row differ in length
                L, o = length(depth), owner(depth)
                diff = (L[1:] != L[:-1]) & (o[1:] == o[:-1])
                if diff.any():
                    bad[o[1:][diff]] = True
                    found = True
        level = level.flatten()
        levels.append(level)
        depth += 1
    leaf = decode_dictionary(level)
    t = leaf.type
    if len(leaf):
        if leaf.null_count:
            bad[owner(depth)[~_valid_mask(leaf)]] = True
            found = True
        if not (_leaf_ok(t) or pa.types.is_null(t)):
            # Pass-through leaves (structs, timestamps, ...): a row holding one is kept as is (the reference
            # keeps a list with a structured value); only a row without any keeps today's checks.
            if found:
                has = np.zeros(n, bool)
                has[owner(depth)[_valid_mask(leaf)]] = True
                bad &= ~has
                found = bool(bad.any())
        elif pa.types.is_uint64(t):
            over = pc.greater(leaf, pa.scalar(_INT64_MAX, pa.uint64()))
            if pc.any(over).as_py():
                bad[owner(depth)[over.to_numpy(zero_copy_only=False).astype(bool)]] = True
                found = True
    return bad if found else None


def value_suspects(col: pa.Array) -> np.ndarray | None:
    """Rows of a value column that the per-record reference might reject (None: none)."""
    col = decode_dictionary(col)
    t = col.type
    if _scalar_ok(t):
        return None
    if is_listlike(t):
        try:
            col = plain_lists(col)
        except pa.ArrowException:
            return _valid_mask(col)
        return list_suspects(col)
    return None  # struct, map, temporal, decimal, ...: passed through, never suspect


def id_suspects(col: pa.Array) -> np.ndarray | None:
    """Rows whose own ``id`` value ``canonical_id`` might reject (empty, not UTF-8, not str/int)."""
    col = decode_dictionary(col)
    t = col.type
    if pa.types.is_null(t) or (pa.types.is_integer(t)):
        return None
    if _is_stringish(t):
        empty = pc.equal(pc.binary_length(col), 0)
        return _true_rows(empty)
    if _is_binaryish(t):
        try:
            col.cast(pa.string())
        except pa.ArrowException:  # some value is not UTF-8: find which (error path only)
            return np.array([_bad_utf8(v) for v in col.to_pylist()], bool)
        return _true_rows(pc.equal(pc.binary_length(col), 0))
    return _valid_mask(col)


def _bad_utf8(v: bytes | None) -> bool:
    if v is None:
        return False
    try:
        return not v.decode("utf-8")
    except UnicodeDecodeError:
        return True


def _true_rows(mask: pa.Array) -> np.ndarray | None:
    """A boolean Arrow mask (nulls false) as numpy, or None when nothing is true."""
    if not pc.any(mask).as_py():
        return None
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False).astype(bool)


def batch_suspects(batch: pa.RecordBatch) -> np.ndarray | None:
    """Rows of a raw batch (one column per field) that need the per-record reference; None: none."""
    n = batch.num_rows
    bad = None
    for name, col in zip(batch.schema.names, batch.columns):
        if name in RESERVED:  # a reserved field name: every row (the reference says why)
            return np.ones(n, bool)
        s = id_suspects(col) if name == ID_KEY else value_suspects(col)
        if s is not None:
            bad = s if bad is None else (bad | s)
    return bad


# ---- normalising a batch of good rows ---------------------------------------------------------------
def _norm_leaf(t: pa.DataType) -> pa.DataType:
    if pa.types.is_floating(t):
        return pa.float32()
    if pa.types.is_integer(t):
        return pa.int64()
    if _is_stringish(t):
        return pa.string()
    if _is_binaryish(t):
        return pa.binary()
    if pa.types.is_null(t):
        return pa.float32()  # only empty lists are left
    return t


def _norm_list_type(t: pa.DataType) -> pa.DataType:
    if is_listlike(t):
        return pa.list_(_norm_list_type(t.value_type))
    return _norm_leaf(t)


def normalize_column(col: pa.Array) -> pa.Array:
    """Natural, uniform Arrow types for a column of good rows (see the module docstring)."""
    col = decode_dictionary(col)
    t = col.type
    if is_listlike(t):
        target = _norm_list_type(t)
        if target == t:
            return col
        try:
            return col.cast(target)
        except pa.ArrowException:
            try:
                return col.cast(_plain_list_type(t))
            except pa.ArrowException:
                return col
    if pa.types.is_integer(t) and not pa.types.is_int64(t):
        try:
            return col.cast(pa.int64())
        except pa.ArrowException:  # uint64 beyond int64: kept as uint64
            return col
    if pa.types.is_float16(t):
        return col.cast(pa.float32())
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return col.cast(pa.string())
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return col.cast(pa.binary())
    return col  # scalars, and pass-through types (struct, map, temporal, decimal, ...) untouched


def derived_ids(source: str, offsets: np.ndarray) -> pa.Array:
    """``f"{shard}:{offset}"`` for each offset, built vectorised."""
    prefix = shard_basename(source) + ":"
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(np.asarray(offsets, np.int64)), pa.string()), "")


def own_ids(col: pa.Array) -> pa.Array | None:
    """A column's usable own ids as strings (null where absent), or None when it has none."""
    col = decode_dictionary(col)
    t = col.type
    if pa.types.is_integer(t) or _is_stringish(t) or _is_binaryish(t):
        return col.cast(pa.string())
    return None  # null type, or a type whose non-null values were all rejected


def id_column(source: str, offsets: np.ndarray, own: pa.Array | None) -> pa.Array:
    n = len(offsets)
    if own is None or own.null_count == n:
        return derived_ids(source, offsets)
    if own.null_count == 0:
        return own
    return pc.coalesce(own, derived_ids(source, offsets))


def finish_batch(raw: pa.RecordBatch, source: str, offsets: np.ndarray) -> pa.RecordBatch:
    """The output batch of good raw rows (``offsets``: their file offsets): id column first, fields
    normalised."""
    names, arrays, own = [], [], None
    for name, col in zip(raw.schema.names, raw.columns):
        if name == ID_KEY:
            own = own_ids(col)
        else:
            names.append(name)
            arrays.append(normalize_column(col))
    ids = id_column(source, offsets, own)
    fields = [ID_FIELD] + [pa.field(nm, a.type) for nm, a in zip(names, arrays)]
    return pa.RecordBatch.from_arrays([ids] + arrays, schema=pa.schema(fields))


class Fallback(Exception):
    """A columnar fast path cannot vouch for a block: read it record by record instead."""


def arrow_chunk(raw: pa.RecordBatch, source: str, start: int, reference: Callable[[int], dict], *,
                strict: bool = False) -> Chunk:
    """A chunk from a raw batch of consecutive records (the first at file offset ``start``).

    Suspect rows go through ``reference(i)`` (the per-record reader: a canonical record or an error dict);
    the rejected ones become ErrorRecords. A suspect the reference accepts is kept as is, or, with
    ``strict`` (the batch values came from another parser than the reference's), raises ``Fallback``."""
    n = raw.num_rows
    suspects = batch_suspects(raw)
    errors: list[ErrorRecord] = []
    keep = None
    if suspects is not None:
        keep = np.ones(n, bool)
        for i in np.flatnonzero(suspects).tolist():
            rec = reference(i)
            if ERROR_KEY in rec:
                errors.append(as_error(rec, start + i))
                keep[i] = False
            elif strict:
                raise Fallback(f"record {start + i} passed the reference")
    if keep is None or keep.all():
        offsets = np.arange(start, start + n, dtype=np.int64)
    else:
        idx = np.flatnonzero(keep)
        raw = raw.take(pa.array(idx))
        offsets = idx.astype(np.int64) + start
    return Chunk(source, start, finish_batch(raw, source, offsets), errors)


def one_batch(table: pa.Table) -> pa.RecordBatch:
    """A table as a single RecordBatch (zero-copy when it has one chunk per column)."""
    batches = table.to_batches()
    if len(batches) == 1:
        return batches[0]
    if not batches:
        return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in table.schema], schema=table.schema)
    return table.combine_chunks().to_batches()[0] if table.num_rows else batches[0]


# ---- building batches from canonical values ---------------------------------------------------------
# A cell kind: ("bool",), ("int",), ("float64",), ("float32",), ("str",), ("bytes",),
# ("arr", numpy dtype name, ndim) for numeric arrays, ("strs", "str" | "bytes", ndim) for string lists.
_SCALAR_TYPES = {"bool": pa.bool_(), "int": pa.int64(), "float64": pa.float64(), "float32": pa.float32(),
                 "str": pa.string(), "bytes": pa.binary()}
_LEAF_TYPES = {"bool": pa.bool_(), "int64": pa.int64(), "float32": pa.float32(), "str": pa.string(),
               "bytes": pa.binary()}


def kind_of(key: str, value: Any) -> tuple:
    """The cell kind of a canonical value; BadValue for an integer beyond int64 (Arrow cannot hold it)."""
    if isinstance(value, bool):
        return ("bool",)
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise BadValue(f"field {key!r}: integer {value} is out of the int64 range")
        return ("int",)
    if isinstance(value, float):
        return ("float64",)
    if isinstance(value, str):
        _check_unicode(key, value)
        return ("str",)
    if isinstance(value, bytes):
        return ("bytes",)
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return ("arr", value.dtype.name, value.ndim)
    if isinstance(value, list):
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):  # a ragged list holding objects
            arr = None
        if arr is not None and arr.dtype.kind == "U":
            for v in arr.reshape(-1).tolist():
                _check_unicode(key, v)
            return ("strs", "str", arr.ndim)
        if arr is not None and arr.dtype.kind == "S":
            return ("strs", "bytes", arr.ndim)
    if is_structured(value):
        return _JSON
    raise BadValue(f"field {key!r}: unsupported value type {type(value).__name__}")


_JSON = ("json",)  # a structured value (dict, list of dicts, datetime, ...), held as its JSON text


def json_text(value: Any) -> str:
    """The compact JSON text of a structured value (what a ``("json",)`` cell holds): ``json.dumps`` with
    ``separators=(",", ":")``, non-ASCII kept (escaped only where the text would not be valid Unicode,
    e.g. a lone surrogate); values JSON lacks (datetime, Decimal, ...) as their ``str``."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(value, separators=(",", ":"), default=_json_default)
    return text


def _json_default(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    return str(v)


def _check_unicode(key: str, value: str, what: str = "string") -> None:
    """BadValue for a string Arrow cannot hold (a lone surrogate, from a JSON escape like \\ud800)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadValue(f"field {key!r}: {what} is not valid Unicode: {e}") from None


def _offsets_array(lengths: np.ndarray) -> tuple[pa.Array, bool]:
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    large = bool(offsets[-1] > np.iinfo(np.int32).max)
    return pa.array(offsets if large else offsets.astype(np.int32)), large


def nested_column(n: int, rows: Sequence[int], shapes: np.ndarray, values: pa.Array) -> pa.Array:
    """A (nested) list column of ``n`` rows: row ``rows[j]`` holds an array of shape ``shapes[j]`` whose
    elements are the next ``prod(shapes[j])`` of the flat ``values``; other rows are null."""
    m, ndim = shapes.shape
    arr = values
    for j in range(ndim - 1, 0, -1):
        counts = np.prod(shapes[:, :j], axis=1)
        offsets, large = _offsets_array(np.repeat(shapes[:, j], counts))
        arr = (pa.LargeListArray if large else pa.ListArray).from_arrays(offsets, arr)
    row_len = np.zeros(n, np.int64)
    rows = np.asarray(rows, np.int64)
    row_len[rows] = shapes[:, 0] if m else 0
    offsets, large = _offsets_array(row_len)
    cls = pa.LargeListArray if large else pa.ListArray
    if m == n:
        return cls.from_arrays(offsets, arr)
    mask = np.ones(n, bool)
    mask[rows] = False
    return cls.from_arrays(offsets, arr, mask=pa.array(mask))


class _Column:
    __slots__ = ("kind", "rows", "values")

    def __init__(self, kind):
        self.kind, self.rows, self.values = kind, [], []

    def build(self, n: int) -> pa.Array:
        kind = self.kind
        if kind == _JSON:
            full = [None] * n
            for r, v in zip(self.rows, self.values):
                full[r] = json_text(v)
            return pa.array(full, pa.string())
        if kind[0] in _SCALAR_TYPES:
            full = [None] * n
            for r, v in zip(self.rows, self.values):
                full[r] = v
            return pa.array(full, _SCALAR_TYPES[kind[0]])
        ndim = kind[2]
        if kind[0] == "arr":
            dtype = np.dtype(kind[1])
            shapes, flats = [], []
            for v in self.values:
                if isinstance(v, np.ndarray):
                    shapes.append(v.shape)
                    flats.append(v.reshape(-1))
                else:  # a flat sequence (TFRecord's repeated fields): 1-d
                    shapes.append((len(v),))
                    flats.append(v)
            if all(isinstance(f, np.ndarray) for f in flats):
                flat = np.concatenate(flats).astype(dtype, copy=False) if flats else np.zeros(0, dtype)
            else:
                total = sum(s[0] for s in shapes)
                flat = np.fromiter(itertools.chain.from_iterable(flats), dtype, count=total)
            leaf = pa.array(flat, _LEAF_TYPES.get(dtype.name, None))
        else:
            shapes, flat = [], []
            for v in self.values:
                a = np.asarray(v, dtype=object) if v else np.zeros((0,) * ndim, object)
                shapes.append(a.shape)
                flat.extend(a.reshape(-1).tolist())
            leaf = pa.array(flat, _LEAF_TYPES[kind[1]])
        shp = np.asarray(shapes, np.int64).reshape(len(shapes), ndim)
        return nested_column(n, self.rows, shp, leaf)


class Builder:
    """Accumulates records (as cells of canonical values) and errors into chunks of consecutive records.

    A chunk is closed when it covers ``batch_rows`` records, or before a record whose field kind differs
    from that field's column so far (e.g. a scalar where earlier records had an array): chunks stay
    columnar and each record keeps exactly the types the per-record reader gives it."""

    def __init__(self, source: str, batch_rows: int, start: int = 0):
        self.source, self.batch_rows = source, batch_rows
        self._reset(start)

    def _reset(self, start: int):
        self.start = start  # offset of the first record of the open chunk
        self.count = 0  # records covered (good + bad)
        self.cols: dict[str, _Column] = {}
        self.ids: list[str | None] = []
        self.offsets: list[int] = []
        self.errors: list[ErrorRecord] = []

    def _fits(self, cells) -> bool:
        cols = self.cols
        for key, kind, _ in cells:
            col = cols.get(key)
            if col is not None and col.kind != kind:
                return False
        return True

    def add(self, offset: int, rid: str | None, cells: Iterable[tuple[str, tuple, Any]]) -> list[Chunk]:
        """Add the good record at ``offset`` (own id or None for the derived one); returns closed chunks."""
        cells = list(cells)
        out = []
        if self.ids and not self._fits(cells):
            out.append(self.flush(offset))
        if self.count == 0:
            self.start = offset
        row = len(self.ids)
        self.ids.append(rid)
        self.offsets.append(offset)
        cols = self.cols
        for key, kind, value in cells:
            col = cols.get(key)
            if col is None:
                col = cols[key] = _Column(kind)
            col.rows.append(row)
            col.values.append(value)
        self.count += 1
        if self.count >= self.batch_rows:
            out.append(self.flush(offset + 1))
        return out

    def add_error(self, offset: int, error: ErrorRecord) -> list[Chunk]:
        if self.count == 0:
            self.start = offset
        self.errors.append(error)
        self.count += 1
        if self.count >= self.batch_rows:
            return [self.flush(offset + 1)]
        return []

    def flush(self, next_start: int) -> Chunk | None:
        """Close the open chunk (None when it is empty); the next one starts at ``next_start``."""
        if self.count == 0:
            self._reset(next_start)
            return None
        n = len(self.ids)
        if n == 0:
            batch = empty_batch()
        else:
            offsets = np.asarray(self.offsets, np.int64)
            own = pa.array(self.ids, pa.string())
            ids = id_column(self.source, offsets, own)
            names = list(self.cols)
            arrays = [self.cols[k].build(n) for k in names]
            fields = [ID_FIELD] + [pa.field(k, a.type) for k, a in zip(names, arrays)]
            batch = pa.RecordBatch.from_arrays([ids] + arrays, schema=pa.schema(fields))
        chunk = Chunk(self.source, self.start, batch, self.errors)
        self._reset(next_start)
        return chunk


def canonical_cells(record: dict) -> list[tuple[str, tuple, Any]]:
    """The cells of a canonical record (without its id); BadValue for a value (or id) Arrow cannot hold."""
    _check_unicode(ID_KEY, record[ID_KEY])
    cells = []
    for k, v in record.items():
        if k != ID_KEY:
            _check_unicode(k, k, what="its name")
            cells.append((k, kind_of(k, v), v))
    return cells
