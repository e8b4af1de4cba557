r"""Dense ground truth for small models (tests only): the Hessian and exact influence.

For the training objective :math:`L(\theta) = \frac1N \sum_n \ell(z_n, \theta) + \frac{l2}{2}\lVert\theta\rVert^2`
(``ModelSpec.batch_loss``) with dense Hessian :math:`H = \nabla^2 L`,

.. math::  \mathrm{influence}(z_{test}, z_{train}) = \nabla\ell(z_{test})^\top H^{-1} \nabla\ell(z_{train}),

the same sign convention as ``beam_influence.core.scoring`` (larger = more helpful). Projections onto
*all* p eigenvectors of H reproduce it exactly. Everything here is O(p^2) memory and O(p^3) time:
use it for p up to a few thousand.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from beam_influence.core.model_spec import ModelSpec
from beam_influence.core.types import Example, Params


def dense_hessian(spec: ModelSpec, params: Params, batch: Example) -> np.ndarray:
    """Hessian ``[p, p]`` (float64, symmetrised) of ``spec.batch_loss`` on ``batch`` at ``params``.

    Coordinates are those of ``jax.flatten_util.ravel_pytree(params)``.
    """
    flat, unravel = ravel_pytree(params)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    h = np.asarray(jax.jit(jax.hessian(lambda f: spec.batch_loss(unravel(f), batch)))(flat), np.float64)
    return 0.5 * (h + h.T)


def flat_grads(spec: ModelSpec, params: Params, batch: Example) -> np.ndarray:
    """Per-example gradients of ``spec.loss``, ravelled: ``[N, p]`` float64 (``ravel_pytree`` order)."""
    grads = jax.jit(jax.vmap(jax.grad(spec.loss), in_axes=(None, 0)))(params, {k: jnp.asarray(v) for k, v in batch.items()})
    n = jax.tree.leaves(grads)[0].shape[0]
    return np.concatenate([np.asarray(g, np.float64).reshape(n, -1) for g in jax.tree.leaves(grads)], axis=1)


def dense_eigensystem(hessian: np.ndarray, params: Params, *, k: int | None = None) -> tuple[np.ndarray, Params]:
    """Top-k eigenpairs of a dense Hessian by eigenvalue (descending), eigenvectors as a pytree.

    Returns ``(eigvals [k], eigvecs)`` where eigvecs has the structure of params with leaves
    ``[k, *leaf.shape]`` (float32); each eigenvector's sign is fixed so its largest-magnitude entry is positive.
    """
    from beam_influence.core.projection import unflatten_eigvecs

    vals, vecs = np.linalg.eigh(hessian)
    order = np.argsort(vals)[::-1][: (len(vals) if k is None else k)]
    vals, vecs = vals[order], vecs[:, order].T  # [k], [k, p]
    signs = np.sign(vecs[np.arange(len(vals)), np.argmax(np.abs(vecs), axis=1)])
    vecs = vecs * signs[:, None]
    return vals, unflatten_eigvecs(vecs.astype(np.float32), params)


def exact_influence(spec: ModelSpec, params: Params, *, train_batch: Example, test_batch: Example,
                    hessian: np.ndarray | None = None) -> np.ndarray:
    """``[N_train, Q]`` float64 of ``∇ℓ_test^T H^{-1} ∇ℓ_train`` by a dense solve.

    Args:
      spec: the model (its ``loss``; ``batch_loss`` for the default Hessian).
      params: where gradients and Hessian are taken.
      train_batch: ``[N_train, ...]`` training examples.
      test_batch: ``[Q, ...]`` test examples.
      hessian: ``[p, p]``; default ``dense_hessian(spec, params, train_batch)`` (the objective on
        the training batch, L2 term included).
    """
    h = dense_hessian(spec, params, train_batch) if hessian is None else np.asarray(hessian, np.float64)
    n_train = len(next(iter(train_batch.values())))
    both = {k: np.concatenate([np.asarray(train_batch[k]), np.asarray(test_batch[k])]) for k in train_batch}
    g = flat_grads(spec, params, both)  # one compilation for both sets
    g_train, g_test = g[:n_train], g[n_train:]
    if h.shape != (g_train.shape[1],) * 2:
        raise ValueError(f"hessian has shape {h.shape}, expected {(g_train.shape[1],) * 2} for these params")
    return g_train @ np.linalg.solve(h, g_test.T)
