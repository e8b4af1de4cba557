"""Arnoldi iteration with full re-orthogonalisation, and distillation to the top Ritz pairs.

Pure host-side numerics (numpy): the operator is any ``matvec(v: [p]) -> [p]`` (e.g. a Hessian-vector
product that runs on the accelerator) or a dense matrix. The Krylov basis Q lives on the host, or
on disk (``basis_path``, a memory-mapped .npy) when p·n floats do not fit in RAM, so it never has to
fit the accelerator.

.. math::
    A Q_n = Q_{n+1} \\tilde H_n, \\qquad Q_{n+1}^T Q_{n+1} = I,

with \\tilde H_n the (n+1)×n upper-Hessenberg matrix. For symmetric A it is tridiagonal in exact
arithmetic; ``distill`` symmetrises H_n, diagonalises it (``eigh``) and maps the chosen Ritz vectors
back, u_i = Q_n y_i (Schioppa et al., "Scaling Up Influence Functions", arXiv 2112.03052, Alg. 1-2).

Each new vector is orthogonalised twice against all earlier ones (classical Gram-Schmidt, two passes:
"twice is enough"); the reference implementation does one pass and loses orthogonality.

Example::

    >>> A = np.diag([5., 3., 1., .5])
    >>> res = arnoldi(A, num_iters=4, seed=0, basis_dtype=np.float64)
    >>> vals, vecs = distill(res, top_k=2)
    >>> np.round(vals, 6).tolist()
    [5.0, 3.0]
"""
from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import numpy as np

Matvec = Callable[[np.ndarray], np.ndarray]
Order = Literal["magnitude", "positive"]


class ArnoldiResult(NamedTuple):
    """State after the iteration.

    Attributes:
      basis: Q, [m+1, p] (row j = q_j); only the first ``num_steps`` rows span the Krylov space used.
      hessenberg: \\tilde H, [m+1, m] (float64).
      num_steps: m, the number of completed steps (< requested after a breakdown).
      breakdown: True when the Krylov space became invariant (‖w‖ ≈ 0) and the iteration stopped early.
    """

    basis: np.ndarray
    hessenberg: np.ndarray
    num_steps: int
    breakdown: bool


def _as_matvec(op: Matvec | np.ndarray) -> tuple[Matvec, int | None]:
    if callable(op):
        return op, None
    mat = np.asarray(op)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"arnoldi needs a square matrix or a matvec callable, got an array of shape {mat.shape}")
    return (lambda v: mat @ v), mat.shape[0]


