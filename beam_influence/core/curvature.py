"""Curvature-vector products on the training objective L(θ) = mean_z ℓ(z, θ) + l2/2 ‖θ‖².

Two products, both over flat float vectors of length p (the ravelled parameters), so that Arnoldi can
keep its basis on the host:

* Hessian:  v ↦ H v = ∇²L(θ) v, forward-over-reverse (``jax.jvp`` of ``jax.grad``), exact.
* Gauss-Newton (GGN):  v ↦ (mean_z J_zᵀ H_out,z J_z + l2 I) v with J_z = ∂f(z,θ)/∂θ the Jacobian of the
  model output and H_out,z = ∂²ℓ_out/∂f² the Hessian of the loss w.r.t. the output. Always positive
  semi-definite for convex output losses (softmax cross-entropy), so every Ritz value is ≥ l2.

``hvp_fn`` / ``ggn_vp_fn`` compute a product on a whole (device) batch at once: memory grows with the
batch. The eigensystem job uses ``CurvatureOperator`` instead: a product over a sample of m examples
that lives on the host (numpy) is accumulated over micro-batches of a fixed size b,

    C v = Σ_j (n_j / m) · C_j v  (+ l2 v, counted once),

where C_j is the mean curvature of micro-batch j (n_j ≤ b real examples). Each micro-batch is copied
to the device explicitly; the last one is padded to b rows (copies of a real row, weight 0), so one
shape is compiled once and every later product, on any sample of any size, reuses it. Device memory
is O(b · activations + p), independent of m.

Data-parallel over D local devices (``devices``): each compiled step takes D micro-batches at once,
one per device (a ``[D·b, ...]`` host batch placed with ``NamedSharding(mesh, P("data"))``); θ and v
are replicated, every device computes its micro-batch's weighted product and one ``psum`` over the
mesh adds them (``jax.shard_map``). The sum is the same C v, in another order of float additions.

A ``BatchSource`` hands out the host batch of each product: a fresh one per product (the reference
implementation's choice: the Krylov space sees more data) or always the same one.
"""
from __future__ import annotations

from typing import Callable, Iterator, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from beam_influence.core.model_spec import ModelSpec, l2_norm_sq
from beam_influence.core.types import Example, FlatVector, Params

Curvature = Literal["hessian", "ggn"]


def hvp_fn(spec: ModelSpec, params: Params) -> Callable[[jax.Array, Example], jax.Array]:
    """A jitted ``(v_flat, batch) -> H v`` for the Hessian of ``spec.batch_loss`` at ``params`` (whole batch)."""
    flat0, unravel = ravel_pytree(params)

    def objective(flat, batch):
        return spec.batch_loss(unravel(flat), batch)

    @jax.jit
    def hvp(v, batch):
        return jax.jvp(lambda f: jax.grad(objective)(f, batch), (flat0,), (v.astype(flat0.dtype),))[1]

    return hvp


def _check_ggn(spec: ModelSpec) -> None:
    if spec.apply is None or spec.output_loss is None:
        raise ValueError(
            f"GGN curvature needs the model spec {spec.name!r} to define apply() and output_loss(); "
            "use curvature='hessian' or add them to the spec"
        )


def ggn_vp_fn(spec: ModelSpec, params: Params) -> Callable[[jax.Array, Example], jax.Array]:
    """A jitted ``(v_flat, batch) -> G v`` for the Gauss-Newton matrix of ``spec`` at ``params`` (whole batch).

    G = mean_z J_zᵀ H_out,z J_z + l2 I; needs ``spec.apply`` and ``spec.output_loss``.
    """
    _check_ggn(spec)
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


