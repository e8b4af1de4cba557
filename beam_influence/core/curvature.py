"""Curvature-vector products on the training objective L(θ) = mean_z ℓ(z, θ) + l2/2 ‖θ‖².

Two products, both over flat float vectors of length p (the ravelled parameters), so that Arnoldi can
keep its basis on the host:

* Hessian:  v ↦ H v = ∇²L(θ) v, forward-over-reverse (``jax.jvp`` of ``jax.grad``), exact.
* Gauss-Newton (GGN):  v ↦ (mean_z J_zᵀ H_out,z J_z + l2 I) v with J_z = ∂f(z,θ)/∂θ the Jacobian of the
  model output and H_out,z = ∂²ℓ_out/∂f² the Hessian of the loss w.r.t. the output. Always positive
  semi-definite for convex output losses (softmax cross-entropy), so every Ritz value is ≥ l2.

Each product runs on a batch; a ``BatchSource`` hands out either a fresh batch per product (the
reference implementation's choice: the Krylov space sees more data) or always the same one.
"""
from __future__ import annotations

from typing import Callable, Iterator, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from beam_influence.core.model_spec import ModelSpec, l2_norm_sq
from beam_influence.core.types import Example, FlatVector, Params

Curvature = Literal["hessian", "ggn"]


def hvp_fn(spec: ModelSpec, params: Params) -> Callable[[jax.Array, Example], jax.Array]:
    """A jitted ``(v_flat, batch) -> H v`` for the Hessian of ``spec.batch_loss`` at ``params``."""
    flat0, unravel = ravel_pytree(params)

    def objective(flat, batch):
        return spec.batch_loss(unravel(flat), batch)

    @jax.jit
    def hvp(v, batch):
        return jax.jvp(lambda f: jax.grad(objective)(f, batch), (flat0,), (v.astype(flat0.dtype),))[1]

    return hvp


def ggn_vp_fn(spec: ModelSpec, params: Params) -> Callable[[jax.Array, Example], jax.Array]:
    """A jitted ``(v_flat, batch) -> G v`` for the Gauss-Newton matrix of ``spec`` at ``params``.

    G = mean_z J_zᵀ H_out,z J_z + l2 I; needs ``spec.apply`` and ``spec.output_loss``.
    """
    if spec.apply is None or spec.output_loss is None:
        raise ValueError(
            f"GGN curvature needs the model spec {spec.name!r} to define apply() and output_loss(); "
            "use curvature='hessian' or add them to the spec"
        )
    flat0, unravel = ravel_pytree(params)

    def one(v, example):
        f = lambda flat: spec.apply(unravel(flat), example)  # noqa: E731
        out, jv = jax.jvp(f, (flat0,), (v,))
        h_jv = jax.jvp(jax.grad(lambda o: spec.output_loss(o, example)), (out,), (jv,))[1]
        return jax.vjp(f, flat0)[1](h_jv)[0]

    @jax.jit
    def ggn_vp(v, batch):
        v = v.astype(flat0.dtype)
        return jnp.mean(jax.vmap(one, in_axes=(None, 0))(v, batch), axis=0) + spec.l2 * v

    return ggn_vp


class BatchSource:
    """Hands out training batches for curvature products: fresh (seeded, cycling) or one fixed batch.

    ``data`` is a decoded batch of the whole (or a sample of the) training set, leading axis N.
    """

    def __init__(self, data: Example, *, batch_size: int, fresh: bool = True, seed: int = 0):
        n = len(next(iter(data.values())))
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data, self.n, self.fresh = data, n, fresh
        self.batch_size = min(batch_size, n)
        self._rng = np.random.default_rng(seed)
        self._fixed = self._draw()

    def _draw(self) -> Example:
        idx = np.sort(self._rng.choice(self.n, self.batch_size, replace=False))
        return {k: jnp.asarray(np.asarray(v)[idx]) for k, v in self.data.items()}

    def __iter__(self) -> Iterator[Example]:
        while True:
            yield self._draw() if self.fresh else self._fixed


def make_matvec(
    spec: ModelSpec,
    params: Params,
    batches: BatchSource,
    *,
    curvature: Curvature = "hessian",
) -> Callable[[FlatVector], FlatVector]:
    """A host-side matrix-vector product ``v (numpy [p]) -> C v (numpy [p], float64)``.

    Copies are explicit: v goes to the device, the product comes back to the host, once per call.
    """
    prod = {"hessian": hvp_fn, "ggn": ggn_vp_fn}[curvature](spec, params)
    it = iter(batches)

    def matvec(v: FlatVector) -> FlatVector:
        out = prod(jax.device_put(np.asarray(v, np.float32)), next(it))
        return np.asarray(jax.device_get(out), dtype=np.float64)

    return matvec


def num_params(params: Params) -> int:
    """p, the number of scalar parameters."""
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


__all__ = ["hvp_fn", "ggn_vp_fn", "BatchSource", "make_matvec", "num_params", "l2_norm_sq"]
