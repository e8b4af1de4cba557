r"""Kronecker-factored curvature from per-example gradients (K-FAC / EK-FAC without model hooks).

For a weight leaf viewed as a matrix :math:`[a, b]` (a dense kernel ``[d_in, d_out]``; a conv kernel
``[kh, kw, c_in, c_out]`` as ``[kh·kw·c_in, c_out]``; an embedding ``[vocab, dim]``) and the per-example
gradients :math:`G_n` of that leaf (``vmap(grad)``, what the projector already forms), the leaf's block of
the curvature :math:`C = \frac1N\sum_n \mathrm{vec}(G_n)\mathrm{vec}(G_n)^\top` is approximated by

.. math::  C_{leaf} \approx \frac{A \otimes B}{s}, \qquad A = \tfrac1N\textstyle\sum_n G_nG_n^\top,\quad
           B = \tfrac1N\textstyle\sum_n G_n^\top G_n,\quad s = \tfrac1N\textstyle\sum_n\lVert G_n\rVert_F^2

(for a dense layer :math:`G_n = x_n\delta_n^\top`, so :math:`A\otimes B/s` is K-FAC's
:math:`E[xx^\top]\otimes E[\delta\delta^\top]` up to how the two norms correlate, and it is exact for one
example; the normalisation by s makes :math:`\mathrm{tr}(A\otimes B)/s = \mathrm{tr}\,C_{leaf}`). With
:math:`A = Q_A \Lambda_A Q_A^\top`, :math:`B = Q_B\Lambda_B Q_B^\top` the K-FAC eigenvalues are
:math:`\lambda_{A,i}\lambda_{B,j}/s` and the eigenvalue-corrected ones (EK-FAC, George et al. 2018) are the
exact diagonal of C in the Kronecker eigenbasis:

.. math::  \Lambda^{EK}_{ij} = \tfrac1N\textstyle\sum_n \big(Q_A^\top G_n Q_B\big)_{ij}^2 .

Leaves that are not matrices (biases, norm scales, scalars) or have a side of 1 are diagonal:
:math:`E[g^2]` per entry. A side longer than ``max_factor_dim`` (a large vocabulary) keeps a diagonal factor
on that side (its basis is the identity). Nothing here knows the model: the factors come from
per-example gradients only, so any ``ModelSpec`` (Flax linen or NNX, dense, conv, embedding) works.

Which per-example "gradients" (``fisher``):

``"empirical"``  the per-example gradients of ``spec.loss`` with the true labels (the empirical Fisher).
``"ggn"``        the Gauss-Newton matrix :math:`J^\top H_{out} J` exactly: with :math:`H_{out} = LL^\top`
                 (the Hessian of ``spec.output_loss`` in the model output, factored by ``eigh``) each example
                 gives the c pseudo-gradients :math:`J^\top L_{:,c}` (one VJP of ``spec.apply`` each);
                 for softmax cross-entropy this is the true Fisher summed over every class. Needs
                 ``spec.apply`` and ``spec.output_loss`` and a small output (``max_output_dim``).

The curvature inverted is :math:`C + (l_2 + \delta) I` (``l2`` of the objective, ``damping`` δ).
``KroneckerCurvature.rotate`` / ``unrotate`` map a gradient leaf to the eigenbasis and back, so
:math:`(C+\mu I)^{-1}v = Q\,(Q^\top v / (\Lambda + \mu))`; how this composes with the Arnoldi top-k
eigenspace is in ``beam_influence.core.influence`` and docs/complement.md.

Everything is fitted on a fixed sample (the eigensystem's: ``fixed_sample``), accumulated over micro-batches
of ``micro_batch`` examples (float32 on the device, float64 sums on the host): the result does not depend
on the micro-batch beyond round-off.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from beam_influence.core.types import Example, Params

FISHERS = ("empirical", "ggn")
KINDS = ("ekfac", "kfac")
DEFAULT_MAX_FACTOR_DIM = 4096
DEFAULT_MICRO_BATCH = 256


# ---- the sample ------------------------------------------------------------------------------------
DEFAULT_MAX_OUTPUT_DIM = 64  # the GGN fit factors each example's output Hessian: c ≤ this many output entries


def output_dim(spec, params: Params, example: Example | None = None) -> int | None:
    """Entries of the model output ``spec.apply`` gives for one example (default: the spec's probe example), or
    None without ``apply``."""
    from beam_influence.core.model_spec import probe_example

    if getattr(spec, "apply", None) is None:
        return None
    out = jax.eval_shape(spec.apply, params, probe_example(spec) if example is None else example)
    return int(np.prod(out.shape))


def fixed_sample(data: Example, sample_size: int, seed: int = 0) -> Example:
    """The rows of ``data`` the eigensystem's operator uses: all of them when ``N ≤ sample_size``, else the
    same seeded subsample ``compute_eigensystem`` takes (sorted ``default_rng(seed).choice``)."""
    data = {k: np.asarray(v) for k, v in data.items()}
    n = len(next(iter(data.values())))
    if n <= sample_size:
        return data
    idx = np.sort(np.random.default_rng(seed).choice(n, sample_size, replace=False))
    return {k: v[idx] for k, v in data.items()}


# ---- one leaf --------------------------------------------------------------------------------------
@dataclasses.dataclass
class LeafFactor:
    """The factored curvature of one parameter leaf.

    ``kind`` ``"kron"``: the leaf is viewed as ``mat_shape = (a, b)``; ``qa [a, a]`` / ``qb [b, b]`` the
    eigenbases (None: that side is diagonal, its basis the identity), ``la [a]`` / ``lb [b]`` the factor
    eigenvalues (means over examples), ``s`` the mean squared Frobenius norm, ``corr [a, b]`` the EK-FAC
    eigenvalues (None until ``fit`` has run its second pass). ``kind`` ``"diag"``: ``diag`` (leaf shape) the
    mean squared gradient entry.
    """

    kind: Literal["kron", "diag"]
    shape: tuple[int, ...]
    mat_shape: tuple[int, int] | None = None
    qa: np.ndarray | None = None
    qb: np.ndarray | None = None
    la: np.ndarray | None = None
    lb: np.ndarray | None = None
    s: float = 0.0
    corr: np.ndarray | None = None
    diag: np.ndarray | None = None

    def eigenvalues(self, kind: str = "ekfac") -> np.ndarray:
        """The curvature's eigenvalues in the leaf's eigenbasis: ``[a, b]`` (kron) or the leaf shape (diag)."""
        if self.kind == "diag":
            return self.diag
        if kind == "ekfac":
            if self.corr is None:
                raise ValueError("no EK-FAC eigenvalues: fit with ekfac=True")
            return self.corr
        if self.s <= 0:
            return np.zeros(self.mat_shape)
        return np.outer(self.la, self.lb) / self.s


LAYOUT_RULES = ("balanced", "last")  # how a leaf of ≥ 3 dimensions is split into [a, b]; "last": files before it


def leaf_layout(shape: tuple[int, ...], max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM, rule: str = "balanced") -> tuple:
    """``("kron", (a, b), dense_a, dense_b)`` or ``("diag",)`` for a leaf of this shape.

    A leaf of ≥ 2 dimensions is the matrix ``[prod(shape[:i]), prod(shape[i:])]``: ``rule="balanced"`` takes the
    split with the smallest a² + b² (the factors' size; ties: the later split), which is ``[in, out]`` for dense
    and embedding kernels, ``[kh·kw·c_in, c_out]`` for conv kernels and ``[d, heads·head_dim]`` for attention
    projections ``[d, heads, head_dim]`` (where the last axis alone gave a d·heads side: 16× the leaf's own size
    in factors); ``"last"`` splits before the last axis (eigensystem files written before the rule). A side of 1
    makes the leaf diagonal; a side longer than ``max_factor_dim`` keeps a diagonal factor (``dense_* = False``);
    both sides too long makes the leaf diagonal."""
    if rule not in LAYOUT_RULES:
        raise ValueError(f"layout rule must be one of {LAYOUT_RULES}, got {rule!r}")
    if len(shape) < 2:
        return ("diag",)
    splits = range(1, len(shape)) if rule == "balanced" else [len(shape) - 1]
    a, b = min(((int(np.prod(shape[:i])), int(np.prod(shape[i:]))) for i in splits),
               key=lambda ab: (ab[0] ** 2 + ab[1] ** 2, -ab[0]))
    if a < 2 or b < 2:
        return ("diag",)
    da, db = a <= max_factor_dim, b <= max_factor_dim
    if not (da or db):
        return ("diag",)
    return ("kron", (a, b), da, db)


# ---- per-example (pseudo-)gradients ---------------------------------------------------------------
class _Fns(tuple):
    """``(loss, apply, output_loss)`` of a spec: hashable (a ModelSpec holds a dict), the cache key."""

    @classmethod
    def of(cls, spec) -> "_Fns":
        return cls((spec.loss, getattr(spec, "apply", None), getattr(spec, "output_loss", None)))


def _pseudo_grads_fn(fns: _Fns, fisher: str, max_output_dim: int):
    """``(params, mbatch) -> tree of [m, c, *shape]``: the c per-example vectors whose outer products sum
    to the example's curvature (c = 1 for the empirical Fisher)."""
    loss, apply, output_loss = fns
    if fisher == "empirical":
        def fn(params, mbatch):
            g = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, mbatch)
            return jax.tree.map(lambda x: x[:, None], g)
        return fn
    if fisher != "ggn":
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if apply is None or output_loss is None:
        raise ValueError("fisher='ggn' needs spec.apply and spec.output_loss; use fisher='empirical'")

    def one(params, z):
        out, vjp = jax.vjp(lambda p: apply(p, z), params)
        c = int(np.prod(out.shape))
        if c > max_output_dim:
            raise ValueError(f"fisher='ggn' factors the {c}-dimensional output Hessian (max_output_dim = "
                             f"{max_output_dim}); use fisher='empirical'")
        flat_loss = lambda o: output_loss(o.reshape(out.shape), z)  # noqa: E731
        h = jax.hessian(flat_loss)(out.reshape(-1).astype(jnp.float32))
        w, v = jnp.linalg.eigh(0.5 * (h + h.T))
        factor = v * jnp.sqrt(jnp.clip(w, 0.0))  # H_out = factor factorᵀ
        cot = factor.T.reshape((c,) + out.shape).astype(out.dtype)
        return jax.vmap(lambda t: vjp(t)[0])(cot)

    return jax.vmap(one, in_axes=(None, 0))


def _mat(x: jax.Array, layout) -> jax.Array:
    """``[n, *shape] -> [n, a, b]``."""
    return x.reshape((x.shape[0],) + layout[1])


@functools.lru_cache(maxsize=32)
def _stats_step(fns: _Fns, fisher: str, layouts: tuple, max_output_dim: int):
    """Jitted first pass over one micro-batch: per leaf ``(A, B, s)`` sums (kron) or ``Σ g²`` (diag)."""
    pg = _pseudo_grads_fn(fns, fisher, max_output_dim)

    def step(params, mbatch, weight):
        leaves = jax.tree.leaves(pg(params, mbatch))
        out = []
        for x, lay in zip(leaves, layouts):
            x = x * weight.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
            x = x.reshape((-1,) + x.shape[2:]).astype(jnp.float32)  # [m·c, *shape]
            if lay[0] == "diag":
                out.append((jnp.sum(x * x, axis=0),))
                continue
            g = _mat(x, lay)
            a = jnp.einsum("nij,nkj->ik", g, g) if lay[2] else jnp.sum(g * g, axis=2).sum(0)
            b = jnp.einsum("nji,njk->ik", g, g) if lay[3] else jnp.sum(g * g, axis=1).sum(0)
            out.append((a, b, jnp.sum(g * g)))
        return out

    return jax.jit(step)


@functools.lru_cache(maxsize=32)
def _corr_step(fns: _Fns, fisher: str, layouts: tuple, max_output_dim: int):
    """Jitted second pass: per kron leaf ``Σ (Q_Aᵀ G Q_B)²`` (``[a, b]``)."""
    pg = _pseudo_grads_fn(fns, fisher, max_output_dim)

    def step(params, mbatch, weight, bases):
        leaves = jax.tree.leaves(pg(params, mbatch))
        out = []
        for x, lay, qs in zip(leaves, layouts, bases):
            if lay[0] == "diag":
                out.append(None)
                continue
            x = x * weight.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
            g = _mat(x.reshape((-1,) + x.shape[2:]).astype(jnp.float32), lay)
            r = _rotate_mat(g, qs[0], qs[1])
            out.append(jnp.sum(r * r, axis=0))
        return out

    return jax.jit(step)


def _rotate_mat(g, qa, qb):
    """``[n, a, b] -> Q_Aᵀ G Q_B`` (a None basis is the identity)."""
    if qa is not None:
        g = jnp.einsum("ia,nib->nab", qa, g)
    if qb is not None:
        g = jnp.einsum("nab,bj->naj", g, qb)
    return g


def _unrotate_mat(g, qa, qb):
    """``[n, a, b] -> Q_A G Q_Bᵀ``."""
    if qa is not None:
        g = jnp.einsum("ai,nib->nab", qa, g)
    if qb is not None:
        g = jnp.einsum("nab,jb->naj", g, qb)
    return g


def _micro_batches(data: Example, micro_batch: int):
    """``(mbatch, weight)``: fixed-size micro-batches, the last padded by repeating row 0 with weight 0."""
    n = len(next(iter(data.values())))
    m = max(1, min(micro_batch, n))
    for s in range(0, n, m):
        idx = np.arange(s, s + m)
        w = (idx < n).astype(np.float32)
        idx = np.where(idx < n, idx, 0)
        yield {k: jnp.asarray(v[idx]) for k, v in data.items()}, jnp.asarray(w)


# ---- the curvature ---------------------------------------------------------------------------------
@dataclasses.dataclass
class KroneckerCurvature:
    """Per-leaf Kronecker-factored (or diagonal) curvature, in ``jax.tree.leaves(params)`` order.

    Attributes:
      factors: one ``LeafFactor`` per parameter leaf.
      treedef: the parameters' tree structure.
      num_examples: N, the sample the means are over.
      fisher: ``"empirical"`` or ``"ggn"``.
      l2: the objective's L2 weight (added to every eigenvalue with the damping).
    """

    factors: list[LeafFactor]
    treedef: Any
    num_examples: int
    fisher: str
    l2: float = 0.0
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(f.shape) for f in self.factors))

    def eigenvalues(self, kind: str = "ekfac") -> list[np.ndarray]:
        """Per leaf, the eigenvalues of C in its eigenbasis (without l2 and damping)."""
        _check_kind(kind)
        return [f.eigenvalues(kind) for f in self.factors]

    def denominators(self, damping: float = 0.0, kind: str = "ekfac") -> list[np.ndarray]:
        """Per leaf, :math:`\\Lambda + l_2 + \\delta` (what a rotated vector is divided by)."""
        mu = float(self.l2) + float(damping)
        return [np.asarray(lam, np.float64) + mu for lam in self.eigenvalues(kind)]

    def bases(self) -> list:
        """Per leaf ``(qa, qb)`` (float32 device arrays or None) for kron leaves, None for diagonal ones."""
        return [(None if f.qa is None else jnp.asarray(f.qa, jnp.float32),
                 None if f.qb is None else jnp.asarray(f.qb, jnp.float32)) if f.kind == "kron" else None
                for f in self.factors]

    # vectors: a list of per-leaf arrays [V, *shape] (jax.tree.leaves order)
    def rotate(self, leaves: list, bases: list | None = None) -> list:
        """Per leaf ``[V, *shape] -> `` the coordinates in the eigenbasis (``[V, a, b]`` or ``[V, *shape]``)."""
        bases = self.bases() if bases is None else bases
        out = []
        for x, f, qs in zip(leaves, self.factors, bases):
            if f.kind == "diag":
                out.append(x)
            else:
                out.append(_rotate_mat(x.reshape((x.shape[0],) + f.mat_shape), qs[0], qs[1]))
        return out

    def unrotate(self, leaves: list, bases: list | None = None) -> list:
        """The inverse of ``rotate``: back to ``[V, *shape]``."""
        bases = self.bases() if bases is None else bases
        out = []
        for x, f, qs in zip(leaves, self.factors, bases):
            if f.kind == "diag":
                out.append(x)
            else:
                out.append(_unrotate_mat(x, qs[0], qs[1]).reshape((x.shape[0],) + f.shape))
        return out

    def inverse_apply(self, tree: Params, *, damping: float = 0.0, kind: str = "ekfac") -> Params:
        """:math:`(C + (l_2+\\delta) I)^{-1} v` for a pytree of ``[V, *shape]`` leaves (float64 numpy)."""
        leaves, treedef = jax.tree.flatten(tree)
        x = [np.asarray(v, np.float64) for v in leaves]
        den = self.denominators(damping, kind)
        out = []
        for v, f, d in zip(x, self.factors, den):
            if f.kind == "diag":
                out.append(v / d)
                continue
            g = _rotate64(v, f) / d
            if f.qa is not None:
                g = np.einsum("ai,nib->nab", f.qa, g)
            if f.qb is not None:
                g = np.einsum("nab,jb->naj", g, f.qb)
            out.append(g.reshape(v.shape))
        return jax.tree.unflatten(treedef, out)

    def dense(self, *, damping: float = 0.0, kind: str = "ekfac") -> np.ndarray:
        """The ``[p, p]`` matrix :math:`C + (l_2+\\delta)I` in ``ravel_pytree`` order (tests, small models)."""
        p = self.num_params
        blocks, off = np.zeros((p, p)), 0
        for f, d in zip(self.factors, self.denominators(damping, kind)):
            n = int(np.prod(f.shape))
            if f.kind == "diag":
                blocks[off:off + n, off:off + n] = np.diag(d.reshape(-1))
            else:
                qa = np.eye(f.mat_shape[0]) if f.qa is None else f.qa
                qb = np.eye(f.mat_shape[1]) if f.qb is None else f.qb
                q = np.kron(qa, qb)  # vec of a row-major [a, b] matrix: index i*b + j
                blocks[off:off + n, off:off + n] = (q * d.reshape(-1)) @ q.T
            off += n
        return blocks


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def fit(spec, params: Params, data: Example, *, fisher: str = "empirical", ekfac: bool = True,
        micro_batch: int = DEFAULT_MICRO_BATCH, max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
        max_output_dim: int = DEFAULT_MAX_OUTPUT_DIM, progress: bool = False) -> KroneckerCurvature:
    """Fit the factored curvature of ``spec`` at ``params`` on ``data`` (all of it: pass the eigensystem's
    ``fixed_sample``). Two passes of per-example gradients over ``data`` (one without ``ekfac``).

    Args:
      fisher: ``"empirical"`` or ``"ggn"`` (see the module docstring).
      ekfac: also compute the eigenvalue correction (the second pass).
      micro_batch: examples per compiled step (``"ggn"``: divided by the output size, at least 1).
      max_factor_dim: a matrix side longer than this keeps a diagonal factor.
    """
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    data = {k: np.asarray(v) for k, v in data.items()}
    n = len(next(iter(data.values())))
    if n < 1:
        raise ValueError("cannot fit a curvature on an empty sample")
    leaves, treedef = jax.tree.flatten(params)
    layouts = tuple(leaf_layout(tuple(np.shape(x)), max_factor_dim, LAYOUT_RULES[0]) for x in leaves)
    if fisher == "ggn":
        out_dim = output_dim(spec, params, {k: v[0] for k, v in data.items()})
        micro_batch = max(1, micro_batch // max(out_dim or 1, 1))
    step = _stats_step(_Fns.of(spec), fisher, layouts, max_output_dim)
    sums = None
    batches = list(_micro_batches(data, micro_batch)) if n <= micro_batch * 4 else None
    it = batches if batches is not None else _micro_batches(data, micro_batch)
    for mb, w in it:
        part = jax.device_get(step(params, mb, w))
        part = [tuple(np.asarray(t, np.float64) for t in leaf) for leaf in part]
        sums = part if sums is None else [tuple(a + b for a, b in zip(s, p)) for s, p in zip(sums, part)]
    factors = []
    for x, lay, st in zip(leaves, layouts, sums):
        shape = tuple(np.shape(x))
        if lay[0] == "diag":
            factors.append(LeafFactor("diag", shape, diag=st[0] / n))
            continue
        a, b, s = st[0] / n, st[1] / n, float(st[2]) / n
        if lay[2]:
            la, qa = np.linalg.eigh(0.5 * (a + a.T))
            la = np.clip(la, 0.0, None)
        else:
            la, qa = a, None
        if lay[3]:
            lb, qb = np.linalg.eigh(0.5 * (b + b.T))
            lb = np.clip(lb, 0.0, None)
        else:
            lb, qb = b, None
        factors.append(LeafFactor("kron", shape, mat_shape=lay[1], qa=qa, qb=qb, la=la, lb=lb, s=s))
    curv = KroneckerCurvature(factors, treedef, n, fisher, float(getattr(spec, "l2", 0.0) or 0.0),
                              info=dict(micro_batch=micro_batch, max_factor_dim=max_factor_dim,
                                        layouts=[lay[0] for lay in layouts], layout_rule=LAYOUT_RULES[0]))
    if ekfac:
        cstep = _corr_step(_Fns.of(spec), fisher, layouts, max_output_dim)
        bases = curv.bases()
        csum = None
        it = batches if batches is not None else _micro_batches(data, micro_batch)
        for mb, w in it:
            part = jax.device_get(cstep(params, mb, w, bases))
            part = [None if t is None else np.asarray(t, np.float64) for t in part]
            csum = part if csum is None else [None if a is None else a + b for a, b in zip(csum, part)]
        for f, c in zip(factors, csum):
            if f.kind == "kron":
                f.corr = c / n
    return curv


# ---- composition with the top-k eigenspace ---------------------------------------------------------
COMPOSITIONS = ("residual", "schur", "additive")


@dataclasses.dataclass
class Complement:
    r"""The factored complement of a top-k eigenspace U (orthonormal, ``[k, p]`` flat), ready to score.

    With :math:`C_\mu = C + (l_2+\delta)I` the factored curvature and :math:`r = (I - UU^\top)g` the residual
    of a gradient, the complement term of :math:`\tau(z, z')` is (``compose``):

    ``"residual"``  :math:`\langle r, C_\mu^{-1} r'\rangle` (F⁻¹ applied to the residual; projecting
                    :math:`C_\mu^{-1}r` back off U changes nothing, r' is already orthogonal to U);
    ``"schur"``     :math:`g^\top M g'`, :math:`M = C_\mu^{-1} - C_\mu^{-1}U(U^\top C_\mu^{-1}U)^{-1}U^\top C_\mu^{-1}`,
                    the exact inverse of :math:`C_\mu` compressed to the complement of U
                    (:math:`M = (P_\perp C_\mu P_\perp)^+`; equal to ``residual`` when U is invariant under C);
    ``"additive"``  :math:`\langle g, C_\mu^{-1} g'\rangle` (no projection: the top-k space counted twice).

    With k = 0 all three are :math:`\langle g, C_\mu^{-1} g'\rangle` (pure K-FAC / EK-FAC).
    """

    curvature: KroneckerCurvature
    u: np.ndarray  # [k, p] float32 or float64 as given (flat, ravel_pytree order); k may be 0
    damping: float = 0.0
    kind: str = "ekfac"
    compose: str = "residual"

    def __post_init__(self):
        _check_kind(self.kind)
        if self.compose not in COMPOSITIONS:
            raise ValueError(f"compose must be one of {COMPOSITIONS}, got {self.compose!r}")
        u = np.asarray(self.u)
        self.u = (u if u.dtype in (np.float32, np.float64) else u.astype(np.float64)).reshape(
            -1, self.curvature.num_params)  # held once, in its own dtype (an eigensystem's: float32)
        s = self._gram() if len(self.u) else np.zeros((0, 0))
        self._s_inv = np.linalg.inv(0.5 * (s + s.T)) if len(self.u) else np.zeros((0, 0))

    def _gram(self) -> np.ndarray:
        """:math:`S = U^\top C_\mu^{-1} U = W^\top W` (``[k, k]`` float64), W = D^{-1/2}Q^\top U, one leaf at a
        time: no ``[k, p]`` float64 copy of :math:`C_\mu^{-1}U` is held (``_cinv_u`` forms it on demand)."""
        curv = self.curvature
        k, out, start = len(self.u), np.zeros((len(self.u), len(self.u))), 0
        for f, den in zip(curv.factors, curv.denominators(self.damping, self.kind)):
            size = int(np.prod(f.shape))
            x = np.asarray(self.u[:, start:start + size], np.float64)
            start += size
            w = ((_rotate64(x, f) if f.kind == "kron" else x.reshape((k,) + f.shape)) / np.sqrt(den)).reshape(k, -1)
            out += w @ w.T
        return out

    @functools.cached_property
    def _cinv_u(self) -> np.ndarray:
        """:math:`C_\mu^{-1}U` ``[k, p]`` float64: formed when ``vectors`` first needs it (the launcher), never on
        workers that only form self-terms and sketches (``whitened``)."""
        return self._cinv(self.u)

    def _cinv(self, flat: np.ndarray) -> np.ndarray:
        """:math:`C_\\mu^{-1}` on rows of ``flat`` ``[V, p]``."""
        tree = _unflatten(np.asarray(flat, np.float64), self.curvature)
        out = self.curvature.inverse_apply(tree, damping=self.damping, kind=self.kind)
        return np.concatenate([np.asarray(x).reshape(len(flat), -1) for x in jax.tree.leaves(out)], axis=1)

    def vectors(self, grads: np.ndarray) -> np.ndarray:
        r"""``[Q, p]`` vectors :math:`w_q` with :math:`\langle\nabla\ell(z), w_q\rangle` = the complement term of
        :math:`\tau(z, z_q)` for every z (``grads``: ``[Q, p]`` flat gradients of the :math:`z_q`): one gradient
        pass over the training set against them (and U) gives every pairwise score."""
        g = np.asarray(grads, np.float64)
        u = np.asarray(self.u, np.float64)
        if self.compose == "additive" or not len(u):
            return self._cinv(g)
        r = g - (g @ u.T) @ u
        w = self._cinv(r)
        if self.compose == "schur":
            w = w - ((w @ u.T) @ self._s_inv) @ self._cinv_u  # w @ uᵀ = Uᵀ C⁻¹ r (C⁻¹ symmetric)
        return w - (w @ u.T) @ u  # off U: ⟨g, w⟩ = ⟨r, w⟩

    def self_terms(self, loss, params: Params, data: Example, *, micro_batch: int = 64) -> np.ndarray:
        r"""``[N]`` float64: the complement term of :math:`\tau(z, z)` for every row of ``data``, per example,
        micro-batch by micro-batch (``whitened``); the ``[N, p]`` gradients are never held."""
        return self.whitened(loss, params, data, micro_batch=micro_batch)[0]

    def whitened(self, loss, params: Params, data: Example, *, sketch=None,
                 micro_batch: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        r"""Per row of ``data``: ``(q [N] float64, Sv̄ [N, d] float32 or None)`` for the whitened residual v̄.

        With the rotated residual :math:`Q^\top r` (:math:`Q^\top r = Q^\top g - \sum_i P_i\,Q^\top u_i`)
        and the eigenvalues D of :math:`C_\mu`, :math:`v = D^{-1/2}Q^\top r` (``additive``: g for r) and
        :math:`W = D^{-1/2}Q^\top U`, the complement term is an inner product of per-example vectors
        (``compose``): :math:`\langle v, v'\rangle` (residual, additive) or, since
        :math:`S = U^\top C_\mu^{-1}U = W^\top W`,

        .. math::  g^\top M g' = \langle v, v'\rangle - (W^\top v)^\top S^{-1}(W^\top v')
                   = \langle \Pi v, \Pi v'\rangle, \qquad \Pi = I - W(W^\top W)^{-1}W^\top

        (schur: Π is the orthogonal projector off span W). So v̄ = Πv (schur) or v, q = ‖v̄‖², and a linear
        ``sketch`` (``core.sketch.GradientSketch``, applied to the rotated coordinates) of v̄ is
        :math:`Sv - (S W)\,S^{-1}W^\top v`: an index stores it in place of the gradient's sketch, and
        :math:`\langle S\bar v, S\bar v'\rangle` estimates the K-FAC complement term exactly as the scalar
        complement's sketch estimates :math:`\langle r, r'\rangle` (docs/complement.md)."""
        step = self._whitened_step(loss, sketch)
        n = len(next(iter(data.values())))
        q = np.empty(n, np.float64)
        sk = None if sketch is None else np.empty((n, sketch.dim), np.float32)
        s = 0
        for mb, w in _micro_batches({k: np.asarray(v) for k, v in data.items()}, micro_batch):
            m = int(np.sum(np.asarray(w)))
            out = jax.device_get(step(params, mb))
            q[s:s + m] = np.asarray(out[0], np.float64)[:m]
            if sk is not None:
                sk[s:s + m] = np.asarray(out[1], np.float32)[:m]
            s += m
        return q, sk

    def per_example(self, sketch=None) -> "WhitenedTerms":
        """The K-FAC self-term and whitened sketch as a projector's ``extra`` (``core.projection.make_projector``):
        computed from the per-example gradients and projections the projector already forms, so a worker does
        not form each gradient twice and holds W (not U) for it."""
        return WhitenedTerms(self, sketch, with_u=False)

    def _whitened_step(self, loss, sketch=None):
        """A jitted ``(params, micro-batch) -> (q, Sv̄ or None)`` that forms the gradients itself (``whitened``)."""
        key = ("whitened", loss, None if sketch is None else (sketch.method, sketch.dim, sketch.seed))
        cache = self.__dict__.setdefault("_steps", {})
        if key in cache:
            return cache[key]
        terms = WhitenedTerms(self, sketch, with_u=True)

        def one_batch(params, mbatch, c):  # c: the step's operands, arguments (not closure constants: a jitted
            # function's closed-over arrays are held a second time by the executable)
            g = [x.astype(jnp.float32) for x in
                 jax.tree.leaves(jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, mbatch))]
            p = sum(jnp.einsum("m...,k...->mk", x, u) for x, u in zip(g, c["u"])) if terms.k else None
            return terms.terms(g, p, c)

        operands = terms.device_operands()
        jitted = jax.jit(one_batch)
        cache[key] = lambda params, mbatch: jitted(params, mbatch, operands)
        return cache[key]


class WhitenedTerms:
    r"""Per example, from its gradient g and projections P = Uᵀg: :math:`q = \lVert\bar v\rVert^2` and the sketch
    :math:`S\bar v` of the whitened residual (``Complement.whitened``). ``device_operands()`` are the float32
    rotations, :math:`D^{-1/2}`, W = D^{-1/2}QᵀU, S⁻¹ and (SW)ᵀ (and U itself, ``with_u``, for a step that forms
    P); ``apply`` is ``make_projector``'s ``extra``: ``[m, 1 + d]`` = [q, Sv̄]."""

    def __init__(self, comp: Complement, sketch=None, *, with_u: bool = False):
        self.curvature, self.sketch, self.with_u = comp.curvature, sketch, with_u
        self.k = len(comp.u)
        self.compose = comp.compose if self.k else "additive"
        self._comp = comp

    def device_operands(self) -> dict:
        comp, curv = self._comp, self.curvature
        bases = curv.bases()
        root = [jnp.asarray(np.sqrt(d), jnp.float32) for d in curv.denominators(comp.damping, comp.kind)]
        u_leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(_unflatten(comp.u, curv))] if self.k else []
        w_rot = [r / d for r, d in zip(curv.rotate(u_leaves, bases), root)] if self.k else None  # W: [k, a, b]
        ops = self.sketch.device_operands() if self.sketch is not None else None
        sw = self._sketched(w_rot, ops) if self.sketch is not None and self.compose == "schur" else None  # (SW)ᵀ
        out = {"bases": bases, "root": root, "w": w_rot, "s_inv": jnp.asarray(comp._s_inv, jnp.float32), "sw": sw,
               "ops": ops}
        if self.with_u:
            out["u"] = u_leaves
        return out

    def _sketched(self, leaves, ops):  # the sketch of rotated vectors [m, a, b] / [m, *shape], as a params tree
        shaped = [x.reshape((x.shape[0],) + f.shape) for x, f in zip(leaves, self.curvature.factors)]
        return self.sketch.apply(jax.tree.unflatten(self.curvature.treedef, shaped), ops)

    def terms(self, g: list, p, c: dict):
        """(q [m], Sv̄ [m, d] or None) from gradient leaves ``g`` (``[m, ...]`` float32) and ``p [m, k]``."""
        v = [r / d for r, d in zip(self.curvature.rotate(g, c["bases"]), c["root"])]  # D^{-1/2}Qᵀg
        if self.compose != "additive":  # minus Σ_i P_i W_i: D^{-1/2}Qᵀ of the residual r = g − U P
            v = [x - jnp.einsum("mk,k...->m...", p, wr) for x, wr in zip(v, c["w"])]
        q = sum(jnp.sum((x * x).reshape(x.shape[0], -1), axis=1) for x in v)
        y = None
        if self.compose == "schur":
            y = sum(jnp.einsum("m...,k...->mk", x, wr) for x, wr in zip(v, c["w"]))  # Wᵀv
            q = q - jnp.einsum("mk,kl,ml->m", y, c["s_inv"], y)
        if self.sketch is None:
            return q, None
        sk = self._sketched(v, c["ops"])
        if y is not None:
            sk = sk - (y @ c["s_inv"]) @ c["sw"]  # S Π v = Sv − (SW) S⁻¹ Wᵀv
        return q, sk

    def apply(self, grads, projections, c: dict):
        """``make_projector``'s extra: ``[m, 1 + d]`` float32 = [q, Sv̄] (``[m, 1]`` without a sketch); the first k
        projection columns are P (query directions may follow)."""
        g = [x.astype(jnp.float32) for x in jax.tree.leaves(grads)]
        q, sk = self.terms(g, projections[:, :self.k].astype(jnp.float32), c)
        return q[:, None] if sk is None else jnp.concatenate([q[:, None], sk.astype(jnp.float32)], axis=1)


