"""Models of the benchmarks, as ModelSpecs (import paths ``benchmarks.models:transformer`` and
``benchmarks.models:logreg16``).

``transformer``: the Flax Transformer encoder classifier of ``../shared/reference/gpu_anchor.py``
(pre-LayerNorm blocks of self-attention + GELU MLP, token embedding, mean-pooled, linear head; no
positional embedding, as in the anchor), configurable in size and compute dtype. The CPU benchmark
uses a small one (2 layers, d=128, T=64, vocab 1000); the GPU script the anchor's 110M-parameter one
(12 layers, d=768, 12 heads, MLP 3072, vocab 32000, T=128, bf16 compute).

``decoder_lm``: a decoder-only (GPT-style) language model: token + learned position embeddings, pre-LayerNorm
causal self-attention blocks with a GELU MLP, final LayerNorm, output projection tied to the token embedding;
per-example loss = mean next-token cross-entropy over the T-1 predicted positions. ``LM_SIZES`` names the sizes
of the large-model benchmark (T = 64): ``1m`` ≈ 1.0M, ``10m`` ≈ 10M, ``50m`` ≈ 50M, ``110m`` ≈ 110M parameters
(the last is GPT-2-small-shaped: 12 layers, d = 768, 12 heads, vocab 32 000). Untrained params are fine for
memory and time.

``logreg16``: multinomial logistic regression on 16 features (p = 68 at 4 classes), the tiny model of
the scaling benchmark, with ``synthetic_arrays`` to generate its data.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from beam_influence.core.model_spec import FeatureSpec, ModelSpec

SMALL_TRANSFORMER = dict(vocab=1000, d=128, heads=4, layers=2, mlp=512, T=64, classes=2)
ANCHOR_TRANSFORMER = dict(vocab=32000, d=768, heads=12, layers=12, mlp=3072, T=128, classes=2)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class _Block(nn.Module):
    """Pre-norm Transformer block; ``mask``: an attention mask (the decoder's causal one), None for none."""

    heads: int
    mlp: int
    dtype: Any

    @nn.compact
    def __call__(self, x, mask=None):
        d = x.shape[-1]
        h = nn.LayerNorm(dtype=self.dtype)(x)
        h = nn.SelfAttention(num_heads=self.heads, dtype=self.dtype)(h, mask=mask)
        x = x + h
        h = nn.LayerNorm(dtype=self.dtype)(x)
        h = nn.Dense(self.mlp, dtype=self.dtype)(h)
        h = nn.gelu(h)
        h = nn.Dense(d, dtype=self.dtype)(h)
        return x + h


class TransformerClassifier(nn.Module):
    """tokens [..., T] int32 -> logits [..., classes] float32."""

    vocab: int
    d: int
    heads: int
    layers: int
    mlp: int
    classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tok):
        x = nn.Embed(self.vocab, self.d, dtype=self.dtype)(tok)
        for _ in range(self.layers):
            x = _Block(self.heads, self.mlp, self.dtype)(x)
        x = nn.LayerNorm(dtype=self.dtype)(x).mean(axis=-2)
        return nn.Dense(self.classes, dtype=self.dtype)(x).astype(jnp.float32)


def _xent(logits, example):
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])


def _classifier_spec(name: str, module: nn.Module, *, input_key: str, input_shape: tuple, input_dtype,
                     features: dict, l2: float, config: dict) -> ModelSpec:
    """A ModelSpec around a Flax classifier: logits ``module(example[input_key])``, softmax cross-entropy
    on ``example["y"]``; ``init`` traces the module on zeros of ``input_shape``/``input_dtype``."""

    def init(seed: int):
        return module.init(jax.random.PRNGKey(seed), jnp.zeros(input_shape, input_dtype))["params"]

    def apply(params, example):
        return module.apply({"params": params}, example[input_key])

    def loss(params, example):
        return _xent(apply(params, example), example)

    return ModelSpec(name=name, init=init, loss=loss, features=features, apply=apply,
                     output_loss=_xent, l2=l2, label_key="y", config=config)


def transformer(vocab: int = 1000, d: int = 128, heads: int = 4, layers: int = 2, mlp: int = 512, T: int = 64,
                classes: int = 2, dtype: str = "float32", l2: float = 0.0) -> ModelSpec:
    """A Transformer encoder classifier as a ModelSpec: features ``tok`` [T] int32 and ``y`` int32.

    ``dtype`` is the compute dtype of activations ("float32" or "bfloat16"); parameters stay float32.
    """
    module = TransformerClassifier(vocab=vocab, d=d, heads=heads, layers=layers, mlp=mlp, classes=classes,
                                   dtype=_DTYPES[dtype])
    features = {"tok": FeatureSpec((T,), "int32", min=0, max=vocab - 1),
                "y": FeatureSpec((), "int32", min=0, max=classes - 1)}
    config = dict(vocab=vocab, d=d, heads=heads, layers=layers, mlp=mlp, T=T, classes=classes, dtype=dtype, l2=l2)
    return _classifier_spec("bench_transformer", module, input_key="tok", input_shape=(T,), input_dtype=jnp.int32,
                            features=features, l2=l2, config=config)


