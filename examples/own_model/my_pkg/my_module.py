"""A user's own model: a small Flax linen Transformer encoder that classifies fixed-length token sequences.

``make_spec`` is all beam-influence needs (``--spec my_pkg.my_module:make_spec``): params (``init``), the
per-example loss, the record features and a config. ``make_data`` generates the example's task (which of
three "topic" token groups is most frequent in a 16-token sequence) with a fraction of flipped labels.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from beam_influence import FeatureSpec, ModelSpec


class Block(nn.Module):
    """Pre-norm Transformer block: x + MHA(LN(x)), then x + MLP(LN(x)).  x: [length, dim]."""

    heads: int
    dim: int

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim)(nn.LayerNorm()(x))
        h = nn.Dense(2 * self.dim)(nn.LayerNorm()(x))
        return x + nn.Dense(self.dim)(nn.gelu(h))


class TokenClassifier(nn.Module):
    """tokens [length] (int) → logits [num_classes]: embedding + learned positions, blocks, mean pool."""

    vocab: int
    length: int
    dim: int
    heads: int
    layers: int
    num_classes: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.dim)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.length, self.dim))
        for _ in range(self.layers):
            x = Block(self.heads, self.dim)(x)
        return nn.Dense(self.num_classes)(nn.LayerNorm()(x).mean(axis=0))


def make_spec(vocab: int = 32, length: int = 16, dim: int = 32, heads: int = 2, layers: int = 2,
              num_classes: int = 3, l2: float = 1e-4) -> ModelSpec:
    """The ModelSpec: ℓ(z, θ) = cross-entropy of the classifier's logits for tokens z["tokens"], label z["label"]."""
    module = TokenClassifier(vocab, length, dim, heads, layers, num_classes)

    def init(seed: int):
        return module.init(jax.random.PRNGKey(seed), jnp.zeros((length,), jnp.int32))["params"]

    def apply(params, example):  # example: unbatched arrays, shaped as in `features`
        return module.apply({"params": params}, example["tokens"])

    def output_loss(logits, example):
        return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])

    def loss(params, example):  # a scalar per example
        return output_loss(apply(params, example), example)

    return ModelSpec(
        name="my_token_classifier", init=init, loss=loss, apply=apply, output_loss=output_loss, l2=l2,
        features={"tokens": FeatureSpec((length,), "int32", min=0, max=vocab - 1),
                  "label": FeatureSpec((), "int32", min=0, max=num_classes - 1)},
        label_key="label",
        config={"vocab": vocab, "length": length, "dim": dim, "heads": heads, "layers": layers,
                "num_classes": num_classes, "l2": l2},
    )


def make_data(n: int, *, vocab: int = 32, length: int = 16, num_classes: int = 3, label_noise: float = 0.0,
              seed: int = 0, prefix: str = "train") -> list[dict]:
    """``n`` records {id, tokens, label, true_label, flipped}. Each sequence favours one token group
    (token ids ``t`` with ``t % num_classes == topic``); its true label is the group seen most often.
    A fraction ``label_noise`` of the labels is flipped to another class (``flipped`` records which)."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, num_classes, n)
    records = []
    for i in range(n):
        p = np.ones(vocab)
        p[np.arange(vocab) % num_classes == topic[i]] = 3.0  # the topic's tokens are three times as likely
        tokens = rng.choice(vocab, length, p=p / p.sum()).astype(np.int32)
        true = int(np.bincount(tokens % num_classes, minlength=num_classes).argmax())
        flipped = bool(rng.random() < label_noise)
        label = int((true + rng.integers(1, num_classes)) % num_classes) if flipped else true
        records.append({"id": f"{prefix}-{i:05d}", "tokens": tokens.tolist(), "label": label, "true_label": true,
                        "flipped": flipped})
    return records
