"""The eigensystem job: Arnoldi on the training-loss curvature → distill → Eigensystem.

Negative or tiny Ritz values (non-convex losses) are handled by ``negative``:
  * ``"abs"``  (default): score with |λ|;
  * ``"drop"``: keep only λ > 0 (top-k chosen among positive values);
  * ``"keep"``: use λ as is (signs flip the meaning of those directions; for experts);
and ``damping`` δ ≥ 0 is added to the (treated) λ: λ_used = treat(λ) + δ. Pairs with
|λ| ≤ ``min_rel_eigval``·max|λ| are dropped (they would blow up 1/λ); the summary reports all of it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Literal

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from beam_influence.core import arnoldi as _arnoldi
from beam_influence.core.curvature import BatchSource, make_matvec, num_params
from beam_influence.core.eigensystem import Eigensystem
from beam_influence.core.model_spec import ModelSpec, fingerprint
from beam_influence.core.types import Example, Params


@dataclasses.dataclass(frozen=True)
class EigensystemArgs:
    """Arguments of the eigensystem job (saved inside the eigensystem file)."""

    num_iters: int = 100  # n: Arnoldi steps (curvature products)
    top_k: int = 20  # k: Ritz pairs kept
    batch_size: int = 512  # examples per curvature product
    fresh_batches: bool = True  # a fresh batch per product (reference) or one fixed batch
    curvature: Literal["hessian", "ggn"] = "hessian"
    negative: Literal["abs", "drop", "keep"] = "abs"
    damping: float = 0.0
    min_rel_eigval: float = 1e-6
    residuals: bool = True  # one more product per pair to report ‖Hu − λu‖
    seed: int = 0
    basis_dtype: Literal["float32", "float64"] = "float32"

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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def compute_eigensystem(
    spec: ModelSpec,
    params: Params,
    data: Example,
    args: EigensystemArgs = EigensystemArgs(),
    *,
    progress: bool = False,
) -> Eigensystem:
    """Top-k eigenpairs of the curvature of L(θ) = mean ℓ + l2/2‖θ‖² at ``params``.

    ``data``: decoded training examples (leading axis N) from which curvature batches are drawn.
    """
    p = num_params(params)
    batches = BatchSource(data, batch_size=args.batch_size, fresh=args.fresh_batches, seed=args.seed)
    matvec = make_matvec(spec, params, batches, curvature=args.curvature)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=min(args.num_iters, p), desc=f"Arnoldi ({args.curvature}, p={p:,})", unit="hvp")
    try:
        res = _arnoldi.arnoldi(
            matvec, num_iters=args.num_iters, dim=p, seed=args.seed,
            basis_dtype=np.dtype(args.basis_dtype).type,
            callback=(lambda j, beta: bar.update(1)) if bar else None,
        )
    finally:
        if bar:
            bar.close()
    order = "positive" if args.negative == "drop" else "magnitude"
    ritz, u = _arnoldi.distill(res, top_k=res.num_steps, order=order)
    keep = np.abs(ritz) > args.min_rel_eigval * np.abs(ritz).max()
    ritz, u = ritz[keep][: args.top_k], u[keep][: args.top_k]
    used = {"abs": np.abs(ritz), "drop": ritz, "keep": ritz}[args.negative] + args.damping
    if args.residuals:
        fixed = BatchSource(data, batch_size=args.batch_size, fresh=False, seed=args.seed)
        res_mv = make_matvec(spec, params, fixed, curvature=args.curvature) if args.fresh_batches else matvec
        resid = _arnoldi.residuals(res_mv, ritz, u)
    else:
        resid = np.full(len(ritz), np.nan)
    _, unravel = ravel_pytree(params)
    u_tree = jax.vmap(unravel)(np.asarray(u, np.float32))
    eigvecs = {jax.tree_util.keystr(kp): np.asarray(leaf, np.float32)
               for kp, leaf in jax.tree_util.tree_leaves_with_path(u_tree)}
    meta = dict(dataclasses.asdict(args), num_params=p, steps_done=res.num_steps, breakdown=res.breakdown)
    return Eigensystem(
        eigvals=np.asarray(used, np.float64), ritz_values=np.asarray(ritz, np.float64),
        residuals=np.asarray(resid, np.float64), eigvecs=eigvecs,
        krylov_ritz_values=_arnoldi.ritz_values(res), fingerprint=fingerprint(spec, params),
        spec_name=spec.name, args=meta,
    )
