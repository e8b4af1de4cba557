r"""Built-in sequence models on a generated toy language (ships with the code; no downloads).

**The language.** Words are 2–15 letters of a 16-letter alphabet (token ids 4..19; 0 pad, 1 BOS,
2 EOS, 3 SEP). The *translation* of a word reverses it and substitutes every letter through a fixed
cipher (``CIPHER``): ``"abc" → cipher("cba")``. ``translation_data`` generates pairs of varying length
with a seeded fraction of **noisy** pairs of four kinds (ids and kinds recorded in every record):

* ``random``    — a random target, unrelated to the source;
* ``shifted``   — the correct target rotated by one letter (misaligned);
* ``copy``      — the source copied as the target (untranslated);
* ``truncated`` — the first half of the correct target.

Records: ``{"id", "src": [ids], "tgt": [ids…, EOS], "src_text", "tgt_text", "noise": kind or "clean",
"noisy": bool, "length": len(src)}``.

**Specs** (import paths for the CLI):

* ``beam_influence.models.sequence:translation`` — a small encoder-decoder Transformer (flax linen;
  1+1 layers, d=32 by default). Per-example loss: the target's token NLL given the source,
  :math:`\ell = \sum_t m_t\,(-\log p(y_t \mid y_{<t}, x))` (``reduction="sum"``) or its mean over real
  tokens (``"mean"``). Buckets ``src (8, 16)``, ``tgt (9, 17)``.
* ``beam_influence.models.sequence:lm`` — a decoder-only Transformer LM over ``prompt`` + ``completion``;
  the loss is the completion's token NLL given the prompt, so a query asks "which training documents
  drove this completion?". ``lm_data`` makes prompt = word + SEP, completion = its translation + EOS.

Both losses are invariant to the pad length: attention never looks at padding, positions count real
tokens only, and ``core.buckets.masked_reduce`` sums over real tokens (the bucket changes no score).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from beam_influence.core.buckets import REDUCTIONS, mask_key, masked_reduce
from beam_influence.core.model_spec import FeatureSpec, ModelSpec

PAD, BOS, EOS, SEP = 0, 1, 2, 3
FIRST_LETTER, NUM_LETTERS = 4, 16
VOCAB = FIRST_LETTER + NUM_LETTERS
LETTERS = "abcdefghijklmnop"
MIN_LEN, MAX_LEN = 2, 15
NOISE_KINDS = ("random", "shifted", "copy", "truncated")
CIPHER = np.random.default_rng(20211206).permutation(NUM_LETTERS)  # the language's fixed substitution
SRC_BUCKETS, TGT_BUCKETS = (8, 16), (9, 17)


# ---- the toy language -------------------------------------------------------------------------
def detokenize(ids: Any) -> str:
    """Token ids → text: letters as themselves, SEP as ' → ', BOS/EOS/PAD dropped."""
    out = []
    for t in np.asarray(ids, np.int64).reshape(-1).tolist():
        if FIRST_LETTER <= t < VOCAB:
            out.append(LETTERS[t - FIRST_LETTER])
        elif t == SEP:
            out.append(" → ")
    return "".join(out)


def translate(src: np.ndarray) -> np.ndarray:
    """The correct target letters (no EOS) of source letters ``src`` (token ids): reverse, then substitute."""
    src = np.asarray(src, np.int64)
    return CIPHER[src[::-1] - FIRST_LETTER] + FIRST_LETTER


def _noisy_target(kind: str, src: np.ndarray, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return rng.integers(FIRST_LETTER, VOCAB, rng.integers(MIN_LEN, MAX_LEN + 1))
    if kind == "shifted":
        return np.roll(clean, -1)
    if kind == "copy":
        return src.copy()
    if kind == "truncated":
        return clean[: max(1, len(clean) // 2)]
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")


@dataclasses.dataclass(frozen=True)
class SequenceData:
    """Generated train/test records and the ground truth of the noisy training pairs."""

    train: list[dict]
    test: list[dict]
    noisy_ids: list[str]
    kinds: dict[str, str]  # noisy id → kind


def translation_data(*, n_train: int = 2000, n_test: int = 200, noise: float = 0.1,
                     kinds: tuple[str, ...] = NOISE_KINDS, seed: int = 0) -> SequenceData:
    """Seeded translation pairs; a ``noise`` fraction of training pairs corrupted, kinds in equal shares."""
    if not 0 <= noise < 1:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    rng = np.random.default_rng(seed)

    def word():
        return rng.integers(FIRST_LETTER, VOCAB, rng.integers(MIN_LEN, MAX_LEN + 1))

    n_noisy = int(round(noise * n_train))
    noisy_pos = np.sort(rng.choice(n_train, n_noisy, replace=False)) if n_noisy else np.zeros(0, int)
    kind_of = {int(p): kinds[i % len(kinds)] for i, p in enumerate(rng.permutation(noisy_pos))}

    def rec(prefix: str, i: int, kind: str) -> dict:
        src = word()
        clean = translate(src)
        tgt = clean if kind == "clean" else _noisy_target(kind, src, clean, rng)
        tgt = np.concatenate([tgt, [EOS]]).astype(np.int64)
        return {"id": f"{prefix}-{i:05d}", "src": src.tolist(), "tgt": tgt.tolist(), "src_text": detokenize(src),
                "tgt_text": detokenize(tgt), "noise": kind, "noisy": kind != "clean", "length": int(len(src))}

    train = [rec("train", i, kind_of.get(i, "clean")) for i in range(n_train)]
    test = [rec("test", i, "clean") for i in range(n_test)]
    noisy = [train[int(p)]["id"] for p in noisy_pos]
    return SequenceData(train, test, noisy, {train[int(p)]["id"]: kind_of[int(p)] for p in noisy_pos})


def lm_data(*, n_train: int = 2000, n_test: int = 200, noise: float = 0.1, seed: int = 0) -> SequenceData:
    """Documents for the LM: prompt = word + SEP, completion = its translation + EOS (noise as above)."""
    base = translation_data(n_train=n_train, n_test=n_test, noise=noise, seed=seed)

    def doc(r: dict) -> dict:
        prompt = r["src"] + [SEP]
        return {"id": r["id"], "prompt": prompt, "completion": r["tgt"], "prompt_text": detokenize(prompt),
                "completion_text": detokenize(r["tgt"]), "noise": r["noise"], "noisy": r["noisy"],
                "length": r["length"]}

    return SequenceData([doc(r) for r in base.train], [doc(r) for r in base.test], base.noisy_ids, base.kinds)


# ---- the Transformer ----------------------------------------------------------------------------
class _Block(nn.Module):
    """Pre-LN block: self-attention (mask [q, k]), optional cross-attention, MLP. x: [T, d]."""

    d: int
    heads: int
    ff: int
    cross: bool = False

    @nn.compact
    def __call__(self, x, mask, memory=None, memory_mask=None):
        attn = lambda name: nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.d,  # noqa: E731
                                                            deterministic=True, name=name)
        h = nn.LayerNorm()(x)
        x = x + attn("self")(h, h, mask=mask[None])
        if self.cross:
            h = nn.LayerNorm()(x)
            x = x + attn("cross")(h, memory, mask=memory_mask[None])
        h = nn.LayerNorm()(x)
        return x + nn.Dense(self.d)(nn.gelu(nn.Dense(self.ff)(h)))


class _Seq2Seq(nn.Module):
    """Encoder-decoder over one (unbatched) pair: src [S], src_mask [S], dec_in [T], tgt_mask [T] → logits [T, V]."""

    d: int = 32
    heads: int = 2
    ff: int = 64
    layers: int = 1
    max_len: int = 32

    @nn.compact
    def __call__(self, src, src_mask, dec_in, tgt_mask):
        tok = nn.Embed(VOCAB, self.d, name="tok")
        pos = nn.Embed(self.max_len, self.d, name="pos")
        x = tok(src) + pos(jnp.arange(src.shape[0]))
        enc_mask = src_mask[None, :] & src_mask[:, None] | jnp.eye(src.shape[0], dtype=bool)
        for i in range(self.layers):
            x = _Block(self.d, self.heads, self.ff, name=f"enc{i}")(x, enc_mask)
        memory = nn.LayerNorm(name="enc_ln")(x)
        t = dec_in.shape[0]
        y = tok(dec_in) + pos(jnp.arange(t))
        causal = jnp.tril(jnp.ones((t, t), bool)) & tgt_mask[None, :] | jnp.eye(t, dtype=bool)
        cross = jnp.broadcast_to(src_mask[None, :], (t, src.shape[0]))
        for i in range(self.layers):
            y = _Block(self.d, self.heads, self.ff, cross=True, name=f"dec{i}")(y, causal, memory, cross)
        return tok.attend(nn.LayerNorm(name="dec_ln")(y))  # tied output embedding


class _LM(nn.Module):
    """Decoder-only LM over one left-aligned sequence: tokens [T], mask [T] → logits [T, V]."""

    d: int = 32
    heads: int = 2
    ff: int = 64
    layers: int = 2
    max_len: int = 64

    @nn.compact
    def __call__(self, tokens, mask):
        tok = nn.Embed(VOCAB, self.d, name="tok")
        t = tokens.shape[0]
        x = tok(tokens) + nn.Embed(self.max_len, self.d, name="pos")(jnp.arange(t))
        causal = jnp.tril(jnp.ones((t, t), bool)) & mask[None, :] | jnp.eye(t, dtype=bool)
        for i in range(self.layers):
            x = _Block(self.d, self.heads, self.ff, name=f"block{i}")(x, causal)
        return tok.attend(nn.LayerNorm(name="ln")(x))


def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def _render(fields: Mapping[str, Any], pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Text of an example: each (label, key) pair's tokens detokenized (mask applied when present)."""
    out = {}
    for label, key in pairs:
        if key in fields and fields[key] is not None:
            ids = np.asarray(fields[key])
            m = fields.get(mask_key(key))
            out[label] = detokenize(ids[np.asarray(m, bool)] if m is not None else ids)
    return out


