"""Arrow helpers that need nothing else of the package: type predicates, and batches back to canonical
records (``batch_records``, what ``read_records`` gives). ``base`` and ``_columns`` both import from here;
nothing here imports either (no import cycle).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ID_KEY = "id"


# ---- type predicates --------------------------------------------------------------------------------
def is_listlike(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
            or pa.types.is_list_view(t) or pa.types.is_large_list_view(t))


def _is_stringish(t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binaryish(t) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_number(t) -> bool:
    return pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t)


def _scalar_ok(t) -> bool:
    """Scalar types whose python values ``canonical_value`` accepts."""
    return _is_number(t) or _is_stringish(t) or _is_binaryish(t) or pa.types.is_null(t)


def _leaf_ok(t) -> bool:
    return _is_number(t) or _is_stringish(t) or _is_binaryish(t)


def is_passthrough(t: pa.DataType) -> bool:
    """A type whose values are kept as they are, never checked (struct, map, temporal, decimal, ...: anything
    but numbers, strings, binary, null and lists), or a (nested) list of such values."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    while is_listlike(t):
        t = t.value_type
    return not (_scalar_ok(t) or is_listlike(t))


def has_content(value: Any) -> bool:
    """True when a python value (of a pass-through column) holds something besides nested lists and None:
    such a row is kept whatever else its list holds (the rule ``list_suspects`` applies column-wise)."""
    if value is None:
        return False
    if isinstance(value, list):
        return any(has_content(v) for v in value)
    return True


def _plain_list_type(t: pa.DataType) -> pa.DataType:
    """``t`` with every list-like level as a plain ``list`` (large lists stay large)."""
    if not is_listlike(t):
        return t
    child = _plain_list_type(t.value_type)
    if pa.types.is_large_list(t) or pa.types.is_large_list_view(t):
        return pa.large_list(child)
    return pa.list_(child)


def plain_lists(col: pa.Array) -> pa.Array:
    """Fixed-size lists and list views as plain lists (the suspect checks work on offsets)."""
    target = _plain_list_type(col.type)
    return col if target == col.type else col.cast(target)


def decode_dictionary(col: pa.Array) -> pa.Array:
    return col.dictionary_decode() if pa.types.is_dictionary(col.type) else col


def leaf_type(t: pa.DataType) -> pa.DataType:
    while is_listlike(t):
        t = t.value_type
    return t



# ---- column helpers ---------------------------------------------------------------------------------
def _valid_mask(col: pa.Array) -> np.ndarray:
    if col.null_count == 0:
        return np.ones(len(col), bool)
    return col.is_valid().to_numpy(zero_copy_only=False)


def _lengths(col: pa.Array) -> np.ndarray:
    """Lengths of a list array's elements (nulls as 0), int64."""
    lens = pc.list_value_length(col)
    if lens.null_count:
        lens = pc.fill_null(lens, 0)
    return lens.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


# ---- batches back to canonical records --------------------------------------------------------------
def _np_leaf_dtype(t: pa.DataType):
    if pa.types.is_boolean(t):
        return np.dtype(bool)
    if pa.types.is_integer(t):
        return np.dtype(np.int64)
    if pa.types.is_floating(t):
        return np.dtype(np.float32)
    return None


def _regular_shape(col: pa.Array) -> tuple[tuple[int, ...], pa.Array] | None:
    """(shape, flat leaf values) when every non-null row of the list column has the same shape."""
    shape = []
    level = col.drop_null() if col.null_count else col
    while is_listlike(level.type):
        if level.null_count:
            return None
        L = _lengths(level)
        if len(L) and (L != L[0]).any():
            return None
        shape.append(int(L[0]) if len(L) else 0)
        level = level.flatten()
    if level.null_count:
        return None
    return tuple(shape), level


def _list_values(col: pa.Array, empty_float32: bool) -> list:
    n = len(col)
    col = plain_lists(col)
    leaf_t = leaf_type(col.type)
    dtype = _np_leaf_dtype(leaf_t)
    valid = np.flatnonzero(_valid_mask(col))
    out: list = [None] * n
    if not len(valid):
        return out

    def empty_dtype():
        return np.float32 if (empty_float32 or dtype is None) else dtype

    if dtype is not None:
        reg = _regular_shape(col)
        if reg is not None:
            shape, leaf = reg
            flat = leaf.to_numpy(zero_copy_only=False)
            if flat.size == 0:
                stacked = np.zeros((len(valid), *shape), empty_dtype())
            else:
                stacked = flat.astype(dtype, copy=False).reshape((len(valid), *shape))
            for i, row in zip(valid.tolist(), stacked):
                out[i] = row
            return out
    passthrough = dtype is None and is_passthrough(leaf_t)
    for i in valid.tolist():
        v = col[i].as_py()
        if passthrough:
            # a list of objects as its python value; one holding only empty lists as the reference has it
            out[i] = v if has_content(v) else np.asarray(v).astype(np.float32)
            continue
        arr = np.asarray(v) if dtype is None else np.asarray(v, dtype=dtype)
        if arr.size == 0:
            out[i] = np.asarray(v, dtype=empty_dtype()) if dtype is not None else np.asarray(v).astype(np.float32)
        elif dtype is None:
            out[i] = arr.tolist() if arr.dtype.kind in "US" else v
        else:
            out[i] = arr
    return out


def column_values(col: pa.Array, empty_float32: bool = True) -> list:
    """Canonical python values of a column (None for nulls)."""
    col = decode_dictionary(col)
    t = col.type
    if pa.types.is_null(t):
        return [None] * len(col)
    if is_listlike(t):
        return _list_values(col, empty_float32)
    return col.to_pylist()


def batch_records(batch: pa.RecordBatch, empty_float32: bool = True) -> list[dict]:
    """The rows of a batch as canonical record dicts (nulls left out, ``id`` first when present)."""
    n = batch.num_rows
    if n == 0:
        return []
    names = batch.schema.names
    ids = None
    cols = []
    for name, col in zip(names, batch.columns):
        if name == ID_KEY:
            ids = column_values(col)
        else:
            cols.append((name, column_values(col, empty_float32)))
    out = []
    for i in range(n):
        rec = {} if ids is None or ids[i] is None else {ID_KEY: ids[i]}
        for name, vals in cols:
            v = vals[i]
            if v is not None:
                rec[name] = v
        out.append(rec)
    return out
