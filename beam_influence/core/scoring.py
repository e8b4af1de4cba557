r"""Influence scores from projections, and exact top-k with deterministic ties (pure numpy).

Sign convention (used everywhere in beam-influence). With projections
:math:`P(z) = [\langle \nabla\ell(z,\theta), u_i\rangle]_{i\le k}` onto Hessian eigenpairs
:math:`(\lambda_i, u_i)` (``beam_influence.core.projection``; Schioppa et al., arXiv 2112.03052):

.. math::

    \mathrm{influence}(z_{test}, z_{train}) = \sum_{i \le k} \frac{P_i(z_{test})\, P_i(z_{train})}{\lambda_i}
      \;\approx\; \nabla\ell(z_{test})^\top H^{-1} \nabla\ell(z_{train}),

    \mathrm{self\_influence}(z) = \sum_{i \le k} \frac{P_i(z)^2}{\lambda_i}.

Upweighting :math:`z_{train}` by :math:`\epsilon` changes the test loss by
:math:`-\epsilon\,\mathrm{influence}` to first order (Koh & Liang's :math:`\mathcal{I}_{up,loss}`
with the sign flipped), so **larger = more helpful**: the training example lowers the test loss
(a *proponent*); the smallest, most negative, scores are *opponents*.

Scores are computed in float64 by elementwise products accumulated over the k eigen-directions in
index order 0..k-1 (no BLAS, no pairwise reduction: one rounding per product and per addition, whatever
the array shapes), so the score of a (train, test) pair is bit-identical whichever batch or shard it is
computed in, and ``beam_influence.core.topk.TopK`` reproduces it bit for bit when it rescores a single pair.

Top-k is exact and deterministic: among equal scores the **smaller id (string order) comes first**,
for proponents and opponents alike; NaN scores rank after every number. ``top_k`` (1-D) is the
definition of this rule; ``beam_influence.core.topk.TopK`` is the one accumulator (and the one merge)
that applies it to Q queries over batches and shards (``beam_influence.core.topk.top_k_per_query`` is
built on it). This module imports nothing from ``topk``; ``topk`` imports this one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

NORMALIZATIONS = ("none", "train_norm", "cosine")
_CHUNK_ELEMENTS = 1 << 18  # float64 [rows, Q] temporaries of at most 2 MiB (cache-sized)

# The question a query's top-k lists answer under each normalisation: (short question, one-line explanation).
# Shown by the query job and the report beside every list, so a user reads the right list for their question.
LIST_QUESTIONS = {
    "none": ("which training examples dominate the loss",
             "raw influence grows with the training example's gradient, so the examples the model fits worst "
             "(often mislabelled or noisy) top the lists of almost every query; for \"why this prediction\" "
             "query with --normalization cosine (or train_norm)"),
    "train_norm": ("why this prediction",
                   "influence divided by the training example's ‖P(z_train)‖ (the reference notebook's choice): "
                   "ranks by how well its gradient direction agrees with the query's, whatever its size"),
    "cosine": ("why this prediction",
               "cosine of the 1/|λ|-weighted projections, in [−1, 1]: ranks by gradient direction only, "
               "for train and test alike"),
}


def list_question(normalization: str) -> tuple[str, str]:
    """``(question, explanation)``: what the top-k lists scored with ``normalization`` answer (``LIST_QUESTIONS``)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    return LIST_QUESTIONS[normalization]


