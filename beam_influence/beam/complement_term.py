r"""Which complement term a job scores with, and the launcher-side pieces it needs.

:math:`H^{-1} \approx U\Lambda^{-1}U^\top + \rho^{-1}(I - UU^\top)` (``beam_influence.core.complement``):

* ``"exact"`` (fused job, and the query job's stage 2: ``beam_influence.beam.rerank``): the test gradients are
  projected beside U on the workers (k + Q directions, Q in blocks the memory plan sizes: ``pipelines._exact``),
  so :math:`\langle\nabla\ell(z), \nabla\ell(z_{test})\rangle` is exact;
* ``"sketch"`` (query job): the index's gradient sketch ``Sg`` gives :math:`\langle r, r'\rangle`,
  :math:`r = Sg - (SU)P` (``beam_influence.core.sketch``), an estimate: the exact rerank turns its candidates
  into exact lists; a K-FAC index (``sketch.space == "kfac"``) stores the sketch of each row's whitened residual
  v̄ instead (``core.kfac.Complement.whitened``) and its ``sketch`` term has ρ = 1, nothing to subtract and
  ``kfac`` set (``kfac_sketch``);
* ``"kfac"`` (fused job, and stage 2 of a query against a K-FAC index): the K-FAC complement vectors
  :math:`w_q = Mg_q` projected beside U, so the dot is the complement term;
* ``"none"``: the truncated score :math:`\sum_i P_iP'_i/\lambda_i` only (older indexes without a sketch,
  or a normalisation other than ``none``).

Self-influence uses the exact :math:`\lVert\nabla\ell(z)\rVert^2` stored in the index (``grad_sq_norm``)
whenever the mode is not ``none``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from beam_influence.core.complement import resolve_rho

MODES = ("auto", "exact", "sketch", "kfac", "none")
STORAGE_KEYS = ("dtype", "scaling", "bytes_per_example")  # how an index stores its sketch, not which map it is


@dataclasses.dataclass(frozen=True)
class ComplementTerm:
    """How scores are completed: ``mode`` (``none`` | ``sketch`` | ``exact`` | ``kfac``) and ρ; ``basis_sketch`` is
    ``(SU)ᵀ [k, d]`` for ``sketch``; ``query_ids`` the column order of ``query_dots`` for ``exact`` and ``kfac``
    (for ``kfac`` the query directions are the K-FAC complement vectors w_q, so ``query_dots`` *is* the complement
    term: ``core.kfac.Complement.vectors``); ``kfac`` describes that fit."""

    mode: str = "none"
    rho: float = 0.0
    basis_sketch: Any = None
    query_ids: tuple[str, ...] = ()
    kfac: tuple = ()  # (("damping", δ), ("kind", ...), ("compose", ...)) of a kfac term

    def __post_init__(self):
        if self.mode not in ("none", "sketch", "exact", "kfac"):
            raise ValueError(f"complement mode must be 'none', 'sketch', 'exact' or 'kfac', got {self.mode!r}")
        if self.mode in ("sketch", "exact") and not (np.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"the complement needs a positive finite rho, got {self.rho}")

    @property
    def on(self) -> bool:
        return self.mode != "none"

    @property
    def kfac_sketch(self) -> bool:
        """A sketch of the K-FAC complement's whitened residual (ρ = 1, margins from ``kfac_self``)."""
        return self.mode == "sketch" and bool(self.kfac)

    @property
    def residual_column(self) -> str:
        """The index column the residual's squared norm comes from: ``kfac_self`` (‖v̄‖², a K-FAC sketch) or
        ``grad_sq_norm`` (‖r‖² = ‖∇ℓ‖² − ‖P‖²)."""
        return "kfac_self" if self.kfac_sketch else "grad_sq_norm"

    def describe(self) -> dict:
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode in ("sketch", "exact") and not self.kfac_sketch:
            out["rho"] = self.rho
        if self.kfac:
            out.update(dict(self.kfac), curvature="kfac")
        if self.mode == "sketch":
            out["sketch_dim"] = int(np.shape(self.basis_sketch)[1])
        return out


def check_mode(mode: str, normalization: str = "none") -> None:
    if mode not in MODES:
        raise ValueError(f"--complement must be one of {MODES}, got {mode!r}")
    if mode in ("exact", "sketch", "kfac") and normalization != "none":
        raise ValueError(f"--complement {mode} scores H⁻¹ with the complement term and needs --normalization none "
                         f"(got {normalization!r}); use --complement none with a normalisation")


def index_sketch(manifest: Mapping[str, Any]) -> dict | None:
    """The sketch an index was built with (``{"dim", "seed", ...}``; ``dtype`` float32 when the manifest
    predates 16-bit storage), or None."""
    sk = (manifest.get("args") or {}).get("sketch")
    return {"dtype": "float32", **sk} if sk and sk.get("dim") else None