def _rotate64(v: np.ndarray, f: LeafFactor) -> np.ndarray:
    """``[n, a, b]`` float64: rows of a Kronecker leaf (``[n, ...]``, any layout of its entries) in the leaf's
    eigenbasis, :math:`Q_A^\top G Q_B` (the numpy twin of ``KroneckerCurvature.rotate``)."""
    g = np.asarray(v, np.float64).reshape((v.shape[0],) + f.mat_shape)
    if f.qa is not None:
        g = np.einsum("ia,nib->nab", f.qa, g)
    if f.qb is not None:
        g = np.einsum("nab,bj->naj", g, f.qb)
    return g


def _unflatten(flat: np.ndarray, curv: KroneckerCurvature):
    """``[V, p]`` flat rows -> a pytree of ``[V, *shape]`` leaves (``ravel_pytree`` order)."""
    flat = np.asarray(flat)
    sizes = [int(np.prod(f.shape)) for f in curv.factors]
    parts = np.split(flat, np.cumsum(sizes)[:-1], axis=1)
    return jax.tree.unflatten(curv.treedef, [x.reshape((len(flat),) + f.shape) for x, f in zip(parts, curv.factors)])


# ---- in the eigensystem file -----------------------------------------------------------------------
LEAF_FIELDS = ("diag", "la", "lb", "s", "qa", "qb", "corr")
"""The tensors of one leaf in the eigensystem file, ``kfac/<param path>/<field>`` (all float64): a diagonal
leaf ``diag`` (leaf shape); a Kronecker leaf ``la [a]``, ``lb [b]``, ``s [1]`` and, where present, ``qa [a, a]``,
``qb [b, b]`` (a side without its basis is diagonal) and ``corr [a, b]`` (the EK-FAC eigenvalues)."""


