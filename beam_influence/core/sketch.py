r"""A seeded random sketch of per-example gradients, applied leaf by leaf, for the complement term in an index.

The complement term of :math:`H^{-1} \approx U\Lambda^{-1}U^\top + \rho^{-1}(I - UU^\top)` needs
:math:`\langle (I-UU^\top) g, (I-UU^\top) g'\rangle` for a training gradient :math:`g` stored in an index
and a test gradient :math:`g'` that arrives later. Storing :math:`g` (p floats) is out of the question;
a linear map :math:`S: \mathbb{R}^p \to \mathbb{R}^d` with :math:`\mathbb{E}[S^\top S] = I` gives the
unbiased estimate

.. math::  \langle (I-UU^\top) g, (I-UU^\top) g'\rangle \approx \langle r(g), r(g')\rangle,\qquad
           r(g) = S g - (S U)\, P(g),

from the index alone: :math:`Sg` (d floats per example), :math:`P(g) = U^\top g` (the projection) and
:math:`SU` (``d × k``, computed once from the eigenvectors with the same map).

:math:`S` is applied leaf by leaf to the per-example gradients the projector already holds; a ``p × d``
matrix is never formed. Two maps (``method``):

``"count"`` (default): CountSketch (Charikar, Chen, Farach-Colton 2002) over the whole ravelled gradient:
coordinate j goes to bucket :math:`h(j) \in [d]` with sign :math:`s(j) = \pm 1`,
:math:`(Sg)_b = \sum_{h(j)=b} s(j) g_j`, with h and s computed from j by a seeded integer hash (no stored
table). :math:`\mathbb{E}\langle Sx, Sy\rangle = \langle x, y\rangle` and
:math:`\mathrm{Var} \le (\lVert x\rVert^2\lVert y\rVert^2 + \langle x,y\rangle^2)/d`, like a dense Gaussian map,
at O(p) work per example (a scatter-add per leaf).

``"kron"``: block diagonal over the leaves, the budget split by leaf size:

* a leaf of ``≥ 2`` dimensions, viewed as a matrix :math:`G \in \mathbb{R}^{a\times b}` (all but the last
  axis × the last axis), is sketched Kronecker-style, :math:`\mathrm{vec}(A G B^\top)` with
  :math:`A \in \mathbb{R}^{d_1\times a}`, :math:`B \in \mathbb{R}^{d_2\times b}` i.i.d.
  :math:`\mathcal{N}(0, 1/d_1)`, :math:`\mathcal{N}(0, 1/d_2)`: :math:`d_1 d_2` numbers from
  :math:`d_1 ab + d_1 d_2 b` multiply-adds, and :math:`\mathbb{E}\langle AGB^\top, AG'B^\top\rangle = \langle G, G'\rangle`;
* a vector leaf is sketched by a dense Gaussian :math:`R \in \mathbb{R}^{d_l\times a}`, :math:`\mathcal{N}(0, 1/d_l)`;
* leaves that are small enough are kept exactly (identity).

  The budget is spent first on exact copies of the smallest leaves (up to a quarter of it), the rest
  proportionally to leaf size. Measured worse (``benchmarks/sketch_quality.py``): a per-example gradient of a
  dense layer is a rank-one :math:`x\delta^\top`, whose Kronecker sketch :math:`(Ax)(B\delta)^\top` estimates
  :math:`\langle x,x'\rangle\langle\delta,\delta'\rangle` as a product of two estimates of dimension
  :math:`d_1` and :math:`d_2`: the error is that of :math:`\min(d_1, d_2)` dimensions, not :math:`d_1 d_2`.

With ``dim ≥ p`` both maps are the identity (exact). Everything is a function of (the params' leaf shapes,
``dim``, ``seed``, ``method``): a query job rebuilds the same map from what the index manifest records.

Storage (``STORAGE_DTYPES``, ``encode_rows`` / ``decode_rows``): an index keeps :math:`Sg` as float32 (4d bytes
per example), or as float16 / bfloat16 scaled per row (2d + 4 bytes): each row is divided by its largest
:math:`|value|` (kept as a float32 scale), so its codes lie in [-1, 1] and neither overflow nor underflow
whatever the gradient's magnitude; decoding multiplies back. Per coordinate, the error is at most half a
unit in the last place of the code times the scale: :math:`2^{-11}\max_j|s_j|` (float16) and
:math:`2^{-8}\max_j|s_j|` (bfloat16), plus the float16 subnormal spacing :math:`2^{-25}` of the scale for
codes below :math:`2^{-14}`. Queries are sketched in float32; only the index's copy is rounded.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from beam_influence.core.types import Params

EXACT_SHARE = 0.25  # kron: at most this share of the budget goes to leaves kept exactly
METHODS = ("count", "kron")
DEFAULT_DIM = 1024  # the index's default sketch: chosen by measurement (docs/complement.md)
STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # how an index stores Sg (encode_rows)
DEFAULT_STORAGE_DTYPE = "float16"  # half the bytes; LDS unchanged (docs/benchmarks.md "Sketch storage dtype")
ROW_SCALING = "row_max_abs"  # 16-bit codes are Sg / max_j |(Sg)_j|, the scale stored beside them (float32)
# the largest relative error per coordinate of a decoded row, as a fraction of the row's max |value|
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


@dataclasses.dataclass(frozen=True)
class LeafSketch:
    """How one parameter leaf is sketched: ``kind`` is ``"exact"``, ``"dense"`` or ``"kron"``."""

    kind: str
    shape: tuple[int, ...]
    rows: int  # a: leading axes flattened (kron), or the leaf size (exact / dense)
    cols: int  # b: the last axis (kron); 1 otherwise
    d1: int
    d2: int

    @property
    def dim(self) -> int:
        return self.d1 * self.d2


class GradientSketch:
    """The seeded block-diagonal sketch :math:`S` of a params tree (see the module docstring).

    Attributes:
      requested: the budget ``dim`` asked for; ``dim`` the columns actually produced (≈ requested,
        ``≤ p``). ``seed``: the PRNG seed. ``leaves``: one ``LeafSketch`` per params leaf (tree order).
      operands: the random matrices, a list (per leaf) of tuples of numpy float32 arrays.
    """

    def __init__(self, params: Params, dim: int, seed: int = 0, method: str = "count"):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"sketch dim must be an integer ≥ 1, got {dim!r}")
        if method not in METHODS:
            raise ValueError(f"sketch method must be one of {METHODS}, got {method!r}")
        shapes = [tuple(int(s) for s in np.shape(x)) for x in jax.tree.leaves(params)]
        if not shapes:
            raise ValueError("params has no leaves to sketch")
        self.requested, self.seed = int(dim), int(seed)
        self.treedef = jax.tree.structure(params)
        sizes = [int(np.prod(sh)) if sh else 1 for sh in shapes]
        self.num_params = sum(sizes)
        if self.num_params >= 1 << 32:
            raise ValueError(f"{self.num_params} parameters: the sketch's 32-bit coordinate hash supports < 2^32")
        self.method = "exact" if dim >= self.num_params else method
        self.offsets = [int(o) for o in np.cumsum([0] + sizes[:-1])]
        if self.method == "count":
            self.leaves = [LeafSketch("count", sh, n, 1, int(dim), 1) for sh, n in zip(shapes, sizes)]
            self.dim = int(dim)
            self.operands = [() for _ in shapes]
            return
        self.leaves = _plan(shapes, int(dim))
        self.dim = sum(leaf.dim for leaf in self.leaves)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5EC7]))
        self.operands: list[tuple[np.ndarray, ...]] = []
        for leaf in self.leaves:  # drawn in tree order, so the map is a function of (shapes, dim, seed)
            if leaf.kind == "exact":
                self.operands.append(())
            elif leaf.kind == "dense":
                self.operands.append((rng.standard_normal((leaf.d1, leaf.rows)).astype(np.float32)
                                      / np.float32(math.sqrt(leaf.d1)),))
            else:
                a = rng.standard_normal((leaf.d1, leaf.rows)).astype(np.float32) / np.float32(math.sqrt(leaf.d1))
                b = rng.standard_normal((leaf.d2, leaf.cols)).astype(np.float32) / np.float32(math.sqrt(leaf.d2))
                self.operands.append((a, b))

    def describe(self) -> dict[str, Any]:
        """What the manifest records: enough to rebuild the map (with the params' shapes)."""
        return {"dim": self.dim, "requested": self.requested, "seed": self.seed, "method": self.method}

    def device_operands(self) -> list[tuple[jax.Array, ...]]:
        """The random matrices as device arrays (a pytree argument of a jitted function)."""
        return [tuple(jnp.asarray(m) for m in ops) for ops in self.operands]

    def bytes_per_example(self, dtype: str = "float32") -> int:
        """Bytes of one example's stored sketch in ``dtype`` (``STORAGE_DTYPES``; 16-bit: codes + scale)."""
        return storage_bytes(self.dim, dtype)

    def apply(self, grads: Params, operands: list[tuple[Any, ...]] | None = None) -> jax.Array:
        """``[m, dim]`` float32 sketches of ``grads``: a params-shaped tree with a leading batch axis m.

        Traceable (used inside the jitted projector with ``operands`` from ``device_operands``)."""
        ops = self.operands if operands is None else operands
        if self.method == "count":
            total = None
            for leaf, g, off in zip(self.leaves, jax.tree.leaves(grads), self.offsets):
                term = count_sketch_leaf(g, off, self.dim, self.seed)
                total = term if total is None else total + term
            return total
        parts = [sketch_leaf(leaf, g, o) for leaf, g, o in zip(self.leaves, jax.tree.leaves(grads), ops)]
        return jnp.concatenate(parts, axis=1)

    def sketch_vectors(self, vectors: Params) -> np.ndarray:
        """``[k, dim]`` float64: the sketch of k params-shaped vectors (leaves ``[k, *shape]``), e.g. ``SU``."""
        return np.asarray(jax.device_get(self.apply(vectors)), np.float64)

    def __repr__(self) -> str:
        kinds = {kind: sum(leaf.kind == kind for leaf in self.leaves) for kind in ("exact", "dense", "kron", "count")}
        return f"GradientSketch(method={self.method!r}, dim={self.dim}, seed={self.seed}, leaves={kinds})"


_C1, _C2 = 0x7FEB352D, 0x846CA68B  # lowbias32 (Wellons): a good 32-bit integer mixer


def _mix32(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_C1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_C2)
    return x ^ (x >> 16)


def count_hash(index: jax.Array, dim: int, seed: int) -> tuple[jax.Array, jax.Array]:
    """``(bucket int32 in [0, dim), sign float32 ±1)`` of global coordinates ``index`` (uint32) under ``seed``."""
    salt = np.uint32((0x9E3779B9 * (2 * int(seed) + 1)) & 0xFFFFFFFF)
    h = _mix32(index ^ jnp.uint32(salt))
    bucket = (h % jnp.uint32(dim)).astype(jnp.int32)
    sign = jnp.where((_mix32(h ^ jnp.uint32(0x5BD1E995)) >> 31) == 1, -1.0, 1.0).astype(jnp.float32)
    return bucket, sign


def count_sketch_leaf(g: jax.Array, offset: int, dim: int, seed: int) -> jax.Array:
    """``[m, dim]``: the CountSketch of one gradient leaf ``g: [m, *shape]`` whose coordinates start at ``offset``
    of the ravelled params (a scatter-add of the signed entries into their buckets)."""
    m = g.shape[0]
    flat = g.reshape(m, -1).astype(jnp.float32)
    bucket, sign = count_hash(jnp.arange(flat.shape[1], dtype=jnp.uint32) + jnp.uint32(offset), dim, seed)
    return jax.ops.segment_sum((flat * sign).T, bucket, num_segments=dim).T


def sketch_leaf(leaf: LeafSketch, g: jax.Array, ops: tuple[Any, ...]) -> jax.Array:
    """``[m, leaf.dim]``: the sketch of one gradient leaf ``g: [m, *leaf.shape]`` (float32 accumulation)."""
    m = g.shape[0]
    if leaf.kind == "exact":
        return g.reshape(m, -1).astype(jnp.float32)
    if leaf.kind == "dense":
        return jnp.einsum("ia,ma->mi", ops[0], g.reshape(m, -1), preferred_element_type=jnp.float32)
    a, b = ops
    ag = jnp.einsum("ia,mab->mib", a, g.reshape(m, leaf.rows, leaf.cols), preferred_element_type=jnp.float32)
    return jnp.einsum("mib,jb->mij", ag, b, preferred_element_type=jnp.float32).reshape(m, leaf.dim)


def check_storage_dtype(dtype: str) -> str:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"sketch storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    return dtype


def storage_bytes(dim: int, dtype: str = "float32") -> int:
    """Bytes per example of a stored sketch of ``dim`` floats: 4·dim (float32), 2·dim + 4 (16-bit + scale)."""
    return 4 * int(dim) if check_storage_dtype(dtype) == "float32" else 2 * int(dim) + 4


def _numpy_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def encode_rows(sketches: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(codes [n, d] in dtype, scales [n] float32 or None)``: the stored form of float32 sketches.

    float32: the rows as they are, no scale. float16 / bfloat16: ``codes = s / max_j |s_j|`` rounded to the
    dtype (in [-1, 1]), ``scales = max_j |s_j|`` (a zero row has scale 0 and zero codes). Non-finite rows are
    refused (the projector dead-letters them before they reach an index)."""
    s = np.asarray(sketches, np.float32)
    if s.ndim != 2:
        raise ValueError(f"encode_rows: sketches must be [n, d], got {s.shape}")
    if check_storage_dtype(dtype) == "float32":
        return s, None
    if not np.all(np.isfinite(s)):
        raise ValueError("encode_rows: non-finite sketch values cannot be stored")
    scales = np.max(np.abs(s), axis=1) if s.shape[1] else np.zeros(s.shape[0], np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    codes = (s / safe[:, None]).astype(_numpy_dtype(dtype))
    return codes, scales.astype(np.float32)


def decode_rows(codes: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """``[n, d]`` float32: the sketches ``encode_rows`` stored (``codes * scales[:, None]``)."""
    out = np.asarray(codes).astype(np.float32)
    if scales is None:
        return out
    return out * np.asarray(scales, np.float32).reshape(-1, 1)


def residual_sketch(sketches: np.ndarray, projections: np.ndarray, basis_sketch: np.ndarray) -> np.ndarray:
    r"""``[n, d]`` float64: :math:`r = Sg - (SU) P`, the sketch of :math:`(I - UU^\top) g`.

    Args:
      sketches: ``[n, d]`` :math:`Sg`; projections: ``[n, k]`` :math:`P = U^\top g`;
      basis_sketch: ``[k, d]`` :math:`(SU)^\top`, ``GradientSketch.sketch_vectors(eigvecs)``.
    """
    s = np.asarray(sketches, np.float64)
    p = np.asarray(projections, np.float64)
    su = np.asarray(basis_sketch, np.float64)
    if s.ndim != 2 or p.ndim != 2 or s.shape[0] != p.shape[0] or su.shape != (p.shape[1], s.shape[1]):
        raise ValueError(f"residual_sketch: sketches {s.shape}, projections {p.shape} and basis sketch "
                         f"{su.shape} must be [n, d], [n, k], [k, d]")
    return s - p @ su


def _plan(shapes: list[tuple[int, ...]], dim: int) -> list[LeafSketch]:
    """Kron: split the budget ``dim`` over the leaves (module docstring); returns one ``LeafSketch`` per leaf."""
    sizes = [int(np.prod(s)) if s else 1 for s in shapes]
    total = sum(sizes)
    if dim >= total:
        return [LeafSketch("exact", s, n, 1, n, 1) for s, n in zip(shapes, sizes)]
    exact = set()
    spent = 0
    for i in sorted(range(len(shapes)), key=lambda i: (sizes[i], i)):  # smallest leaves kept exactly
        if spent + sizes[i] > EXACT_SHARE * dim:
            break
        exact.add(i)
        spent += sizes[i]
    rest_size = sum(n for i, n in enumerate(sizes) if i not in exact)
    budget = dim - spent
    plan = []
    for i, (shape, n) in enumerate(zip(shapes, sizes)):
        if i in exact:
            plan.append(LeafSketch("exact", shape, n, 1, n, 1))
            continue
        share = max(1, round(budget * n / rest_size))
        if share >= n:
            plan.append(LeafSketch("exact", shape, n, 1, n, 1))
        elif len(shape) < 2 or min(shape[-1], n // shape[-1]) == 1:
            plan.append(LeafSketch("dense", shape, n, 1, share, 1))
        else:
            a, b = n // shape[-1], shape[-1]
            d1 = int(min(a, max(1, round(math.sqrt(share * a / b)))))
            d2 = int(min(b, max(1, round(share / d1))))
            plan.append(LeafSketch("kron", shape, a, b, d1, d2))
    return plan