def translation(*, d: int = 32, heads: int = 2, ff: int = 64, layers: int = 1, reduction: str = "sum",
                l2: float = 0.0, src_buckets: tuple[int, ...] = SRC_BUCKETS,
                tgt_buckets: tuple[int, ...] = TGT_BUCKETS) -> ModelSpec:
    """Encoder-decoder Transformer on ``translation_data`` records (features ``src``, ``tgt`` with EOS).

    ℓ(z) = Σ_t m_t · −log p(tgt_t | tgt_<t, src) (``reduction="sum"``) or that over Σ_t m_t (``"mean"``);
    the decoder input is BOS + tgt shifted right by one. An empty ``src`` or ``tgt`` is rejected on decode
    (``min_length=1``): an empty target has a loss and gradient of exactly 0, so it could never be scored."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    src_buckets, tgt_buckets = tuple(int(b) for b in src_buckets), tuple(int(b) for b in tgt_buckets)
    module = _Seq2Seq(d=d, heads=heads, ff=ff, layers=layers, max_len=max(src_buckets[-1], tgt_buckets[-1]))
    features = {
        "src": FeatureSpec(shape=(None,), dtype="int32", buckets=src_buckets, pad_id=PAD, min=0, max=VOCAB - 1,
                           min_length=1),
        "tgt": FeatureSpec(shape=(None,), dtype="int32", buckets=tgt_buckets, pad_id=PAD, min=0, max=VOCAB - 1,
                           min_length=1),
    }

    def apply(params, ex):
        dec_in = jnp.concatenate([jnp.array([BOS], ex["tgt"].dtype), ex["tgt"][:-1]])
        return module.apply({"params": params}, ex["src"], ex["src_mask"], dec_in, ex["tgt_mask"])

    def output_loss(logits, ex):
        return masked_reduce(_token_nll(logits, ex["tgt"]), ex["tgt_mask"], reduction)

    def loss(params, ex):
        return output_loss(apply(params, ex), ex)

    def init(seed: int):
        s, t = src_buckets[0], tgt_buckets[0]
        return module.init(jax.random.PRNGKey(seed), jnp.zeros(s, jnp.int32), jnp.ones(s, bool),
                           jnp.zeros(t, jnp.int32), jnp.ones(t, bool))["params"]

    return ModelSpec(name="toy_translation", init=init, loss=loss, features=features, apply=apply,
                     output_loss=output_loss, l2=l2, label_key=None,
                     config={"d": d, "heads": heads, "ff": ff, "layers": layers, "reduction": reduction,
                             "src_buckets": list(src_buckets), "tgt_buckets": list(tgt_buckets)},
                     render=lambda fields: _render(fields, (("source", "src"), ("target", "tgt"))))


def _compact(tokens: jax.Array, mask: jax.Array, *rest: jax.Array) -> tuple[jax.Array, ...]:
    """Move the real tokens to the front (stable), padding to the back: positions then count real tokens."""
    order = jnp.argsort(~mask, stable=True)
    return (tokens[order], mask[order], *(r[order] for r in rest))


def lm(*, d: int = 32, heads: int = 2, ff: int = 64, layers: int = 2, reduction: str = "sum", l2: float = 0.0,
       prompt_buckets: tuple[int, ...] = (9, 17), completion_buckets: tuple[int, ...] = (9, 17)) -> ModelSpec:
    """Decoder-only Transformer LM on ``lm_data`` records (features ``prompt``, ``completion``).

    The document is prompt ⧺ completion (real tokens only, left-aligned); ℓ(z) = Σ over completion tokens
    of −log p(token | everything before it) (``"sum"``), or that over the completion length (``"mean"``). An
    empty ``prompt`` or ``completion`` is rejected on decode (``min_length=1``): with no prompt the first
    completion token is never predicted, so a one-token completion would have a loss of exactly 0."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    prompt_buckets, completion_buckets = tuple(map(int, prompt_buckets)), tuple(map(int, completion_buckets))
    module = _LM(d=d, heads=heads, ff=ff, layers=layers, max_len=prompt_buckets[-1] + completion_buckets[-1])
    features = {
        "prompt": FeatureSpec(shape=(None,), dtype="int32", buckets=prompt_buckets, pad_id=PAD, min=0, max=VOCAB - 1,
                              min_length=1),
        "completion": FeatureSpec(shape=(None,), dtype="int32", buckets=completion_buckets, pad_id=PAD, min=0,
                                  max=VOCAB - 1, min_length=1),
    }

    def loss(params, ex):
        tokens = jnp.concatenate([ex["prompt"], ex["completion"]])
        mask = jnp.concatenate([ex["prompt_mask"], ex["completion_mask"]])
        is_completion = jnp.concatenate([jnp.zeros_like(ex["prompt_mask"]), ex["completion_mask"]])
        tokens, mask, is_completion = _compact(tokens, mask, is_completion)
        logits = module.apply({"params": params}, tokens, mask)
        nll = _token_nll(logits[:-1], tokens[1:])  # position t predicts token t+1
        return masked_reduce(nll, is_completion[1:], reduction)

    def init(seed: int):
        t = prompt_buckets[0] + completion_buckets[0]
        return module.init(jax.random.PRNGKey(seed), jnp.zeros(t, jnp.int32), jnp.ones(t, bool))["params"]

    return ModelSpec(name="toy_lm", init=init, loss=loss, features=features, l2=l2, label_key=None,
                     config={"d": d, "heads": heads, "ff": ff, "layers": layers, "reduction": reduction,
                             "prompt_buckets": list(prompt_buckets), "completion_buckets": list(completion_buckets)},
                     render=lambda fields: _render(fields, (("prompt", "prompt"), ("completion", "completion"))))


def teacher_forced_accuracy(spec: ModelSpec, params, batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
    """(token accuracy of argmax predictions given the true prefix, over real target tokens; per-example
    losses ``[n]``) of the translation spec on decoded ``batch``, bucket by bucket (``core.buckets.split``)."""
    from beam_influence.core.buckets import split

    n = len(batch["tgt"])
    losses = np.zeros(n, np.float64)
    hits = total = 0

    @jax.jit
    def run(p, part):
        logits = jax.vmap(spec.apply, in_axes=(None, 0))(p, part)
        return jnp.argmax(logits, -1), jax.vmap(spec.output_loss)(logits, part)

    for rows, part in split(batch, spec.features):
        pred, loss = jax.device_get(run(params, part))
        m = np.asarray(part["tgt_mask"], bool)
        hits += int(((np.asarray(pred) == part["tgt"]) & m).sum())
        total += int(m.sum())
        losses[rows] = loss
    return hits / max(total, 1), losses