def leaf_paths(params: Params) -> list[str]:
    """The parameter paths (``jax.tree_util.keystr``) in ``jax.tree.leaves`` order: the file's leaf names."""
    return [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]


def curvature_metadata(curv: KroneckerCurvature) -> dict:
    """What the file records about a fit beside its tensors (JSON, in the eigensystem's ``args["kfac"]``)."""
    return {"fisher": curv.fisher, "num_examples": int(curv.num_examples), "l2": float(curv.l2),
            "ekfac": all(f.corr is not None for f in curv.factors if f.kind == "kron"),
            "max_factor_dim": int(curv.info.get("max_factor_dim", DEFAULT_MAX_FACTOR_DIM)),
            "micro_batch": int(curv.info.get("micro_batch", DEFAULT_MICRO_BATCH)),
            "layout": str(curv.info.get("layout_rule", "last"))}


def curvature_tensors(curv: KroneckerCurvature, params: Params) -> dict[str, np.ndarray]:
    """``{"<param path>/<field>": float64 C-contiguous array}`` (``LEAF_FIELDS``): the fit, exactly, for the file."""
    paths = leaf_paths(params)
    if len(paths) != len(curv.factors):
        raise ValueError(f"the curvature has {len(curv.factors)} leaves, the parameters {len(paths)}")
    out: dict[str, np.ndarray] = {}
    f64 = lambda x: np.ascontiguousarray(x, np.float64)  # noqa: E731
    for key, f, leaf in zip(paths, curv.factors, jax.tree.leaves(params)):
        if tuple(f.shape) != tuple(np.shape(leaf)):
            raise ValueError(f"the curvature's leaf {key} has shape {f.shape}, the parameter {np.shape(leaf)}")
        if f.kind == "diag":
            out[f"{key}/diag"] = f64(f.diag)
            continue
        out[f"{key}/la"], out[f"{key}/lb"], out[f"{key}/s"] = f64(f.la), f64(f.lb), f64([f.s])
        for name in ("qa", "qb", "corr"):
            if getattr(f, name) is not None:
                out[f"{key}/{name}"] = f64(getattr(f, name))
    return out


