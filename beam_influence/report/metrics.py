r"""The numbers a report shows, as pure functions of arrays (numpy only; no files, no plotting).

Mislabel detection by self-influence: rank the training examples by self-influence
:math:`\sum_i P_i(z)^2/\lambda_i` (largest first, ties by id ascending) and inspect the top fraction
:math:`f`; the *recall* at :math:`f` is the fraction of all flipped labels found there
(:math:`\lceil fN \rceil` examples inspected). ROC-AUC is the probability that a random flipped example
ranks above a random clean one (ties count one half): the Mann-Whitney statistic
(``roc_auc``, from ``beam_influence.evaluation.mislabel``).

Example::

    >>> roc_auc([3.0, 2.0, 1.0, 0.5], [True, False, True, False])
    0.75
    >>> recall_at_fractions([3.0, 2.0, 1.0, 0.5], [True, False, True, False], ids=["a", "b", "c", "d"],
    ...                     fractions=(0.25, 0.5))
    {0.25: 0.5, 0.5: 0.5}
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from beam_influence.evaluation.mislabel import roc_auc  # noqa: F401 - the package's one ROC-AUC (sklearn)

DEFAULT_FRACTIONS = (0.01, 0.05, 0.10, 0.20)


def _check(scores, positives) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64)
    y = np.asarray(positives, bool)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and positives {y.shape} must be 1-D of the same length")
    return s, y


def inspection_order(scores: Sequence[float], ids: Sequence[str] | None = None) -> np.ndarray:
    """Indices ordering examples by score, largest first; ties by id ascending (or by position)."""
    s = np.asarray(scores, np.float64)
    tie = np.asarray(ids, dtype=str) if ids is not None else np.arange(len(s))
    return np.lexsort((tie, -s))


def num_inspected(fraction: float, n: int) -> int:
    """How many of ``n`` examples "the top ``fraction``" is: ⌈fraction·n⌉ (at least 1 when n > 0)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return min(n, max(1 if n else 0, math.ceil(fraction * n - 1e-9)))


def recall_curve(scores: Sequence[float], positives: Sequence[bool],
                 ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fraction inspected [N+1], fraction of positives found [N+1]), starting at (0, 0)."""
    s, y = _check(scores, positives)
    found = np.r_[0, np.cumsum(y[inspection_order(s, ids)])]
    total = max(int(y.sum()), 1)
    return np.arange(len(s) + 1) / max(len(s), 1), found / total


def recall_at_fractions(scores: Sequence[float], positives: Sequence[bool], *, ids: Sequence[str] | None = None,
                        fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[float, float]:
    """{fraction: share of all positives among the top ⌈fraction·N⌉ by score}."""
    s, y = _check(scores, positives)
    hits = y[inspection_order(s, ids)]
    total = int(y.sum())
    out = {}
    for f in fractions:
        m = num_inspected(f, len(s))
        out[f] = float(hits[:m].sum() / total) if total else float("nan")
    return out


def spectrum_capture(ritz_values: Sequence[float], krylov_ritz_values: Sequence[float]) -> float:
    """Share of the Krylov spectrum's |λ| mass held by the kept Ritz values: Σ|λ_kept| / Σ|λ_krylov|."""
    kept = float(np.abs(np.asarray(ritz_values, np.float64)).sum())
    total = float(np.abs(np.asarray(krylov_ritz_values, np.float64)).sum())
    return kept / total if total > 0 else float("nan")


def krylov_consistent(ritz_values: Sequence[float], krylov_ritz_values: Sequence[float], *,
                      rtol: float = 1e-6) -> bool:
    """True when every kept Ritz value appears among the stored Krylov Ritz values (as it must)."""
    kry = np.asarray(krylov_ritz_values, np.float64)
    kept = np.asarray(ritz_values, np.float64)
    if not np.all(np.isfinite(kry)):
        return False
    scale = np.abs(kept)[:, None] + 1e-300
    return bool(np.all((np.abs(kept[:, None] - kry[None, :]) <= rtol * scale).any(axis=1)))


def cumulative_capture(ritz_values: Sequence[float], krylov_ritz_values: Sequence[float]) -> np.ndarray:
    """[k]: share of the Krylov |λ| mass held by the first i+1 kept Ritz values."""
    total = float(np.abs(np.asarray(krylov_ritz_values, np.float64)).sum())
    return np.cumsum(np.abs(np.asarray(ritz_values, np.float64))) / (total if total > 0 else np.nan)