# ---- weighted micro-batch products (no l2 term): Σ_i w_i C_i v ------------------------------------
# θ is the params pytree itself (no ravelled copy of it is ever made: one p-sized buffer fewer, and no
# slices of a flat θ inside the step); only v and the product are flat [p] vectors.
def _tree_ravel_fns(params: Params):
    """``(ravel, unravel)`` between a params-shaped pytree and a flat [p] vector (``ravel_pytree``'s order and
    common dtype), built from the shapes alone: unlike ``ravel_pytree(params)`` no flat copy of θ is made."""
    leaves, treedef = jax.tree.flatten(params)
    shapes = [tuple(np.shape(x)) for x in leaves]
    sizes = [int(np.prod(sh, dtype=np.int64)) for sh in shapes]
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()

    def ravel(tree):
        return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in jax.tree.leaves(tree)])

    def unravel(flat):
        return jax.tree.unflatten(treedef, [flat[a:b].reshape(sh).astype(x.dtype) for a, b, sh, x in
                                            zip(offsets[:-1], offsets[1:], shapes, leaves)])

    return ravel, unravel, int(offsets[-1]), np.dtype(dtype)


def _weighted_hessian(spec: ModelSpec, ravel, unravel) -> Callable:
    def weighted_loss(tree, batch, w):
        losses = jax.vmap(spec.loss, in_axes=(None, 0))(tree, batch)
        return jnp.sum(w * losses)

    def prod(tree, v, batch, w):
        return ravel(jax.jvp(lambda t: jax.grad(weighted_loss)(t, batch, w), (tree,), (unravel(v),))[1])

    return prod


def _weighted_ggn(spec: ModelSpec, ravel, unravel) -> Callable:
    _check_ggn(spec)

    def prod(tree, v, batch, w):
        # batched J v (forward), per-example H_out, weights, then one batched Jᵀ (reverse): O(b·out + p)
        # memory, never the [b, p] per-example products
        f = lambda t: jax.vmap(spec.apply, in_axes=(None, 0))(t, batch)  # noqa: E731
        out, jv = jax.jvp(f, (tree,), (unravel(v),))

        def h_out(o, t, ex):
            return jax.jvp(jax.grad(lambda oo: spec.output_loss(oo, ex)), (o,), (t,))[1]

        hjv = jax.vmap(h_out)(out, jv, batch)
        hjv = jax.tree.map(lambda h: h * w.reshape((-1,) + (1,) * (h.ndim - 1)).astype(h.dtype), hjv)
        return ravel(jax.vjp(f, tree)[1](hjv)[0])

    return prod


