r"""Projection of per-example gradients onto a Hessian eigensystem: the hot path of an influence pass.

For an eigensystem :math:`(\lambda_i, u_i)_{i \le k}` of the Hessian of the training objective
(Schioppa et al., "Scaling Up Influence Functions", AAAI-22, arXiv 2112.03052) every example
:math:`z` is mapped to

.. math::  P(z) = \big[\langle \nabla_\theta \ell(z, \theta), u_i \rangle\big]_{i \le k} \in \mathbb{R}^k,

after which influence is a cheap k-dimensional product (see ``beam_influence.core.scoring``).

Eigenvectors are a pytree with the structure of ``params`` whose leaves have shape
``[k, *param_leaf.shape]``: row ``i`` of every leaf together is the unit vector ``u_i``.

Three methods compute the same ``P`` (they agree to float32 round-off):

``"leafwise"`` (default)
    per-example gradients by ``vmap(grad)`` over micro-batches (``lax.map``), each gradient leaf
    ``[m, *shape]`` contracted with its eigenvector leaf ``[k, *shape]`` by
    ``einsum('b...,k...->bk')`` and the ``[m, k]`` results summed over leaves. The whole gradient
    is never flattened or concatenated, so no ``[m, p]`` copy is made.
``"flat"``
    ``vmap(grad)``, ravel + concatenate every example's gradient into ``[m, p]``, one matmul with
    the flattened ``U: [k, p]``. For comparison: the concatenation costs a full extra copy.
``"jvp"``
    the forward mode of the seed paper's code: one Jacobian-vector product of the loss per
    eigenvector (``vmap`` over the k tangents and the examples of a micro-batch).

Measured on one H200 for a 110M-parameter Transformer (``../shared/reference/h200_anchor.md``),
seconds per example relative to a training step at k = 32 / 128: jvp 17x / 69x, flat 6.8x / 11.3x
(micro-batch 16), leafwise in bf16 2.6x / 4.1x (micro-batch 16) down to 1.6x / 1.9x (micro-batch 64).

Example::

    spec = digits.cnn(); params = spec.init(0)
    project = make_projector(spec.loss, eigvecs)          # jitted once per batch shape
    out = project(params, {"x": x[:64], "y": y[:64]})     # out.projections: [64, k]
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from beam_influence.core.memory import device_memory, host_free_bytes
from beam_influence.core.types import Example, Params

METHODS = ("leafwise", "flat", "jvp")
DEFAULT_MICRO_BATCH = 64

LossFn = Callable[[Params, Example], jax.Array]


class ProjectionOutput(NamedTuple):
    """What a projector returns for a batch of B examples (device arrays).

    Attributes:
      projections: ``[B, k]`` float32, row b is :math:`P(z_b)`.
      losses: ``[B]`` float32, :math:`\\ell(z_b, \\theta)`.
      finite: ``[B]`` bool, True when the loss and every gradient entry of example b are finite
        (for ``"jvp"``, which never forms the gradient: the loss and the k projections). Callers
        dead-letter the rows where it is False; their projections are meaningless.
      grad_sq_norms: ``[B]`` float32, :math:`\lVert\nabla\ell(z_b)\rVert^2` (the complement term of
        self-influence); NaN for ``"jvp"``, which never forms the gradient.
      sketches: ``[B, d]`` float32, the gradient sketch :math:`S\nabla\ell(z_b)` (``core.sketch``);
        ``[B, 0]`` without a sketch.
      extra: ``[B, c]`` float32, what the projector's ``extra`` computed from the same per-example gradients
        (e.g. ``core.kfac.WhitenedTerms``: the K-FAC self-term and whitened sketch); ``[B, 0]`` without one.
    """

    projections: jax.Array
    losses: jax.Array
    finite: jax.Array
    grad_sq_norms: jax.Array
    sketches: jax.Array
    extra: jax.Array = None


class Projector:
    """A jitted ``(params, batch) -> ProjectionOutput`` with its eigenvectors held on device.

    Built by ``make_projector``. Calling it runs ``self.jitted(params, batch, eigvecs, ...)``; the
    eigenvectors are an argument of the jitted function (not a compile-time constant), so a new
    batch of the same shapes and dtypes reuses the compiled executable.

    Attributes:
      method: ``"leafwise"``, ``"flat"`` or ``"jvp"``.
      micro_batch: examples per ``vmap`` step; None means ``min(B, 64)`` per batch size B.
      k: number of eigenvectors.
      eigvecs: the device-resident operand (a pytree of ``[k, *shape]`` leaves; for ``"flat"``
        the flattened ``[k, p]`` matrix).
      jitted: the underlying ``jax.jit`` function ``(params, batch, eigvecs, sketch_operands, extra_operands) ->
        ProjectionOutput``.
      sketch: the ``core.sketch.GradientSketch`` applied beside the projection, or None.
      extra, extra_operands: the per-example term computed beside it (``make_projector``'s ``extra``), or None.
    """

    def __init__(self, *, method: str, micro_batch: int | None, k: int, eigvecs: Any, jitted: Callable,
                 sketch: Any = None, sketch_operands: Any = (), extra: Any = None, extra_operands: Any = ()):
        self.method = method
        self.micro_batch = micro_batch
        self.k = k
        self.eigvecs = eigvecs
        self.jitted = jitted
        self.sketch = sketch
        self.sketch_operands = sketch_operands
        self.extra = extra
        self.extra_operands = extra_operands

    def __call__(self, params: Params, batch: Example) -> ProjectionOutput:
        """Project a batch. ``batch``: feature -> ``[B, ...]``; returns ``[B, k]`` projections."""
        return self.jitted(params, batch, self.eigvecs, self.sketch_operands, self.extra_operands)

    def cache_size(self) -> int:
        """How many executables the jitted function holds (one per batch shape seen)."""
        return self.jitted._cache_size()  # noqa: SLF001 - jax's own introspection hook

    def __repr__(self) -> str:
        return f"Projector(method={self.method!r}, k={self.k}, micro_batch={self.micro_batch})"


def make_projector(
    loss: LossFn,
    eigvecs: Params,
    *,
    method: str = "leafwise",
    micro_batch: int | None = None,
    compute_dtype: Any = None,
    sketch: Any = None,
    extra: Any = None,
) -> Projector:
    r"""Build a jitted projector :math:`z \mapsto P(z) = [\langle \nabla\ell(z,\theta), u_i\rangle]_{i\le k}`.

    Args:
      loss: per-example loss ``loss(params, example) -> scalar`` (``example`` unbatched).
      eigvecs: pytree with the structure of params, leaves ``[k, *param_leaf.shape]``; converted
        once to device arrays here (in ``compute_dtype`` for leafwise/flat when given).
      method: ``"leafwise"`` (default), ``"flat"`` or ``"jvp"`` (see the module docstring).
      micro_batch: examples per ``vmap`` step (bounds memory: m per-example gradients live at
        once, or m x k tangents for jvp). None: ``min(B, 64)``. A batch size B that is not a
        multiple is padded by repeating the last example; the padding rows are dropped.
      compute_dtype: e.g. ``jnp.bfloat16``: the dtype of the contraction inputs (gradient and
        eigenvector leaves) for leafwise/flat, accumulated in float32
        (``preferred_element_type``). Not supported for jvp (tangents must match the params' dtype).
      sketch: a ``core.sketch.GradientSketch`` of these params: the output's ``sketches`` are
        :math:`S\nabla\ell(z)`, computed leaf by leaf from the same per-example gradients (not for jvp).
      extra: an object with ``device_operands()`` and ``apply(grads, projections, operands) -> [m, c]`` (the
        micro-batch's per-example gradient tree and its ``[m, k(+Q)]`` projections): the output's ``extra``, from
        the same gradients (not for jvp); e.g. ``core.kfac.Complement.per_example``.

    Returns:
      A ``Projector``: ``project(params, batch) -> ProjectionOutput`` with ``projections [B, k]``
      float32, ``losses [B]`` float32 and ``finite [B]`` bool. One compilation per batch shape.
    """
    if method not in METHODS:
        raise ValueError(f"unknown projection method {method!r}; choose one of {METHODS}")
    if micro_batch is not None and (not isinstance(micro_batch, (int, np.integer)) or micro_batch < 1):
        raise ValueError(f"micro_batch must be a positive integer or None, got {micro_batch!r}")
    if compute_dtype is not None and method == "jvp":
        raise ValueError("compute_dtype is not supported by method='jvp' (tangents must have the params' dtype); "
                         "use method='leafwise' for a reduced-precision contraction")
    leaves = jax.tree.leaves(eigvecs)
    if not leaves:
        raise ValueError("eigvecs has no leaves")
    k = int(np.shape(leaves[0])[0]) if np.ndim(leaves[0]) else -1
    for kp, leaf in jax.tree_util.tree_leaves_with_path(eigvecs):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != k:
            raise ValueError(f"eigvecs leaf {jax.tree_util.keystr(kp)} has shape {np.shape(leaf)}; every leaf must "
                             f"be [k, *param_shape] with the same k (first leaf: {np.shape(leaves[0])})")
    if (sketch is not None or extra is not None) and method == "jvp":
        raise ValueError("a gradient sketch (or an extra per-example term) needs the per-example gradients: use "
                         "method='leafwise' or 'flat', not 'jvp'")
    cdt = None if compute_dtype is None else jnp.dtype(compute_dtype)
    sketch_ops = sketch.device_operands() if sketch is not None else ()
    extra_ops = extra.device_operands() if extra is not None else ()

    # device_put, not jnp.asarray: one device copy (on the CPU backend jnp.asarray of a numpy array held a
    # second host copy, measured +2x U); the caller may then drop its host U (``InfluenceContext`` does)
    def put(u):
        return u if isinstance(u, jax.Array) and (cdt is None or u.dtype == cdt) else jax.device_put(
            np.asarray(u) if cdt is None else np.asarray(u).astype(cdt))

    if method == "flat":
        operand = put(flatten_eigvecs(eigvecs))
    else:
        operand = jax.tree.map(put, eigvecs)
    mb = None if micro_batch is None else int(micro_batch)
    body = {"leafwise": _leafwise_step, "flat": _flat_step, "jvp": _jvp_step}[method]

    def project(params: Params, batch: Example, eigvecs_operand: Any, sketch_operands: Any,
                extra_operands: Any) -> ProjectionOutput:
        if method != "flat":
            _check_structure(params, eigvecs_operand)

        def step(mbatch):
            out, grads = body(loss, params, mbatch, eigvecs_operand, cdt)
            none = jnp.zeros((out.losses.shape[0], 0), jnp.float32)
            return out._replace(
                sketches=none if sketch is None or grads is None else sketch.apply(grads, sketch_operands),
                extra=none if extra is None or grads is None else extra.apply(grads, out.projections, extra_operands))

        return _map_micro_batches(step, batch, mb)

    return Projector(method=method, micro_batch=mb, k=k, eigvecs=operand, jitted=jax.jit(project),
                     sketch=sketch, sketch_operands=sketch_ops, extra=extra, extra_operands=extra_ops)


class DeviceInfo(NamedTuple):
    """What ``choose_method`` needs to know of the device a projector runs on.

    Attributes:
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"`` (``jax.Device.platform``).
      kind: ``jax.Device.device_kind``, e.g. ``"NVIDIA H200"`` (recorded in the plan's reason).
      free_bytes: device memory not in use (``memory_stats``: limit − in use), None when the backend
        reports none (the CPU: then host RAM bounds the plan).
    """

    platform: str
    kind: str
    free_bytes: int | None


class ProjectionPlan(NamedTuple):
    """``choose_method``'s answer: the ``make_projector`` arguments and why.

    Attributes:
      method: ``"leafwise"``, ``"flat"`` or ``"jvp"``.
      micro_batch: examples per ``vmap`` step, ``1 <= micro_batch <= batch_size``.
      compute_dtype: ``"bfloat16"`` or None (the params' float32).
      reason: one line: the rule (or override) that chose these, with the numbers it used.
      memory: ``core.memory.MemoryPlan.as_dict()`` of the choice (JSON; its ``line`` is the one-line plan),
        None when memory was not planned.
    """

    method: str
    micro_batch: int
    compute_dtype: str | None
    reason: str
    memory: Any = None


# The rule's constants, from measurements (docs/accelerators.md has the table):
#  - one H200, 110M Transformer (../shared/reference/h200_anchor.md): leafwise bf16 1.56x / 1.88x a training
#    step at k = 32 / 128 with micro-batch 64 (2.0x / 2.7x at 32, 2.6x / 4.1x at 16); flat 6.8x / 11.3x,
#    jvp 17x / 69x.  -> accelerators: leafwise, bf16, the largest measured micro-batch that fits.
#  - this 2-core CPU (benchmarks/results/projection.json, float32): flat beats leafwise at every k >= 64 for
#    both models at micro-batch 64 (CNN 3.47x vs 3.96x at k = 64, 4.75x vs 5.91x at 128, 7.06x vs 10.3x at 256;
#    Transformer 1.49x vs 1.52x, 1.93x vs 1.95x, 2.63x vs 2.85x); at k = 16 leafwise wins (1.07x vs 1.14x);
#    micro-batch 64 is best or within 4 % for every k >= 64.  -> CPU: flat at k >= 64, else leafwise, m = 64.
#  - jvp is never the fastest measured (CPU 4.5x..80x, GPU 17x..69x): only on request.
FLAT_MIN_K_CPU = 64
ACCEL_MICRO_BATCH = 64  # the largest micro-batch measured on the H200 (and the fastest there)
CPU_MICRO_BATCH = 64
ACCEL_BYTES_PER_EXAMPLE_PER_PARAM = 8  # float32 per-example gradient + its bf16/working copies
CPU_BYTES_PER_EXAMPLE_PER_PARAM = {"leafwise": 4, "flat": 12}  # flat: gradients + [m, p] concatenation (+ cast)
MEMORY_FRACTION = 0.5  # of free device memory (or host RAM on the CPU) the per-example gradients may use


def device_info(device: Any = None) -> DeviceInfo:
    """``DeviceInfo`` of a JAX device (default: the first local device)."""
    dev = device or jax.local_devices()[0]
    mem = device_memory(dev)
    return DeviceInfo(str(dev.platform), str(getattr(dev, "device_kind", dev.platform)),
                      None if mem is None else mem["free"])


def choose_method(*, batch_size: int, k: int, num_params: int | None = None,
                  memory_budget_bytes: int | None = None, device: DeviceInfo | Any = None,
                  method: str | None = None, micro_batch: int | None = None,
                  compute_dtype: str | None = None, query_directions: int = 0,
                  extra_buffers: Sequence = ()) -> ProjectionPlan:
    r"""Pick method, micro-batch and compute dtype for ``make_projector`` from the model, k and the device.

    The rule (derived from measurements; table in docs/accelerators.md):

    * **accelerator** (``gpu``/``tpu``): ``"leafwise"`` in ``bfloat16``; micro-batch m the largest of
      min(B, 64), then powers of two below it, with :math:`8\,m\,p` bytes (float32 per-example gradients and their
      reduced-precision copies) within the budget. On one H200 larger m was faster throughout
      (each micro-batch reads U once: U traffic per example is :math:`k p / m`).
    * **CPU**: ``"flat"`` when the directions projected (k + ``query_directions``) are ≥ 64 and its
      :math:`12\,m\,p` bytes fit, else ``"leafwise"``; float32;
      m = min(B, 64), lowered to fit the budget.
    * ``"jvp"`` only when asked for.

    Args:
      batch_size: B, the examples per call.
      k: number of eigenvectors.
      num_params: p (None: memory is not checked).
      memory_budget_bytes: bytes the per-example gradients alone may take (a fixed budget, for tests and
        benchmarks). Default: the memory plan (``core.memory.plan_projection``) counts U, θ, the step's work,
        the runtime and the m gradients against the device's free memory (the host's available RAM on the
        CPU) and m is the largest that fits; ``MemoryPlanError`` when not even m = 1 fits.
      query_directions: exact-complement query gradients projected beside U (the fused job).
      extra_buffers: the stage's other ``core.memory.Buffer`` s (a K-FAC worker's: ``core.memory.kfac_buffers``).
      device: a ``DeviceInfo`` or a JAX device (default: the first local device).
      method, micro_batch, compute_dtype: overrides; each one given is used as is (micro_batch capped
        at B) and the rule fills in the rest.
    Returns:
      A ``ProjectionPlan(method, micro_batch, compute_dtype, reason)``.
    """
    if batch_size < 1 or k < 1:
        raise ValueError(f"batch_size and k must be positive, got batch_size={batch_size}, k={k}")
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown projection method {method!r}; choose one of {METHODS} (or None for the rule)")
    if micro_batch is not None and (isinstance(micro_batch, bool) or int(micro_batch) < 1):
        raise ValueError(f"micro_batch must be a positive integer or None, got {micro_batch!r}")
    if compute_dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"compute_dtype must be None, 'float32', 'bfloat16' or 'float16', got {compute_dtype!r}")
    info = device if isinstance(device, DeviceInfo) else device_info(device)
    accel = info.platform != "cpu"
    budget = memory_budget_bytes
    free = info.free_bytes if accel else host_free_bytes()
    planned = budget is None and num_params is not None and free is not None  # the memory plan picks m

    def memory_plan(per_param: int, *, top: int | None = None, m: int | None = None, dtype: str | None = None):
        """``core.memory.plan_projection`` for this device: U, θ, the step's work and m gradients counted."""
        from beam_influence.core.memory import plan_projection

        return plan_projection("projection", p=num_params, k=k, per_example_bytes_per_param=per_param,
                               max_micro_batch=top or 1, micro_batch=m, platform=info.platform,
                               u_itemsize=2 if dtype in ("bfloat16", "float16") else 4,
                               query_directions=query_directions, extra=extra_buffers,
                               host_free=None if accel else free, device_free=free if accel else None)

    def fits(m: int, per_param: int) -> bool:
        if planned:
            from beam_influence.core.memory import MemoryPlanError

            try:
                memory_plan(per_param, m=m)
            except MemoryPlanError:
                return False
            return True
        return num_params is None or budget is None or m * per_param * num_params <= budget

    def largest(top: int, per_param: int) -> int:
        """The largest of min(B, top), then halvings down to 1, that fits (``MemoryPlanError`` when not even
        one example's gradient fits beside U)."""
        if planned:
            return memory_plan(per_param, top=min(batch_size, top), dtype=dtype).choices["micro_batch"]
        m = min(batch_size, top)
        while m > 1 and not fits(m, per_param):
            m = 1 << ((m - 1).bit_length() - 1)  # the largest power of two below m
        return m

    notes = []
    if accel:
        chosen = method or "leafwise"
        dtype = compute_dtype if compute_dtype is not None else ("bfloat16" if chosen != "jvp" else None)
        per = ACCEL_BYTES_PER_EXAMPLE_PER_PARAM
        m = largest(ACCEL_MICRO_BATCH, per)
        notes.append(f"{info.platform} ({info.kind}): leafwise bf16 at the largest micro-batch that fits "
                     f"(H200 anchor: 1.56x/1.88x a training step at k=32/128 with m=64)")
    else:
        directions = k + int(query_directions)  # the rule is about the directions projected (U and query vectors)
        flat_ok = directions >= FLAT_MIN_K_CPU and fits(min(batch_size, CPU_MICRO_BATCH),
                                                        CPU_BYTES_PER_EXAMPLE_PER_PARAM["flat"])
        chosen = method or ("flat" if flat_ok else "leafwise")
        dtype = compute_dtype
        per = CPU_BYTES_PER_EXAMPLE_PER_PARAM.get(chosen, 4)
        m = largest(CPU_MICRO_BATCH, per)
        why = ("directions < " if directions < FLAT_MIN_K_CPU else "directions >= ") + f"{FLAT_MIN_K_CPU}" + (
            "" if flat_ok or directions < FLAT_MIN_K_CPU else " but the [m, p] concatenation does not fit")
        notes.append(f"cpu: {'flat' if flat_ok else 'leafwise'} ({why}; on the CPU measurements flat wins at "
                     f"k >= {FLAT_MIN_K_CPU}), float32, m <= {CPU_MICRO_BATCH}")
    if micro_batch is not None:
        m = min(int(micro_batch), batch_size)
    if dtype == "float32":
        dtype = None
    if chosen == "jvp" and dtype is not None:
        raise ValueError("compute_dtype is not supported by method='jvp'; use leafwise or flat for bf16")
    overrides = [n for n, v in (("method", method), ("micro_batch", micro_batch), ("compute_dtype", compute_dtype))
                 if v is not None]
    if overrides:
        notes.append("overridden: " + ", ".join(overrides))
    memory = None
    if planned:  # the plan of what was chosen (an m given that does not fit is refused here, with the fix)
        plan = memory_plan(ACCEL_BYTES_PER_EXAMPLE_PER_PARAM if accel else CPU_BYTES_PER_EXAMPLE_PER_PARAM.get(
            chosen, 4), m=max(1, int(m)), dtype=dtype)
        memory = plan.as_dict()
        notes.append(f"p={num_params:,}, U + θ + {int(m)} gradients + runtime = "
                     f"{plan.bytes_in('device' if accel else 'host') / 2**30:.2f} GiB of {free / 2**30:.2f} GiB free")
    elif num_params is not None and budget is not None:
        notes.append(f"p={num_params:,}, budget {budget / 2**30:.2f} GiB")
    return ProjectionPlan(chosen, max(1, int(m)), dtype, "; ".join(notes), memory)


def make_planned_projector(loss: LossFn, eigvecs: Params, *, batch_size: int, device: DeviceInfo | Any = None,
                           memory_budget_bytes: int | None = None, method: str | None = None,
                           micro_batch: int | None = None, compute_dtype: str | None = None,
                           **projector_kwargs: Any) -> Projector:
    """``make_projector`` with the arguments ``choose_method`` picks for this model, k and device (overrides
    as in ``choose_method``); the plan is kept as ``projector.plan``. Other keyword arguments go to
    ``make_projector`` unchanged."""
    leaves = jax.tree.leaves(eigvecs)
    if not leaves:
        raise ValueError("eigvecs has no leaves")
    k = int(np.shape(leaves[0])[0])
    p = int(sum(int(np.prod(np.shape(u)[1:])) for u in leaves))
    plan = choose_method(batch_size=batch_size, k=k, num_params=p, memory_budget_bytes=memory_budget_bytes,
                         device=device, method=method, micro_batch=micro_batch, compute_dtype=compute_dtype)
    proj = make_projector(loss, eigvecs, method=plan.method, micro_batch=plan.micro_batch,
                          compute_dtype=None if plan.compute_dtype is None else jnp.dtype(plan.compute_dtype),
                          **projector_kwargs)
    proj.plan = plan
    return proj


# ---- eigenvector layout helpers ----------------------------------------------------------------
def flatten_eigvecs(eigvecs: Params) -> np.ndarray:
    """Pytree of ``[k, *shape]`` leaves -> ``U: [k, p]``, columns in ``ravel_pytree`` order (C-order per leaf)."""
    leaves = jax.tree.leaves(eigvecs)
    k = np.shape(leaves[0])[0]
    return np.concatenate([np.reshape(np.asarray(u), (k, -1)) for u in leaves], axis=1)


def unflatten_eigvecs(u_flat: np.ndarray, params: Params) -> Params:
    """``U: [k, p]`` (rows in ``ravel_pytree(params)`` order) -> pytree of ``[k, *shape]`` leaves."""
    u_flat = np.asarray(u_flat)
    leaves, treedef = jax.tree.flatten(params)
    sizes = [int(np.size(x)) for x in leaves]
    if u_flat.ndim != 2 or u_flat.shape[1] != sum(sizes):
        raise ValueError(f"U has shape {u_flat.shape}; expected [k, {sum(sizes)}] for these params")
    parts = np.split(u_flat, np.cumsum(sizes)[:-1], axis=1)
    return jax.tree.unflatten(treedef, [p.reshape((u_flat.shape[0],) + np.shape(x)) for p, x in zip(parts, leaves)])


# ---- internals ----------------------------------------------------------------------------------
def _check_structure(params: Params, eigvecs: Params) -> None:
    """Trace-time check that eigvecs leaves are ``[k, *param_leaf.shape]`` for the same tree."""
    pt, et = jax.tree.structure(params), jax.tree.structure(eigvecs)
    if pt != et:
        raise ValueError(f"eigvecs tree {et} does not match the params tree {pt}")
    for (kp, p), u in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(eigvecs)):
        if tuple(u.shape[1:]) != tuple(np.shape(p)):
            raise ValueError(f"eigvecs leaf {jax.tree_util.keystr(kp)} has shape {tuple(u.shape)}, expected "
                             f"[k, *{tuple(np.shape(p))}] to match the parameter")


def _batch_size(batch: Example) -> int:
    sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch features disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def _map_micro_batches(fn: Callable[[Example], ProjectionOutput], batch: Example,
                       micro_batch: int | None) -> ProjectionOutput:
    """Apply ``fn`` to micro-batches of ``m`` examples with ``lax.map``; pad B up to a multiple of m."""
    b = _batch_size(batch)
    if b == 0:
        raise ValueError("cannot project an empty batch (B = 0)")
    m = min(b, DEFAULT_MICRO_BATCH) if micro_batch is None else min(micro_batch, b)
    n = math.ceil(b / m)
    pad = n * m - b

    def split(x):
        x = jnp.asarray(x)
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
        return x.reshape((n, m) + x.shape[1:])

    if n == 1:  # one micro-batch: no loop
        return fn(jax.tree.map(jnp.asarray, batch))
    out = jax.lax.map(fn, jax.tree.map(split, batch))
    return ProjectionOutput(*(x.reshape((n * m,) + x.shape[2:])[:b] for x in out))


def _finite_rows(losses: jax.Array, leaves: list[jax.Array]) -> jax.Array:
    """``[m]`` bool: loss finite and every entry of every ``[m, ...]`` leaf finite."""
    ok = jnp.isfinite(losses)
    for g in leaves:
        ok = ok & jnp.all(jnp.isfinite(g).reshape(g.shape[0], -1), axis=1)
    return ok


def _sq_norms(leaves: list[jax.Array]) -> jax.Array:
    """``[m]`` float32: :math:`\sum_{leaves} \lVert g_b \rVert^2` of ``[m, ...]`` gradient leaves."""
    total = None
    for g in leaves:
        term = jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
        total = term if total is None else total + term
    return total


def _per_example_grads(loss: LossFn, params: Params, mbatch: Example):
    return jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))(params, mbatch)


