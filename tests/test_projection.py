"""Projection of per-example gradients: leafwise, flat and jvp agree with a brute-force flatten(grad) @ U^T."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from beam_influence.core.exact import flat_grads
from beam_influence.models import digits
from beam_influence.core.projection import (
    METHODS,
    DeviceInfo,
    ProjectionOutput,
    choose_method,
    device_info,
    make_planned_projector,
    flatten_eigvecs,
    make_projector,
    unflatten_eigvecs,
)


def _params(spec, seed=0):
    """Random params with the structure of ``spec.init`` (its truncated-normal init compiles slowly on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(a.dtype), jax.eval_shape(spec.init, 0))


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(0, 1, (n, 64)).astype(np.float32), "y": rng.integers(0, 10, n).astype(np.int32)}


def _orthonormal(params, k, seed=0):
    """Random orthonormal U: [k, p] (QR of a random matrix) and its per-leaf [k, ...] pytree."""
    p = ravel_pytree(params)[0].size
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(p, k)))
    u = q.T.astype(np.float32)
    return u, unflatten_eigvecs(u, params)


@pytest.fixture(scope="module", params=["logreg", "cnn"])
def model(request):
    """(spec, params, eigvecs pytree, batch of 12, brute force flatten(grad) @ U^T [12, 8] float64, projector(method))."""
    spec = getattr(digits, request.param)()
    params = _params(spec)
    u_flat, eigvecs = _orthonormal(params, k=8)
    batch = _batch(12)
    want = flat_grads(spec, params, batch) @ u_flat.T.astype(np.float64)
    projectors = {}  # method -> projector, shared by the tests of this model (one compilation each)

    def projector(method):
        if method not in projectors:
            # micro_batch 5 does not divide B = 12: 3 micro-batches, the last padded with 3 copies of its last row
            projectors[method] = make_projector(spec.loss, eigvecs, method=method, micro_batch=5)
        return projectors[method]

    return spec, params, eigvecs, batch, want, projector


def test_flatten_order_matches_ravel_pytree():
    params = _params(digits.cnn())
    flat, _ = ravel_pytree(params)
    eig = jax.tree.map(lambda x: np.stack([np.asarray(x), 2 * np.asarray(x)]), params)
    u = flatten_eigvecs(eig)
    np.testing.assert_array_equal(u, np.stack([flat, 2 * flat]))
    back = unflatten_eigvecs(u, params)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(eig)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"expected \[k, "):
        unflatten_eigvecs(u[:, 1:], params)