def check_tensors(tensors: dict, leaf_shapes: dict, meta: Any) -> dict[str, dict[str, np.ndarray]]:
    """Validate the file's K-FAC tensors against the parameter leaves (``{path: shape}``) and the metadata
    (``curvature_metadata``); ``{path: {field: array}}``. Raises ValueError naming what is wrong."""
    if not isinstance(meta, dict) or any(k not in meta for k in ("fisher", "num_examples", "l2", "max_factor_dim")):
        raise ValueError("the file has K-FAC tensors but no K-FAC metadata (args.kfac)")
    if meta["fisher"] not in FISHERS:
        raise ValueError(f"args.kfac.fisher is {meta['fisher']!r}, expected one of {FISHERS}")
    if meta.get("layout", "last") not in LAYOUT_RULES:
        raise ValueError(f"args.kfac.layout is {meta['layout']!r}, expected one of {LAYOUT_RULES}")
    by_leaf: dict[str, dict[str, np.ndarray]] = {}
    for name, v in tensors.items():
        key, _, field = name.rpartition("/")
        if field not in LEAF_FIELDS or key not in leaf_shapes:
            raise ValueError(f"unexpected K-FAC tensor kfac/{name}")
        if v.dtype != np.float64 or not np.all(np.isfinite(v)):
            raise ValueError(f"K-FAC tensor kfac/{name} must be finite float64 (is {v.dtype})")
        by_leaf.setdefault(key, {})[field] = v
    for key, shape in leaf_shapes.items():
        t = by_leaf.get(key)
        if t is None:
            raise ValueError(f"no K-FAC factors for parameter {key}")
        lay = leaf_layout(tuple(shape), int(meta["max_factor_dim"]), meta.get("layout", "last"))
        if lay[0] == "diag":
            if set(t) != {"diag"} or t["diag"].shape != tuple(shape):
                raise ValueError(f"K-FAC leaf {key} must be diagonal of shape {tuple(shape)}: has "
                                 f"{ {f: v.shape for f, v in t.items()} }")
            continue
        a, b = lay[1]
        want = {"la": (a,), "lb": (b,), "s": (1,), "qa": (a, a), "qb": (b, b), "corr": (a, b)}
        need = {"la", "lb", "s"} | ({"qa"} if lay[2] else set()) | ({"qb"} if lay[3] else set()) \
            | ({"corr"} if meta.get("ekfac") else set())
        allowed = need | {"corr"}
        if not need <= set(t) <= allowed or any(t[f].shape != want[f] for f in t):
            raise ValueError(f"K-FAC leaf {key} ({a}×{b}) needs {sorted(need)} of shapes "
                             f"{ {f: want[f] for f in sorted(need)} }, has { {f: v.shape for f, v in t.items()} }")
    return by_leaf


