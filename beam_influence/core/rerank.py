r"""Two-stage queries: candidates from the sketched complement with a margin, then exact scores.

Against an index, the complement term of a score is estimated from a CountSketch (``core.sketch``):

.. math::  \hat s_{iq} = \sum_{j\le k} \frac{P_{ij}P_{qj}}{\lambda_j} + \frac{\langle Sr_i, Sr_q\rangle}{\rho},
           \qquad s_{iq} = \ldots + \frac{\langle r_i, r_q\rangle}{\rho}, \qquad r = (I - UU^\top)\nabla\ell.

The CountSketch estimate :math:`\hat c = \langle Sx, Sy\rangle` of :math:`c = \langle x, y\rangle` (d buckets,
one hash) is unbiased with :math:`\mathrm{Var}\,\hat c = \tfrac1d(\lVert x\rVert^2\lVert y\rVert^2 + c^2 -
2\sum_j x_j^2y_j^2) \le \tfrac2d\lVert x\rVert^2\lVert y\rVert^2`, and both norms are known exactly:
:math:`\lVert r\rVert^2 = \lVert\nabla\ell\rVert^2 - \lVert P\rVert^2` (the index's ``grad_sq_norm``; U has
orthonormal columns). A 16-bit stored sketch adds at most :math:`\lVert\varepsilon_i\rVert\,\lVert Sr_q\rVert`
with :math:`\lVert\varepsilon_i\rVert \le \sqrt d\,\mathrm{scale}_i\,(u + 2^{-22})` (``storage_error``).
So with z standard deviations the margin

.. math::  m_{iq} = \frac{1}{\rho}\Big(z\sqrt{2/d}\,\lVert r_i\rVert\lVert r_q\rVert
           + \lVert\varepsilon_i\rVert\,\lVert Sr_q\rVert\Big) = a_i\cdot b_q,
           \quad a_i = (\lVert r_i\rVert, \lVert\varepsilon_i\rVert),
           \quad b_q = (z\sqrt{2/d}\lVert r_q\rVert, \lVert Sr_q\rVert)/\rho

bounds :math:`|\hat s - s|` except with a probability of at most :math:`1/z^2` per pair by Chebyshev (about
:math:`3\cdot10^{-5}` one-sided at z = 4 if the estimate is near Gaussian, as a sum of p/d-term buckets is).

Stage 1 (``core.candidates.MarginCandidates``, one scan of the index) keeps, per query and kind, every row whose
*optimistic* score :math:`\hat s \pm m` reaches :math:`\tau`, the k-th best *pessimistic* score
:math:`\hat s \mp m` over all rows: any other row is beaten by k rows for sure, so the exact top k is among
the candidates (within the margin) and the lists stage 2 computes from their exact scores are the exact
complement's lists. The number of candidates is what the sketch's precision makes it: small where the
margin is small against the gaps between scores, up to every row where it is not.
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_MARGIN = 4.0  # z: standard deviations of the sketch's error
_CODE_UNIT = {"float32": 0.0, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
_DECODE_SLACK = 2.0 ** -22  # float16 subnormal spacing relative to the scale, and the float32 decode


CANDIDATE_BUDGET = 2_000_000  # candidate entries (id, bound) kept by stage 1 over all lists, by default: ~100 MB
# (at 10⁶ rows × 1 000 queries a cap of 2 000 instead of 1 000 cost 561 s instead of 381 s and certified no more
# lists: docs/benchmarks.md "Exact answers from an index")


def default_cap(top_k: int, num_queries: int, rows: int) -> int:
    """Candidates kept per list when ``--rerank_candidates`` is not given: every row when the budget allows
    (``CANDIDATE_BUDGET`` over the 2Q lists), else that share of it, and never fewer than 10·k."""
    share = CANDIDATE_BUDGET // max(2 * int(num_queries), 1)
    return max(10 * int(top_k), min(int(rows), share))


def candidate_cap(requested: int | None, top_k: int, num_queries: int, rows: int) -> int:
    """The cap stage 1 uses: ``--rerank_candidates`` (``requested``) or ``default_cap``, at least k."""
    return max(int(requested or default_cap(top_k, num_queries, rows)), int(top_k))


def residual_norms(grad_sq_norm: np.ndarray, proj: np.ndarray) -> np.ndarray:
    r"""``[n]`` :math:`\lVert (I-UU^\top)\nabla\ell\rVert = \sqrt{\max(\lVert\nabla\ell\rVert^2 - \lVert P\rVert^2, 0)}`
    (float64). A NaN norm (a projection method that never forms the gradient) is refused."""
    sq = np.asarray(grad_sq_norm, np.float64)
    p = np.asarray(proj, np.float64)
    if not np.all(np.isfinite(sq)):
        raise ValueError("the exact rerank needs each row's ‖∇ℓ‖² (grad_sq_norm), which this index/projection "
                         "lacks (the 'jvp' projection method does not form gradients); rebuild the index with "
                         "another --projection_method, or use --exact_rerank off")
    return np.sqrt(np.maximum(sq - np.einsum("ij,ij->i", p, p), 0.0))


def storage_error(scales: np.ndarray | None, dim: int, dtype: str, n: int) -> np.ndarray:
    r"""``[n]`` a bound on :math:`\lVert\varepsilon_i\rVert`, the 2-norm of a stored sketch row's rounding
    error: 0 for float32, :math:`\sqrt d\,\mathrm{scale}_i\,(u + 2^{-22})` for 16-bit codes (u = 2⁻¹¹ float16,
    2⁻⁸ bfloat16)."""
    if dtype not in _CODE_UNIT:
        raise ValueError(f"unknown sketch storage dtype {dtype!r}")
    if dtype == "float32" or scales is None:
        return np.zeros(n)
    return math.sqrt(dim) * np.abs(np.asarray(scales, np.float64)) * (_CODE_UNIT[dtype] + _DECODE_SLACK)


def whitened_norms(kfac_self: np.ndarray) -> np.ndarray:
    r"""``[n]`` :math:`\lVert\bar v\rVert = \sqrt{\max(q, 0)}` from the K-FAC self-terms q (``kfac_self``):
    the norm of the whitened residual a K-FAC index sketches (``core.kfac.Complement.whitened``)."""
    q = np.asarray(kfac_self, np.float64)
    if not np.all(np.isfinite(q)):
        raise ValueError("the exact rerank needs each row's K-FAC self-term (kfac_self), and some are not finite")
    return np.sqrt(np.maximum(q, 0.0))


def train_factors(resid: np.ndarray, scales: np.ndarray | None, dim: int, dtype: str) -> np.ndarray:
    """``[n, 2]`` the rows' margin factors :math:`a_i = (\lVert r_i\rVert, \lVert\varepsilon_i\rVert)` from the
    residual norms ``resid`` (``residual_norms`` or ``whitened_norms``) and the stored sketch's scales."""
    r = np.asarray(resid, np.float64)
    return np.stack([r, storage_error(scales, dim, dtype, r.shape[0])], axis=1)


