r"""Label-noise benchmarks for the mislabel task, on any record dataset with an integer label.

``uniform`` (the data factory's own ``label_noise``): a seeded fraction of training labels flipped to a
uniformly chosen other class. On digits every method, the training loss included, finds them
(AUC ≥ 0.99): the benchmark cannot tell self-influence from the loss.

The benchmarks below are built so that the loss alone does **not** find the noisy examples:

``swap``: a *systematic* swap between the two most similar classes a, b (closest class means): a
  fraction of a's examples is labelled b and the same fraction of b's labelled a. Every example of a
  and b then has an elevated loss (the model hedges between the two), clean or not, so the loss ranks
  the clean a/b examples with the swapped ones.
``duplicates``: near-duplicate pairs with conflicting labels: for a fraction of training examples
  (x, y) a copy (x + ε, y') with another label y' is added (ε: Gaussian noise of ``duplicate_scale``
  times the feature's standard deviation); the copies are the noisy examples. Both members of a
  pair get the same, high loss (the model cannot tell x from x + ε), so the loss cannot say which of
  the two is wrong.

``atypical``: the labels of the most atypical examples (largest leverage of their inputs) flipped:
  annotation errors where examples are unusual; the model fits them more easily than typical ones.
``atypical+ambiguous``: the same plus ``AMBIGUOUS_PER_NOISY`` clean but hard examples per mislabel —
  50/50 blends of two training images of different classes, labelled with one of them. Their loss is
  high (about log 2) though their label is as right as it can be, so the loss ranks them among the
  mislabels; their inputs lie among common ones (low leverage), so self-influence, which weighs the
  residual by the inverse curvature along the input, does not (docs/quality.md measures it).

Each returns a new dataset (same ``train``/``test``/``flipped_ids`` fields as
``beam_influence.models.digits.DigitsData``) whose ``flipped_ids`` are the noisy examples.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

AMBIGUOUS_PER_NOISY = 6  # atypical+ambiguous: 6 clean blends per mislabel (5% flips → 30% blends)
NOISE_KINDS = ("uniform", "swap", "duplicates", "atypical", "atypical+ambiguous")


@dataclasses.dataclass(frozen=True)
class NoisyData:
    """Train/test records and the ids of the noisy training examples (plus what was done)."""

    train: list[dict]
    test: list[dict]
    flipped_ids: list[str]
    info: dict


def _float_features(rec: dict, label_key: str) -> list[str]:
    return [k for k, v in rec.items() if k != label_key and isinstance(v, (list, tuple, np.ndarray))
            and np.asarray(v).dtype.kind == "f"]


def _matrix(records: Sequence[dict], keys: Sequence[str]) -> np.ndarray:
    return np.stack([np.concatenate([np.ravel(np.asarray(r[k], np.float64)) for k in keys]) for r in records])


def similar_classes(records: Sequence[dict], label_key: str) -> tuple[int, int]:
    """The two classes whose mean feature vectors are closest (Euclidean): the hardest pair to tell apart."""
    keys = _float_features(records[0], label_key)
    if not keys:
        raise ValueError(f"records have no float features besides {label_key!r}: cannot find similar classes")
    x = _matrix(records, keys)
    y = np.array([int(r[label_key]) for r in records])
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    d = np.linalg.norm(means[:, None] - means[None], axis=-1) + np.diag(np.full(len(classes), np.inf))
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return int(classes[min(i, j)]), int(classes[max(i, j)])


def label_swap(data: Any, *, label_key: str, fraction: float, seed: int = 0,
               classes: tuple[int, int] | None = None) -> NoisyData:
    """``fraction`` of class a's training examples relabelled b and of b's relabelled a (see the module doc)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the swap fraction must be in (0, 1), got {fraction}")
    train = [dict(r) for r in data.train]
    a, b = classes or similar_classes(train, label_key)
    rng = np.random.default_rng(seed)
    flipped = []
    for src, dst in ((a, b), (b, a)):
        members = [i for i, r in enumerate(train) if int(r[label_key]) == src]
        for i in rng.choice(members, int(round(fraction * len(members))), replace=False):
            train[i][label_key] = dst
            train[i]["flipped"] = True
            flipped.append(str(train[i]["id"]))
    return NoisyData(train, list(data.test), sorted(flipped),
                     dict(kind="swap", classes=[a, b], fraction=fraction, n_noisy=len(flipped)))


