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


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """ROC-AUC of ranking by ``scores`` (higher = more suspicious) for the boolean ``positives``.

    Mann-Whitney U with average ranks for ties: the probability that a random positive outscores a
    random negative (ties count one half). NaN when either class is empty.
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, np.float64)
    positives = np.asarray(positives, bool)
    if scores.shape != positives.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must both be [N]")
    n1, n0 = int(positives.sum()), int((~positives).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[positives].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


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