def arnoldi(
    op: Matvec | np.ndarray,
    *,
    num_iters: int,
    dim: int | None = None,
    v0: np.ndarray | None = None,
    seed: int = 0,
    tol: float = 1e-10,
    reorthogonalize: bool = True,
    basis_dtype=np.float32,
    basis_path: str | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> ArnoldiResult:
    """Run ``num_iters`` Arnoldi steps on ``op`` (matrix or matvec over flat [p] vectors).

    Args:
      op: a square matrix, or ``matvec(v) -> A v`` on numpy vectors of length p.
      num_iters: n, the number of operator applications (Krylov dimension).
      dim: p; needed when ``op`` is a callable and ``v0`` is not given.
      v0: start vector; default a seeded standard-normal vector (``seed``).
      tol: breakdown threshold: stop when ‖w‖ ≤ tol·‖A q_j‖ after orthogonalisation.
      reorthogonalize: two Gram-Schmidt passes (default) instead of one.
      basis_dtype: storage dtype of Q (float32 halves host memory; the products are in float64).
      basis_path: if given, Q is a memory-mapped ``.npy`` file there (for p·n beyond RAM).
      callback: ``callback(step, beta)`` after each step (progress bars).
    """
    matvec, mat_dim = _as_matvec(op)
    if v0 is None:
        p = dim or mat_dim
        if p is None:
            raise ValueError("arnoldi needs dim= (or v0=) when op is a callable")
        v0 = np.random.default_rng(seed).standard_normal(p)
    v0 = np.asarray(v0, np.float64).ravel()
    p = v0.size
    if num_iters < 1:
        raise ValueError(f"num_iters must be ≥ 1, got {num_iters}")
    num_iters = min(num_iters, p)
    shape = (num_iters + 1, p)
    if basis_path:
        basis = np.lib.format.open_memmap(basis_path, mode="w+", dtype=basis_dtype, shape=shape)
    else:
        basis = np.zeros(shape, dtype=basis_dtype)
    h = np.zeros((num_iters + 1, num_iters), np.float64)
    basis[0] = v0 / np.linalg.norm(v0)
    passes = 2 if reorthogonalize else 1
    for j in range(num_iters):
        w = np.asarray(matvec(np.asarray(basis[j], np.float64)), np.float64).ravel()
        if w.shape != (p,):
            raise ValueError(f"matvec returned shape {w.shape}, expected ({p},)")
        if not np.all(np.isfinite(w)):
            raise FloatingPointError(f"matvec returned non-finite values at Arnoldi step {j}")
        scale = np.linalg.norm(w)
        q = basis[: j + 1]
        for _ in range(passes):
            # products in the basis dtype go to BLAS (a float32 × float64 product does not: ~9× slower);
            # H and the norms stay float64, and the second pass restores what float32 loses
            coeffs = np.asarray(q @ w.astype(q.dtype, copy=False), np.float64)
            w = w - np.asarray(coeffs.astype(q.dtype) @ q, np.float64)
            h[: j + 1, j] += coeffs
        beta = float(np.linalg.norm(w))
        h[j + 1, j] = beta
        if callback is not None:
            callback(j + 1, beta)
        if beta <= tol * max(scale, np.finfo(float).tiny):
            return ArnoldiResult(basis, h, j + 1, True)
        basis[j + 1] = w / beta
    return ArnoldiResult(basis, h, num_iters, False)


def ritz_values(result: ArnoldiResult) -> np.ndarray:
    """All m Ritz values of the symmetrised H_m, largest first."""
    m = result.num_steps
    hm = result.hessenberg[:m, :m]
    return np.linalg.eigvalsh(0.5 * (hm + hm.T))[::-1].copy()


def distill(
    result: ArnoldiResult,
    *,
    top_k: int,
    order: Order = "magnitude",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k Ritz pairs of the symmetrised Hessenberg matrix.

    Args:
      top_k: how many pairs to keep (at most the number of completed steps).
      order: "magnitude" keeps the k largest |λ|; "positive" the k largest λ > 0.

    Returns:
      eigvals [k] (float64, sorted by the chosen order) and eigvecs [k, p] (float64, unit rows): u_i = Q_m y_i.
    """
    m = result.num_steps
    hm = result.hessenberg[:m, :m]
    vals, vecs = np.linalg.eigh(0.5 * (hm + hm.T))
    if order == "magnitude":
        idx = np.argsort(-np.abs(vals), kind="stable")
    elif order == "positive":
        idx = np.argsort(-vals, kind="stable")
        idx = idx[vals[idx] > 0]
    else:
        raise ValueError(f"order must be 'magnitude' or 'positive', got {order!r}")
    idx = idx[:top_k]
    y = vecs[:, idx]  # [m, k]
    q = result.basis[:m]
    u = np.asarray(y.T @ q, np.float64)  # [k, p]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return vals[idx], u


def residuals(matvec: Matvec | np.ndarray, eigvals: np.ndarray, eigvecs: np.ndarray) -> np.ndarray:
    """‖A u_i − λ_i u_i‖ for each Ritz pair (one more operator application each)."""
    mv, _ = _as_matvec(matvec)
    return np.array([np.linalg.norm(np.asarray(mv(u), np.float64) - lam * u) for lam, u in zip(eigvals, eigvecs)])