def near_duplicates(data: Any, *, label_key: str, fraction: float, seed: int = 0, num_classes: int | None = None,
                    duplicate_scale: float = 0.05) -> NoisyData:
    """Add a near-duplicate with another label for ``fraction`` of the training examples (see the module doc)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the duplicate fraction must be in (0, 1), got {fraction}")
    train = [dict(r) for r in data.train]
    keys = _float_features(train[0], label_key)
    if not keys:
        raise ValueError(f"records have no float features besides {label_key!r} to perturb")
    labels = np.array([int(r[label_key]) for r in train])
    k = int(num_classes or labels.max() + 1)
    rng = np.random.default_rng(seed)
    std = {key: np.asarray([r[key] for r in train], np.float64).std(0) for key in keys}
    picked = np.sort(rng.choice(len(train), int(round(fraction * len(train))), replace=False))
    added = []
    for j, i in enumerate(picked):
        rec = dict(train[i])
        for key in keys:
            x = np.asarray(rec[key], np.float64)
            rec[key] = (x + duplicate_scale * std[key] * rng.standard_normal(x.shape)).astype(np.float32).tolist()
        rec[label_key] = int((labels[i] + rng.integers(1, k)) % k)
        rec["id"] = f"dup-{j:05d}-of-{rec['id']}"
        rec["flipped"] = True
        added.append(rec)
    return NoisyData(train + added, list(data.test), [r["id"] for r in added],
                     dict(kind="duplicates", fraction=fraction, n_noisy=len(added), duplicate_scale=duplicate_scale))


def atypical_flips(data: Any, *, label_key: str, fraction: float, seed: int = 0, num_classes: int | None = None,
                   ridge: float = 1.0) -> NoisyData:
    """Flip the labels of the ``fraction`` most *atypical* training examples (largest leverage
    :math:`x^\top(X^\top X + rI)^{-1}x` of the centred features, the ridge hat matrix's diagonal) to a
    random other class: annotation errors where examples are unusual. A model fits such examples more
    easily than typical ones, so their loss is lower than that of a typical mislabel."""
    if not 0 < fraction < 1:
        raise ValueError(f"the atypical fraction must be in (0, 1), got {fraction}")
    train = [dict(r) for r in data.train]
    keys = _float_features(train[0], label_key)
    if not keys:
        raise ValueError(f"records have no float features besides {label_key!r}")
    x = _matrix(train, keys)
    x = x - x.mean(0)
    lev = np.einsum("ij,ij->i", x @ np.linalg.inv(x.T @ x + ridge * np.eye(x.shape[1])), x)
    labels = np.array([int(r[label_key]) for r in train])
    k = int(num_classes or labels.max() + 1)
    rng = np.random.default_rng(seed)
    picked = np.sort(np.argsort(-lev, kind="stable")[: int(round(fraction * len(train)))])
    for i in picked:
        train[i][label_key] = int((labels[i] + rng.integers(1, k)) % k)
        train[i]["flipped"] = True
    return NoisyData(train, list(data.test), [str(train[i]["id"]) for i in picked],
                     dict(kind="atypical", fraction=fraction, n_noisy=len(picked)))


def with_ambiguous(data: Any, noisy: NoisyData, *, label_key: str, fraction: float, seed: int = 0,
                   mix: float = 0.55) -> NoisyData:
    """Add ``fraction``·N *clean but hard* training examples to ``noisy``: blends
    ``mix·x_a + (1 − mix)·x_b`` of two training examples of different classes, labelled with the
    dominant one (a). Correct labels with a high loss: the loss ranks them with the mislabels; their
    inputs lie among common ones (low leverage), so self-influence need not."""
    train = list(noisy.train)
    clean = [r for r in train if not r.get("flipped")]
    keys = _float_features(clean[0], label_key)
    rng = np.random.default_rng(seed + 7)
    added = []
    while len(added) < int(round(fraction * len(train))):
        i, j = rng.choice(len(clean), 2, replace=False)
        a, b = clean[i], clean[j]
        if int(a[label_key]) == int(b[label_key]):
            continue
        rec = {k: v for k, v in a.items()}
        for key in keys:
            rec[key] = (mix * np.asarray(a[key], np.float64) + (1 - mix) * np.asarray(b[key], np.float64)
                        ).astype(np.float32).tolist()
        rec["id"] = f"blend-{len(added):05d}"
        rec["flipped"] = False
        added.append(rec)
    info = dict(noisy.info, ambiguous_added=len(added), mix=mix)
    return NoisyData(train + added, noisy.test, noisy.flipped_ids, info)


def make_noisy(load, kind: str, *, label_key: str, fraction: float, test_fraction: float, seed: int) -> Any:
    """The mislabel task's data: ``load(test_fraction=, label_noise=, seed=)`` with ``uniform`` noise, or
    the clean data with a ``swap`` / ``duplicates`` benchmark applied."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose from {', '.join(NOISE_KINDS)}")
    if kind == "uniform":
        return load(test_fraction=test_fraction, label_noise=fraction, seed=seed)
    clean = load(test_fraction=test_fraction, label_noise=0.0, seed=seed)
    if kind == "swap":
        return label_swap(clean, label_key=label_key, fraction=fraction, seed=seed)
    if kind == "atypical":
        return atypical_flips(clean, label_key=label_key, fraction=fraction, seed=seed)
    if kind == "atypical+ambiguous":
        noisy = atypical_flips(clean, label_key=label_key, fraction=fraction, seed=seed)
        return with_ambiguous(clean, noisy, label_key=label_key, fraction=AMBIGUOUS_PER_NOISY * fraction, mix=0.5,
                              seed=seed)
    return near_duplicates(clean, label_key=label_key, fraction=fraction, seed=seed)


__all__ = ["NOISE_KINDS", "NoisyData", "label_swap", "near_duplicates", "atypical_flips", "similar_classes", "make_noisy"]
