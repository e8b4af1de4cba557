"""The eigensystem job: Arnoldi on the training-loss curvature → distill → Eigensystem.

Negative or tiny Ritz values (non-convex losses) are handled by ``negative``:
  * ``"abs"``  (default): score with |λ|;
  * ``"drop"``: keep only λ > 0 (top-k chosen among positive values);
  * ``"keep"``: use λ as is (signs flip the meaning of those directions; for experts);
and ``damping`` δ ≥ 0 is added to the (treated) λ: λ_used = treat(λ) + δ. Pairs with
|λ| ≤ ``min_rel_eigval``·max|λ| are dropped (they would blow up 1/λ), and so, with
``drop_unresolved_negative`` (default), are negative pairs whose |λ| is within their residual
‖Hu − λu‖ (the sign is noise: ``abs`` would score noise as a direction). The counts are recorded in
``args`` (``negative_treated``, ``negative_unresolved_dropped``, ``tiny_dropped``) and the summary
(``beam_influence.core.diagnostics``) reports them.

The operator. By default every product is the curvature of one fixed, seeded sample of
``sample_size`` training examples (C = mean over the sample + l2 I), accumulated over micro-batches of
``micro_batch`` rows: Arnoldi sees one symmetric operator, so its Ritz pairs are those of that
sample's dense curvature (device memory is bounded by the micro-batch, time grows with the sample).
``fresh_batches=True`` draws a fresh batch of ``batch_size`` (default 512) per product, as the
reference code does: cheaper per product, but each Krylov step sees another operator (docs/quality.md
measured Ritz values off by a few %, spurious negative Ritz values on a convex loss and a lower LDS).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Literal, Mapping

import jax
import numpy as np

from beam_influence.core import arnoldi as _arnoldi
from beam_influence.core.diagnostics import gradient_mass, hutchinson_trace
from beam_influence.core.curvature import BatchSource, CurvatureOperator, make_matvec, num_params, resolve_devices
from beam_influence.core.eigensystem import Eigensystem
from beam_influence.core.memory import MemoryPlan, device_memory, host_free_bytes, plan_eigensystem
from beam_influence.core.model_spec import ModelSpec, fingerprint
from beam_influence.core.projection import unflatten_eigvecs
from beam_influence.core.types import Example, Params


FRESH_BATCH_SIZE = 512  # examples per product with fresh_batches=True and batch_size=None


@dataclasses.dataclass(frozen=True)
class EigensystemArgs:
    """Arguments of the eigensystem job (saved inside the eigensystem file)."""

    num_iters: int = 150  # n: Arnoldi steps (curvature products); docs/quality.md measured n = 3k
    top_k: int = 50  # k: Ritz pairs kept (floats per example in the index)
    batch_size: int | None = None  # examples per product: None = the whole fixed sample (fresh: 512)
    fresh_batches: bool = False  # True: a fresh batch per product (the reference code; inconsistent operator)
    micro_batch: int = 256  # examples per compiled step; a product accumulates ⌈batch/micro⌉ steps
    sample_size: int = 8192  # the fixed, seeded sample whose curvature is taken (streamed; see docs/quality.md)
    curvature: Literal["hessian", "ggn"] = "hessian"
    negative: Literal["abs", "drop", "keep"] = "abs"
    damping: float = 0.0
    min_rel_eigval: float = 1e-6
    residuals: bool = True  # one more product per pair to report ‖Hu − λu‖
    drop_unresolved_negative: bool = True  # drop λ < 0 with |λ| ≤ residual (noise, not a direction)
    mass_sample: int = 256  # examples whose gradient mass Σ‖Uᵀg‖²/Σ‖g‖² is recorded (0: skip)
    trace_probes: int = 0  # Hutchinson probes for tr C (Σλ_kept / tr C in the summary; one product each)
    seed: int = 0
    basis_dtype: Literal["float32", "float64"] = "float32"
    basis: Literal["auto", "device", "host", "mmap"] = "auto"  # where the Krylov basis lives (core.arnoldi)
    basis_path: str = ""  # the .npy file of basis="mmap" (and of "auto" when the basis does not fit the device)
    devices: int = 0  # local devices of the data-parallel curvature product (0: all)

    def __post_init__(self):
        if self.num_iters < 1 or self.top_k < 1:
            raise ValueError(f"num_iters ({self.num_iters}) and top_k ({self.top_k}) must be ≥ 1")
        if self.top_k > self.num_iters:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_iters ({self.num_iters})")
        if self.curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature must be 'hessian' or 'ggn', got {self.curvature!r}")
        if self.negative not in ("abs", "drop", "keep"):
            raise ValueError(f"negative must be 'abs', 'drop' or 'keep', got {self.negative!r}")
        if self.damping < 0:
            raise ValueError(f"damping must be ≥ 0, got {self.damping}")
        for name in ("batch_size", "micro_batch", "sample_size"):
            value = getattr(self, name)
            if name == "batch_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")

        for name in ("mass_sample", "trace_probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be an integer ≥ 0, got {value!r}")
        if self.basis not in _arnoldi.BASES or (self.basis == "mmap" and not self.basis_path):
            raise ValueError(f"basis must be one of {_arnoldi.BASES} (mmap with basis_path), got {self.basis!r}")
        if isinstance(self.devices, bool) or not isinstance(self.devices, (int, np.integer)) or self.devices < 0:
            raise ValueError(f"devices must be an integer ≥ 0 (0: all local devices), got {self.devices!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def treat_eigenvalues(ritz: np.ndarray, *, negative: str = "abs", damping: float = 0.0) -> np.ndarray:
    """The λ used in 1/λ from raw eigenvalues: ``abs`` → |λ| + δ; ``drop`` and ``keep`` → λ + δ
    (``drop`` has already chosen λ > 0 only). The one place that treats eigenvalues."""
    if negative not in ("abs", "drop", "keep"):
        raise ValueError(f"negative must be 'abs', 'drop' or 'keep', got {negative!r}")
    ritz = np.asarray(ritz)
    return (np.abs(ritz) if negative == "abs" else ritz) + damping


def compute_eigensystem(
    spec: ModelSpec,
    params: Params,
    data: Example,
    args: EigensystemArgs = EigensystemArgs(),
    *,
    progress: bool = False,
    sample_info: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> Eigensystem:
    """Top-k eigenpairs of the curvature of L(θ) = mean ℓ + l2/2‖θ‖² at ``params``.

    ``data``: the decoded host (numpy) sample of training examples (leading axis m) from which
    curvature batches are drawn, e.g. ``beam_influence.data.sample_examples(..., size=args.sample_size)``.
    With more than ``args.sample_size`` rows a seeded uniform subsample of that size is taken first.
    Every product is accumulated over micro-batches of ``args.micro_batch`` rows (one compiled step).
    ``sample_info``: facts about how ``data`` was sampled (seed, records read, …) recorded in
    ``args`` of the result; ``sample_size_used`` (rows actually used) and ``sample_seed`` (default
    ``args.seed``) are always recorded.

    Before any product, the memory plan (``core.memory.plan_eigensystem``: basis, θ, the operator's vectors,
    the sample, the runtime against the free host / device memory) picks the basis placement for
    ``basis="auto"`` or raises ``MemoryPlanError`` with the fix; ``log`` (default: print when ``progress``)
    gets its one line, then, after the second product, the measured time per product and the estimated
    total (n Arnoldi products + k residual products). Both are recorded in the result's args
    (``memory_plan``, ``first_product_s``, ``product_s``, ``estimated_total_s``).
    """
    p = num_params(params)
    data = {k: np.asarray(v) for k, v in data.items()}
    n = len(next(iter(data.values())))
    if n > args.sample_size:
        idx = np.sort(np.random.default_rng(args.seed).choice(n, args.sample_size, replace=False))
        data = {k: v[idx] for k, v in data.items()}
        n = args.sample_size
    batch_size = args.batch_size if args.batch_size is not None else (
        FRESH_BATCH_SIZE if args.fresh_batches else n)
    batches = BatchSource(data, batch_size=batch_size, fresh=args.fresh_batches, seed=args.seed)
    devices = resolve_devices(args.devices or None)
    if log is None and progress:
        log = print
    plan = _plan(args, p=p, params=params, data=data, devices=devices)
    if log:
        log(plan.line())
    op = CurvatureOperator(spec, params, curvature=args.curvature, devices=devices,
                           micro_batch=min(args.micro_batch, -(-batches.batch_size // len(devices))))
    n_steps = min(args.num_iters, p)
    timer = _ProductTimer(make_matvec(spec, params, batches, operator=op), n_steps=n_steps,
                          residual_products=min(args.top_k, n_steps) if args.residuals else 0, log=log)
    matvec = timer
    bar = None
    if progress:
        from tqdm import tqdm

        # one bar for every product: the first includes XLA's compilation, then the Arnoldi steps and the
        # residual products (its ETA is the estimate)
        bar = tqdm(total=timer.total, desc=f"eigensystem ({args.curvature}, p={p:,}; the first product compiles)",
                   unit="product")
        timer.bar = bar
        if log is print:
            timer.log = bar.write  # the line above the bar, not through it
    try:
        res = _arnoldi.arnoldi(
            matvec, num_iters=args.num_iters, dim=p, seed=args.seed,
            basis_dtype=np.dtype(args.basis_dtype).type, basis=plan.choices["basis"],
            basis_path=args.basis_path or None,
        )
    except BaseException:
        if bar:
            bar.close()
        raise
    order = "positive" if args.negative == "drop" else "magnitude"
    # only the top_k Ritz vectors are formed (n of them would be n·p floats on the host: 176 GB at p = 110M,
    # n = 200). The pairs are ordered by |λ| (or λ > 0, descending), so the first is the largest in magnitude
    # and the tiny ones (|λ| ≤ min_rel_eigval·max|λ|) are a suffix: dropping them from the first top_k is
    # what dropping them from all n and then taking top_k gives.
    # formed in place in the basis rows (host / mmap basis): no [k, p] float64 copy beside the basis
    ritz, u = _arnoldi.distill(res, top_k=min(args.top_k, res.num_steps), order=order, overwrite_basis=True)
    keep = np.abs(ritz) > args.min_rel_eigval * (np.abs(ritz).max() if len(ritz) else 0.0)
    tiny_dropped = int(np.sum(~keep))
    kept = int(keep.sum())
    assert keep[:kept].all(), "tiny Ritz values are a suffix of the |λ| order"
    ritz = ritz[:kept]
    basis, res = res.basis, res._replace(basis=None)
    if res.basis_kind == "device":  # distill formed them apart from the (device) basis
        del basis
        u = np.asarray(u[:kept], np.float32)
    else:  # they are the basis' first rows: it shrinks to them in place (or they are copied out)
        del u
        u = _ritz_rows(basis, kept, p)
        del basis
    # residuals (and the trace) against the operator the eigensystem stands for: the fixed batch, or
    # (fresh batches) the whole sample, whose mean curvature the fresh batches estimate
    if args.fresh_batches:
        res_mv = make_matvec(spec, params, BatchSource(data, batch_size=n, fresh=False, seed=args.seed),
                             operator=op)  # same compiled step
    else:
        res_mv = matvec
    try:
        if args.residuals:
            resid = _arnoldi.residuals(timer.wrap(res_mv) if res_mv is not matvec else timer, ritz, u)
        else:
            resid = np.full(len(ritz), np.nan)
    finally:
        if bar:
            bar.close()
    unresolved = (ritz < 0) & (np.abs(ritz) <= resid)  # False where residuals are NaN
    dropped_unresolved = int(unresolved.sum()) if args.drop_unresolved_negative and args.negative != "drop" else 0
    if dropped_unresolved:
        ritz, u, resid = ritz[~unresolved], u[~unresolved], resid[~unresolved]
    used = treat_eigenvalues(ritz, negative=args.negative, damping=args.damping)
    # one C-contiguous block per parameter leaf (the file's layout: saving copies nothing more), then the
    # [k, p] rows are freed: U is held once more only while the blocks are made, after the basis shrank to U
    tree = jax.tree.map(np.ascontiguousarray, unflatten_eigvecs(np.asarray(u, np.float32), params))
    del u
    eigvecs = Eigensystem.eigvecs_by_path(tree)
    extra: dict[str, Any] = {}
    if args.mass_sample and len(ritz):
        extra["captured_gradient_mass"] = _gradient_mass(spec, params, data, tree, args.mass_sample, args.seed)
        extra["mass_sample_used"] = int(min(args.mass_sample, n))
    if args.trace_probes:
        extra["trace_estimate"] = hutchinson_trace(res_mv, p, probes=args.trace_probes, seed=args.seed)
    meta = dict(dataclasses.asdict(args), num_params=p, steps_done=res.num_steps, breakdown=res.breakdown,
                sample_size_used=int(n), sample_seed=args.seed,
                micro_batch_used=op.micro_batch, batch_size_used=batches.batch_size,
                operator=("fresh batches" if args.fresh_batches and batches.batch_size < n else "fixed sample"),
                negative_treated=int(np.sum(ritz < 0)) if args.negative != "keep" else 0,
                negative_kept=int(np.sum(ritz < 0)), negative_unresolved_dropped=dropped_unresolved,
                tiny_dropped=tiny_dropped, **extra)
    meta.update(basis_used=res.basis_kind, devices_used=op.num_devices, memory_plan=plan.as_dict(),
                first_product_s=timer.first_s, product_s=timer.product_s, estimated_total_s=timer.estimate_s,
                products=timer.count)
    meta.update(dict(sample_info or {}))
    return Eigensystem(
        eigvals=np.asarray(used, np.float64), ritz_values=np.asarray(ritz, np.float64),
        residuals=np.asarray(resid, np.float64), eigvecs=eigvecs,
        krylov_ritz_values=_arnoldi.ritz_values(res), fingerprint=fingerprint(spec, params),
        spec_name=spec.name, args=meta,
    )


def _gradient_mass(spec: ModelSpec, params: Params, data: Example, eigvecs: Params, size: int, seed: int) -> float:
    """Σ‖Uᵀ∇ℓ(z)‖² / Σ‖∇ℓ(z)‖² over a seeded subsample of ``size`` rows of ``data`` (leafwise projector)."""
    import jax.numpy as jnp

    from beam_influence.core.projection import make_projector

    n = len(next(iter(data.values())))
    idx = np.sort(np.random.default_rng(seed + 1).permutation(n)[: min(size, n)])
    proj = make_projector(spec.loss, eigvecs, micro_batch=min(64, len(idx)))
    out = proj(params, {k: jnp.asarray(v[idx]) for k, v in data.items()})
    return gradient_mass(np.asarray(out.projections), np.asarray(out.grad_sq_norms))


def _ritz_rows(basis, k: int, p: int) -> np.ndarray:
    """The first k rows of the basis (the Ritz vectors ``distill(overwrite_basis=True)`` wrote there) as a
    [k, p] float32 array that does not keep the rest alive: a host basis that owns its memory is shrunk in
    place (``ndarray.resize``: realloc returns the tail to the system, no copy); a memory-mapped or device
    basis has its rows copied out."""
    if isinstance(basis, np.ndarray) and not isinstance(basis, np.memmap) and basis.flags.owndata:
        try:
            basis.resize((k, p), refcheck=True)
            return basis
        except ValueError:  # another reference to it: copy the rows instead
            pass
    return np.array(np.asarray(basis[:k]), np.float32)


def _plan(args: EigensystemArgs, *, p: int, params: Params, data: Example, devices: list) -> MemoryPlan:
    """The eigensystem's memory plan on these devices (``core.memory.plan_eigensystem``)."""
    import jax

    platform = str(devices[0].platform)
    mem = device_memory(devices[0])
    itemsize = max((np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)), default=4)
    return plan_eigensystem(p=p, num_iters=min(args.num_iters, p), top_k=args.top_k, basis=args.basis,
                            basis_path=args.basis_path or None,
                            basis_itemsize=np.dtype(args.basis_dtype).itemsize, param_itemsize=itemsize,
                            sample_bytes=int(sum(np.asarray(v).nbytes for v in data.values())),
                            platform=platform, host_free=host_free_bytes(),
                            device_free=None if mem is None else mem["free"], devices=len(devices))