def for_index_queries(mode: str, normalization: str, manifest: Mapping[str, Any], ctx, rho: float | None) -> ComplementTerm:
    """The complement of a query against an index (``auto``: the one its sketch is of). A gradient sketch gives
    the scalar complement (``sketch``: ρ, ``(SU)ᵀ``); a K-FAC sketch (``"space": "kfac"``, the whitened residual
    v̄ of ``core.kfac.Complement.whitened``) the K-FAC one, as a ``sketch`` term with ρ = 1 and nothing to
    subtract (v̄ ⟂ U already) and ``kfac`` describing the fit."""
    check_mode(mode, normalization)
    if mode == "exact":
        raise ValueError("--complement exact needs the training gradients, which an index does not keep: use the "
                         "fused job (`pipelines.fused`), or --complement sketch (exact lists with --train_data)")
    sk = index_sketch(manifest)
    space = (sk or {}).get("space", "gradient")
    if mode == "auto":
        mode = ("none" if not sk or normalization != "none" else "kfac" if space == "kfac" else "sketch")
    if mode == "none":
        return ComplementTerm()
    if mode == "kfac" and space != "kfac":
        raise ValueError("--complement kfac against an index needs one that sketches the K-FAC complement: compute "
                         "the eigensystem with `beam-influence eigensystem --kfac` and index with --sketch_space kfac "
                         "(the default then); or use the fused job, or --complement sketch")
    if mode == "sketch" and space == "kfac":
        raise ValueError("this index sketches the K-FAC complement (--sketch_space kfac): query with --complement "
                         "kfac (or auto); for the scalar complement re-index with --sketch_space gradient")
    if not sk:
        raise ValueError("--complement sketch: this index has no gradient sketch (built with --sketch_dim 0 or by an "
                         "older version); rebuild it with --sketch_dim > 0, or query with --complement none")
    if ctx.sketch is None or any(ctx.sketch.describe().get(key) != value for key, value in sk.items()
                                 if key not in STORAGE_KEYS + ("space",)) \
            or ctx.ref.sketch_space != space:
        raise ValueError(f"the query's gradient sketch ({ctx.sketch!r}, {ctx.ref.sketch_space}) is not the index's "
                         f"({sk}); load the model with the index's sketch (resources.with_index_sketch)")
    if mode == "kfac":
        desc = (manifest.get("args") or {}).get("kfac_complement") or {}
        return ComplementTerm("sketch", 1.0, ctx.basis_sketch, kfac=tuple(sorted(desc.items())))
    return ComplementTerm("sketch", resolve_rho(ctx.eigvals, rho), ctx.basis_sketch)


def for_self_influence(mode: str, manifest_or_columns, ctx, rho: float | None) -> ComplementTerm:
    """Self-influence with the K-FAC complement when the index stores ``kfac_self`` (``auto``; indexed under an
    eigensystem carrying K-FAC factors), else the exact scalar complement when it stores ``grad_sq_norm``."""
    check_mode(mode)
    cols = manifest_or_columns
    args = (cols.get("args") or {}) if isinstance(cols, Mapping) else {}
    has = bool(args.get("grad_sq_norm")) if isinstance(cols, Mapping) else "grad_sq_norm" in cols
    has_kfac = bool(args.get("kfac_self")) if isinstance(cols, Mapping) else "kfac_self" in cols
    if mode == "auto":
        mode = "kfac" if has_kfac else "exact" if has else "none"
    if mode == "none":
        return ComplementTerm()
    if mode == "kfac":
        if not has_kfac:
            raise ValueError("--complement kfac: this index has no kfac_self column (its eigensystem carried no K-FAC "
                             "factors when it was built): compute the eigensystem with --kfac and re-index, or use "
                             "--complement exact")
        return ComplementTerm("kfac", kfac=tuple(sorted((args.get("kfac_complement") or {}).items())))
    if mode == "sketch":
        mode = "exact"  # ‖∇ℓ‖² is exact in an index
    if not has:
        raise ValueError("this index has no grad_sq_norm column (built by an older version): rebuild it, or use "
                         "--complement none")
    return ComplementTerm("exact", resolve_rho(ctx.eigvals, rho))


def kfac_complement(ctx):
    """The ``core.kfac.Complement`` of ``ctx``'s eigensystem from the K-FAC factors saved with it (``beam-influence
    eigensystem --kfac``; the library's ``KFACOptions`` defaults, as ``beam_influence.pairwise_scores``): no refit.
    Holds U once as stored (float32, k·p·4 bytes) and, once it forms self-terms or sketches, U and
    W = D^{-1/2}QᵀU as float32 device arrays (2·k·p·4); C_μ⁻¹U (k·p·8) only where ``vectors`` runs (launcher)."""
    from beam_influence.api import KFACOptions, fit_complement, saved_curvature

    opts = KFACOptions()
    curvature = saved_curvature(ctx.spec, ctx.params, ctx.eigensystem, opts) if getattr(ctx.eigensystem, "kfac", None) \
        else None
    if curvature is None:
        raise ValueError("--complement kfac needs K-FAC factors saved with the eigensystem (the library defaults): "
                         "compute it with `beam-influence eigensystem --kfac`, or use --complement exact")
    return fit_complement(ctx.spec, ctx.params, None, ctx.eigensystem, options=opts, curvature=curvature)


def kfac_description(comp) -> dict:
    return {"damping": float(comp.damping), "kind": comp.kind, "compose": comp.compose}


# ---- the fused job's test gradients ------------------------------------------------------------
def write_query_gradients(path: str, spec, params, queries, transform=None) -> list[str]:
    """Per-example gradients of the test queries, ``[Q, p]`` float32 (``ravel_pytree`` order), with their
    ids, to ``path`` (``.npz``, no pickle); ``queries``: ``data.LoadedData`` of the test data. Rows with a
    non-finite loss or gradient are left out (the pipeline dead-letters them too). ``transform``: ``[Q, p] →
    [Q, p]`` applied before writing (the K-FAC complement vectors). Returns the ids written (Q of them)."""
    import io

    from beam_influence.core.files import write_bytes
    from beam_influence.evaluation.gradients import flat_grads

    grads = flat_grads(spec.loss, params, queries.batch)
    ok = np.all(np.isfinite(grads), axis=1)
    grads = grads[ok]
    if transform is not None:  # e.g. the K-FAC complement vectors w_q of the gradients
        grads = transform(grads)
    ids = np.asarray(queries.ids, dtype=str)[ok]
    buf = io.BytesIO()
    np.savez(buf, ids=ids, gradients=np.asarray(grads, np.float32))
    write_bytes(path, buf.getvalue())
    return [str(i) for i in ids]