def query_factors(resid: np.ndarray, residual_sketch: np.ndarray, *, dim: int, rho: float,
                  z: float = DEFAULT_MARGIN, exact_sketch: bool = False) -> np.ndarray:
    r"""``[Q, 2]`` the queries' margin factors :math:`b_q = (z\sqrt{2/d}\lVert r_q\rVert, \lVert Sr_q\rVert)/\rho`
    (``resid``: the queries' residual norms); the first is 0 when the sketch is the identity (``exact_sketch``:
    d ≥ p)."""
    if not (rho > 0 and np.isfinite(rho)) or not z >= 0 or dim < 1:
        raise ValueError(f"query_factors needs rho > 0, z ≥ 0 and dim ≥ 1, got rho={rho}, z={z}, dim={dim}")
    r = np.asarray(resid, np.float64)
    sr = np.linalg.norm(np.asarray(residual_sketch, np.float64), axis=1)
    sigma = 0.0 if exact_sketch else z * math.sqrt(2.0 / dim)
    return np.stack([sigma * r, sr], axis=1) / rho


__all__ = ["CANDIDATE_BUDGET", "DEFAULT_MARGIN", "candidate_cap", "default_cap", "query_factors", "residual_norms", "storage_error",
           "train_factors", "whitened_norms"]
