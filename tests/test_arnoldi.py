"""Arnoldi on symmetric matrices with known spectra (float64, tight tolerance)."""
import numpy as np
import pytest

from beam_influence.core import arnoldi


def _sym(eigs, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T, q


@pytest.mark.parametrize("as_callable", [False, True])
def test_recovers_top_eigenvalues_and_orthonormal_basis(as_callable):
    rng = np.random.default_rng(1)
    eigs = np.concatenate([[50.0, 20.0, -15.0, 10.0, 5.0], rng.uniform(-0.5, 0.5, 95)])
    a, q = _sym(eigs)
    op = (lambda v: a @ v) if as_callable else a
    res = arnoldi.arnoldi(op, num_iters=60, dim=100, seed=3, basis_dtype=np.float64)
    assert res.num_steps == 60 and not res.breakdown
    basis = res.basis[: res.num_steps + 1]
    np.testing.assert_allclose(basis @ basis.T, np.eye(res.num_steps + 1), atol=1e-12)
    vals, vecs = arnoldi.distill(res, top_k=5)
    np.testing.assert_allclose(vals, [50.0, 20.0, -15.0, 10.0, 5.0], rtol=1e-10)
    # eigenvectors match the true ones up to sign
    for i, v in enumerate(vecs):
        assert abs(abs(v @ q[:, i]) - 1) < 1e-8
    np.testing.assert_array_less(arnoldi.residuals(a, vals, vecs), 1e-8)


def test_positive_order_skips_negative():
    a, _ = _sym(np.array([5.0, -9.0, 3.0, 1.0, 0.5, 0.1]))
    res = arnoldi.arnoldi(a, num_iters=6, basis_dtype=np.float64)
    vals, _ = arnoldi.distill(res, top_k=2, order="positive")
    np.testing.assert_allclose(vals, [5.0, 3.0], rtol=1e-10)
    vals, _ = arnoldi.distill(res, top_k=2, order="magnitude")
    np.testing.assert_allclose(vals, [-9.0, 5.0], rtol=1e-10)


def test_early_stop_on_breakdown_gives_exact_result():
    # rank-3 operator: a generic start vector has a null-space part too, so the Krylov space
    # span(v, Av, A²v, ...) is invariant after 4 steps (3 range directions + that null part)
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.standard_normal((40, 3)))
    a = u @ np.diag([4.0, 2.0, 1.0]) @ u.T
    res = arnoldi.arnoldi(a, num_iters=20, seed=0, basis_dtype=np.float64)
    assert res.breakdown and res.num_steps == 4
    vals, vecs = arnoldi.distill(res, top_k=10)
    assert len(vals) == 4 and abs(vals[3]) < 1e-12
    vals, vecs = vals[:3], vecs[:3]
    np.testing.assert_allclose(vals, [4.0, 2.0, 1.0], rtol=1e-10)
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(3), atol=1e-10)
    np.testing.assert_array_less(arnoldi.residuals(a, vals, vecs), 1e-10)


def test_reorthogonalisation_keeps_basis_orthonormal_where_one_pass_does_not():
    # a clustered, ill-conditioned spectrum: single-pass Gram-Schmidt loses orthogonality
    eigs = np.concatenate([np.logspace(6, 0, 200)])
    a, _ = _sym(eigs, seed=4)
    two = arnoldi.arnoldi(a, num_iters=120, seed=0, basis_dtype=np.float64)
    one = arnoldi.arnoldi(a, num_iters=120, seed=0, basis_dtype=np.float64, reorthogonalize=False)
    err = lambda r: np.abs(r.basis[: r.num_steps] @ r.basis[: r.num_steps].T - np.eye(r.num_steps)).max()  # noqa: E731
    assert err(two) < 1e-12
    assert err(one) > 1e3 * err(two)


def test_basis_on_disk(tmp_path):
    a, _ = _sym(np.linspace(1, 10, 30))
    res = arnoldi.arnoldi(a, num_iters=10, basis_dtype=np.float64, basis_path=str(tmp_path / "q.npy"))
    mem = arnoldi.arnoldi(a, num_iters=10, basis_dtype=np.float64)
    assert isinstance(res.basis, np.memmap)
    np.testing.assert_allclose(res.basis, mem.basis)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="square"):
        arnoldi.arnoldi(np.zeros((3, 4)), num_iters=2)
    with pytest.raises(ValueError, match="dim"):
        arnoldi.arnoldi(lambda v: v, num_iters=2)
    with pytest.raises(FloatingPointError, match="non-finite"):
        arnoldi.arnoldi(lambda v: v * np.nan, num_iters=2, dim=3)