def _num_rows(batch: Example) -> int:
    sizes = {len(v) for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch features have different leading sizes {sizes}")
    return sizes.pop()


def resolve_devices(devices: int | Sequence | None = None) -> list:
    """The local JAX devices a curvature product runs on: None or 0 → all local devices, an int D → the
    first D, a sequence → those devices."""
    local = jax.local_devices()
    if devices is None or (isinstance(devices, (int, np.integer)) and int(devices) == 0):
        return list(local)
    if isinstance(devices, (int, np.integer)):
        if not 1 <= int(devices) <= len(local):
            raise ValueError(f"devices={devices}: this process has {len(local)} local device(s) "
                             f"({local[0].platform}); use 1..{len(local)} or 0 for all")
        return list(local[: int(devices)])
    out = list(devices)
    if not out:
        raise ValueError("devices is an empty sequence; pass None for all local devices")
    return out


class CurvatureOperator:
    """``(v, host_batch) -> C v`` accumulated over fixed-size micro-batches with one compiled step.

    Args:
      spec, params: the model and where the curvature is taken.
      curvature: ``"hessian"`` (exact, jvp of grad) or ``"ggn"`` (Gauss-Newton; needs apply/output_loss).
      micro_batch: b, the rows per device per compiled step (the device-memory knob). Any host batch of
        m ≥ 1 rows is cut into ⌈m/(D·b)⌉ steps; the last is padded with weight-0 rows.
      devices: the devices of the data-parallel product (``resolve_devices``: default all local devices).

    ``trace_count`` counts traces of the jitted step (1 after the first product, one per bucket for token
    sequences; it must not grow after that).
    """

    def __init__(self, spec: ModelSpec, params: Params, *, curvature: Curvature = "hessian", micro_batch: int = 256,
                 devices: int | Sequence | None = None):
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
        if int(micro_batch) < 1:
            raise ValueError(f"micro_batch must be ≥ 1, got {micro_batch}")
        ravel, unravel, dim, dtype = _tree_ravel_fns(params)
        self.curvature, self.micro_batch, self.l2 = curvature, int(micro_batch), float(spec.l2)
        self._features = spec.features  # token sequences are grouped by bucket (core.buckets.split)
        self.dim, self.dtype = dim, dtype
        self.devices = resolve_devices(devices)
        self.num_devices = len(self.devices)
        self.home = self.devices[0]  # where device-side results (``apply_device``) are returned
        self.trace_count = 0
        partial = {"hessian": _weighted_hessian, "ggn": _weighted_ggn}[curvature](spec, ravel, unravel)
        donate = (0,)  # the accumulator is updated in place (one [p] buffer, not two per step)
        if self.num_devices == 1:
            self._params = jax.device_put(params, self.home)  # θ as given (a pytree; no copy when already there)
            self._batch_sharding = self._vec_sharding = self.home

            def step(acc, flat, v, batch, w):
                self.trace_count += 1  # runs only while tracing
                return acc + partial(flat, v, batch, w).astype(acc.dtype)

            self._step = jax.jit(step, donate_argnums=donate)
        else:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

            mesh = Mesh(np.asarray(self.devices), ("data",))
            self.mesh = mesh
            self._batch_sharding = NamedSharding(mesh, P("data"))
            self._vec_sharding = NamedSharding(mesh, P())
            self._params = jax.device_put(params, self._vec_sharding)

            def local(acc, flat, v, batch, w):  # one device: its b rows, then the sum over the mesh
                self.trace_count += 1
                return acc + jax.lax.psum(partial(flat, v, batch, w).astype(acc.dtype), "data")

            # check_vma=False: derivatives with respect to the replicated θ stay per-device partial sums (with
            # the check on, JAX's transpose would insert its own psum over "data" and this one would count D×)
            sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), jax.tree.map(lambda _: P(), params), P(),
                                                                 P("data"), P("data")),
                                    out_specs=P(), check_vma=False)
            self._step = jax.jit(sharded, donate_argnums=donate)

    @property
    def rows_per_step(self) -> int:
        """D·b: host rows one compiled step consumes (b per device)."""
        return self.micro_batch * self.num_devices

    def micro_batches(self, batch: Example) -> Iterator[tuple[Example, np.ndarray]]:
        """The host steps of ``batch`` (each D·b rows) and their weights: 1/m per real row, 0 per padding row."""
        m = _num_rows(batch)
        if m < 1:
            raise ValueError("cannot take a curvature product over an empty batch")
        b = self.rows_per_step
        from beam_influence.core.buckets import split

        # token sequences: steps never mix buckets (each cut to its bucket's length); weights stay 1/m
        for _, host in split({k: np.asarray(v) for k, v in batch.items()}, self._features):
            mg = _num_rows(host)
            for start in range(0, mg, b):
                n = min(b, mg - start)
                w = np.zeros(b, np.float32)
                w[:n] = 1.0 / m
                if n == b:
                    mb = {k: v[start:start + b] for k, v in host.items()}
                else:  # pad with copies of the last real row (finite loss; weight 0)
                    take = np.minimum(np.arange(start, start + b), mg - 1)
                    mb = {k: v[take] for k, v in host.items()}
                yield mb, w

    def _accumulate(self, v_dev: jax.Array, batch: Example) -> jax.Array:
        """Σ_j (n_j/m) C_j v on the device(s), without the l2 term (replicated over the mesh when D > 1)."""
        acc = jax.device_put(jnp.zeros(self.dim, self.dtype), self._vec_sharding)
        for mb, w in self.micro_batches(batch):
            # explicit host→device copies (split over the devices when D > 1); dispatch is asynchronous, so
            # the next step's rows are sliced and copied while this one computes
            acc = self._step(acc, self._params, v_dev, jax.device_put(mb, self._batch_sharding),
                             jax.device_put(w, self._batch_sharding))
        return acc

    def __call__(self, v: FlatVector, batch: Example) -> FlatVector:
        """C v (numpy float64 [p]) over the host batch ``batch`` (feature -> [m, ...] arrays)."""
        v = np.asarray(v)
        if v.shape != (self.dim,):
            raise ValueError(f"v has shape {v.shape}, expected ({self.dim},)")
        # p-sized buffers: v in θ's dtype (no copy when it already is, e.g. a float32 basis row), its device
        # copy, the accumulator (donated: updated in place), the product's own work, and the float64 result
        acc = self._accumulate(jax.device_put(v.astype(self.dtype, copy=False), self._vec_sharding), batch)
        out = np.empty(self.dim, np.float64)
        out[...] = np.asarray(jax.device_get(acc))  # the CPU backend hands out its buffer without a copy
        del acc
        if self.l2:  # + l2 v, in float64, in blocks (no p-sized temporaries)
            for a in range(0, self.dim, _L2_BLOCK):
                out[a:a + _L2_BLOCK] += self.l2 * np.asarray(v[a:a + _L2_BLOCK], np.float64)
        return out

    def apply_device(self, v: jax.Array, batch: Example) -> jax.Array:
        """C v as a device array on ``self.home`` (params' dtype), l2 term included: v never leaves the
        accelerator (what ``arnoldi(basis="device")`` calls)."""
        if tuple(v.shape) != (self.dim,):
            raise ValueError(f"v has shape {tuple(v.shape)}, expected ({self.dim},)")
        v = jax.device_put(jnp.asarray(v, self.dtype), self._vec_sharding)
        out = self._accumulate(v, batch) + self.l2 * v
        return out if self.num_devices == 1 else jax.device_put(out, self.home)


