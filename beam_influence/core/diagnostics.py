r"""How good is an eigensystem? Checks on its Ritz pairs, and the mass its subspace captures.

Warnings (``Diagnostics.warnings``), each naming what to do:

* **residuals comparable to eigenvalues**: a kept pair with :math:`\lVert Hu - \lambda u\rVert \ge`
  ``RESIDUAL_WARN``·|λ| is not an eigenpair of the operator (Arnoldi has not converged on it, or the
  operator changed between products: fresh batches);
* **negative Ritz values where none can be**: the GGN is positive semi-definite (every eigenvalue
  ≥ l2) and so is the Hessian of a convex loss (``convex=True``); a Ritz value below
  ``-NEGATIVE_TOL``·max|λ| means an inconsistent operator (fresh batches), not curvature;
* **negative values scored as |λ|** (``negative="abs"``): how many kept pairs were treated, and how
  many unresolved ones (|λ| within the residual, i.e. noise) were dropped instead;
* **fresh batches**: the operator is not one symmetric matrix (see ``beam_influence.core.estimate``).

Captured mass (reported, not a warning):

* spectral: :math:`\sum_{i\le k}|\lambda_i| / \operatorname{tr}|H|`-like ratio against the Krylov
  spectrum (:math:`\sum|\theta_j|` over all n Ritz values; an upper bound on the true share) and, when
  the job estimated it (Hutchinson, ``trace_estimate``), against :math:`\operatorname{tr} H`;
* gradient: :math:`\sum_z\lVert U^\top\nabla\ell(z)\rVert^2 / \sum_z\lVert\nabla\ell(z)\rVert^2` on a
  sample (``captured_gradient_mass``): the share of the gradients the truncated index sees; the rest is
  what the complement term :math:`\rho^{-1}(I - UU^\top)` scores.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

RESIDUAL_WARN = 0.1  # warn when ‖Hu − λu‖ ≥ 0.1·|λ| for a kept pair
NEGATIVE_TOL = 1e-6  # a Ritz value < −NEGATIVE_TOL·max|λ| counts as negative where none can be


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """The checks of one eigensystem (see the module docstring). ``warnings`` is empty for a good one."""

    k: int
    operator: str
    sample_size: int | None
    sample_seed: int | None
    batch_size: int | None
    curvature: str
    rel_residual_median: float
    rel_residual_max: float
    residual_comparable: int  # kept pairs with ‖Hu − λu‖ ≥ RESIDUAL_WARN·|λ|
    krylov_negative: int  # Krylov Ritz values < −NEGATIVE_TOL·max|λ|
    negative_treated: int  # kept negative pairs scored as |λ|
    negative_unresolved_dropped: int
    krylov_mass: float  # Σ kept |λ| / Σ |θ| over the Krylov spectrum
    trace_mass: float | None  # Σ kept λ / Hutchinson estimate of tr H
    gradient_mass: float | None  # Σ‖Uᵀg‖² / Σ‖g‖² on a sample
    warnings: tuple[str, ...]

    def lines(self) -> list[str]:
        """Human-readable lines: the operator, the captured mass, then one ``warning:`` line each."""
        if self.operator == "fresh batches":
            op = f"fresh batches of {self.batch_size or '?'} examples per product"
            if self.sample_size is not None:
                op += f", drawn from a sample of {self.sample_size:,} (seed {self.sample_seed})"
        else:
            op = "one fixed sample" + (f" of {self.sample_size:,} examples (seed {self.sample_seed})"
                                       if self.sample_size is not None else "")
            if self.batch_size is not None and self.sample_size is not None and self.batch_size < self.sample_size:
                op += f", a fixed batch of {self.batch_size:,} of it"
        out = [f"  operator: {self.curvature} of {op}"]
        mass = [f"{100 * self.krylov_mass:.1f}% of the Krylov |λ| mass"]
        if self.trace_mass is not None:
            mass.append(f"{100 * self.trace_mass:.1f}% of tr H (Hutchinson estimate)")
        if self.gradient_mass is not None:
            mass.append(f"{100 * self.gradient_mass:.1f}% of the gradient mass Σ‖Uᵀg‖²/Σ‖g‖² on a sample "
                        "(the rest is the complement term's)")
        out.append("  captured: " + "; ".join(mass))
        if np.isfinite(self.rel_residual_max):
            out.append(f"  residuals ‖Hu − λu‖/|λ|: median {self.rel_residual_median:.3g}, "
                       f"max {self.rel_residual_max:.3g}")
        out += [f"  warning: {w}" for w in self.warnings]
        return out


def relative_residuals(ritz_values: Sequence[float], residuals: Sequence[float]) -> np.ndarray:
    """``[k]``: ‖Hu − λu‖ / |λ| per kept pair (NaN where residuals were not computed or λ = 0)."""
    lam = np.abs(np.asarray(ritz_values, np.float64))
    return np.asarray(residuals, np.float64) / np.where(lam > 0, lam, np.nan)


def diagnose(es, *, convex: bool = False, gradient_mass: float | None = None) -> Diagnostics:
    """The diagnostics of an ``Eigensystem`` ``es`` (its spectra and recorded ``args``).

    ``convex``: the loss is convex in θ (e.g. logistic regression), so the Hessian has no negative
    eigenvalue either. ``gradient_mass``: Σ‖Uᵀg‖²/Σ‖g‖² measured elsewhere (default: the one the
    eigensystem job recorded, if any).
    """
    args: Mapping[str, Any] = es.args
    ritz = np.asarray(es.ritz_values, np.float64)
    krylov = np.asarray(es.krylov_ritz_values, np.float64)
    rel = relative_residuals(ritz, es.residuals)
    finite = rel[np.isfinite(rel)]
    curvature = str(args.get("curvature", "hessian"))
    operator = str(args.get("operator") or ("fresh batches" if args.get("fresh_batches") else "fixed sample"))
    scale = float(np.abs(krylov).max()) if krylov.size else float(np.abs(ritz).max(initial=0.0))
    krylov_negative = int(np.sum(krylov < -NEGATIVE_TOL * scale))
    treated = int(args.get("negative_treated", np.sum(ritz < 0) if args.get("negative") == "abs" else 0))
    unresolved = int(args.get("negative_unresolved_dropped", 0))
    comparable = int(np.sum(finite >= RESIDUAL_WARN))
    total = float(np.abs(krylov).sum())
    krylov_mass = float(np.abs(ritz).sum() / total) if total > 0 else float("nan")
    trace = args.get("trace_estimate")
    trace_mass = float(ritz.sum() / trace) if trace else None
    if gradient_mass is None:
        gradient_mass = args.get("captured_gradient_mass")

    warnings: list[str] = []
    if comparable:
        warnings.append(
            f"{comparable} of {len(finite)} kept Ritz pairs have residuals ≥ {RESIDUAL_WARN:g}·|λ| (max "
            f"{finite.max():.3g}·|λ|): they are not eigenpairs of the operator"
            + (" — the fresh batch per product changes the operator between Arnoldi steps; use the default "
               "fixed sample (drop --fresh_batches)" if operator == "fresh batches"
               else "; raise --num_iters (n ≥ 3k) or lower --num_eigenpairs"))
    if krylov_negative and (curvature == "ggn" or convex):
        what = "the Gauss-Newton matrix is positive semi-definite" if curvature == "ggn" else \
            "the loss is convex, so its Hessian is positive semi-definite"
        warnings.append(
            f"{krylov_negative} negative Ritz values (most negative {krylov.min():.3g}) although {what}: "
            "the operator is inconsistent" + (" (fresh batches: use the default fixed sample)"
                                             if operator == "fresh batches" else " (numerical noise or a bug)"))
    if treated:
        warnings.append(
            f"{treated} kept Ritz pairs have λ < 0 and are scored with |λ| (--negative {args.get('negative')}); "
            f"{unresolved} more with |λ| within their residual were dropped as noise. Use --negative drop to "
            "keep positive curvature only, or --curvature ggn")
    elif unresolved:
        warnings.append(f"{unresolved} negative Ritz pairs with |λ| within their residual were dropped as noise")
    if operator == "fresh batches" and not comparable:
        warnings.append("fresh batches per product: Arnoldi saw a different operator at every step, so Ritz "
                        "values and residuals are only estimates (the default fixed sample avoids this)")
    return Diagnostics(k=int(len(ritz)), operator=operator, sample_size=_int_or_none(args.get("sample_size_used")),
                       sample_seed=_int_or_none(args.get("sample_seed")),
                       batch_size=_int_or_none(args.get("batch_size_used")), curvature=curvature,
                       rel_residual_median=float(np.median(finite)) if finite.size else float("nan"),
                       rel_residual_max=float(finite.max()) if finite.size else float("nan"),
                       residual_comparable=comparable, krylov_negative=krylov_negative, negative_treated=treated,
                       negative_unresolved_dropped=unresolved, krylov_mass=krylov_mass, trace_mass=trace_mass,
                       gradient_mass=None if gradient_mass is None else float(gradient_mass),
                       warnings=tuple(warnings))


def _int_or_none(x) -> int | None:
    return None if x is None else int(x)


def hutchinson_trace(matvec: Callable[[np.ndarray], np.ndarray], dim: int, *, probes: int = 8,
                     seed: int = 0) -> float:
    r"""Unbiased estimate of tr C from ``probes`` Rademacher vectors z: mean of :math:`z^\top C z`."""
    if probes < 1:
        raise ValueError(f"probes must be ≥ 1, got {probes}")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(probes):
        z = rng.choice(np.array([-1.0, 1.0]), size=dim)
        total += float(z @ np.asarray(matvec(z), np.float64))
    return total / probes


def gradient_mass(projections: np.ndarray, grad_sq_norms: np.ndarray) -> float:
    r""":math:`\sum_z\lVert P(z)\rVert^2 / \sum_z\lVert\nabla\ell(z)\rVert^2` from projections
    :math:`P(z) = U^\top\nabla\ell(z)` ``[B, k]`` (orthonormal U) and ``grad_sq_norms`` ``[B]``: in [0, 1],
    1 when the gradients lie in the subspace. Rows with a non-finite value are left out."""
    proj = np.asarray(projections, np.float64)
    sq = np.asarray(grad_sq_norms, np.float64)
    ok = np.isfinite(sq) & np.all(np.isfinite(proj), axis=1)
    denom = float(np.sum(sq[ok]))
    return float(np.sum(proj[ok] ** 2) / denom) if denom > 0 else float("nan")


__all__ = ["Diagnostics", "diagnose", "relative_residuals", "hutchinson_trace", "gradient_mass",
           "RESIDUAL_WARN", "NEGATIVE_TOL"]