def curvature_from_tensors(tensors: dict, params: Params, meta: dict) -> KroneckerCurvature:
    """The ``KroneckerCurvature`` saved by ``curvature_tensors`` (``meta``: ``curvature_metadata``), rebuilt
    without recomputation, in the leaf order of ``params``."""
    leaves, treedef = jax.tree.flatten(params)
    paths = leaf_paths(params)
    shapes = {key: tuple(np.shape(x)) for key, x in zip(paths, leaves)}
    by_leaf = check_tensors(tensors, shapes, meta)
    factors, layouts = [], []
    for key in paths:
        t, shape = by_leaf[key], shapes[key]
        if "diag" in t:
            factors.append(LeafFactor("diag", shape, diag=np.asarray(t["diag"])))
            layouts.append("diag")
            continue
        factors.append(LeafFactor("kron", shape, mat_shape=(len(t["la"]), len(t["lb"])), qa=t.get("qa"),
                                  qb=t.get("qb"), la=np.asarray(t["la"]), lb=np.asarray(t["lb"]),
                                  s=float(t["s"][0]), corr=t.get("corr")))
        layouts.append("kron")
    return KroneckerCurvature(factors, treedef, int(meta["num_examples"]), str(meta["fisher"]), float(meta["l2"]),
                              info=dict(micro_batch=int(meta.get("micro_batch", DEFAULT_MICRO_BATCH)),
                                        max_factor_dim=int(meta["max_factor_dim"]), layouts=layouts,
                                        layout_rule=meta.get("layout", "last"), from_file=True))
