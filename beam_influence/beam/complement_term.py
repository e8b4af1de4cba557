r"""Which complement term a job scores with, and the launcher-side pieces it needs.

:math:`H^{-1} \approx U\Lambda^{-1}U^\top + \rho^{-1}(I - UU^\top)` (``beam_influence.core.complement``):

* ``"exact"`` (fused job, and the query job's stage 2: ``beam_influence.beam.rerank``): the test gradients are
  projected beside U on the workers (k + Q directions, Q in blocks the memory plan sizes: ``pipelines._exact``),
  so :math:`\langle\nabla\ell(z), \nabla\ell(z_{test})\rangle` is exact;
* ``"sketch"`` (query job): the index's gradient sketch ``Sg`` gives :math:`\langle r, r'\rangle`,
  :math:`r = Sg - (SU)P` (``beam_influence.core.sketch``), an estimate: the exact rerank turns its candidates
  into exact lists;
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

MODES = ("auto", "exact", "sketch", "none")
STORAGE_KEYS = ("dtype", "scaling", "bytes_per_example")  # how an index stores its sketch, not which map it is


@dataclasses.dataclass(frozen=True)
class ComplementTerm:
    """How scores are completed: ``mode`` (``none`` | ``sketch`` | ``exact``) and ρ; ``basis_sketch`` is
    ``(SU)ᵀ [k, d]`` for ``sketch``; ``query_ids`` the column order of ``query_dots`` for ``exact``."""

    mode: str = "none"
    rho: float = 0.0
    basis_sketch: Any = None
    query_ids: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in ("none", "sketch", "exact"):
            raise ValueError(f"complement mode must be 'none', 'sketch' or 'exact', got {self.mode!r}")
        if self.mode != "none" and not (np.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"the complement needs a positive finite rho, got {self.rho}")

    @property
    def on(self) -> bool:
        return self.mode != "none"

    def describe(self) -> dict:
        out: dict[str, Any] = {"mode": self.mode}
        if self.on:
            out["rho"] = self.rho
        if self.mode == "sketch":
            out["sketch_dim"] = int(np.shape(self.basis_sketch)[1])
        return out


def check_mode(mode: str, normalization: str = "none") -> None:
    if mode not in MODES:
        raise ValueError(f"--complement must be one of {MODES}, got {mode!r}")
    if mode in ("exact", "sketch") and normalization != "none":
        raise ValueError(f"--complement {mode} scores H⁻¹ with the complement term and needs --normalization none "
                         f"(got {normalization!r}); use --complement none with a normalisation")


def index_sketch(manifest: Mapping[str, Any]) -> dict | None:
    """The sketch an index was built with (``{"dim", "seed", ...}``; ``dtype`` float32 when the manifest
    predates 16-bit storage), or None."""
    sk = (manifest.get("args") or {}).get("sketch")
    return {"dtype": "float32", **sk} if sk and sk.get("dim") else None


def for_index_queries(mode: str, normalization: str, manifest: Mapping[str, Any], ctx, rho: float | None) -> ComplementTerm:
    """The complement of a query against an index: ``sketch`` when the index has one (``auto``)."""
    check_mode(mode, normalization)
    if mode == "exact":
        raise ValueError("--complement exact needs the training gradients, which an index does not keep: use the "
                         "fused job (`pipelines.fused`) or --complement sketch")
    sk = index_sketch(manifest)
    if mode == "auto":
        mode = "sketch" if sk and normalization == "none" else "none"
    if mode == "none":
        return ComplementTerm()
    if not sk:
        raise ValueError("--complement sketch: this index has no gradient sketch (built with --sketch_dim 0 or by an "
                         "older version); rebuild it with --sketch_dim > 0, or query with --complement none")
    if ctx.sketch is None or any(ctx.sketch.describe().get(key) != value for key, value in sk.items()
                                 if key not in STORAGE_KEYS):
        raise ValueError(f"the query's gradient sketch ({ctx.sketch!r}) is not the index's ({sk}); "
                         "load the model with the index's sketch_dim/sketch_seed")
    return ComplementTerm("sketch", resolve_rho(ctx.eigvals, rho), ctx.basis_sketch)


def for_self_influence(mode: str, manifest_or_columns, ctx, rho: float | None) -> ComplementTerm:
    """Self-influence with the exact complement when the index stores ``grad_sq_norm`` (``auto``)."""
    check_mode(mode)
    cols = manifest_or_columns
    has = bool((cols.get("args") or {}).get("grad_sq_norm")) if isinstance(cols, Mapping) else "grad_sq_norm" in cols
    if mode == "auto":
        mode = "exact" if has else "none"
    if mode == "none":
        return ComplementTerm()
    if not has:
        raise ValueError("this index has no grad_sq_norm column (built by an older version): rebuild it, or use "
                         "--complement none")
    return ComplementTerm("exact", resolve_rho(ctx.eigvals, rho))


# ---- the fused job's test gradients ------------------------------------------------------------
def write_query_gradients(path: str, spec, params, queries) -> list[str]:
    """Per-example gradients of the test queries, ``[Q, p]`` float32 (``ravel_pytree`` order), with their
    ids, to ``path`` (``.npz``, no pickle); ``queries``: ``data.LoadedData`` of the test data. Rows with a non-finite loss or gradient are left out (the
    pipeline dead-letters them too). Returns the ids written (Q of them)."""
    from beam_influence.evaluation.gradients import flat_grads

    import io

    from beam_influence.core.files import write_bytes

    data = queries
    grads = flat_grads(spec.loss, params, data.batch)
    ok = np.all(np.isfinite(grads), axis=1)
    buf = io.BytesIO()
    np.savez(buf, ids=np.asarray(data.ids, dtype=str)[ok], gradients=grads[ok].astype(np.float32))
    write_bytes(path, buf.getvalue())
    return [str(i) for i in np.asarray(data.ids, dtype=str)[ok]]