def random_tokens(spec: ModelSpec, n: int, seed: int = 0) -> dict:
    """A batch of n random examples for ``transformer`` specs (timing only)."""
    cfg = spec.config
    rng = np.random.default_rng(seed)
    return {"tok": rng.integers(0, cfg["vocab"], (n, cfg["T"]), dtype=np.int32),
            "y": rng.integers(0, cfg["classes"], (n,), dtype=np.int32)}


# ---- decoder-only language model (the large-model benchmark) --------------------------------------
LM_SIZES = {
    "1m": dict(vocab=2000, d=128, heads=4, layers=4, mlp=512, T=64),
    "10m": dict(vocab=8000, d=256, heads=4, layers=10, mlp=1024, T=64),
    "50m": dict(vocab=24000, d=512, heads=8, layers=12, mlp=2048, T=64),
    "110m": dict(vocab=32000, d=768, heads=12, layers=12, mlp=3072, T=64),
}


class DecoderLM(nn.Module):
    """tokens [..., T] int32 -> next-token logits [..., T, vocab] float32 (output tied to the embedding)."""

    vocab: int
    d: int
    heads: int
    layers: int
    mlp: int
    T: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tok):
        embed = nn.Embed(self.vocab, self.d, dtype=self.dtype, name="embed")
        pos = self.param("pos", nn.initializers.normal(0.02), (self.T, self.d))
        x = embed(tok) + pos[: tok.shape[-1]].astype(self.dtype)
        mask = nn.make_causal_mask(tok)
        for _ in range(self.layers):
            x = _Block(self.heads, self.mlp, self.dtype)(x, mask)
        x = nn.LayerNorm(dtype=self.dtype)(x)
        return embed.attend(x).astype(jnp.float32)


def _lm_xent(logits, example):
    """Mean next-token cross-entropy: logits [T, vocab] predict tok[1:] from positions 0..T-2."""
    tok = example["tok"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:-1], tok[1:]))


def decoder_lm(size: str | None = None, *, vocab: int = 2000, d: int = 128, heads: int = 4, layers: int = 4,
               mlp: int = 512, T: int = 64, dtype: str = "float32", l2: float = 0.0) -> ModelSpec:
    """A decoder-only LM as a ModelSpec: feature ``tok`` [T] int32; ``size`` picks one of ``LM_SIZES``
    (then the other shape arguments are ignored). Loss: mean next-token cross-entropy (``_lm_xent``)."""
    cfg = dict(LM_SIZES[size]) if size else dict(vocab=vocab, d=d, heads=heads, layers=layers, mlp=mlp, T=T)
    module = DecoderLM(**cfg, dtype=_DTYPES[dtype])
    features = {"tok": FeatureSpec((cfg["T"],), "int32", min=0, max=cfg["vocab"] - 1)}

    def init(seed: int):
        return module.init(jax.random.PRNGKey(seed), jnp.zeros((cfg["T"],), jnp.int32))["params"]

    def apply(params, example):
        return module.apply({"params": params}, example["tok"])

    def loss(params, example):
        return _lm_xent(apply(params, example), example)

    return ModelSpec(name="bench_decoder_lm", init=init, loss=loss, features=features, apply=apply,
                     output_loss=_lm_xent, l2=l2, label_key=None, config=dict(cfg, dtype=dtype, l2=l2, size=size))


def random_lm_tokens(spec: ModelSpec, n: int, seed: int = 0) -> dict:
    """n random token sequences for a ``decoder_lm`` spec: {"tok": [n, T] int32}."""
    cfg = spec.config
    return {"tok": np.random.default_rng(seed).integers(0, cfg["vocab"], (n, cfg["T"]), dtype=np.int32)}


# ---- the scaling benchmark's tiny model -----------------------------------------------------------
LOGREG_FEATURES = 16
LOGREG_CLASSES = 4


class _LogReg(nn.Module):
    classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes)(x)


def logreg16(l2: float = 1e-3, classes: int = LOGREG_CLASSES) -> ModelSpec:
    """Multinomial logistic regression on 16 features: p = 17·classes (68 at 4 classes)."""
    module = _LogReg(classes)
    features = {"x": FeatureSpec((LOGREG_FEATURES,), "float32"),
                "y": FeatureSpec((), "int32", min=0, max=classes - 1)}
    return _classifier_spec("bench_logreg16", module, input_key="x", input_shape=(LOGREG_FEATURES,),
                            input_dtype=jnp.float32, features=features, l2=l2, config={"l2": l2, "classes": classes})


def synthetic_arrays(n: int, *, seed: int = 0, classes: int = LOGREG_CLASSES, offset: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """n examples of a noisy linear 16-feature, ``classes``-class problem: (x [n, 16] float32, y [n] int32).

    Deterministic per (seed, offset): rows offset..offset+n-1 of one infinite stream, so shards can be
    generated independently and a prefix of the data set is the same whatever N.
    """
    w = np.random.default_rng(12345).standard_normal((LOGREG_FEATURES, classes))
    rng = np.random.default_rng([seed, offset])
    x = rng.standard_normal((n, LOGREG_FEATURES)).astype(np.float32)
    logits = x @ w + rng.gumbel(size=(n, classes))
    return x, np.argmax(logits, axis=1).astype(np.int32)
