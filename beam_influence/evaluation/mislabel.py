r"""Mislabel detection: rank training examples by self-influence, measure how well flipped labels surface.

With a fraction of training labels flipped (``beam_influence.models.digits.load_digits(label_noise=...)``
records the flipped ids), a good influence method gives the flipped examples large self-influence
:math:`\tau(z, z) = \nabla\ell(z)^\top H^{-1}\nabla\ell(z)`. The score is the ROC-AUC of that ranking
(0.5 = chance, 1 = every flipped example above every clean one); ``recall_at`` adds the fraction of
flipped labels found when inspecting the top few percent.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


def roc_auc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """ROC-AUC of ranking by ``scores`` (higher = more suspicious) for the boolean ``positives``
    (``sklearn.metrics.roc_auc_score``): the probability that a random positive outscores a random
    negative, ties counting one half (the Mann-Whitney statistic).

    NaN when either class is empty or a score is NaN; ±inf scores rank above/below every finite one.
    The one ROC-AUC of the package (``beam_influence.report.metrics`` uses it too).
    """
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, np.float64)
    y = np.asarray(positives, bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and positives {y.shape} must both be [N]")
    if y.all() or not y.any() or np.isnan(s).any():
        return float("nan")
    if not np.isfinite(s).all():  # sklearn wants finite scores; the AUC depends only on their order
        s = np.unique(s, return_inverse=True)[1].astype(np.float64)
    return float(roc_auc_score(y, s))


def recall_at(scores: np.ndarray, positives: np.ndarray, fraction: float) -> float:
    """Fraction of positives among the top ``ceil(fraction·N)`` scores (ties broken by index)."""
    scores = np.asarray(scores, np.float64)
    positives = np.asarray(positives, bool)
    top = np.argsort(-scores, kind="stable")[: int(np.ceil(fraction * len(scores)))]
    return float(positives[top].sum() / max(positives.sum(), 1))


class MislabelResult(NamedTuple):
    auc: float
    recall_at_10pct: float
    n: int
    n_flipped: int


def mislabel_auc(self_influence: np.ndarray, flipped: np.ndarray) -> MislabelResult:
    """AUC and recall@10% of the self-influence ranking for the flipped-label mask ``flipped`` ([N] bool)."""
    flipped = np.asarray(flipped, bool)
    return MislabelResult(roc_auc(self_influence, flipped), recall_at(self_influence, flipped, 0.1),
                          int(flipped.size), int(flipped.sum()))


def flipped_mask(ids: Sequence[str], flipped_ids: Sequence[str]) -> np.ndarray:
    """``[N]`` bool: which of ``ids`` are in ``flipped_ids``."""
    bad = set(map(str, flipped_ids))
    return np.array([str(i) in bad for i in ids], bool)


def stratified_sample(flipped: np.ndarray, size: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``size`` examples: up to half flipped, the rest clean (seeded).

    ROC-AUC does not depend on the class ratio, so a balanced sample estimates it with the fewest
    self-influence evaluations (useful for methods that need one linear solve per example).
    """
    flipped = np.asarray(flipped, bool)
    if size >= flipped.size:
        return np.arange(flipped.size)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(flipped), np.flatnonzero(~flipped)
    n_pos = min(len(pos), size // 2)
    n_neg = min(len(neg), size - n_pos)
    return np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)]))
