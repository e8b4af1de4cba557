"""Arnoldi iteration with full re-orthogonalisation, and distillation to the top Ritz pairs.

The operator is any ``matvec(v: [p]) -> [p]`` (e.g. a Hessian-vector product that runs on the
accelerator) or a dense matrix. Where the Krylov basis Q, (n+1)·p floats, lives is the ``basis`` option:

* ``"device"``: Q is one ``[n+1, p]`` array in accelerator memory; both Gram-Schmidt passes run there
  (one jitted step, Q donated and updated in place), and only the Hessenberg scalars of each step
  (j+1 coefficients, ‖w‖) come to the host. The operator is applied to device vectors (a matvec with
  an ``on_device`` attribute, e.g. ``curvature.make_matvec``, keeps the whole step on the device).
* ``"host"``: Q in host RAM (numpy); the products go through float32 BLAS.
* ``"mmap"``: Q is a memory-mapped ``.npy`` file at ``basis_path`` (for p·n beyond RAM).
* ``"auto"`` (default): ``"device"`` when (n+1)·p floats fit in the free memory of the accelerator
  beside what it already holds (the model) with room left for the operator (``choose_basis``), else
  ``"mmap"`` when a ``basis_path`` is given, else ``"host"``. Backends that report no memory
  statistics (the CPU) get the host basis.

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

from typing import Any, Callable, Literal, NamedTuple

import numpy as np

from beam_influence.core.memory import device_memory

Matvec = Callable[[np.ndarray], np.ndarray]
Order = Literal["magnitude", "positive"]

Basis = Literal["auto", "device", "host", "mmap"]
BASES = ("auto", "device", "host", "mmap")
DEVICE_BLOCK = 16  # basis rows per block of the device Gram-Schmidt (each pass reads ⌈(j+1)/16⌉ blocks)


class ArnoldiResult(NamedTuple):
    """State after the iteration.

    Attributes:
      basis: Q, [m+1, p] (row j = q_j); only the first ``num_steps`` rows span the Krylov space used.
      hessenberg: \\tilde H, [m+1, m] (float64).
      num_steps: m, the number of completed steps (< requested after a breakdown).
      breakdown: True when the Krylov space became invariant (‖w‖ ≈ 0) and the iteration stopped early.
      basis_kind: where ``basis`` lives: ``"host"`` (numpy), ``"mmap"`` (``np.memmap``) or ``"device"``
        (a ``jax.Array`` in accelerator memory; ``distill`` maps Ritz vectors back there).
    """

    basis: Any
    hessenberg: np.ndarray
    num_steps: int
    breakdown: bool
    basis_kind: str = "host"


def _as_matvec(op: Matvec | np.ndarray) -> tuple[Matvec, int | None]:
    if callable(op):
        return op, None
    mat = np.asarray(op)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"arnoldi needs a square matrix or a matvec callable, got an array of shape {mat.shape}")
    return (lambda v: mat @ v), mat.shape[0]


def basis_bytes(num_iters: int, dim: int, dtype=np.float32) -> int:
    """Bytes of the Krylov basis Q: (n+1)·p entries of ``dtype``."""
    return (int(num_iters) + 1) * int(dim) * np.dtype(dtype).itemsize


def choose_basis(
    basis: Basis = "auto",
    *,
    num_iters: int,
    dim: int,
    dtype=np.float32,
    basis_path: str | None = None,
    reserve_bytes: int | None = None,
    device=None,
) -> str:
    """Resolve ``basis`` to ``"device"``, ``"host"`` or ``"mmap"``.

    ``"auto"``: ``"device"`` when ``basis_bytes(n, p) + reserve ≤ free`` device memory (``device_memory``:
    the limit minus what is in use, i.e. beside the model already placed there), where ``reserve`` (default
    max(10 % of the limit, 8 p-vectors)) is left for the operator's own work (a Hessian-vector product's
    activations); else ``"mmap"`` when ``basis_path`` is given, else ``"host"``.
    """
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if basis == "mmap" and not basis_path:
        raise ValueError("basis='mmap' needs basis_path= (the .npy file that holds the basis)")
    if basis != "auto":
        return basis
    mem = device_memory(device)
    if mem is not None:
        need = basis_bytes(num_iters, dim, dtype)
        reserve = reserve_bytes if reserve_bytes is not None else max(mem["limit"] // 10, 8 * dim * 4)
        if need + reserve <= mem["free"]:
            return "device"
    return "mmap" if basis_path else "host"


def arnoldi(
    op: Matvec | np.ndarray,
    *,
    num_iters: int,
    dim: int | None = None,
    v0: np.ndarray | None = None,
    seed: int = 0,
    tol: float = 1e-10,
    reorthogonalize: bool = True,
    basis: Basis = "auto",
    basis_dtype=np.float32,
    basis_path: str | None = None,
    device=None,
    reserve_bytes: int | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> ArnoldiResult:
    """Run ``num_iters`` Arnoldi steps on ``op`` (matrix or matvec over flat [p] vectors).

    Args:
      op: a square matrix, or ``matvec(v) -> A v`` on vectors of length p (numpy for the host bases; for the
        device basis ``op.on_device`` when present, else ``op`` itself, is called with device arrays).
      num_iters: n, the number of operator applications (Krylov dimension).
      dim: p; needed when ``op`` is a callable and ``v0`` is not given.
      v0: start vector; default a seeded standard-normal vector (``seed``).
      tol: breakdown threshold: stop when ‖w‖ ≤ tol·‖A q_j‖ after orthogonalisation.
      reorthogonalize: two Gram-Schmidt passes (default) instead of one.
      basis: ``"auto"`` | ``"device"`` | ``"host"`` | ``"mmap"`` (module docstring; ``choose_basis``).
      basis_dtype: storage dtype of Q (float32 halves the memory; on the host the products are float64,
        on the device they are in this dtype, float64 only with ``jax_enable_x64``).
      basis_path: the memory-mapped ``.npy`` file of ``basis="mmap"`` (and of ``"auto"`` when Q does not fit
        the device).
      device: the JAX device of the device basis (default: the first local device).
      reserve_bytes: device memory ``basis="auto"`` leaves free for the operator's own work (``choose_basis``;
        default max(10 % of the device's limit, 8 p-vectors): raise it for large curvature micro-batches).
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
    kind = choose_basis(basis, num_iters=num_iters, dim=p, dtype=basis_dtype, basis_path=basis_path,
                        reserve_bytes=reserve_bytes, device=device)
    passes = 2 if reorthogonalize else 1
    if kind == "device":
        dev_op = getattr(op, "on_device", None) or (op if callable(op) else np.asarray(op))
        return _device_arnoldi(dev_op, v0, num_iters=num_iters, tol=tol, passes=passes, dtype=basis_dtype,
                               device=device, callback=callback)
    shape = (num_iters + 1, p)
    if kind == "mmap":
        basis = np.lib.format.open_memmap(basis_path, mode="w+", dtype=basis_dtype, shape=shape)
    else:
        basis = np.zeros(shape, dtype=basis_dtype)
    h = np.zeros((num_iters + 1, num_iters), np.float64)
    basis[0] = v0 / np.linalg.norm(v0)
    del v0
    # p-sized buffers besides the basis: w (float64) and one scratch vector in the basis dtype; the operator
    # gets the basis row itself (read-only view, no float64 copy) and w of the last step is freed before it
    tmp = np.empty(p, basis.dtype)
    for j in range(num_iters):
        row = basis[j].view(np.ndarray)
        row.flags.writeable = False
        w = np.asarray(matvec(row))
        del row
        if w.dtype != np.float64 or not w.flags.writeable or w.base is not None:
            w = w.astype(np.float64)  # w is updated in place below: never the operator's own buffer
        w = w.ravel()
        if w.shape != (p,):
            raise ValueError(f"matvec returned shape {w.shape}, expected ({p},)")
        if not np.all(np.isfinite(w)):
            raise FloatingPointError(f"matvec returned non-finite values at Arnoldi step {j}")
        scale = np.linalg.norm(w)
        q = basis[: j + 1]
        for _ in range(passes):
            # products in the basis dtype go to BLAS (a float32 × float64 product does not: ~9× slower);
            # H and the norms stay float64, and the second pass restores what float32 loses
            np.copyto(tmp, w, casting="same_kind")
            coeffs = np.asarray(q @ tmp, np.float64)
            np.matmul(coeffs.astype(q.dtype), q, out=tmp)
            w -= tmp
            h[: j + 1, j] += coeffs
        beta = float(np.linalg.norm(w))
        h[j + 1, j] = beta
        if callback is not None:
            callback(j + 1, beta)
        if beta <= tol * max(scale, np.finfo(float).tiny):
            return ArnoldiResult(basis, h, j + 1, True, kind)
        np.divide(w, beta, out=tmp, casting="same_kind")
        basis[j + 1] = tmp
        del w
    return ArnoldiResult(basis, h, num_iters, False, kind)


# ---- the device basis ---------------------------------------------------------------------------
def _gram_schmidt_fns(rows: int, block: int, passes: int):
    """``step(Q, w, j) -> (Q, q_next, h, beta, scale, finite)`` (to be jitted: ``_jitted_step``) for a device
    basis Q: [rows, p]. ``step`` orthogonalises w against q_0..q_j (``passes`` classical Gram-Schmidt passes, each
    reading only the ⌈(j+1)/block⌉ blocks of rows that hold them: ``lax.fori_loop`` with a traced bound, so one
    compilation serves every j), writes q_{j+1} = w/‖w‖ into row j+1 in place (Q is donated), and returns the
    j-th Hessenberg column h [rows] (zeros past j), β = ‖w‖, ‖A q_j‖ and whether A q_j was finite."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    c = min(block, rows)

    def block_at(b, j):
        start = jnp.minimum(b * c, rows - c)  # the last block is shifted back to stay in bounds ...
        idx = start + jnp.arange(c)
        return start, (idx >= b * c) & (idx <= j)  # ... and the rows an earlier block covered are masked

    def coefficients(Q, w, j):
        def body(b, h):
            start, keep = block_at(b, j)
            blk = lax.dynamic_slice_in_dim(Q, start, c, axis=0)
            hb = jnp.where(keep, jnp.matmul(blk, w, preferred_element_type=w.dtype), 0)
            return lax.dynamic_update_slice_in_dim(h, lax.dynamic_slice_in_dim(h, start, c) + hb, start, axis=0)

        return lax.fori_loop(0, j // c + 1, body, jnp.zeros(rows, w.dtype))

    def subtract(Q, w, h, j):
        def body(b, w):
            start, keep = block_at(b, j)
            blk = lax.dynamic_slice_in_dim(Q, start, c, axis=0)
            hb = jnp.where(keep, lax.dynamic_slice_in_dim(h, start, c), 0).astype(Q.dtype)
            return w - jnp.matmul(hb, blk, preferred_element_type=w.dtype)

        return lax.fori_loop(0, j // c + 1, body, w)

    def step(Q, w, j):
        w = w.astype(Q.dtype)
        finite = jnp.all(jnp.isfinite(w))
        scale = jnp.linalg.norm(w)
        h_total = jnp.zeros(rows, w.dtype)
        for _ in range(passes):
            h = coefficients(Q, w, j)
            w = subtract(Q, w, h, j)
            h_total = h_total + h
        beta = jnp.linalg.norm(w)
        q_next = w / jnp.where(beta > 0, beta, 1)
        Q = lax.dynamic_update_slice_in_dim(Q, q_next[None], j + 1, axis=0)
        return Q, q_next, h_total, beta, scale, finite

    return step


def _jitted_step(rows: int, block: int, passes: int, *, donate: bool):
    """The jitted Gram-Schmidt step; with ``donate`` Q's buffer is donated and aliased to the returned Q, so the
    basis is updated in place (one [rows, p] buffer on the device, never two). Not donated on the CPU backend."""
    import jax

    return jax.jit(_gram_schmidt_fns(rows, block, passes), donate_argnums=(0,) if donate else ())


def _device_arnoldi(op, v0: np.ndarray, *, num_iters: int, tol: float, passes: int, dtype, device,
                    callback) -> ArnoldiResult:
    """``arnoldi`` with Q: [n+1, p] in device memory (see ``_gram_schmidt_fns``); only the Hessenberg scalars
    of each step are copied to the host."""
    import jax
    import jax.numpy as jnp

    dev = device or jax.local_devices()[0]
    dt = jnp.dtype(dtype)
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("a float64 device basis needs jax_enable_x64 (jax.config.update('jax_enable_x64', True)); "
                         "use basis_dtype=float32 or basis='host'")
    p, rows = v0.size, num_iters + 1
    if callable(op):
        matvec = op
    else:
        mat = jax.device_put(np.asarray(op, dt), dev)
        matvec = lambda v: mat @ v  # noqa: E731
    step = _jitted_step(rows, DEVICE_BLOCK, passes, donate=dev.platform != "cpu")
    q0 = jax.device_put((v0 / np.linalg.norm(v0)).astype(dt), dev)
    Q = jax.jit(lambda q: jnp.zeros((rows, p), dt).at[0].set(q))(q0)  # allocated once, on the device
    h = np.zeros((num_iters + 1, num_iters), np.float64)
    q = q0
    for j in range(num_iters):
        w = jnp.asarray(matvec(q))
        if w.shape != (p,):
            raise ValueError(f"matvec returned shape {w.shape}, expected ({p},)")
        w = jax.device_put(w, dev)
        Q, q, coeffs, beta, scale, finite = step(Q, w, jnp.int32(j))
        coeffs, beta, scale, finite = jax.device_get((coeffs, beta, scale, finite))  # the scalars only
        if not finite:
            raise FloatingPointError(f"matvec returned non-finite values at Arnoldi step {j}")
        h[: j + 1, j] = coeffs[: j + 1]
        h[j + 1, j] = beta = float(beta)
        if callback is not None:
            callback(j + 1, beta)
        if beta <= tol * max(float(scale), np.finfo(float).tiny):
            return ArnoldiResult(Q, h, j + 1, True, "device")
    return ArnoldiResult(Q, h, num_iters, False, "device")


def ritz_values(result: ArnoldiResult) -> np.ndarray:
    """All m Ritz values of the symmetrised H_m, largest first."""
    m = result.num_steps
    hm = result.hessenberg[:m, :m]
    return np.linalg.eigvalsh(0.5 * (hm + hm.T))[::-1].copy()


DISTILL_BLOCK_BYTES = 64 << 20  # float64 bytes of one [m, block] slab of the basis in ``distill``


def distill(
    result: ArnoldiResult,
    *,
    top_k: int,
    order: Order = "magnitude",
    overwrite_basis: bool = False,
    block_bytes: int = DISTILL_BLOCK_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k Ritz pairs of the symmetrised Hessenberg matrix.

    The Ritz vectors u_i = Q_m y_i are formed in blocks of parameters: for each block of columns
    ``[a, b)`` the ``[m, b-a]`` slab of Q is upcast to float64 (at most ``block_bytes``), multiplied by
    y and written out; the norms are accumulated in float64 over the blocks. The n·p basis is never
    copied or upcast as a whole.

    Args:
      top_k: how many pairs to keep (at most the number of completed steps).
      order: "magnitude" keeps the k largest |λ|; "positive" the k largest λ > 0.
      overwrite_basis: write the Ritz vectors into the first k rows of a host or mmap basis (in its
        dtype) and return that view: no [k, p] array besides the basis (what the eigensystem job
        does). Column block [a, b) of every row is read before it is written, so this is exact; the
        basis is no longer a Krylov basis afterwards. Ignored for a device basis.
      block_bytes: float64 bytes of one slab (bounds the working memory: ``block_bytes`` plus
        k·block float64).

    Returns:
      eigvals [k] (float64, sorted by the chosen order) and eigvecs [k, p] (unit rows): float64, or
      the basis dtype with ``overwrite_basis``.
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
    if result.basis_kind == "device":
        u = _device_ritz_vectors(result.basis, y)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        return vals[idx], u
    return vals[idx], ritz_vectors(result.basis, y, overwrite_basis=overwrite_basis, block_bytes=block_bytes)


def ritz_vectors(basis: np.ndarray, y: np.ndarray, *, overwrite_basis: bool = False,
                 block_bytes: int = DISTILL_BLOCK_BYTES) -> np.ndarray:
    """Unit rows u_i = Q_m y_i / ‖Q_m y_i‖ of a host (or memory-mapped) basis Q: [≥m, p], y: [m, k].

    Blockwise over the p columns (``distill``): float64 work per block, never an [m, p] float64 copy.
    ``overwrite_basis``: the result is ``basis[:k]`` (basis dtype), written in place."""
    m, k = y.shape
    p = basis.shape[1]
    block = max(1, int(block_bytes) // (8 * max(m, k, 1)))
    out = basis[:k] if overwrite_basis else np.empty((k, p), np.float64)
    sq = np.zeros(k, np.float64)
    yt = np.ascontiguousarray(y.T)
    for a in range(0, p, block):
        slab = np.asarray(basis[:m, a:a + block], np.float64)  # read the whole block first ...
        ub = yt @ slab  # [k, block] float64
        sq += np.einsum("ij,ij->i", ub, ub)
        out[:, a:a + block] = ub  # ... then write it (in place: rows < k of the same columns)
    inv = 1.0 / np.sqrt(sq)
    for a in range(0, p, block):
        seg = out[:, a:a + block]
        np.multiply(seg, inv[:, None], out=seg, casting="unsafe")  # the product in float64, stored in out's dtype
    return out


def _device_ritz_vectors(basis, y: np.ndarray, rows_per_copy: int = 8) -> np.ndarray:
    """u = yᵀ Q_m on the device, ``rows_per_copy`` Ritz vectors at a time (so at most that many [p] vectors
    exist beside Q there), each group copied to the host: [k, p] float64."""
    import jax
    import jax.numpy as jnp

    m, k = y.shape
    rows, p = basis.shape
    ypad = np.zeros((rows, k), np.dtype(basis.dtype))
    ypad[:m] = y  # rows past m (unused basis rows) get weight 0: no [m, p] slice of Q is made
    combine = jax.jit(lambda yy, q: jnp.matmul(yy.T, q, preferred_element_type=q.dtype))
    out = np.empty((k, p), np.float64)
    for s in range(0, k, rows_per_copy):
        block = ypad[:, s:s + rows_per_copy]
        if block.shape[1] < rows_per_copy:  # one compiled shape
            block = np.pad(block, ((0, 0), (0, rows_per_copy - block.shape[1])))
        got = np.asarray(jax.device_get(combine(block, basis)), np.float64)
        out[s:s + rows_per_copy] = got[: min(rows_per_copy, k - s)]
    return out


def residuals(matvec: Matvec | np.ndarray, eigvals: np.ndarray, eigvecs: np.ndarray) -> np.ndarray:
    """‖A u_i − λ_i u_i‖ for each Ritz pair (one more operator application each)."""
    mv, _ = _as_matvec(matvec)
    return np.array([np.linalg.norm(np.asarray(mv(u), np.float64) - lam * u) for lam, u in zip(eigvals, eigvecs)])
