"""scikit-learn's digits (8×8 images, 10 classes; ships inside scikit-learn) and three small models.

Records look like ``{"id": "train-00012", "x": [64 floats in 0..1], "y": label, "true_y": label,
"flipped": bool}``; with label noise a seeded fraction of *training* labels is flipped to another
class and their ids are recorded.

Specs (import paths for the CLI): ``beam_influence.models.digits:logreg`` (L2-regularised
multinomial logistic regression, p = 650), ``:mlp`` (tanh MLP, p = 4810) and ``:cnn`` (small CNN).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from beam_influence.core.model_spec import FeatureSpec, ModelSpec

NUM_CLASSES = 10
FEATURES = {"x": FeatureSpec((64,), "float32"), "y": FeatureSpec((), "int32", min=0, max=NUM_CLASSES - 1)}


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """The digits split into train and test records, with the ids of flipped training labels."""

    train: list[dict]
    test: list[dict]
    flipped_ids: list[str]


def load_digits(*, test_fraction: float = 0.2, label_noise: float = 0.0, seed: int = 0) -> DigitsData:
    """Split digits into train/test records (seeded), flipping ``label_noise`` of training labels."""
    from sklearn.datasets import load_digits as _load

    ds = _load()
    x = (ds.data / 16.0).astype(np.float32)
    y = ds.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    noisy = y[train_idx].copy()
    n_flip = int(round(label_noise * len(train_idx)))
    flip_pos = np.sort(rng.choice(len(train_idx), n_flip, replace=False)) if n_flip else np.array([], int)
    noisy[flip_pos] = (noisy[flip_pos] + rng.integers(1, NUM_CLASSES, n_flip)) % NUM_CLASSES
    flipped = np.zeros(len(train_idx), bool)
    flipped[flip_pos] = True

    def rec(prefix, i, row, label, true_label, was_flipped):
        return {"id": f"{prefix}-{i:05d}", "x": x[row].tolist(), "y": int(label),
                "true_y": int(true_label), "flipped": bool(was_flipped)}

    train = [rec("train", i, r, noisy[i], y[r], flipped[i]) for i, r in enumerate(train_idx)]
    test = [rec("test", i, r, y[r], y[r], False) for i, r in enumerate(test_idx)]
    return DigitsData(train, test, [train[i]["id"] for i in flip_pos])


def _xent(logits: jax.Array, example) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])


class _LogReg(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(NUM_CLASSES)(x)


class _MLP(nn.Module):
    hidden: int = 64

    @nn.compact
    def __call__(self, x):
        return nn.Dense(NUM_CLASSES)(jnp.tanh(nn.Dense(self.hidden)(x)))


class _CNN(nn.Module):
    channels: int = 8

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[:-1] + (8, 8, 1))
        x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
        x = nn.relu(nn.Conv(2 * self.channels, (3, 3), strides=(2, 2))(x))  # 4×4
        x = x.reshape(x.shape[:-3] + (-1,))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(NUM_CLASSES)(x)


def _spec(name: str, module: nn.Module, l2: float, config: dict) -> ModelSpec:
    def init(seed: int):
        return module.init(jax.random.PRNGKey(seed), jnp.zeros((64,), jnp.float32))["params"]

    def apply(params, example):
        return module.apply({"params": params}, example["x"])

    def loss(params, example):
        return _xent(apply(params, example), example)

    return ModelSpec(name=name, init=init, loss=loss, features=FEATURES, apply=apply,
                     output_loss=_xent, l2=l2, label_key="y", config=config)


def logreg(l2: float = 1e-3) -> ModelSpec:
    """Multinomial logistic regression on 64 pixels, L2-regularised: p = 650, strictly convex."""
    return _spec("digits_logreg", _LogReg(), l2, {"l2": l2})


def mlp(l2: float = 1e-3, hidden: int = 64) -> ModelSpec:
    """tanh MLP 64 → hidden → 10 (p = 4810 at hidden=64)."""
    return _spec("digits_mlp", _MLP(hidden), l2, {"l2": l2, "hidden": hidden})


def cnn(l2: float = 1e-4, channels: int = 8) -> ModelSpec:
    """Small CNN: conv 3×3 (c) → conv 3×3 stride 2 (2c) → dense 32 → dense 10."""
    return _spec("digits_cnn", _CNN(channels), l2, {"l2": l2, "channels": channels})


def predict(spec: ModelSpec, params, x: np.ndarray) -> np.ndarray:
    """Predicted class for a batch of images x: [N, 64]."""
    logits = jax.vmap(lambda xi: spec.apply(params, {"x": xi}))(jnp.asarray(x))
    return np.asarray(jnp.argmax(logits, -1))
