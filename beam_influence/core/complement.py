r"""The complement term: truncated Arnoldi influence plus a scalar inverse on the rest of the space.

With the top-k eigenpairs :math:`(\lambda_i, u_i)` of H (``U = [u_1..u_k]``, orthonormal columns),
approximate

.. math::  H^{-1} \approx U \Lambda^{-1} U^\top + \tfrac{1}{\rho}\,(I - U U^\top),

i.e. every direction outside the Krylov eigenspace is inverted with the same scalar :math:`\rho`
(default: the smallest kept eigenvalue, the best guess for the part of the spectrum left out).
With projections :math:`P(z) = U^\top \nabla\ell(z)` this gives

.. math::

    \tau_c(z_{test}, z_{train}) = \sum_{i\le k} \frac{P_i(z_{test}) P_i(z_{train})}{\lambda_i}
      + \frac{1}{\rho}\Big(\langle\nabla\ell(z_{train}), \nabla\ell(z_{test})\rangle
      - \langle P(z_{train}), P(z_{test})\rangle\Big),

    \tau_c(z, z) = \sum_{i\le k} \frac{P_i(z)^2}{\lambda_i} + \frac{1}{\rho}\big(\lVert\nabla\ell(z)\rVert^2 - \lVert P(z)\rVert^2\big).

The full-gradient inner products are needed: exact where test gradients meet training gradients
(the fused job; ``beam_influence.evaluation.gradients.gradient_dots`` in memory), the squared norms
exact in an index (column ``grad_sq_norm``), and for queries against an index estimated from a seeded
gradient sketch (``beam_influence.core.sketch``): :math:`\langle (I-UU^\top)g, (I-UU^\top)g'\rangle
\approx \langle r, r'\rangle` with :math:`r = Sg - (SU)P`. Then the complement is simply d more
directions with eigenvalue :math:`\rho` (``augment``), so the exact top-k machinery applies unchanged. With k = p, :math:`UU^\top = I` and the term vanishes: :math:`\tau_c` is the
plain truncation and equals exact influence.

Same sign convention as ``beam_influence.core.scoring`` (larger = more helpful).
"""
from __future__ import annotations

import numpy as np

from beam_influence.core.scoring import _check, self_influence


def default_rho(eigvals: np.ndarray) -> float:
    """The smallest kept eigenvalue in magnitude, :math:`\\min_i |\\lambda_i|` (the λ used for scoring)."""
    lam = np.asarray(eigvals, np.float64)
    if lam.ndim != 1 or lam.size == 0:
        raise ValueError(f"eigvals must be a non-empty [k] vector, got shape {lam.shape}")
    return float(np.min(np.abs(lam)))


def resolve_rho(eigvals: np.ndarray, rho: float | None = None) -> float:
    """``rho`` checked (positive, finite), or ``default_rho(eigvals)`` when None."""
    return _rho(eigvals, rho)


def augment(proj: np.ndarray, residual: np.ndarray, eigvals: np.ndarray, rho: float) -> tuple[np.ndarray, np.ndarray]:
    r"""``([n, k+d] vectors, [k+d] eigenvalues)`` such that the plain truncated score of the augmented
    vectors is the complement score: :math:`\sum_i P_iP'_i/\lambda_i + \langle r, r'
angle/
ho`.

    ``residual``: ``[n, d]`` :math:`r = Sg - (SU)P` (``core.sketch.residual_sketch``); ``rho`` > 0."""
    proj = np.asarray(proj, np.float64)
    residual = np.asarray(residual, np.float64)
    if residual.shape[0] != proj.shape[0]:
        raise ValueError(f"residual {residual.shape} and projections {proj.shape} disagree on the rows")
    lam = np.concatenate([np.asarray(eigvals, np.float64), np.full(residual.shape[1], _rho(eigvals, rho))])
    return np.concatenate([proj, residual], axis=1), lam


def load_query_gradients(path: str, eigvecs):
    """``(query ids, eigvecs extended by the test gradients)``: leaves ``[k + Q, *shape]``, so one projection
    gives :math:`[U^\top g, G_{test} g]`. ``path``: the ``.npz`` of ``beam.complement_term.write_query_gradients``
    (``ids [Q]``, ``gradients [Q, p]`` in ``ravel_pytree`` order); read without pickle, shapes checked."""
    import io

    import jax

    from beam_influence.core.files import read_bytes

    try:
        with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as z:
            ids, grads = [str(i) for i in z["ids"]], np.asarray(z["gradients"], np.float32)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"cannot read the query gradients {path!r} ({type(e).__name__}: {e}); rerun the fused job") from None
    leaves, treedef = jax.tree.flatten(eigvecs)
    sizes = [int(np.prod(np.shape(u)[1:])) for u in leaves]
    if grads.ndim != 2 or grads.shape != (len(ids), sum(sizes)):
        raise ValueError(f"query gradients {path!r} have shape {grads.shape}, expected [{len(ids)}, {sum(sizes)}]")
    parts = np.split(grads, np.cumsum(sizes)[:-1], axis=1)
    ext = [np.concatenate([np.asarray(u, np.float32), g.reshape((len(ids),) + np.shape(u)[1:])])
           for u, g in zip(leaves, parts)]
    return ids, jax.tree.unflatten(treedef, ext)