# ---- the device basis (Gram-Schmidt on the accelerator; here the CPU backend) ------------------------
def _spectrum_100():
    rng = np.random.default_rng(1)
    eigs = np.concatenate([[50.0, 20.0, -15.0, 10.0, 5.0], rng.uniform(-0.5, 0.5, 95)])
    return _sym(eigs)


def test_device_basis_equals_host_basis_float64():
    import jax

    a, q = _spectrum_100()
    with jax.enable_x64(True):
        host = arnoldi.arnoldi(a, num_iters=60, seed=3, basis="host", basis_dtype=np.float64)
        dev = arnoldi.arnoldi(a, num_iters=60, seed=3, basis="device", basis_dtype=np.float64)
        assert dev.basis_kind == "device" and isinstance(dev.basis, jax.Array) and host.basis_kind == "host"
        assert dev.num_steps == host.num_steps == 60 and not dev.breakdown
        np.testing.assert_allclose(dev.hessenberg, host.hessenberg, rtol=0, atol=1e-11)
        np.testing.assert_allclose(np.asarray(dev.basis), host.basis, rtol=0, atol=1e-11)
        hv, hu = arnoldi.distill(host, top_k=5)
        dv, du = arnoldi.distill(dev, top_k=5)
    np.testing.assert_allclose(dv, hv, rtol=1e-12)
    np.testing.assert_allclose(du, hu, atol=1e-10)
    np.testing.assert_allclose(dv, [50.0, 20.0, -15.0, 10.0, 5.0], rtol=1e-10)
    for i, v in enumerate(du):
        assert abs(abs(v @ q[:, i]) - 1) < 1e-8


def test_device_basis_equals_host_basis_float32():
    a, _ = _spectrum_100()
    host = arnoldi.arnoldi(a, num_iters=60, seed=3, basis="host")
    dev = arnoldi.arnoldi(a, num_iters=60, seed=3, basis="device")
    hv, hu = arnoldi.distill(host, top_k=5)
    dv, du = arnoldi.distill(dev, top_k=5)
    np.testing.assert_allclose(dv, hv, rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(du * hu, axis=1)), 1.0, atol=1e-6)  # same vectors up to sign
    b = np.asarray(dev.basis[: dev.num_steps + 1], np.float64)
    np.testing.assert_allclose(b @ b.T, np.eye(dev.num_steps + 1), atol=1e-5)  # two passes keep Q orthonormal


def test_device_basis_breakdown_and_bad_operator():
    import jax

    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.standard_normal((40, 3)))
    a = u @ np.diag([4.0, 2.0, 1.0]) @ u.T
    with jax.enable_x64(True):
        res = arnoldi.arnoldi(a, num_iters=20, seed=0, basis="device", basis_dtype=np.float64)
        assert res.breakdown and res.num_steps == 4
        vals, _ = arnoldi.distill(res, top_k=3)
    np.testing.assert_allclose(vals, [4.0, 2.0, 1.0], rtol=1e-10)
    with pytest.raises(FloatingPointError, match="non-finite"):
        arnoldi.arnoldi(lambda v: v * np.nan, num_iters=2, dim=3, basis="device")
    with pytest.raises(ValueError, match="jax_enable_x64"):
        arnoldi.arnoldi(a, num_iters=2, basis="device", basis_dtype=np.float64)


def test_device_basis_block_boundaries():
    # more steps than one Gram-Schmidt block (16 rows) and a row count that is not a multiple of it:
    # the shifted last block must neither skip nor double-count a basis row
    import jax

    a, _ = _sym(np.linspace(1.0, 3.0, 50), seed=5)
    with jax.enable_x64(True):
        host = arnoldi.arnoldi(a, num_iters=37, seed=1, basis="host", basis_dtype=np.float64)
        dev = arnoldi.arnoldi(a, num_iters=37, seed=1, basis="device", basis_dtype=np.float64)
        b = np.asarray(dev.basis)
    np.testing.assert_allclose(dev.hessenberg, host.hessenberg, rtol=0, atol=1e-11)
    np.testing.assert_allclose(b @ b.T, np.eye(38), atol=1e-12)


class _FakeDevice:
    """A device whose memory statistics say what the test wants (the CPU backend reports none)."""

    platform = "gpu"

    def __init__(self, limit, in_use):
        self.stats = {"bytes_limit": limit, "bytes_in_use": in_use}

    def memory_stats(self):
        return self.stats


