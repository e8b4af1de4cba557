r"""Agreement of a method's scores with a reference (exact inverse-Hessian influence where H fits in memory).

Per query q (a column of the ``[N_train, Q]`` score matrices): the Spearman rank correlation over
training examples, and the overlap of the top-k proponents (largest scores) and top-k opponents
(smallest scores), :math:`|T_k(\text{method}) \cap T_k(\text{exact})| / k`. Reported as means over queries.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from beam_influence.evaluation.lds import spearman_columns


class Agreement(NamedTuple):
    spearman: float  # mean over queries
    top_k_proponents: float  # mean overlap fraction of the k largest
    top_k_opponents: float  # mean overlap fraction of the k smallest
    k: int
    spearman_per_query: np.ndarray


def top_k_overlap(scores: np.ndarray, reference: np.ndarray, k: int, *, largest: bool = True) -> np.ndarray:
    """``[Q]``: fraction of the k best training examples of ``reference`` that ``scores`` also puts in its k best.

    Ties are broken by index (stable sort), the same way for both matrices.
    """
    scores, reference = _check(scores, reference)
    k = min(int(k), scores.shape[0])
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sign = -1.0 if largest else 1.0
    a = np.argsort(sign * scores, axis=0, kind="stable")[:k]
    b = np.argsort(sign * reference, axis=0, kind="stable")[:k]
    return np.array([len(np.intersect1d(a[:, q], b[:, q])) / k for q in range(scores.shape[1])])


def agreement(scores: np.ndarray, reference: np.ndarray, *, k: int = 10) -> Agreement:
    """Spearman and top-k overlap of ``scores`` with ``reference`` (both ``[N_train, Q]``), averaged over queries."""
    scores, reference = _check(scores, reference)
    rho = spearman_columns(scores, reference)
    ok = np.isfinite(rho)
    return Agreement(float(np.mean(rho[ok])) if ok.any() else float("nan"),
                     float(np.mean(top_k_overlap(scores, reference, k, largest=True))),
                     float(np.mean(top_k_overlap(scores, reference, k, largest=False))),
                     min(int(k), scores.shape[0]), rho)


def _check(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [N_train, Q] score matrices of the same shape; got {a.shape} and {b.shape}")
    return a, b