@pytest.mark.parametrize("method", METHODS)
def test_methods_equal_brute_force(model, method):
    spec, params, _, batch, want, projector = model
    out = projector(method)(params, batch)
    assert isinstance(out, ProjectionOutput)
    assert out.projections.shape == (12, 8) and out.projections.dtype == jnp.float32
    assert out.losses.shape == (12,) and out.losses.dtype == jnp.float32
    assert out.finite.shape == (12,) and out.finite.dtype == jnp.bool_
    np.testing.assert_allclose(np.asarray(out.projections), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    losses = jax.jit(jax.vmap(spec.loss, in_axes=(None, 0)))(params, batch)
    np.testing.assert_allclose(np.asarray(out.losses), np.asarray(losses), rtol=1e-6)
    assert np.asarray(out.finite).all()


@pytest.mark.parametrize("method", METHODS)
def test_finite_flag_catches_nan_input(model, method):
    spec, params, _, batch, want, projector = model
    bad = {k: v.copy() for k, v in batch.items()}
    bad["x"][2, 5] = np.nan
    bad["x"][11, 0] = np.nan  # the last row: its copies pad the last micro-batch
    out = projector(method)(params, bad)
    expect = np.ones(12, bool)
    expect[[2, 11]] = False
    np.testing.assert_array_equal(np.asarray(out.finite), expect)
    # bad rows do not leak into their neighbours
    np.testing.assert_allclose(np.asarray(out.projections)[expect], want[expect], rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())


def test_bfloat16_contraction_accumulates_in_float32(model):
    spec, params, eigvecs, batch, want, _ = model
    out = make_projector(spec.loss, eigvecs, compute_dtype=jnp.bfloat16)(params, batch).projections
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize("method", METHODS)
def test_no_recompile_on_second_batch_of_same_shape(method):
    spec = digits.logreg()
    params = jax.device_put(_params(spec))
    _, eigvecs = _orthonormal(params, k=4)
    traces = []

    def counting_loss(p, z):
        traces.append(1)  # runs only while tracing
        return spec.loss(p, z)

    project = make_projector(counting_loss, eigvecs, method=method, micro_batch=4)
    jax.block_until_ready(project(params, _batch(8, seed=0)))
    n_traces = len(traces)
    assert n_traces > 0 and project.cache_size() == 1
    out = project(params, _batch(8, seed=1))  # new values, same shapes and dtypes
    jax.block_until_ready(out)
    assert len(traces) == n_traces, "the projector retraced on a batch of the same shape"
    assert project.cache_size() == 1, "the projector recompiled on a batch of the same shape"
    if method == "leafwise":  # a new batch shape compiles once more, as expected
        project(params, _batch(6, seed=2))
        assert project.cache_size() == 2


def test_argument_errors():
    spec = digits.logreg()
    params = _params(spec)
    _, eigvecs = _orthonormal(params, k=3)
    with pytest.raises(ValueError, match="unknown projection method"):
        make_projector(spec.loss, eigvecs, method="magic")
    with pytest.raises(ValueError, match="micro_batch"):
        make_projector(spec.loss, eigvecs, micro_batch=0)
    with pytest.raises(ValueError, match="compute_dtype"):
        make_projector(spec.loss, eigvecs, method="jvp", compute_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="empty batch"):
        make_projector(spec.loss, eigvecs)(params, _batch(0))
    wrong = jax.tree.map(lambda u: u[:, :-1], eigvecs)  # drop a column from every leaf
    with pytest.raises(ValueError, match="expected"):
        make_projector(spec.loss, wrong)(params, _batch(4))
    ragged = jax.tree.map(lambda u: u, eigvecs)
    ragged["Dense_0"]["bias"] = ragged["Dense_0"]["bias"][:2]
    with pytest.raises(ValueError, match="same k"):
        make_projector(spec.loss, ragged)


CPU = DeviceInfo("cpu", "cpu", None)
H200 = DeviceInfo("gpu", "NVIDIA H200", 135 * 2**30)


def test_choose_method():
    # CPU: leafwise below k = 64, flat from k = 64 (the CPU measurements), micro-batch min(B, 64), float32
    assert choose_method(batch_size=10, k=16, device=CPU)[:3] == ("leafwise", 10, None)
    assert choose_method(batch_size=500, k=16, device=CPU)[:3] == ("leafwise", 64, None)
    assert choose_method(batch_size=500, k=64, num_params=10**4, device=CPU)[:3] == ("flat", 64, None)
    # 1e6 params * 4 bytes * m <= 40 MB  ->  m = 10 (leafwise); flat's 12 bytes per entry do not fit at k = 128
    assert choose_method(batch_size=500, k=16, num_params=10**6, memory_budget_bytes=40 * 10**6,
                         device=CPU)[:2] == ("leafwise", 8)
    assert choose_method(batch_size=10, k=128, num_params=10**6, memory_budget_bytes=40 * 10**6,
                         device=CPU)[:2] == ("leafwise", 10)
    assert choose_method(batch_size=500, k=16, num_params=10**9, memory_budget_bytes=1,
                         device=CPU)[:2] == ("leafwise", 1)
    # an accelerator: leafwise in bf16 at the largest micro-batch (64) whose gradients fit half the free memory
    p = 109_633_538
    assert choose_method(batch_size=128, k=128, num_params=p, device=H200)[:3] == ("leafwise", 64, "bfloat16")
    l4 = DeviceInfo("gpu", "NVIDIA L4", 22 * 2**30)  # 11 GiB budget / (8 bytes * 110M) -> 12 -> power of two 8
    assert choose_method(batch_size=128, k=32, num_params=p, device=l4)[:3] == ("leafwise", 8, "bfloat16")
    # overrides win; the rule fills in the rest
    plan = choose_method(batch_size=128, k=32, num_params=p, device=H200, method="flat", compute_dtype="float32")
    assert plan[:3] == ("flat", 64, None) and "overridden: method, compute_dtype" in plan.reason
    assert choose_method(batch_size=20, k=4, device=CPU, micro_batch=50).micro_batch == 20
    with pytest.raises(ValueError):
        choose_method(batch_size=0, k=4)
    with pytest.raises(ValueError, match="unknown projection method"):
        choose_method(batch_size=4, k=4, method="fast")
    with pytest.raises(ValueError, match="jvp"):
        choose_method(batch_size=4, k=4, method="jvp", compute_dtype="bfloat16", device=CPU)
    assert device_info().platform == "cpu" and device_info().free_bytes is None


@pytest.mark.parametrize("k", [8, 64])
def test_planned_projector_agrees_and_compiles_once(k):
    """The chosen method (leafwise at k = 8, flat at k = 64 on the CPU) equals the others to float32 round-off,
    and a second batch of the same shape reuses the compiled executable."""
    spec = digits.logreg()
    params = _params(spec)
    u_flat, eigvecs = _orthonormal(params, k=k)
    b1, b2 = _batch(12, seed=1), _batch(12, seed=2)
    proj = make_planned_projector(spec.loss, eigvecs, batch_size=12, device=CPU)
    assert proj.plan.method == ("leafwise" if k < 64 else "flat") and proj.method == proj.plan.method
    assert proj.micro_batch == 12 and proj.plan.compute_dtype is None
    got1 = np.asarray(proj(params, b1).projections, np.float64)
    got2 = np.asarray(proj(params, b2).projections, np.float64)
    assert proj.cache_size() == 1, f"recompiled on the second batch: {proj.cache_size()} executables"
    for batch, got in ((b1, got1), (b2, got2)):
        want = flat_grads(spec, params, batch) @ u_flat.T.astype(np.float64)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
        for other in METHODS:
            if other != proj.method:
                alt = make_projector(spec.loss, eigvecs, method=other, micro_batch=5)
                np.testing.assert_allclose(got, np.asarray(alt(params, batch).projections), rtol=1e-4,
                                           atol=1e-5 * scale)


def test_accelerator_plan_runs_in_bf16():
    """The plan an accelerator gets (leafwise, bf16) runs here too; bf16 inputs, float32 accumulation."""
    spec = digits.logreg()
    params = _params(spec)
    u_flat, eigvecs = _orthonormal(params, k=8)
    batch = _batch(12)
    proj = make_planned_projector(spec.loss, eigvecs, batch_size=12, device=H200)
    assert proj.plan[:3] == ("leafwise", 12, "bfloat16")
    got = np.asarray(proj(params, batch).projections, np.float64)
    want = flat_grads(spec, params, batch) @ u_flat.T.astype(np.float64)
    assert np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want)  # bf16 has 8 significant bits
    proj(params, _batch(12, seed=5))
    assert proj.cache_size() == 1