_L2_BLOCK = 1 << 20


class BatchSource:
    """Hands out host (numpy) batches for curvature products: fresh (seeded) or one fixed batch.

    ``data`` is a decoded host sample of the training set (feature -> array, leading axis N); each
    batch has ``min(batch_size, N)`` rows drawn without replacement.
    """

    def __init__(self, data: Example, *, batch_size: int, fresh: bool = True, seed: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data = {k: np.asarray(v) for k, v in data.items()}
        self.n, self.fresh = _num_rows(self.data), fresh
        self.batch_size = min(batch_size, self.n)
        self._rng = np.random.default_rng(seed)
        self._fixed = self._draw()

    def _draw(self) -> Example:
        if self.batch_size == self.n:
            self._rng.choice(self.n, self.batch_size, replace=False)  # same stream as before
            return self.data
        idx = np.sort(self._rng.choice(self.n, self.batch_size, replace=False))
        return {k: v[idx] for k, v in self.data.items()}

    def __iter__(self) -> Iterator[Example]:
        while True:
            yield self._draw() if self.fresh else self._fixed


def make_matvec(
    spec: ModelSpec,
    params: Params,
    batches: BatchSource,
    *,
    curvature: Curvature = "hessian",
    micro_batch: int | None = None,
    operator: CurvatureOperator | None = None,
    devices: int | Sequence | None = None,
) -> Callable[[FlatVector], FlatVector]:
    """A host-side matrix-vector product ``v (numpy [p]) -> C v (numpy [p], float64)``, one batch per call.

    ``micro_batch``: rows per device per compiled step (default: the whole batch, capped at
    ``batches.batch_size``). ``operator``: reuse an existing ``CurvatureOperator`` (and its compiled step)
    instead of building one (``devices`` is then ignored). The operator is available as ``matvec.operator``;
    ``matvec.on_device(v: jax.Array) -> jax.Array`` is the same product on device vectors, drawing from
    the same batch stream (what ``arnoldi(basis="device")`` uses).
    """
    if operator is None:
        b = batches.batch_size if micro_batch is None else min(int(micro_batch), batches.batch_size)
        operator = CurvatureOperator(spec, params, curvature=curvature, micro_batch=b, devices=devices)
    it = iter(batches)

    def matvec(v: FlatVector) -> FlatVector:
        return operator(v, next(it))

    matvec.operator = operator
    matvec.on_device = lambda v: operator.apply_device(v, next(it))
    return matvec


def num_params(params: Params) -> int:
    """p, the number of scalar parameters."""
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


__all__ = ["hvp_fn", "ggn_vp_fn", "CurvatureOperator", "resolve_devices", "BatchSource", "make_matvec",
           "num_params", "l2_norm_sq"]