def _rho(eigvals, rho):
    r = default_rho(eigvals) if rho is None else float(rho)
    if not np.isfinite(r) or r <= 0:
        raise ValueError(f"rho must be a positive finite number, got {r}")
    return r


def complement_scores(test_proj: np.ndarray, train_proj: np.ndarray, eigvals: np.ndarray,
                      grad_dots: np.ndarray, *, rho: float | None = None) -> np.ndarray:
    r"""Truncated influence plus the complement term: ``[B, Q]`` float64.

    Args:
      test_proj: ``[Q, k]`` projections :math:`P(z_{test})`.
      train_proj: ``[B, k]`` projections :math:`P(z_{train})`.
      eigvals: ``[k]`` eigenvalues used for scoring.
      grad_dots: ``[B, Q]`` full gradient inner products :math:`\langle\nabla\ell(z^{train}_b), \nabla\ell(z^{test}_q)\rangle`.
      rho: the scalar inverted on the complement; default ``default_rho(eigvals)``.
    """
    grad_dots = np.asarray(grad_dots)
    if grad_dots.dtype not in (np.float32, np.float64):
        grad_dots = grad_dots.astype(np.float64)
    test, train, lam = _check(test_proj=test_proj, train_proj=train_proj, eigvals=eigvals)
    if grad_dots.shape != (train.shape[0], test.shape[0]):
        raise ValueError(f"grad_dots has shape {grad_dots.shape}, expected [B, Q] = {(train.shape[0], test.shape[0])}")
    r = _rho(eigvals, rho)
    # Σ_i P_i P'_i/λ_i + (⟨g, g'⟩ − Σ_i P_i P'_i)/ρ = (P (P' ⊙ (ρ/λ − 1))ᵀ + ⟨g, g'⟩)/ρ: one product, two in-place
    # passes (float32 dots are added in float64)
    out = train @ (test * (r / lam - 1.0)).T
    out += grad_dots
    out /= r
    return out


def complement_pair_scores(test_proj: np.ndarray, train_proj: np.ndarray, eigvals: np.ndarray, grad_dots: np.ndarray,
                           rows: np.ndarray, cols: np.ndarray, *, rho: float | None = None) -> np.ndarray:
    r"""``complement_scores(test_proj, train_proj, eigvals, G, rho=rho)[rows, cols]`` for those pairs only
    (``grad_dots [C]`` = the pairs' :math:`\langle g, g'\rangle`), without the ``[B, Q]`` matrix: the same formula,
    summed in index order (equal up to rounding)."""
    from beam_influence.core.scoring import _inner_pairs

    test, train, lam = _check(test_proj=test_proj, train_proj=train_proj, eigvals=eigvals)
    r = _rho(eigvals, rho)
    out = _inner_pairs(train, test * (r / lam - 1.0), rows, cols)
    out += np.asarray(grad_dots, np.float64)
    out /= r
    return out


def complement_self_influence(proj: np.ndarray, eigvals: np.ndarray, grad_sq_norms: np.ndarray, *,
                              rho: float | None = None) -> np.ndarray:
    r"""Self-influence with the complement term: ``[N]`` float64.

    Args:
      proj: ``[N, k]`` projections.
      eigvals: ``[k]``.
      grad_sq_norms: ``[N]`` :math:`\lVert\nabla\ell(z_n)\rVert^2`.
      rho: as in ``complement_scores``.
    """
    proj = np.asarray(proj, np.float64)
    sq = np.asarray(grad_sq_norms, np.float64)
    if sq.shape != proj.shape[:1]:
        raise ValueError(f"grad_sq_norms has shape {sq.shape}, expected [N] = {proj.shape[:1]}")
    # the complement part is >= 0 up to round-off (‖g‖² ≥ ‖Uᵀg‖² for orthonormal U)
    return self_influence(proj, eigvals) + (sq - np.sum(proj * proj, axis=1)) / _rho(eigvals, rho)
