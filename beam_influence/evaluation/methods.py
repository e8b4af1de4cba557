r"""Influence methods behind one interface: Arnoldi (truncated, with complement), exact, CG, LiSSA, TracIn.

Every method estimates the same quantity, under the project's sign convention (larger = more
helpful: upweighting the training example lowers the test loss):

.. math::  \tau(z_{test}, z_{train}) = \nabla\ell(z_{test})^\top H^{-1} \nabla\ell(z_{train}),
   \qquad H = \nabla^2\Big(\frac1N\sum_n \ell(z_n,\theta) + \frac{l2}{2}\lVert\theta\rVert^2\Big),

and gives ``scores() -> [N_train, Q]`` and ``self_influence(idx) -> [len(idx)]`` (:math:`\tau(z, z)`):

==================== ===========================================================================
``arnoldi``          top-k eigenpairs by Arnoldi (``beam_influence.core.estimate.compute_eigensystem``),
                     projections (``beam_influence.core.projection``), :math:`\sum_i P_iP_i/\lambda_i`
                     (Schioppa et al., arXiv 2112.03052).
``arnoldi_complement`` the same plus :math:`\rho^{-1}(I - UU^\top)` on the rest of the space
                     (``beam_influence.core.complement``).
``ideal_complement`` the complement on the ideal top-k eigenvectors (dense Hessian, or a converged
                     reference Arnoldi where it does not fit): the target of ``arnoldi_complement``.
``arnoldi_kfac``     the same top-k term plus a Kronecker-factored (EK-FAC) curvature on the complement of U
                     (``beam_influence.core.kfac``; the defaults of ``beam_influence.pairwise_scores``);
                     ``arnoldi_kfac_residual`` / ``arnoldi_kfac_additive``: the same with that composition
                     (docs/complement.md).
``ekfac``, ``kfac``  the factored curvature alone (k = 0): EK-FAC / K-FAC from per-example gradients, the
                     peers' method (George et al. 2018; Grosse et al. 2023), as implemented here.
``exact``            dense Hessian (p HVPs), ``eigh``, :math:`H^{-1}` (small models only).
``cg``               conjugate gradients on :math:`(H + \delta I)x = \nabla\ell(z_{test})` with HVPs,
                     one system per test example (solved as a block), to a relative tolerance.
``lissa``            the LiSSA recursion :math:`h_j = v + (I - (H+\delta I)/s)h_{j-1}`,
                     :math:`H^{-1}v \approx h_J/s` (Agarwal et al. 2017; Koh & Liang 2017).
``tracin``           gradient dot product :math:`\langle\nabla\ell(z_{test}), \nabla\ell(z_{train})\rangle`
                     at the final checkpoint (TracIn with one checkpoint; :math:`H = I`).
==================== ===========================================================================

Per-example gradients come from ``jax.vmap(jax.grad(spec.loss))``; training gradients are only
ever contracted with a few vectors, leaf by leaf and batch by batch
(``beam_influence.evaluation.gradients``).

Example::

    task = Task(spec, params, train_batch, test_batch)
    m = make_method("arnoldi_complement", top_k=50, num_iters=200).fit(task)
    scores = m.scores()                 # [N_train, Q]
    self_inf = m.self_influence()       # [N_train]
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from beam_influence.core.curvature import hvp_fn, num_params
from beam_influence.core.estimate import treat_eigenvalues
from beam_influence.core.model_spec import ModelSpec
from beam_influence.core.projection import unflatten_eigvecs
from beam_influence.core.types import Example, Params
from beam_influence.evaluation import METHOD_NAMES
from beam_influence.core import complement as _complement
from beam_influence.evaluation.gradients import (DEFAULT_BATCH_SIZE, flat_grads, grad_sq_norms, gradient_dots,
                                                 num_examples, take)


# ---- the task --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
    """A trained model and its data: what every method is fitted on.

    Attributes:
      spec: the model spec (``loss`` and ``batch_loss``).
      params: the trained parameters θ.
      train: ``[N, ...]`` decoded training examples (the objective whose Hessian is inverted).
      test: ``[Q, ...]`` decoded test examples (the queries).
      batch_size: training examples per jitted gradient pass.
      curvature_batch_size: examples per Hessian-vector product; None = the whole training set.
      progress: show progress bars in long loops (dense Hessian, Arnoldi).
    """

    spec: ModelSpec
    params: Params
    train: Example
    test: Example
    batch_size: int = DEFAULT_BATCH_SIZE
    curvature_batch_size: int | None = None
    progress: bool = False

    @property
    def n_train(self) -> int:
        return num_examples(self.train)

    @property
    def n_test(self) -> int:
        return num_examples(self.test)

    @property
    def num_params(self) -> int:
        return num_params(self.params)

    @functools.cached_property
    def test_grads(self) -> np.ndarray:
        """``[Q, p]`` float32 test gradients (Q is small)."""
        return flat_grads(self.spec.loss, self.params, self.test)

    @functools.cached_property
    def matmat(self) -> Callable[[np.ndarray, Example], np.ndarray]:
        """``make_matmat(spec, params)``, built (and compiled) once per task and shared by the methods."""
        return make_matmat(self.spec, self.params)

    def random_batch(self, size: int, rng: np.random.Generator) -> Example:
        """A uniform mini-batch of ``size`` training examples (one index set for every feature), on device."""
        idx = np.sort(rng.choice(self.n_train, min(size, self.n_train), replace=False))
        return {k: jnp.asarray(v) for k, v in take(self.train, idx).items()}

    def dense_hessian(self, seed: int = 0) -> np.ndarray:
        """``[p, p]`` dense Hessian on ``curvature_batch(seed)``, computed once per seed and shared by the
        methods that need it (``exact``, ``--eigvecs exact``, ``ideal_complement``)."""
        cache = self.__dict__.setdefault("_hessians", {})
        if seed not in cache:
            cache[seed] = dense_hessian(self.spec, self.params, self.curvature_batch(seed), matmat=self.matmat,
                                        progress=self.progress)
        return cache[seed]

    def curvature_batch(self, seed: int = 0) -> Example:
        """The batch HVPs run on: the whole training set, or a seeded sample of ``curvature_batch_size``."""
        if self.curvature_batch_size is None or self.curvature_batch_size >= self.n_train:
            return {k: jnp.asarray(v) for k, v in self.train.items()}
        return self.random_batch(self.curvature_batch_size, np.random.default_rng(seed))


# ---- curvature on blocks of vectors --------------------------------------------------------------
def make_matmat(spec: ModelSpec, params: Params, *, chunk: int = 64) -> Callable[[np.ndarray, Example], np.ndarray]:
    """``(V [C, p] float64, batch) -> H V [C, p] float64`` by vmapped HVPs, ``chunk`` vectors per call.

    A block is padded to the next power of two in [8, ``chunk``], so a handful of compilations serve
    every block size.
    """
    batched = jax.jit(jax.vmap(hvp_fn(spec, params), in_axes=(0, None)))

    def matmat(v: np.ndarray, batch: Example) -> np.ndarray:
        v = np.atleast_2d(np.asarray(v))
        c = v.shape[0]
        out = np.empty(v.shape, np.float64)
        for s in range(0, c, chunk):
            blk = v[s:s + chunk].astype(np.float32)
            size = min(chunk, max(8, 1 << (blk.shape[0] - 1).bit_length()))  # a power of two: few compilations
            pad = size - blk.shape[0]
            if pad:
                blk = np.concatenate([blk, np.zeros((pad, blk.shape[1]), np.float32)])
            out[s:s + chunk] = np.asarray(batched(jnp.asarray(blk), batch), np.float64)[: size - pad]
        return out

    return matmat


def dense_hessian(spec: ModelSpec, params: Params, batch: Example, *, chunk: int = 64,
                  progress: bool = False, matmat: Callable | None = None) -> np.ndarray:
    """``[p, p]`` float64 symmetrised Hessian of ``spec.batch_loss`` on ``batch``, column block by block.

    p HVPs, ``chunk`` at a time: memory O(p² + chunk·activations), unlike ``jax.hessian`` over the
    whole batch (O(p · activations)). ``matmat``: a ``make_matmat(spec, params)`` to reuse.
    """
    p = num_params(params)
    matmat = make_matmat(spec, params, chunk=chunk) if matmat is None else matmat
    eye = np.eye(p, dtype=np.float32)
    h = np.empty((p, p), np.float64)
    starts = range(0, p, chunk * 4)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"dense Hessian (p={p:,})", unit="block")
    for s in starts:
        h[s:s + chunk * 4] = matmat(eye[s:s + chunk * 4], batch)
    return 0.5 * (h + h.T)


@dataclasses.dataclass
class CGInfo:
    """Per-system diagnostics of ``cg_solve``: iterations, final relative residual, negative curvature met."""

    iterations: np.ndarray
    rel_residual: np.ndarray
    negative_curvature: np.ndarray


def _steps(n: int, desc: str, progress: bool):
    if not progress:
        return range(n)
    from tqdm import tqdm

    return tqdm(range(n), desc=desc, unit="step", leave=False)


def cg_solve(matmat: Callable[[np.ndarray], np.ndarray], b: np.ndarray, *, tol: float = 1e-5,
             max_iters: int = 1000, damping: float = 0.0, progress: bool = False) -> tuple[np.ndarray, CGInfo]:
    r"""Solve :math:`(A + \delta I) x_c = b_c` for every row c of ``b`` by conjugate gradients (a block of
    independent CG runs in float64; A applied with ``matmat`` to the rows still running).

    A row stops when :math:`\lVert r\rVert \le` ``tol`` :math:`\lVert b\rVert`, after ``max_iters``, or
    when it meets a direction of non-positive curvature :math:`p^\top (A+\delta I) p \le 0` (A not
    positive definite: increase ``damping``); the last iterate is returned.

    Args:
      matmat: ``[C, p] -> [C, p]`` (rows are vectors).
      b: ``[C, p]`` right-hand sides.
    Returns:
      ``(x [C, p] float64, CGInfo)``.
    """
    b = np.atleast_2d(np.asarray(b, np.float64))
    x = np.zeros_like(b)
    r = b.copy()
    d = r.copy()
    rs = np.sum(r * r, axis=1)
    bnorm2 = np.sum(b * b, axis=1)
    active = rs > (tol ** 2) * bnorm2
    iters = np.zeros(len(b), np.int64)
    negative = np.zeros(len(b), bool)
    for _ in _steps(max_iters, f"CG ({len(b)} systems)", progress):
        a = np.flatnonzero(active)
        if a.size == 0:
            break
        ad = matmat(d[a]) + damping * d[a]
        dad = np.sum(d[a] * ad, axis=1)
        bad = dad <= 0
        negative[a[bad]] = True
        ok = ~bad
        a, ad, dad = a[ok], ad[ok], dad[ok]
        alpha = rs[a] / dad
        x[a] += alpha[:, None] * d[a]
        r[a] -= alpha[:, None] * ad
        rs_new = np.sum(r[a] * r[a], axis=1)
        d[a] = r[a] + (rs_new / rs[a])[:, None] * d[a]
        rs[a] = rs_new
        iters[a] += 1
        active[:] = False
        active[a] = rs_new > (tol ** 2) * bnorm2[a]
    return x, CGInfo(iters, np.sqrt(rs / np.maximum(bnorm2, 1e-300)), negative)


def lissa_solve(matmat: Callable[[np.ndarray, int], np.ndarray], v: np.ndarray, *, scale: float, depth: int,
                damping: float = 0.0, repeats: int = 1, progress: bool = False) -> np.ndarray:
    r"""LiSSA: :math:`h_0 = v`, :math:`h_j = v + (1 - \delta/s)\,h_{j-1} - A_j h_{j-1}/s`,
    :math:`(A+\delta I)^{-1}v \approx h_J / s`, averaged over ``repeats`` runs.

    Converges when :math:`0 < \lambda + \delta < 2s` for every eigenvalue λ of A (take s above the
    largest one); the error on an eigendirection shrinks like :math:`(1-(\lambda+\delta)/s)^J`.
    A diverging recursion (non-finite iterate) stops early and returns NaN.

    Args:
      matmat: ``(V [C, p], j) -> A_j V``; j = repeat·depth + step lets a caller draw a fresh
        mini-batch per step (stochastic LiSSA) or ignore it (full batch).
      v: ``[C, p]`` right-hand sides (rows).
    """
    v = np.atleast_2d(np.asarray(v, np.float64))
    total = np.zeros_like(v)
    for rep in range(repeats):
        h = v.copy()
        for j in _steps(depth, f"LiSSA ({len(v)} vectors)", progress):
            h = v + (1.0 - damping / scale) * h - matmat(h, rep * depth + j) / scale
            if j % 50 == 49 and not np.all(np.isfinite(h)):  # diverged: stop early, the result is NaN
                return np.full_like(v, np.nan)
        total += h / scale
    return total / repeats


def power_iteration(matvec: Callable[[np.ndarray], np.ndarray], dim: int, *, num_iters: int = 30,
                    seed: int = 0) -> float:
    """Largest-magnitude eigenvalue estimate :math:`\\lambda_{max}` (Rayleigh quotient after ``num_iters``)."""
    v = np.random.default_rng(seed).standard_normal(dim)
    v /= np.linalg.norm(v)
    lam = 0.0
    for _ in range(num_iters):
        w = matvec(v)
        lam = float(v @ w)
        v = w / max(np.linalg.norm(w), 1e-300)
    return abs(lam)


# ---- the methods -----------------------------------------------------------------------------------
class InfluenceMethod:
    """Base class: ``fit(task)`` once (timed in ``fit_seconds``), then ``scores()`` and ``self_influence()``.

    ``cheap_self_influence``: self-influence of the whole training set costs about one gradient
    pass (True), or one linear solve per example (False: evaluate on a sample).
    ``info``: diagnostics (JSON-serialisable) for the report.
    """

    name = "base"
    cheap_self_influence = True

    def __init__(self):
        self.task: Task | None = None
        self.fit_seconds = float("nan")
        self.info: dict[str, Any] = {}

    def fit(self, task: Task) -> "InfluenceMethod":
        t0 = time.perf_counter()
        self.task = task
        self._extra_seconds = 0.0  # work shared with another method on the same task, counted here too
        self._fit(task)
        self.fit_seconds = time.perf_counter() - t0 + self._extra_seconds
        return self

    def _fit(self, task: Task) -> None:  # precomputation shared by scores and self-influence
        pass

    def _task(self) -> Task:
        if self.task is None:
            raise RuntimeError(f"{self.name}: call fit(task) first")
        return self.task

    def scores(self) -> np.ndarray:
        """``[N_train, Q]`` float64 influence of each training example on each test example."""
        raise NotImplementedError

    def self_influence(self, idx: np.ndarray | None = None) -> np.ndarray:
        """``[len(idx)]`` float64 self-influence τ(z, z) of training examples ``idx`` (default: all)."""
        raise NotImplementedError

    def _idx(self, idx):
        return np.arange(self._task().n_train) if idx is None else np.asarray(idx, np.int64)


class Arnoldi(InfluenceMethod):
    """Truncated influence on the top-k eigenpairs, optionally with the complement term.

    Args:
      top_k, num_iters, sample_size, fresh_batches, batch_size: as in ``EigensystemArgs`` (None = the
        library's default, so ``evaluate`` measures what users get).
      complement: add :math:`\rho^{-1}(I - UU^\top)` (see ``beam_influence.core.complement``).
      rho: the complement's scalar; default ``complement.default_rho``.
      eigvecs: ``"arnoldi"`` (default: ``compute_eigensystem`` with these arguments), ``"exact"`` (top-k
        of the dense Hessian of the whole training set: the ideal at this k; small models only) or
        ``"reference"`` (a converged Arnoldi on the whole training set, n = ``reference_iters`` with a
        float64 basis: the ideal where the dense Hessian does not fit).
      negative, damping, curvature, seed: as in ``EigensystemArgs``. The task's
        ``curvature_batch_size``, when set, is the per-product batch (``batch_size``).
    """

    name = "arnoldi"

    def __init__(self, *, top_k: int | None = None, num_iters: int | None = None, complement: bool = False,
                 rho: float | None = None, eigvecs: str = "arnoldi", negative: str = "abs", damping: float = 0.0,
                 curvature: str = "hessian", fresh_batches: bool = False, sample_size: int | None = None,
                 batch_size: int | None = None, reference_iters: int | None = None, seed: int = 0):
        super().__init__()
        if eigvecs not in ("arnoldi", "exact", "reference"):
            raise ValueError(f"eigvecs must be 'arnoldi', 'exact' or 'reference', got {eigvecs!r}")
        from beam_influence.core.estimate import EigensystemArgs

        d = EigensystemArgs()
        self.top_k = d.top_k if top_k is None else int(top_k)
        self.num_iters = max(d.num_iters, self.top_k) if num_iters is None else int(num_iters)
        self.sample_size = d.sample_size if sample_size is None else int(sample_size)
        self.complement, self.rho, self.batch_size = complement, rho, batch_size
        self.eigvecs, self.negative, self.damping = eigvecs, negative, damping
        self.curvature, self.fresh_batches, self.seed = curvature, fresh_batches, seed
        self.reference_iters = reference_iters
        if complement:
            self.name = "arnoldi_complement"

    def eigensystem_args(self, task: Task, **overrides):
        """The ``EigensystemArgs`` this method fits with on ``task`` (``overrides`` replace fields)."""
        from beam_influence.core.estimate import EigensystemArgs

        bs = self.batch_size if self.batch_size is not None else task.curvature_batch_size
        kw = dict(num_iters=min(self.num_iters, task.num_params), top_k=min(self.top_k, task.num_params),
                  batch_size=bs, fresh_batches=self.fresh_batches, sample_size=self.sample_size,
                  curvature=self.curvature, negative=self.negative, damping=self.damping, seed=self.seed)
        kw.update(overrides)
        return EigensystemArgs(**kw)

    def _fit(self, task: Task) -> None:
        if self.eigvecs in ("arnoldi", "reference"):
            from beam_influence.core.estimate import compute_eigensystem

            if self.eigvecs == "arnoldi":
                args = self.eigensystem_args(task)
            else:  # converged: the whole training set, one fixed operator, many steps, float64 basis
                n_ref = self.reference_iters or max(6 * self.top_k, 300)
                args = self.eigensystem_args(task, num_iters=min(n_ref, task.num_params), batch_size=None,
                                             fresh_batches=False, sample_size=max(task.n_train, 1),
                                             basis_dtype="float64", mass_sample=0)
            cache = task.__dict__.setdefault("_eigensystems", {})  # arnoldi and arnoldi_complement share one
            key = args.to_json()
            if key not in cache:
                t0 = time.perf_counter()
                cache[key] = (compute_eigensystem(task.spec, task.params, task.train, args, progress=task.progress),
                              time.perf_counter() - t0)
            else:  # computed by the other arnoldi method: its time still counts in this method's fit time
                self._extra_seconds = cache[key][1]
            es = cache[key][0]
            self.info["eigensystem_seconds"] = cache[key][1]
            self.eigensystem = es
            self.eigvals = np.asarray(es.eigvals, np.float64)
            tree = es.eigvecs_tree(task.params)
            from beam_influence.core.diagnostics import diagnose

            diag = diagnose(es)
            self.info.update(ritz_values=[float(x) for x in es.ritz_values],
                             residuals=[float(x) for x in es.residuals],
                             eigensystem_args={k: es.args[k] for k in ("num_iters", "top_k", "sample_size_used",
                                                                       "batch_size_used", "operator", "seed")},
                             krylov_negative=diag.krylov_negative, negative_treated=diag.negative_treated,
                             negative_unresolved_dropped=diag.negative_unresolved_dropped,
                             rel_residual_max=diag.rel_residual_max, gradient_mass=diag.gradient_mass,
                             warnings=list(diag.warnings))
        else:
            h = task.dense_hessian(self.seed)
            vals, vecs = np.linalg.eigh(h)
            order = np.argsort(-np.abs(vals) if self.negative != "drop" else -vals)
            if self.negative == "drop":
                order = order[vals[order] > 0]
            order = order[: self.top_k]
            lam = vals[order]
            self.eigvals = treat_eigenvalues(lam, negative=self.negative, damping=self.damping)
            tree = unflatten_eigvecs(vecs[:, order].T.astype(np.float32), task.params)
            self.info.update(ritz_values=[float(x) for x in lam])
        self.tree = tree
        self.k = len(self.eigvals)
        self.train_proj = gradient_dots(task.spec.loss, task.params, task.train, tree, batch_size=task.batch_size)
        self.test_proj = gradient_dots(task.spec.loss, task.params, task.test, tree, batch_size=task.batch_size)
        self.rho_used = _complement.default_rho(self.eigvals) if self.rho is None else float(self.rho)
        self.info.update(k=self.k, eigvals_min=float(np.min(self.eigvals)), eigvals_max=float(np.max(self.eigvals)),
                         rho=self.rho_used if self.complement else None)

    def scores(self) -> np.ndarray:
        from beam_influence.core.scoring import influence_scores

        task = self._task()
        if not self.complement:
            return influence_scores(self.test_proj, self.train_proj, self.eigvals)
        dots = gradient_dots(task.spec.loss, task.params, task.train, task.test_grads, batch_size=task.batch_size)
        return _complement.complement_scores(self.test_proj, self.train_proj, self.eigvals, dots, rho=self.rho_used)

    def self_influence(self, idx=None) -> np.ndarray:
        from beam_influence.core.scoring import self_influence

        task, idx = self._task(), self._idx(idx)
        if not self.complement:
            return self_influence(self.train_proj[idx], self.eigvals)
        sq = grad_sq_norms(task.spec.loss, task.params, take(task.train, idx), batch_size=task.batch_size)
        return _complement.complement_self_influence(self.train_proj[idx], self.eigvals, sq, rho=self.rho_used)


class IdealComplement(Arnoldi):
    """The complement term on the *ideal* top-k eigenvectors of the whole training set's Hessian: the
    dense Hessian's (``eigvecs="exact"``) when p ≤ ``max_exact_params``, else a converged reference
    Arnoldi (``eigvecs="reference"``). What ``arnoldi_complement`` with the library's defaults should
    reach at the same k (docs/quality.md)."""

    name = "ideal_complement"

    def __init__(self, *, max_exact_params: int = 12_000, **kw):
        kw.pop("eigvecs", None)
        super().__init__(complement=True, **kw)
        self.name = "ideal_complement"
        self.max_exact_params = int(max_exact_params)

    def _fit(self, task: Task) -> None:
        self.eigvecs = "exact" if task.num_params <= self.max_exact_params else "reference"
        self.info["eigvecs"] = self.eigvecs
        super()._fit(task)


class Exact(InfluenceMethod):
    """Dense inverse Hessian: p HVPs, ``eigh``, then :math:`H^{-1}` through all p eigenpairs.

    Args:
      damping: δ added to every eigenvalue.
      negative: ``"keep"`` (the true inverse, default) or ``"abs"`` (invert |λ|) for non-convex models.
      max_params: refuse models with more parameters (the Hessian is p² float64).
    """

    name = "exact"

    def __init__(self, *, damping: float = 0.0, negative: str = "keep", max_params: int = 12_000, seed: int = 0):
        super().__init__()
        if negative not in ("keep", "abs"):
            raise ValueError(f"negative must be 'keep' or 'abs', got {negative!r}")
        self.damping, self.negative, self.max_params, self.seed = damping, negative, max_params, seed

    def _fit(self, task: Task) -> None:
        p = task.num_params
        if p > self.max_params:
            raise ValueError(f"exact influence needs a dense [p, p] Hessian; p = {p:,} > max_params = "
                             f"{self.max_params:,}. Use arnoldi/cg/lissa, or raise max_params if it fits in memory")
        h = task.dense_hessian(self.seed)
        vals, vecs = np.linalg.eigh(h)
        lam = treat_eigenvalues(vals, negative=self.negative, damping=self.damping)
        if np.any(lam == 0):
            raise ValueError("the Hessian is singular; pass damping > 0")
        self.eigvals, self.vecs = lam, vecs  # [p], [p, p] columns
        self.info.update(num_negative=int(np.sum(vals < 0)), eig_min=float(vals.min()), eig_max=float(vals.max()))

    def scores(self) -> np.ndarray:
        task = self._task()
        x = (task.test_grads.astype(np.float64) @ self.vecs / self.eigvals) @ self.vecs.T  # [Q, p] = H^{-1} g_test
        return gradient_dots(task.spec.loss, task.params, task.train, x.astype(np.float32), batch_size=task.batch_size)

    def self_influence(self, idx=None) -> np.ndarray:
        task, idx = self._task(), self._idx(idx)
        proj = gradient_dots(task.spec.loss, task.params, take(task.train, idx), self.vecs.T.astype(np.float32),
                             batch_size=min(task.batch_size, 64))
        return np.sum(proj * proj / self.eigvals, axis=1)


class _IterativeSolver(InfluenceMethod):
    """Shared by CG and LiSSA: ``_solve(rhs [C, p]) -> (H + δI)^{-1} rhs``, scores through one gradient pass."""

    cheap_self_influence = False

    def __init__(self, *, self_chunk: int = 256, seed: int = 0):
        super().__init__()
        self.self_chunk, self.seed = self_chunk, seed

    def _fit(self, task: Task) -> None:
        self.matmat_raw = task.matmat
        self.batch = task.curvature_batch(self.seed)

    def _solve(self, rhs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def scores(self) -> np.ndarray:
        task = self._task()
        x = self._solve(task.test_grads)
        return gradient_dots(task.spec.loss, task.params, task.train, x.astype(np.float32), batch_size=task.batch_size)

    def self_influence(self, idx=None) -> np.ndarray:
        task, idx = self._task(), self._idx(idx)
        out = np.empty(len(idx), np.float64)
        for s in range(0, len(idx), self.self_chunk):
            g = flat_grads(task.spec.loss, task.params, take(task.train, idx[s:s + self.self_chunk])).astype(np.float64)
            out[s:s + len(g)] = np.sum(g * self._solve(g), axis=1)
        return out


class CG(_IterativeSolver):
    """Conjugate gradients per test gradient on :math:`(H + \\delta I)`, to a relative tolerance.

    Args:
      tol: stop when ‖r‖ ≤ tol ‖b‖.
      max_iters: HVPs per system at most.
      damping: δ (needed when H is indefinite: CG stops at the first negative-curvature direction).
    """

    name = "cg"

    def __init__(self, *, tol: float = 1e-5, max_iters: int = 500, damping: float = 0.0, **kw):
        super().__init__(**kw)
        self.tol, self.max_iters, self.damping = tol, max_iters, damping
        self.info.update(iterations=[], max_rel_residual=0.0, negative_curvature=0)

    def _solve(self, rhs):
        x, info = cg_solve(lambda v: self.matmat_raw(v, self.batch), rhs, tol=self.tol, max_iters=self.max_iters,
                           damping=self.damping, progress=self._task().progress)
        self.info["iterations"].append(int(info.iterations.max()))
        self.info["max_rel_residual"] = max(self.info["max_rel_residual"], float(info.rel_residual.max()))
        self.info["negative_curvature"] += int(info.negative_curvature.sum())
        return x


class LiSSA(_IterativeSolver):
    """LiSSA recursion (Agarwal, Bullins, Hazan 2017; as used by Koh & Liang 2017).

    Args:
      depth: J recursion steps (one HVP per vector each).
      scale: s; default 1.25 × λ_max estimated by power iteration on the task's curvature batch.
      damping: δ.
      repeats: independent runs averaged (they differ only with stochastic mini-batches).
      batch_size: examples per HVP: None = the task's curvature batch (deterministic), else a fresh
        seeded mini-batch per step (stochastic LiSSA).
    """

    name = "lissa"

    def __init__(self, *, depth: int = 1000, scale: float | None = None, damping: float = 0.0, repeats: int = 1,
                 batch_size: int | None = None, **kw):
        super().__init__(**kw)
        self.depth, self.scale, self.damping, self.repeats, self.batch_size = depth, scale, damping, repeats, batch_size

    def _fit(self, task: Task) -> None:
        super()._fit(task)
        if self.scale is None:
            lam_max = power_iteration(lambda v: self.matmat_raw(v[None], self.batch)[0], task.num_params,
                                      seed=self.seed)
            self.scale_used = 1.25 * (lam_max + self.damping)
        else:
            self.scale_used = float(self.scale)
        self.info.update(scale=self.scale_used, depth=self.depth, damping=self.damping)
        if self.batch_size is not None:
            rng = np.random.default_rng(self.seed)
            self._draw = lambda j: task.random_batch(self.batch_size, rng)  # a fresh mini-batch per step

    def _solve(self, rhs):
        if self.batch_size is None:
            mm = lambda v, j: self.matmat_raw(v, self.batch)  # noqa: E731
        else:
            mm = lambda v, j: self.matmat_raw(v, self._draw(j))  # noqa: E731
        x = lissa_solve(mm, rhs, scale=self.scale_used, depth=self.depth, damping=self.damping, repeats=self.repeats,
                        progress=self._task().progress)
        if not np.all(np.isfinite(x)):
            self.info["diverged"] = True  # some λ + δ outside (0, 2s): raise damping (non-convex) or scale
        return x


class TracIn(InfluenceMethod):
    """Gradient dot product at the final checkpoint: :math:`\\langle\\nabla\\ell(z_{test}),\\nabla\\ell(z_{train})\\rangle`
    (TracIn, Pruthi et al. 2020, with one checkpoint and unit step size; influence with H = I)."""

    name = "tracin"

    def scores(self) -> np.ndarray:
        task = self._task()
        return gradient_dots(task.spec.loss, task.params, task.train, task.test_grads, batch_size=task.batch_size)

    def self_influence(self, idx=None) -> np.ndarray:
        task, idx = self._task(), self._idx(idx)
        return grad_sq_norms(task.spec.loss, task.params, take(task.train, idx), batch_size=task.batch_size)


class ArnoldiKFAC(Arnoldi):
    r"""The top-k eigenspace plus a Kronecker-factored curvature on its complement (``core.kfac.Complement``).

    The curvature is fitted on the eigensystem's own fixed sample (``sample_size``, ``seed``); the options are
    ``beam_influence.api.KFACOptions`` fields (default: the library's, what ``pairwise_scores`` gives). With
    ``eigvecs="exact"`` the top-k term uses the dense Hessian's eigenvectors (the ideal at this k).
    """

    name = "arnoldi_kfac"

    def __init__(self, *, fisher: str | None = None, kind: str | None = None, kfac_damping: float | None = None,
                 relative_damping: bool | None = None, compose: str | None = None, method_name: str = "arnoldi_kfac",
                 **kw):
        kw.pop("complement", None)
        super().__init__(complement=False, **kw)
        from beam_influence.api import KFACOptions

        given = dict(fisher=fisher, kind=kind, damping=kfac_damping, relative_damping=relative_damping,
                     compose=compose)
        self.options = dataclasses.replace(KFACOptions(), **{k: v for k, v in given.items() if v is not None})
        from beam_influence.core.kfac import COMPOSITIONS

        if self.options.compose not in COMPOSITIONS:
            raise ValueError(f"compose must be one of {COMPOSITIONS}, got {self.options.compose!r}")
        self.name = method_name

    def _fit(self, task: Task) -> None:
        from beam_influence.core import kfac
        from beam_influence.core.projection import flatten_eigvecs

        super()._fit(task)
        curv, secs, cached = _curvature(task, self.options, self.sample_size, self.seed)
        if cached:  # fitted by another method on this task: its time counts here too
            self._extra_seconds += secs
        u = flatten_eigvecs(self.tree).astype(np.float64)
        scale = float(np.min(np.abs(self.eigvals)))
        damping = self.options.damping * scale if self.options.relative_damping else self.options.damping
        self.comp = kfac.Complement(curv, u, damping=damping, kind=self.options.kind, compose=self.options.compose)
        self.info.update(kfac=dataclasses.asdict(self.options), kfac_damping_used=damping, kfac_fit_seconds=secs,
                         kfac_fisher=curv.fisher)

    def scores(self) -> np.ndarray:
        from beam_influence.core.scoring import influence_scores

        task = self._task()
        w = self.comp.vectors(task.test_grads).astype(np.float32)
        comp = gradient_dots(task.spec.loss, task.params, task.train, w, batch_size=task.batch_size)
        return influence_scores(self.test_proj, self.train_proj, self.eigvals) + comp

    def self_influence(self, idx=None) -> np.ndarray:
        from beam_influence.core.scoring import self_influence

        task, idx = self._task(), self._idx(idx)
        return self_influence(self.train_proj[idx], self.eigvals) + \
            self.comp.self_terms(task.spec.loss, task.params, take(task.train, idx))


class KFAC(InfluenceMethod):
    r"""K-FAC / EK-FAC alone (k = 0): :math:`\langle g, (C + (l_2+\delta)I)^{-1} g'\rangle` with the factored
    curvature of ``core.kfac`` fitted on the fixed sample (``sample_size``, ``seed``) of the training set.

    Args:
      kind: ``"ekfac"`` (method ``ekfac``) or ``"kfac"`` (method ``kfac``).
      fisher: ``"auto"`` (GGN where the spec allows), ``"ggn"`` or ``"empirical"``.
      damping: δ; ``relative_damping``: δ = damping × the mean factored eigenvalue (kronfluence's heuristic).
    """

    name = "ekfac"

    def __init__(self, *, kind: str = "ekfac", fisher: str = "auto", damping: float = 0.0,
                 relative_damping: bool = False, sample_size: int | None = None, seed: int = 0):
        super().__init__()
        from beam_influence.api import KFACOptions
        from beam_influence.core.estimate import EigensystemArgs

        self.options = KFACOptions(fisher=fisher, kind=kind, damping=damping, relative_damping=relative_damping)
        self.sample_size = EigensystemArgs().sample_size if sample_size is None else int(sample_size)
        self.seed = seed
        self.name = kind

    def _fit(self, task: Task) -> None:
        from beam_influence.core import kfac

        curv, secs, cached = _curvature(task, self.options, self.sample_size, self.seed)
        if cached:  # fitted by another method on this task: its time counts here too
            self._extra_seconds += secs
        lams = curv.eigenvalues(self.options.kind)
        scale = float(sum(np.sum(x) for x in lams) / sum(np.size(x) for x in lams))
        damping = self.options.damping * scale if self.options.relative_damping else self.options.damping
        self.comp = kfac.Complement(curv, np.zeros((0, curv.num_params)), damping=damping, kind=self.options.kind)
        self.info.update(kfac=dataclasses.asdict(self.options), damping_used=damping, kfac_fit_seconds=secs,
                         kfac_fisher=curv.fisher)

    def scores(self) -> np.ndarray:
        task = self._task()
        w = self.comp.vectors(task.test_grads).astype(np.float32)
        return gradient_dots(task.spec.loss, task.params, task.train, w, batch_size=task.batch_size)

    def self_influence(self, idx=None) -> np.ndarray:
        task, idx = self._task(), self._idx(idx)
        return self.comp.self_terms(task.spec.loss, task.params, take(task.train, idx))


def _curvature(task: Task, options, sample_size: int, seed: int):
    """The ``KroneckerCurvature`` of ``task`` on its fixed sample, fitted once per (fisher, sample) and shared by
    the methods; ``(curvature, fit seconds, cached)`` (cached: fitted by another method on this task, whose fit
    seconds the caller still counts, as the eigensystem's are)."""
    from beam_influence.api import resolve_fisher
    from beam_influence.core import kfac

    fisher = resolve_fisher(task.spec, options.fisher, task.params)
    key = (fisher, sample_size, seed, options.micro_batch, options.max_factor_dim)
    cache = task.__dict__.setdefault("_kfac", {})
    if key not in cache:
        t0 = time.perf_counter()
        sample = kfac.fixed_sample(task.train, sample_size, seed)
        cache[key] = (kfac.fit(task.spec, task.params, sample, fisher=fisher, ekfac=True,
                               micro_batch=options.micro_batch, max_factor_dim=options.max_factor_dim),
                      time.perf_counter() - t0)
        return cache[key] + (False,)
    return cache[key] + (True,)


def make_method(name: str, **options: Any) -> InfluenceMethod:
    """Build a method by name (``METHOD_NAMES``); options are its keyword arguments.

    ``arnoldi`` and ``arnoldi_complement`` share ``Arnoldi`` (complement False / True).
    """
    if name == "arnoldi":
        return Arnoldi(complement=False, **options)
    if name == "arnoldi_complement":
        return Arnoldi(complement=True, **options)
    if name == "ideal_complement":
        return IdealComplement(**options)
    if name == "arnoldi_kfac":
        return ArnoldiKFAC(**options)
    if name.startswith("arnoldi_kfac_"):  # arnoldi_kfac_residual / _schur / _additive: that composition
        return ArnoldiKFAC(**dict(options, compose=name[len("arnoldi_kfac_"):]), method_name=name)
    if name in ("ekfac", "kfac"):
        return KFAC(kind=name, **options)
    classes = {"exact": Exact, "cg": CG, "lissa": LiSSA, "tracin": TracIn}
    if name not in classes:
        names = dict.fromkeys(METHOD_NAMES)
        raise ValueError(f"unknown influence method {name!r}; choose from {', '.join(names)}")
    return classes[name](**options)


def influence_fn(name: str, task: Task, **options: Any) -> np.ndarray:
    """Functional form: ``[N_train, Q]`` scores of method ``name`` on ``task``."""
    return make_method(name, **options).fit(task).scores()


__all__ = ["METHOD_NAMES", "Task", "InfluenceMethod", "Arnoldi", "ArnoldiKFAC", "KFAC", "IdealComplement", "Exact", "CG", "LiSSA", "TracIn", "make_method",
           "influence_fn", "cg_solve", "lissa_solve", "dense_hessian", "make_matmat", "power_iteration"]