def test_choose_basis_auto_rule():
    p, n = 1_000_000, 99  # the basis is 100 · 1e6 · 4 bytes = 400 MB
    need = arnoldi.basis_bytes(n, p)
    assert need == 400_000_000
    roomy = _FakeDevice(limit=10**9, in_use=10**8)  # 900 MB free, reserve 100 MB
    tight = _FakeDevice(limit=10**9, in_use=550 * 10**6)  # 450 MB free: the basis fits, the reserve does not
    assert arnoldi.choose_basis("auto", num_iters=n, dim=p, device=roomy) == "device"
    assert arnoldi.choose_basis("auto", num_iters=n, dim=p, device=tight) == "host"
    assert arnoldi.choose_basis("auto", num_iters=n, dim=p, device=tight, basis_path="/tmp/q.npy") == "mmap"
    assert arnoldi.choose_basis("auto", num_iters=n, dim=p, device=tight, reserve_bytes=0) == "device"
    assert arnoldi.choose_basis("host", num_iters=n, dim=p, device=roomy) == "host"  # explicit wins
    # the CPU backend reports no memory statistics: the host basis
    assert arnoldi.device_memory() is None
    assert arnoldi.choose_basis("auto", num_iters=n, dim=p) == "host"
    with pytest.raises(ValueError, match="basis_path"):
        arnoldi.choose_basis("mmap", num_iters=n, dim=p)
    with pytest.raises(ValueError, match="basis must be"):
        arnoldi.choose_basis("gpu", num_iters=n, dim=p)


def test_device_step_updates_the_basis_in_place_when_donated():
    """On an accelerator the step donates Q: the compiled program must alias Q's buffer to the returned Q
    (else the basis would need twice its memory: 164 GiB at 110M parameters, n = 200)."""
    import jax.numpy as jnp

    lowered = arnoldi._jitted_step(41, 16, 2, donate=True).lower(
        jnp.zeros((41, 1000), jnp.float32), jnp.ones(1000, jnp.float32), jnp.int32(3))
    hlo = lowered.compile().as_text()
    assert "input_output_alias={ {0}: (0," in hlo.replace("\n", " ")
    plain = arnoldi._jitted_step(41, 16, 2, donate=False).lower(
        jnp.zeros((41, 1000), jnp.float32), jnp.ones(1000, jnp.float32), jnp.int32(3))
    assert "input_output_alias" not in plain.compile().as_text()


# ---- distill in blocks: the same Ritz vectors, never an n·p float64 copy --------------------------------
def _krylov(p=3000, n=24, seed=0):
    rng = np.random.default_rng(seed)
    d = np.linspace(1.0, 50.0, p)
    return arnoldi.arnoldi(lambda v: d * v, num_iters=n, dim=p, seed=seed, basis="host")


def test_blocked_distill_equals_one_shot_product():
    res = _krylov()
    m = res.num_steps
    hm = res.hessenberg[:m, :m]
    vals, vecs = np.linalg.eigh(0.5 * (hm + hm.T))
    idx = np.argsort(-np.abs(vals), kind="stable")[:5]
    ref = vecs[:, idx].T @ np.asarray(res.basis[:m], np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    for block_bytes in (8 * m * 7, 8 * m * 1000, 1 << 30):  # ragged last block, several blocks, one block
        got_vals, got = arnoldi.distill(res, top_k=5, block_bytes=block_bytes)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got_vals, vals[idx])
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    basis_copy = res.basis.copy()
    _, inplace = arnoldi.distill(res._replace(basis=basis_copy), top_k=5, overwrite_basis=True,
                                 block_bytes=8 * m * 7)
    assert inplace.dtype == np.float32 and np.shares_memory(inplace, basis_copy)
    np.testing.assert_allclose(inplace, ref, rtol=0, atol=2e-6)


def test_distill_peak_memory_is_blocks_not_the_upcast_basis():
    import tracemalloc

    p, n, k = 200_000, 20, 4
    res = _krylov(p=p, n=n)
    tracemalloc.start()
    try:
        arnoldi.distill(res, top_k=k, block_bytes=1 << 20)
        _, peak_copy = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        arnoldi.distill(res, top_k=k, overwrite_basis=True, block_bytes=1 << 20)
        _, peak_inplace = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the one-shot product upcast the n·p basis: 20·200k·8 = 32 MB; blocks keep k·p·8 (the output) + ~2 MB
    assert peak_copy < k * p * 8 + (4 << 20), peak_copy
    assert peak_inplace < 4 << 20, peak_inplace
