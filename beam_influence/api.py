r"""The in-memory API: influence scores of a trained model on arrays, with the library's defaults.

.. code-block:: python

    import beam_influence as bi

    scores = bi.pairwise_scores(spec, params, train, test)   # [N_train, N_test]
    si = bi.self_influence_scores(spec, params, train)       # [N_train]

``train`` / ``test`` are decoded batches (``{feature: [N, ...]}``, e.g. ``spec.stack([spec.decode(r) ...])``).
Without an ``eigensystem`` one is computed with ``compute_eigensystem``'s defaults (``EigensystemArgs()``: the
top k = 50 eigenpairs of the Hessian of the fixed, seeded sample of up to 8 192 training examples).
Sign convention as everywhere: larger = more helpful (upweighting the training example lowers the test loss).

The score is the top-k term plus a complement term for the directions outside U (``complement``):

``"kfac"``   (default) a Kronecker-factored curvature on the complement (``beam_influence.core.kfac``): EK-FAC
             factors of the Gauss-Newton matrix (``fisher="ggn"``; the empirical Fisher where the spec has no
             ``apply``/``output_loss``) fitted on the eigensystem's own sample, damped by ``damping`` × the
             smallest kept eigenvalue, composed with U as the exact inverse of the curvature compressed to the
             complement of U (``compose="schur"``; docs/complement.md has the math and the measurements).
``"scalar"`` :math:`\rho^{-1}(I - UU^\top)` with ρ the smallest kept |λ| (``beam_influence.core.complement``).
``"none"``   the truncated top-k term alone (Schioppa et al.).

``eigensystem=False`` drops the top-k term (k = 0): ``complement="kfac"`` is then plain EK-FAC / K-FAC.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from beam_influence.core.types import Example, Params

COMPLEMENTS = ("kfac", "scalar", "none")
DEFAULT_COMPLEMENT = "kfac"


@dataclasses.dataclass(frozen=True)
class KFACOptions:
    """How the Kronecker-factored complement is built (the defaults were chosen by LDS: docs/quality.md).

    Attributes:
      fisher: ``"ggn"`` (exact Gauss-Newton factors from the output Hessian), ``"empirical"`` (per-example
        loss gradients) or ``"auto"`` (``ggn`` when the spec has ``apply`` and ``output_loss`` and its output is
        small enough to factor per example, a classifier's logits; else ``empirical``: ``resolve_fisher``).
      kind: ``"ekfac"`` (eigenvalue-corrected) or ``"kfac"``.
      damping: δ added to the curvature's eigenvalues (with the objective's l2).
      relative_damping: when True (default) δ = ``damping`` × the smallest kept |λ| of the eigensystem (the
        scale the top-k space ends at), else δ = ``damping``; with k = 0, × the mean factored eigenvalue
        (kronfluence's heuristic).
      compose: ``"schur"``, ``"residual"`` or ``"additive"`` (``beam_influence.core.kfac.Complement``).
      micro_batch: examples per compiled step of the fit.
      max_factor_dim: a matrix side above this keeps a diagonal factor.
    """

    fisher: str = "auto"
    kind: str = "ekfac"
    damping: float = 0.1
    relative_damping: bool = True
    compose: str = "schur"
    micro_batch: int = 256
    max_factor_dim: int = 4096


def resolve_fisher(spec, fisher: str = "auto", params: Params | None = None) -> str:
    """``fisher`` itself, or for ``"auto"``: ``"ggn"`` when the spec has ``apply`` and ``output_loss`` and (with
    ``params`` given) its output has at most ``core.kfac.DEFAULT_MAX_OUTPUT_DIM`` entries (the GGN fit factors
    each example's output Hessian: a classifier's logits, not a language model's T × vocab), else
    ``"empirical"``."""
    if fisher != "auto":
        return fisher
    if getattr(spec, "apply", None) is None or getattr(spec, "output_loss", None) is None:
        return "empirical"
    if params is not None:
        from beam_influence.core.kfac import DEFAULT_MAX_OUTPUT_DIM, output_dim

        if output_dim(spec, params) > DEFAULT_MAX_OUTPUT_DIM:
            return "empirical"
    return "ggn"


def default_eigensystem(spec, params: Params, train: Example, args=None, *, progress: bool = False):
    """``compute_eigensystem(spec, params, train, args or EigensystemArgs())``."""
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem

    return compute_eigensystem(spec, params, train, args or EigensystemArgs(), progress=progress)


def fit_complement(spec, params: Params, train: Example, eigensystem=None, *, options: KFACOptions = KFACOptions(),
                   curvature=None, sample_size: int | None = None, seed: int | None = None):
    """The ``core.kfac.Complement`` of ``eigensystem`` (None/False: k = 0): the factored curvature fitted on the
    eigensystem's fixed sample of ``train`` (``sample_size``/``seed`` from its arguments), unless ``curvature``
    (a ``KroneckerCurvature``) is given or the eigensystem carries the fit ``options`` ask for
    (``saved_curvature``: ``beam-influence eigensystem --kfac``, the same sample), which is then used as saved."""
    from beam_influence.core import kfac
    from beam_influence.core.estimate import EigensystemArgs

    d = EigensystemArgs()
    es_args = eigensystem.args if eigensystem else {}
    if curvature is None and eigensystem and sample_size is None and seed is None:
        curvature = saved_curvature(spec, params, eigensystem, options)
    if curvature is None:
        m = sample_size or es_args.get("sample_size_used") or es_args.get("sample_size") or d.sample_size
        s = seed if seed is not None else es_args.get("sample_seed", es_args.get("seed", d.seed))
        sample = kfac.fixed_sample(train, int(m), int(s))
        curvature = kfac.fit(spec, params, sample, fisher=resolve_fisher(spec, options.fisher, params),
                             ekfac=options.kind == "ekfac", micro_batch=options.micro_batch,
                             max_factor_dim=options.max_factor_dim)
    if eigensystem:
        u = eigensystem.flat_eigvecs(params)  # as stored (float32): the Complement holds it once
        scale = float(np.min(np.abs(eigensystem.eigvals)))
    else:
        u = np.zeros((0, curvature.num_params))
        lams = curvature.eigenvalues(options.kind)
        scale = float(sum(np.sum(x) for x in lams) / sum(np.size(x) for x in lams))
    damping = options.damping * scale if options.relative_damping else options.damping
    return kfac.Complement(curvature, u, damping=damping, kind=options.kind, compose=options.compose)


def saved_curvature(spec, params: Params, eigensystem, options: KFACOptions = KFACOptions()):
    """The K-FAC curvature saved in ``eigensystem`` (``beam-influence eigensystem --kfac``) when it is the fit
    ``options`` ask for (same Fisher, factor layout and, for ``kind="ekfac"``, its eigenvalue correction), else
    None (the caller fits it anew on the eigensystem's sample)."""
    meta = (eigensystem.args.get("kfac") or {}) if eigensystem else {}
    if not getattr(eigensystem, "kfac", None) or not meta:
        return None
    if meta.get("fisher") != resolve_fisher(spec, options.fisher, params) \
            or meta.get("max_factor_dim") != options.max_factor_dim:
        return None
    if options.kind == "ekfac" and not meta.get("ekfac"):
        return None
    return eigensystem.kfac_curvature(params)


def fit_eigensystem_kfac(spec, params: Params, sample: Example, eigensystem, *,
                         options: KFACOptions = KFACOptions()):
    """``eigensystem`` carrying the K-FAC curvature (with its EK-FAC correction) fitted on ``sample``: pass the
    rows its operator used (``core.kfac.fixed_sample(train, args.sample_size, args.seed)``, what
    ``fit_complement`` takes); ``pairwise_scores`` / ``self_influence_scores`` then use it without refitting."""
    import time

    from beam_influence.core import kfac

    t0 = time.perf_counter()
    curv = kfac.fit(spec, params, sample, fisher=resolve_fisher(spec, options.fisher, params), ekfac=True,
                    micro_batch=options.micro_batch, max_factor_dim=options.max_factor_dim)
    return eigensystem.with_kfac(curv, params, fit_seconds=time.perf_counter() - t0)


def _options(options: KFACOptions | None, kw: dict) -> KFACOptions:
    options = options or KFACOptions()
    fields = {f.name for f in dataclasses.fields(KFACOptions)}
    bad = set(kw) - fields
    if bad:
        raise TypeError(f"unknown option(s) {sorted(bad)}; KFACOptions has {sorted(fields)}")
    return dataclasses.replace(options, **kw)


def _prepare(spec, params, train, eigensystem, complement, eigensystem_args, progress):
    if complement not in COMPLEMENTS:
        raise ValueError(f"complement must be one of {COMPLEMENTS}, got {complement!r}")
    if eigensystem is None:
        eigensystem = default_eigensystem(spec, params, train, eigensystem_args, progress=progress)
    if eigensystem is False and complement != "kfac":
        raise ValueError("eigensystem=False (k = 0) needs complement='kfac'")
    return eigensystem


def pairwise_scores(spec, params: Params, train: Example, test: Example, eigensystem=None, *,
                    complement: str = DEFAULT_COMPLEMENT, rho: float | None = None, curvature=None,
                    kfac_options: KFACOptions | None = None, eigensystem_args=None, batch_size: int = 256,
                    progress: bool = False, return_details: bool = False, **options: Any):
    r"""``[N_train, N_test]`` float64 influence :math:`\tau(z_{test}, z_{train})` with the library's defaults.

    Args:
      spec, params: the model and its trained parameters.
      train, test: decoded batches ``{feature: [N, ...]}``.
      eigensystem: an ``Eigensystem`` of this model; None: computed with ``EigensystemArgs()`` (or
        ``eigensystem_args``) on ``train``; False: none (k = 0, only with ``complement="kfac"``). One that
        carries K-FAC factors (``--kfac``, ``fit_eigensystem_kfac``) gives them to ``complement="kfac"`` (no refit).
      complement: ``"kfac"`` (default), ``"scalar"`` or ``"none"`` (module docstring).
      rho: the scalar complement's ρ (default: the smallest kept |λ|).
      curvature: a fitted ``core.kfac.KroneckerCurvature`` to reuse (``complement="kfac"``).
      kfac_options / ``**options``: ``KFACOptions`` fields (``damping=``, ``kind=``, ``fisher=``, ...).
      batch_size: training examples per gradient pass.
      return_details: also return ``{"eigensystem", "complement"}`` (to reuse them).
    """
    from beam_influence.core.complement import complement_scores
    from beam_influence.core.scoring import influence_scores
    from beam_influence.evaluation.gradients import flat_grads, gradient_dots, num_examples

    opts = _options(kfac_options, options)
    es = _prepare(spec, params, train, eigensystem, complement, eigensystem_args, progress)
    loss = spec.loss
    n_test = num_examples(test)
    g_test = flat_grads(loss, params, test)  # [Q, p] float32
    details: dict[str, Any] = {"eigensystem": es, "complement": None}
    k = es.k if es else 0
    u = es.flat_eigvecs(params) if es else None  # [k, p] float32
    p_test = g_test.astype(np.float64) @ u.T.astype(np.float64) if k else np.zeros((n_test, 0))
    if complement == "kfac":
        comp = fit_complement(spec, params, train, es, options=opts, curvature=curvature)
        details["complement"] = comp
        w = np.concatenate([comp.vectors(g_test[s:s + 256]) for s in range(0, n_test, 256)])
        vecs = np.concatenate([u, w.astype(np.float32)]) if k else w.astype(np.float32)
        d = gradient_dots(loss, params, train, vecs, batch_size=batch_size)
        scores = d[:, k:]
        if k:
            scores = scores + influence_scores(p_test, d[:, :k], es.eigvals)
    else:
        vecs = np.concatenate([u, g_test]) if complement == "scalar" else u
        d = gradient_dots(loss, params, train, vecs, batch_size=batch_size)
        if complement == "scalar":
            scores = complement_scores(p_test, d[:, :k], es.eigvals, d[:, k:], rho=rho)
        else:
            scores = influence_scores(p_test, d, es.eigvals)
    return (scores, details) if return_details else scores


def self_influence_scores(spec, params: Params, train: Example, eigensystem=None, *,
                          complement: str = DEFAULT_COMPLEMENT, rho: float | None = None, curvature=None,
                          kfac_options: KFACOptions | None = None, eigensystem_args=None, examples: Example | None = None,
                          batch_size: int = 256, micro_batch: int = 64, progress: bool = False,
                          return_details: bool = False, **options: Any):
    r"""``[N]`` float64 self-influence :math:`\tau(z, z)` of every row of ``examples`` (default: ``train``),
    with the same eigensystem and complement as ``pairwise_scores`` (its diagonal, computed per example:
    the complement term from the per-example rotated residual, never a ``[N, p]`` matrix)."""
    from beam_influence.core.complement import complement_self_influence
    from beam_influence.core.scoring import self_influence
    from beam_influence.evaluation.gradients import grad_sq_norms, gradient_dots, num_examples

    opts = _options(kfac_options, options)
    es = _prepare(spec, params, train, eigensystem, complement, eigensystem_args, progress)
    rows = train if examples is None else examples
    details: dict[str, Any] = {"eigensystem": es, "complement": None}
    k = es.k if es else 0
    proj = gradient_dots(spec.loss, params, rows, es.eigvecs_tree(params), batch_size=batch_size) if k else None
    if complement == "none":
        out = self_influence(proj, es.eigvals)
    elif complement == "scalar":
        sq = grad_sq_norms(spec.loss, params, rows, batch_size=batch_size)
        out = complement_self_influence(proj, es.eigvals, sq, rho=rho)
    else:
        comp = fit_complement(spec, params, train, es, options=opts, curvature=curvature)
        details["complement"] = comp
        out = comp.self_terms(spec.loss, params, rows, micro_batch=micro_batch)
        if k:
            out = out + self_influence(proj, es.eigvals)
    assert len(out) == num_examples(rows)
    return (out, details) if return_details else out


__all__ = ["COMPLEMENTS", "DEFAULT_COMPLEMENT", "KFACOptions", "default_eigensystem", "fit_complement",
           "fit_eigensystem_kfac", "pairwise_scores", "resolve_fisher", "saved_curvature", "self_influence_scores"]