class _ProductTimer:
    """A matvec that times its products: the first includes compilation; after the second, one line with
    the time per product and the estimated total for the products still to come (Arnoldi + residuals)."""

    def __init__(self, matvec, *, n_steps: int, residual_products: int, log=None):
        self.matvec, self.log, self.bar = matvec, log, None
        self.total = int(n_steps) + int(residual_products)
        self.count = 0
        self.first_s = self.product_s = self.estimate_s = None
        on_device = getattr(matvec, "on_device", None)  # arnoldi(basis="device") calls this one
        if on_device is not None:
            self.on_device = lambda v: self._timed(on_device, v)

    def wrap(self, other):
        def mv(v):
            return self._timed(other, v)
        return mv

    def __call__(self, v):
        return self._timed(self.matvec, v)

    def _timed(self, fn, v):
        t = time.perf_counter()
        out = fn(v)
        if self.count < 2 and hasattr(out, "block_until_ready"):  # device products are asynchronous
            out.block_until_ready()
        dt = time.perf_counter() - t
        self.count += 1
        if self.count == 1:
            self.first_s = dt
        elif self.count == 2:
            self.product_s = dt
            self.estimate_s = self.first_s + dt * (self.total - 1)
            if self.log:
                left = dt * (self.total - 2)
                self.log(f"eigensystem: the first product took {self.first_s:.1f}s (with compilation), then "
                         f"{dt:.2f}s each; {self.total} products in all (Arnoldi + residuals): about "
                         f"{_duration(left)} more")
        if self.bar is not None:
            self.bar.update(1)
        return out


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
