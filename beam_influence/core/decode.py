"""Column-wise decoding: an Arrow batch of raw records → arrays of the ModelSpec's features.

One implementation serves batches and single records (``ModelSpec.decode`` decodes a one-row batch),
so the two can never disagree. Every check is a numpy operation over a whole column; per-row Python
runs only to word the reason of a rejected row.

Checks per feature, in this order (a row gets the reason of the first failing check):
  missing (absent column or null) → non-numeric values (booleans too, unless the dtype is bool) → shape → non-finite → integer conversion
  (non-integral float, out of the dtype's range) → the spec's [min, max] range.
Shape rule: a row whose nested lists have exactly ``shape`` is taken as is; a flat row (or a scalar)
with ``prod(shape)`` values is reshaped (TFRecord and JSONL writers flatten arrays).

Sequence features (``shape=(None,)`` with ``buckets``) are list columns of any length: padded to the
largest bucket with ``pad_id``, with a ``<name>_mask`` and the example's ``bucket`` index added (see
``beam_influence.core.buckets``); too long → rejected (or cut, with ``truncate=True``); shorter than the
feature's ``min_length`` → rejected.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beam_influence.core.buckets import BUCKET_KEY, check_sequence_features, mask_key


@dataclasses.dataclass
class DecodedBatch:
    """The good rows of a batch as arrays, and the rejected ones with their reasons.

    Attributes:
      ids: ``[n]`` ids (str) of the good rows.
      arrays: feature name → ``[n, *shape]`` array of the feature's dtype.
      rows: ``[n]`` int64 positions of the good rows in the input batch.
      rejected: ``(position, id, reason)`` of every rejected row, by position.
    """

    ids: np.ndarray
    arrays: dict[str, np.ndarray]
    rows: np.ndarray
    rejected: list[tuple[int, str, str]]

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])


def _levels(col: pa.Array) -> tuple[list[np.ndarray], pa.Array]:
    """Per nesting level the list lengths (nulls as -1), and the leaf values."""
    lengths = []
    arr = col
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        lengths.append(pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64))
        arr = arr.flatten()
    return lengths, arr


def _row_of(lengths: list[np.ndarray], n: int) -> list[np.ndarray]:
    """For each level, the row (of the n top-level rows) that each element of that level belongs to."""
    owners = [np.arange(n)]
    for ln in lengths:
        owners.append(np.repeat(owners[-1], np.maximum(ln, 0)))
    return owners  # owners[j]: row of each element at depth j (owners[-1]: of each leaf)


def _any_per_row(flags: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    if flags.size == 0:
        return np.zeros(n, bool)
    return np.bincount(owner[flags], minlength=n) > 0 if flags.any() else np.zeros(n, bool)


def _py_shape(value: Any) -> tuple[int, ...]:
    try:
        return np.asarray(value).shape
    except ValueError:  # ragged
        return (len(value),) if isinstance(value, list) else ()


def decode_columns(features: Mapping[str, Any], batch: pa.RecordBatch | pa.Table) -> DecodedBatch:
    """Decode ``batch`` column by column into the ``features`` (name → FeatureSpec); see module doc."""
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([])
    n = batch.num_rows
    names = batch.schema.names
    if "id" in names:
        ids = batch.column(names.index("id")).to_numpy(zero_copy_only=False).astype(object)
    else:
        ids = np.asarray([str(i) for i in range(n)], dtype=object)
    bad = np.zeros(n, bool)
    reasons: dict[int, str] = {}

    def reject(mask: np.ndarray, reason) -> None:
        new = np.flatnonzero(mask & ~bad)
        for i in new:
            reasons[int(i)] = reason(int(i)) if callable(reason) else reason
        bad[new] = True

    def present_fields(i: int) -> list[str]:
        return sorted(c for c in names if batch.column(names.index(c))[i].is_valid)

    arrays: dict[str, np.ndarray] = {}
    seq_bucket: dict[str, np.ndarray] = {}  # sequence feature → per-row smallest fitting bucket index
    for key, fs in features.items():
        if getattr(fs, "buckets", None) is not None:
            arrays[key], arrays[mask_key(key)], seq_bucket[key] = _decode_sequence(key, fs, batch, names, n, reject)
            continue
        shape = tuple(fs.shape)
        size = int(np.prod(shape)) if shape else 1
        dtype = np.dtype(fs.dtype)
        if key not in names:
            reject(np.ones(n, bool), lambda i, key=key: f"record is missing feature {key!r} (has {present_fields(i)})")
            arrays[key] = np.zeros((n,) + shape, dtype)
            continue
        col = batch.column(names.index(key))
        if col.null_count:
            reject(np.asarray(col.is_null()), lambda i, key=key: f"record is missing feature {key!r} (has {present_fields(i)})")
        lengths, leaf = _levels(col)
        owners = _row_of(lengths, n)
        leaf_type = leaf.type
        if not (pa.types.is_integer(leaf_type) or pa.types.is_floating(leaf_type) or pa.types.is_boolean(leaf_type)
                or pa.types.is_null(leaf_type)):
            kind = "U" if (pa.types.is_string(leaf_type) or pa.types.is_large_string(leaf_type)) else \
                ("S" if pa.types.is_binary(leaf_type) else "O")
            nonempty = _any_per_row(np.ones(len(leaf), bool), owners[-1], n) if lengths else np.ones(n, bool)
            reject(nonempty | (np.zeros(n, bool) if lengths else True),
                   f"feature {key!r} is not convertible to {fs.dtype}: holds {kind!r}-kind values ({leaf_type})")
        if pa.types.is_boolean(leaf_type) and dtype.kind != "b":  # JSON true/false is not a number or a label
            holds = _any_per_row(np.ones(len(leaf), bool), owners[-1], n) if lengths else np.ones(n, bool)
            reject(holds, f"feature {key!r} holds booleans (true/false), not numbers for dtype {fs.dtype}; write "
                          "them as numbers (0/1) if that is what they mean")
        # shape: exact nesting, or flat/scalar with prod(shape) values
        depth = len(lengths)
        if depth == len(shape) and depth > 0:
            ok = np.ones(n, bool)
            for j, ln in enumerate(lengths):
                ok &= ~_any_per_row(ln != shape[j], owners[j], n)
        elif depth == len(shape) == 0:
            ok = np.ones(n, bool)
        elif depth == 1:
            ok = lengths[0] == size
        elif depth == 0:
            ok = np.full(n, size == 1)
        else:
            ok = np.zeros(n, bool)
        if not ok.all():
            reject(~ok, lambda i, key=key: f"feature {key!r} has shape {_py_shape(col[i].as_py())}, "
                                            f"expected {shape}")
        # leaf values of the rows with the right shape: each such row owns `size` contiguous leaves
        null_leaf = np.asarray(leaf.is_null()) if leaf.null_count else None
        if null_leaf is not None:
            reject(_any_per_row(null_leaf, owners[-1], n), f"feature {key!r} holds null values")
            leaf = pc.fill_null(leaf, 0) if not pa.types.is_null(leaf_type) else leaf
        if pa.types.is_null(leaf_type) or not (pa.types.is_integer(leaf_type) or pa.types.is_floating(leaf_type)
                                                or pa.types.is_boolean(leaf_type)):
            arrays[key] = np.zeros((n,) + shape, dtype)
            continue
        values = leaf.to_numpy(zero_copy_only=False)
        counts = np.bincount(owners[-1], minlength=n) if depth else np.ones(n, np.int64)
        good_shape = ok & (counts == size)
        if good_shape.all() and values.size == n * size:
            vals = values.reshape(n, size)
        else:
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            vals = np.zeros((n, size), values.dtype)
            rows = np.flatnonzero(good_shape)
            if rows.size:
                vals[rows] = values[starts[rows][:, None] + np.arange(size)]
        src_float = vals.dtype.kind == "f"
        if src_float:
            finite = np.isfinite(vals).all(axis=1)
            if dtype.kind == "f" or not finite.all():
                reject(~finite, f"feature {key!r} holds non-finite values")
        if dtype.kind in "iu":
            if src_float:
                frac = (vals != np.round(vals)).any(axis=1) & ~bad
                reject(frac, lambda i, key=key: f"feature {key!r} holds non-integer values for dtype {fs.dtype}: "
                                                 f"{vals[i][vals[i] != np.round(vals[i])][:3].tolist()}")
            info = np.iinfo(dtype)
            with np.errstate(invalid="ignore"):
                over = ((vals < info.min) | (vals > info.max)).any(axis=1)
            reject(over, lambda i, key=key: f"feature {key!r} holds values outside the {fs.dtype} range "
                                             f"[{info.min}, {info.max}]: {vals[i].min()}..{vals[i].max()}")
        if fs.min is not None or fs.max is not None:
            with np.errstate(invalid="ignore"):
                out = np.zeros(n, bool)
                if fs.min is not None:
                    out |= (vals < fs.min).any(axis=1)
                if fs.max is not None:
                    out |= (vals > fs.max).any(axis=1)
            reject(out, lambda i, key=key: f"feature {key!r} is out of range [{fs.min}, {fs.max}]: "
                                            f"{vals[i].min()}..{vals[i].max()}")
        with np.errstate(invalid="ignore", over="ignore"):
            arrays[key] = vals.astype(dtype, copy=False).reshape((n,) + shape)
    if seq_bucket:
        check_sequence_features(features)
        arrays[BUCKET_KEY] = np.max(np.stack(list(seq_bucket.values())), axis=0).astype(np.int32)
    good = np.flatnonzero(~bad)
    if good.size != n:
        arrays = {k: v[good] for k, v in arrays.items()}
    rejected = [(i, str(ids[i]), reasons[i]) for i in sorted(reasons)]
    return DecodedBatch(ids=ids[good].astype(str) if good.size else np.zeros(0, str), arrays=arrays,
                        rows=good.astype(np.int64), rejected=rejected)


def _decode_sequence(key: str, fs: Any, batch: pa.RecordBatch, names: list[str], n: int, reject
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A variable-length token column → (``[n, b_max]`` ids padded with ``pad_id``, ``[n, b_max]`` bool mask,
    ``[n]`` smallest fitting bucket index). Rows that do not fit are passed to ``reject`` (missing, not a
    list of integers, null or non-integral or out-of-range tokens, longer than the largest bucket unless
    ``fs.truncate``, shorter than ``fs.min_length``). Column-wise: one scatter of the leaf values, no per-row Python."""
    dtype = np.dtype(fs.dtype)
    buckets = np.asarray(fs.buckets, np.int64)
    width = int(buckets[-1])
    ids = np.full((n, width), fs.pad_id, dtype)
    mask = np.zeros((n, width), bool)
    missing = lambda i: f"record is missing feature {key!r}"  # noqa: E731
    if key not in names:
        reject(np.ones(n, bool), missing)
        return ids, mask, np.zeros(n, np.int32)
    col = batch.column(names.index(key))
    if col.null_count:
        reject(np.asarray(col.is_null()), missing)
    lengths, leaf = _levels(col)
    if len(lengths) != 1:
        reject(np.ones(n, bool), f"feature {key!r} must be a list of token ids (a 1-D sequence), got Arrow "
                                 f"type {col.type}")
        return ids, mask, np.zeros(n, np.int32)
    length = np.maximum(lengths[0], 0)
    owner = np.repeat(np.arange(n), length)
    lt = leaf.type
    if not (pa.types.is_integer(lt) or pa.types.is_floating(lt) or pa.types.is_null(lt)):
        reject(length > 0, f"feature {key!r} is not convertible to {fs.dtype}: holds {lt} tokens")
        return ids, mask, np.zeros(n, np.int32)
    if leaf.null_count:
        reject(_any_per_row(np.asarray(leaf.is_null()), owner, n), f"feature {key!r} holds null tokens")
        leaf = pc.fill_null(leaf, fs.pad_id) if not pa.types.is_null(lt) else leaf
    values = (np.zeros(len(leaf), dtype) if pa.types.is_null(lt) else leaf.to_numpy(zero_copy_only=False))
    if values.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            frac = ~np.isfinite(values) | (values != np.round(values))
        reject(_any_per_row(frac, owner, n), f"feature {key!r} holds non-integer token ids for dtype {fs.dtype}")
        values = np.where(frac, fs.pad_id, values)
    info = np.iinfo(dtype)
    lo = info.min if fs.min is None else max(info.min, fs.min)
    hi = info.max if fs.max is None else min(info.max, fs.max)
    with np.errstate(invalid="ignore"):
        out = (values < lo) | (values > hi)
    if out.any():
        per_row = _any_per_row(out, owner, n)
        reject(per_row, lambda i: f"feature {key!r} holds token ids outside [{lo}, {hi}]: "
                                  f"{values[owner == i].min()}..{values[owner == i].max()}")
        values = np.where(out, fs.pad_id, values)
    too_long = length > width
    if too_long.any() and not fs.truncate:
        reject(too_long, lambda i: f"feature {key!r} has length {int(length[i])}, longer than its largest bucket "
                                   f"{width} (buckets {tuple(fs.buckets)}); add a bucket or set truncate=True "
                                   "in its FeatureSpec to cut it")
    too_short = (length < fs.min_length) & (lengths[0] >= 0)  # a null row is already "missing"
    if too_short.any():
        reject(too_short, lambda i: f"feature {key!r} has length {int(length[i])}, shorter than its minimum length "
                                    f"{fs.min_length} (min_length of its FeatureSpec): an empty or too-short "
                                    "sequence is a degenerate example (e.g. an empty target has zero loss and "
                                    "gradient, so it could never be scored)")
    kept = np.minimum(length, width)
    starts = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
    pos = np.arange(len(values), dtype=np.int64) - np.repeat(starts, length)
    keep = pos < width
    ids[owner[keep], pos[keep]] = values[keep].astype(dtype)
    mask[:] = np.arange(width)[None, :] < kept[:, None]
    bucket = np.searchsorted(buckets, kept, side="left").astype(np.int32)
    return ids, mask, bucket


def record_batch(record: Mapping[str, Any], keys) -> pa.RecordBatch:
    """A one-row batch of ``record``'s ``keys`` (and its id), for decoding a single record.

    Raises ValueError naming the field when a value has no Arrow form (mixed types, ragged arrays)."""
    cols, fields = [], []
    for key in ["id", *keys]:
        if key not in record or record[key] is None:
            continue
        value = record[key]
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        try:
            arr = pa.array([value])
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"feature {key!r} is not convertible: {e}") from None
        if key == "id":
            arr = pa.array([str(value)])
        cols.append(arr)
        fields.append(key)
    return pa.RecordBatch.from_arrays(cols, names=fields) if cols else pa.RecordBatch.from_pylist([{}])