def _leafwise_step(loss, params, mbatch, eigvecs, cdt) -> ProjectionOutput:
    losses, grads = _per_example_grads(loss, params, mbatch)
    g_leaves = jax.tree.leaves(grads)
    proj = None
    for g, u in zip(g_leaves, jax.tree.leaves(eigvecs)):
        g = g if cdt is None else g.astype(cdt)
        term = jnp.einsum("b...,k...->bk", g, u, preferred_element_type=jnp.float32)
        proj = term if proj is None else proj + term
    return (ProjectionOutput(proj.astype(jnp.float32), losses.astype(jnp.float32), _finite_rows(losses, g_leaves),
                             _sq_norms(g_leaves), None), grads)


def _flat_step(loss, params, mbatch, u_flat, cdt) -> ProjectionOutput:
    losses, grads = _per_example_grads(loss, params, mbatch)
    g_leaves = jax.tree.leaves(grads)
    m = losses.shape[0]
    g_flat = jnp.concatenate([g.reshape(m, -1) for g in g_leaves], axis=1)  # [m, p]
    if g_flat.shape[1] != u_flat.shape[1]:
        raise ValueError(f"flattened gradient has {g_flat.shape[1]} entries but U is {tuple(u_flat.shape)}")
    g_flat = g_flat if cdt is None else g_flat.astype(cdt)
    proj = jnp.matmul(g_flat, u_flat.T, preferred_element_type=jnp.float32)
    return (ProjectionOutput(proj.astype(jnp.float32), losses.astype(jnp.float32), _finite_rows(losses, [g_flat]),
                             _sq_norms(g_leaves), None), grads)


def _jvp_step(loss, params, mbatch, eigvecs, cdt) -> ProjectionOutput:
    del cdt  # rejected in make_projector
    eigvecs = jax.tree.map(lambda u, p: u.astype(jnp.result_type(p)), eigvecs, params)  # tangent dtype = primal dtype

    def per_example_losses(p):
        return jax.vmap(loss, in_axes=(None, 0))(p, mbatch)

    def along(u):  # one eigenvector u (a params-shaped tangent) -> (losses [m], <grad, u> [m])
        return jax.jvp(per_example_losses, (params,), (u,))

    losses, tangents = jax.vmap(along, out_axes=(None, 0))(eigvecs)  # [m], [k, m]
    proj = tangents.T.astype(jnp.float32)
    nan = jnp.full(losses.shape, jnp.nan, jnp.float32)  # jvp never forms the gradient
    return ProjectionOutput(proj, losses.astype(jnp.float32), _finite_rows(losses, [proj]), nan, None), None