def influence_scores(test_proj: np.ndarray, train_proj: np.ndarray, eigvals: np.ndarray, *,
                     normalization: str = "none") -> np.ndarray:
    r"""Influence of every training example on every test example: ``[B, Q]`` float64.

    .. math::  S_{bq} = \sum_i P_i(z^{test}_q) P_i(z^{train}_b) / \lambda_i

    (larger = training example b is more helpful to test example q: proponent; most negative =
    opponent). Normalisations:

    - ``"none"``: :math:`S_{bq}`.
    - ``"train_norm"``: :math:`S_{bq} / \lVert P(z^{train}_b) \rVert_2` (plain L2 norm of the train
      projection, as in the reference notebook; damps examples with huge gradients). 0 where the norm is 0.
    - ``"cosine"``: :math:`S_{bq} / (\lVert P(z^{train}_b) \rVert_w \lVert P(z^{test}_q) \rVert_w)` with
      :math:`\lVert v \rVert_w^2 = \sum_i v_i^2 / |\lambda_i|`: the cosine between the
      :math:`|\lambda|^{-1/2}`-scaled projections when all :math:`\lambda_i > 0` (then
      :math:`\lVert P(z)\rVert_w^2` is the self-influence). Symmetric in train/test and in
      :math:`[-1, 1]` for any signs of :math:`\lambda` (Cauchy-Schwarz). 0 where a norm is 0.

    Args:
      test_proj: ``[Q, k]`` projections of the test examples.
      train_proj: ``[B, k]`` projections of the training examples.
      eigvals: ``[k]`` nonzero finite eigenvalues (negative ones are allowed).
      normalization: one of ``"none"``, ``"train_norm"``, ``"cosine"``.
    Returns:
      ``[B, Q]`` float64 scores, train-major (one row per training example).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    test, train, lam = _check(test_proj=test_proj, train_proj=train_proj, eigvals=eigvals)
    n_train, n_test = _norms(train, test, lam, normalization)
    scores = _inner_all(_weighted(train, lam), test)
    if normalization == "train_norm":
        scores = _safe_divide(scores, n_train[:, None])
    elif normalization == "cosine":
        scores = _safe_divide(scores, n_train[:, None] * n_test[None, :])
    return scores


def self_influence(proj: np.ndarray, eigvals: np.ndarray) -> np.ndarray:
    r"""Self-influence :math:`\sum_i P_i(z)^2 / \lambda_i` of every example: ``[N]`` float64.

    Same sign convention as ``influence_scores`` (it is its diagonal for train = test); with
    positive eigenvalues it is >= 0, large for examples the model finds surprising (e.g. mislabelled).

    Args:
      proj: ``[N, k]`` projections.
      eigvals: ``[k]`` nonzero finite eigenvalues.
    """
    p, _, lam = _check(test_proj=proj, train_proj=proj, eigvals=eigvals)
    return _dot_rows(_weighted(p, lam), p)  # same rounding as influence_scores' diagonal


# ---- exact, deterministic top-k ---------------------------------------------------------------
def top_k(scores: np.ndarray, ids: Sequence[str], k: int, *, largest: bool = True) -> np.ndarray:
    """Indices of the k best scores: ``[min(k, N)]`` int64, best first.

    ``largest=True`` ranks by descending score (proponents under the module's sign convention),
    ``largest=False`` by ascending score (opponents). Ties are broken by id ascending (string
    order), for both directions; NaN scores rank last. Exact (no approximation), O(N + c log c)
    where c is the number of candidates at or above the k-th score.

    Args:
      scores: ``[N]`` scores.
      ids: ``[N]`` example ids (compared as strings).
      k: how many to keep (>= 0).
      largest: descending (True) or ascending (False).
    """
    scores = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(ids).astype(str)
    if scores.ndim != 1 or ids.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and ids {ids.shape} must both be [N]")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n = scores.shape[0]
    key = -scores if largest else scores  # ascending key; NaN stays NaN and sorts last
    cand = np.arange(n)
    if 0 < k < n:
        kth = np.partition(key, k - 1)[k - 1]
        if not np.isnan(kth):
            cand = np.flatnonzero(key <= kth)  # all ties of the k-th score, NaNs excluded
    elif k == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((ids[cand], key[cand]))  # primary: key, secondary: id
    return cand[order[:k]].astype(np.int64)


# ---- internals ----------------------------------------------------------------------------------
def _check(*, test_proj, train_proj, eigvals):
    test = np.asarray(test_proj, dtype=np.float64)
    train = np.asarray(train_proj, dtype=np.float64)
    lam = np.asarray(eigvals, dtype=np.float64)
    if test.ndim != 2 or train.ndim != 2 or lam.ndim != 1 or not (test.shape[1] == train.shape[1] == lam.shape[0]):
        raise ValueError(f"expected test projections [Q, k], train projections [B, k] and eigvals [k]; got "
                         f"test {test.shape}, train {train.shape}, eigvals {lam.shape}")
    if not np.all(np.isfinite(lam)) or np.any(lam == 0):
        raise ValueError(f"eigvals must be finite and nonzero, got {lam}")
    return test, train, lam


def _weighted(train: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """``[B, k]`` rows ``train_b * (1 / lambda)`` (float64): the left factor of every score."""
    return train * (1.0 / lam)


def _norms(train: np.ndarray, test: np.ndarray, lam: np.ndarray, normalization: str):
    """The normalisation factors ``(n_train [B] | None, n_test [Q] | None)`` of ``influence_scores``."""
    if normalization == "train_norm":
        return np.sqrt(_sum_cols(np.square(train))), None
    if normalization == "cosine":
        w = 1.0 / np.abs(lam)
        return np.sqrt(_sum_cols(np.square(train) * w)), np.sqrt(_sum_cols(np.square(test) * w))
    return None, None


def _sum_cols(m: np.ndarray) -> np.ndarray:
    """``[R, k] -> [R]``: sum over k in index order 0..k-1 (row-independent, shape-independent rounding)."""
    if m.shape[1] == 0:
        return np.zeros(m.shape[0])
    acc = m[:, 0].copy()
    for i in range(1, m.shape[1]):
        acc += m[:, i]
    return acc


def _dot_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[R, k] x [R, k] -> [R]``: sum_i x_i y_i, same rounding as one entry of ``_inner_all``."""
    return _sum_cols(x * y)


def _inner_all(aw: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[A, k] x [Q, k] -> [A, Q]``: sum_i aw_i b_i, products accumulated in index order 0..k-1.

    Entry (a, q) is rounded exactly as ``_dot_rows(aw[[a]], b[[q]])`` (one product and one addition
    per i, no fused or reordered sums), so it does not depend on the other rows or on the chunking.
    """
    out = np.empty((aw.shape[0], b.shape[0]), np.float64)
    k = aw.shape[1]
    if k == 0:
        out[:] = 0.0
        return out
    awt, bt = np.ascontiguousarray(aw.T), np.ascontiguousarray(b.T)
    step = max(1, _CHUNK_ELEMENTS // max(1, b.shape[0]))
    tmp = np.empty((min(step, aw.shape[0]), b.shape[0]), np.float64)
    for s in range(0, aw.shape[0], step):
        acc = out[s:s + step]
        t = tmp[:acc.shape[0]]
        np.multiply(awt[0, s:s + step, None], bt[0, None, :], out=acc)
        for i in range(1, k):
            np.multiply(awt[i, s:s + step, None], bt[i, None, :], out=t)
            acc += t
    return out


def _inner_pairs(aw: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``[C]``: entries ``(rows[c], cols[c])`` of ``_inner_all(aw, b)``, with the same rounding."""
    if aw.shape[1] == 0:
        return np.zeros(len(rows))
    awt, bt = np.ascontiguousarray(aw.T), np.ascontiguousarray(b.T)
    acc = awt[0][rows] * bt[0][cols]
    tmp = np.empty_like(acc)
    for i in range(1, aw.shape[1]):
        np.multiply(awt[i][rows], bt[i][cols], out=tmp)
        acc += tmp
    return acc


def _pair_scores(aw: np.ndarray, test: np.ndarray, n_train, n_test, rows: np.ndarray, cols: np.ndarray,
                 normalization: str) -> np.ndarray:
    """``influence_scores(...)[rows, cols]`` for selected pairs only, bit-identical (same arithmetic).

    ``aw = _weighted(train, lam)`` and ``(n_train, n_test) = _norms(train, test, lam, normalization)``.
    """
    s = _inner_pairs(aw, test, rows, cols)
    if normalization == "train_norm":
        s = _safe_divide(s, n_train[rows])
    elif normalization == "cosine":
        s = _safe_divide(s, n_train[rows] * n_test[cols])
    return s


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    den = np.broadcast_to(den, num.shape)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out
