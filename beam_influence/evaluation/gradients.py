r"""Per-example gradient products for the evaluation baselines, leaf by leaf, in training batches.

Everything a baseline needs from the training set is an inner product of each training gradient
with a few fixed vectors :math:`v_1..v_V` (test gradients, inverse-HVPs of test gradients,
eigenvectors):

.. math::  D_{nv} = \langle \nabla_\theta \ell(z_n, \theta), v_v \rangle,

which is exactly a projection (``beam_influence.core.projection.make_projector``: per-example gradients
by ``vmap(grad)``, contracted leaf by leaf with einsum). Training examples go through in batches of
``batch_size`` (the last one padded, so one compilation serves the pass), so the ``[N, p]`` gradient
matrix never exists; only ``V`` vectors of size p do.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from beam_influence.core.projection import flatten_eigvecs, make_projector, unflatten_eigvecs
from beam_influence.core.types import Example, Params

DEFAULT_BATCH_SIZE = 256


def num_examples(batch: Example) -> int:
    sizes = {int(np.shape(v)[0]) for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch features disagree on the number of examples: {sorted(sizes)}")
    return sizes.pop()


def take(batch: Example, idx: np.ndarray) -> Example:
    """Rows ``idx`` of every feature (numpy)."""
    return {k: np.asarray(v)[idx] for k, v in batch.items()}


def padded_size(n: int, batch_size: int) -> int:
    """Rows per jitted call: ``batch_size``, or the next power of two (>= 8) when N is smaller, so that
    a few compilations serve every N."""
    return max(1, min(batch_size, max(8, 1 << (max(n, 1) - 1).bit_length())))


def iter_batches(batch: Example, batch_size: int):
    """Yield ``(start, stop, padded batch)``: batches of ``padded_size(N, batch_size)`` rows, the last
    one padded by repeating its last row (callers drop the padding rows ``stop - start`` onwards)."""
    n = num_examples(batch)
    b = padded_size(n, batch_size)
    for s in range(0, n, b):
        e = min(s + b, n)
        idx = np.arange(s, s + b).clip(max=n - 1)
        yield s, e, take(batch, idx)


def flat_grads(loss, params: Params, batch: Example, *, batch_size: int = 64) -> np.ndarray:
    """``[B, p]`` float32 per-example gradients, ravelled (``ravel_pytree`` order). For small B (test sets)."""
    fn = _grads_jit(loss)
    out = []
    for s, e, b in iter_batches(batch, batch_size):
        grads = fn(params, {k: jnp.asarray(v) for k, v in b.items()})
        out.append(flatten_eigvecs(grads).astype(np.float32, copy=False)[: e - s])
    return np.concatenate(out)


def gradient_dots(loss, params: Params, train: Example, vectors: np.ndarray | Params, *,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    r"""``[N, V]`` float64: :math:`\langle \nabla\ell(z_n), v_v\rangle` for every training example.

    Args:
      loss: per-example loss ``loss(params, example) -> scalar``.
      params: where the gradients are taken.
      train: ``[N, ...]`` examples.
      vectors: ``[V, p]`` flat vectors (``ravel_pytree`` order) or a pytree of ``[V, *leaf]`` leaves.
      batch_size: training examples per jitted call.
    """
    tree = unflatten_eigvecs(np.asarray(vectors, np.float32), params) if isinstance(vectors, np.ndarray) else vectors
    tree = jax.tree.map(jnp.asarray, tree)
    project = _projector(loss, tree, min(64, batch_size))
    n = num_examples(train)
    out = np.empty((n, int(jax.tree.leaves(tree)[0].shape[0])), np.float64)
    for s, e, b in iter_batches(train, batch_size):
        out[s:e] = np.asarray(project.jitted(params, b, tree, (), ()).projections, np.float64)[: e - s]
    return out


def grad_sq_norms(loss, params: Params, train: Example, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    r"""``[N]`` float64: :math:`\lVert \nabla\ell(z_n) \rVert^2`, summed leaf by leaf, in batches."""
    fn = _sq_norm_jit(loss)
    n = num_examples(train)
    out = np.empty(n, np.float64)
    for s, e, b in iter_batches(train, batch_size):
        out[s:e] = np.asarray(fn(params, b), np.float64)[: e - s]
    return out


# One jitted function per loss (and micro-batch): the vectors are an argument of the jitted projector,
# so new vectors of the same shape reuse the compiled executable.
_PROJECTOR_CACHE: dict = {}


def _projector(loss, tree, micro_batch: int):
    key = (loss, jax.tree.structure(tree), micro_batch)
    if key not in _PROJECTOR_CACHE:
        _PROJECTOR_CACHE[key] = make_projector(loss, tree, micro_batch=micro_batch)
    return _PROJECTOR_CACHE[key]


@functools.cache  # one jitted function per loss
def _grads_jit(loss):
    return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))


@functools.cache
def _sq_norm_jit(loss):
    def sq(params, batch):
        return jax.lax.map(lambda z: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(jax.grad(loss)(params, z))),
                           batch, batch_size=64)

    return jax.jit(sq)
