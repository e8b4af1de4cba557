r"""Token sequences in buckets: the one place that groups decoded examples by padded length.

A sequence feature (``FeatureSpec(shape=(None,), buckets=(b_0 < b_1 < …), pad_id=…)``) decodes to

* ``arrays[name]``: ``[n, b_max]`` token ids, padded with ``pad_id`` past each row's length;
* ``arrays[name + "_mask"]``: ``[n, b_max]`` bool, True on real tokens;
* ``arrays["bucket"]``: ``[n]`` int32, the example's bucket i — the smallest i such that every sequence
  feature of the spec fits its ``buckets[i]`` (all sequence features have the same number of buckets).

On the host every array keeps one shape (``b_max``), so samples, concatenation and shuffles need no
special care. Before anything reaches the model, ``split`` groups the rows by bucket and cuts every
sequence feature (and its mask) to that bucket's length: a handful of compiled shapes, and no compute
on padding beyond the bucket. A spec's loss must not depend on the pad length (mask the padding out;
``masked_reduce`` reduces per-token values over real tokens), so a result never depends on the bucket:

.. math::  \ell(z) = \sum_t m_t\, \ell_t(z) \quad\text{or}\quad \frac{\sum_t m_t\, \ell_t(z)}{\max(1, \sum_t m_t)}.

Example::

    for rows, part in split(dec.arrays, spec.features):   # one group per bucket, rows ascending
        out[rows] = project(params, part)
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

BUCKET_KEY = "bucket"
MASK_SUFFIX = "_mask"
REDUCTIONS = ("sum", "mean")


def mask_key(name: str) -> str:
    """The decoded mask array of sequence feature ``name``."""
    return name + MASK_SUFFIX


def sequence_features(features: Mapping[str, Any]) -> dict[str, Any]:
    """The sequence features (name → FeatureSpec with buckets), in spec order."""
    return {k: fs for k, fs in features.items() if getattr(fs, "buckets", None) is not None}


def num_buckets(features: Mapping[str, Any]) -> int:
    """How many buckets the spec's sequence features share (0 when it has none)."""
    seq = sequence_features(features)
    return len(next(iter(seq.values())).buckets) if seq else 0


def check_sequence_features(features: Mapping[str, Any]) -> None:
    """Raise ValueError unless every sequence feature has the same number of buckets and no feature name
    collides with a decoded mask or the ``bucket`` array."""
    seq = sequence_features(features)
    if not seq:
        return
    counts = {k: len(fs.buckets) for k, fs in seq.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"sequence features must have the same number of buckets (an example's bucket index is "
                         f"shared), got {counts}; give each the same count, e.g. src (8, 16, 32) and tgt (10, 18, 34)")
    for name in [BUCKET_KEY, *(mask_key(k) for k in seq)]:
        if name in features:
            raise ValueError(f"feature name {name!r} is reserved for the decoded sequence masks/buckets; rename it")


def decoded_keys(features: Mapping[str, Any]) -> list[str]:
    """The arrays decoding produces: every feature, then each sequence feature's mask, then ``bucket``."""
    seq = sequence_features(features)
    return [*features, *(mask_key(k) for k in seq), *([BUCKET_KEY] if seq else [])]


def trim(arrays: Mapping[str, np.ndarray], features: Mapping[str, Any], bucket: int) -> dict[str, np.ndarray]:
    """``arrays`` with every sequence feature and its mask cut to length ``buckets[bucket]``."""
    out = dict(arrays)
    for name, fs in sequence_features(features).items():
        length = fs.buckets[bucket]
        for key in (name, mask_key(name)):
            if key in out:
                out[key] = out[key][:, :length]
    return out


def split(arrays: Mapping[str, np.ndarray], features: Mapping[str, Any]) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Group decoded rows by bucket: ``[(rows, arrays of those rows cut to the bucket's length)]``.

    ``rows`` are ascending int64 positions into ``arrays``; groups come in bucket order. A spec without
    sequence features (or arrays without a ``bucket`` column) is one group holding every row, as is."""
    n = len(next(iter(arrays.values()))) if arrays else 0
    if not sequence_features(features) or BUCKET_KEY not in arrays:
        return [(np.arange(n, dtype=np.int64), dict(arrays))] if n else []
    bucket = np.asarray(arrays[BUCKET_KEY])
    out = []
    for b in np.unique(bucket):
        rows = np.flatnonzero(bucket == b).astype(np.int64)
        out.append((rows, trim({k: v[rows] for k, v in arrays.items()}, features, int(b))))
    return out


def fixed_batches(arrays: Mapping[str, np.ndarray], features: Mapping[str, Any], batch_size: int
                  ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Per bucket, batches of exactly ``batch_size`` rows: ``(rows, batch)`` where ``rows`` (≤ batch_size of
    them) are the real rows' positions and the batch is padded with copies of its first row (one compiled
    shape per bucket). Scatter results back with ``out[rows] = result[:len(rows)]``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    for rows, part in split(arrays, features):
        for s in range(0, len(rows), batch_size):
            m = min(batch_size, len(rows) - s)
            take = np.arange(s, s + batch_size)
            take[m:] = s
            yield rows[s:s + m], {k: v[take] for k, v in part.items()}


def scatter(parts: list[tuple[np.ndarray, Any]], n: int) -> dict[str, np.ndarray]:
    """Row-ordered arrays from per-batch results: ``parts`` is ``[(rows, result)]`` with ``result`` a
    NamedTuple or dict of ``[≥len(rows), ...]`` arrays; returns field → ``[n, ...]`` (rows not covered stay 0)."""
    out: dict[str, np.ndarray] = {}
    for rows, res in parts:
        fields = res._asdict() if hasattr(res, "_asdict") else dict(res)
        for name, value in fields.items():
            value = np.asarray(value)
            if name not in out:
                out[name] = np.zeros((n,) + value.shape[1:], value.dtype)
            out[name][rows] = value[:len(rows)]
    return out


def probe_sequence(name: str, fs: Any, value: float) -> dict[str, np.ndarray]:
    """A synthetic decoded sequence for up-front checks: ``value`` tokens filling the smallest bucket, its
    all-True mask and bucket 0 (unbatched)."""
    length = fs.buckets[0]
    return {name: np.full(length, value, dtype=fs.dtype), mask_key(name): np.ones(length, bool),
            BUCKET_KEY: np.asarray(0, np.int32)}


def masked_reduce(values, mask, reduction: str = "sum"):
    r"""Reduce per-token ``values [T]`` over real tokens (``mask [T]``, bool): the sum :math:`\sum_t m_t v_t`
    or the mean :math:`\sum_t m_t v_t / \max(1, \sum_t m_t)`. Padding contributes exactly zero (``where``, so a
    NaN/inf at a padded position cannot leak into the value or the gradient)."""
    import jax.numpy as jnp

    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    mask = jnp.asarray(mask).astype(bool)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    if reduction == "sum":
        return total
    return total / jnp.maximum(1.0, jnp.sum(mask.astype(values.dtype)))


__all__ = ["BUCKET_KEY", "mask_key", "sequence_features", "num_buckets", "check_sequence_features", "decoded_keys",
           "trim", "split", "fixed_batches", "scatter", "probe_sequence", "masked_reduce"]
