"""Curvature products against dense ground truth on tiny models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from beam_influence.core.curvature import BatchSource, ggn_vp_fn, hvp_fn, make_matvec
from beam_influence.models import digits


@pytest.fixture(scope="module")
def tiny():
    spec = digits.mlp(hidden=6, l2=1e-2)
    d = digits.load_digits(seed=1)
    batch = spec.stack([spec.decode(r) for r in d.train[:32]])
    params = spec.init(3)
    return spec, params, {k: jnp.asarray(v) for k, v in batch.items()}


def test_hvp_equals_dense_hessian(tiny):
    spec, params, batch = tiny
    flat, unravel = ravel_pytree(params)
    dense = jax.jit(jax.hessian(lambda f: spec.batch_loss(unravel(f), batch)))(flat)
    v = jax.random.normal(jax.random.PRNGKey(0), flat.shape)
    np.testing.assert_allclose(hvp_fn(spec, params)(v, batch), dense @ v, rtol=2e-4, atol=1e-5)


def test_ggn_equals_dense_jt_hout_j(tiny):
    spec, params, batch = tiny
    flat, unravel = ravel_pytree(params)
    p = flat.size

    @jax.jit
    def one(ex):
        j = jax.jacfwd(lambda f: spec.apply(unravel(f), ex))(flat)  # [10, p]
        h_out = jax.hessian(lambda o: spec.output_loss(o, ex))(spec.apply(params, ex))  # [10, 10]
        return j.T @ h_out @ j

    g = np.asarray(jax.vmap(one)(batch), np.float64).mean(0) + spec.l2 * np.eye(p)
    v = np.asarray(jax.random.normal(jax.random.PRNGKey(1), flat.shape))
    np.testing.assert_allclose(ggn_vp_fn(spec, params)(jnp.asarray(v), batch), g @ v, rtol=2e-4, atol=1e-5)
    # positive semi-definite (with the l2 term: ≥ l2)
    assert np.linalg.eigvalsh(g).min() >= spec.l2 - 1e-6


def test_ggn_needs_apply_and_output_loss(tiny):
    import dataclasses

    spec, params, _ = tiny
    bare = dataclasses.replace(spec, apply=None)
    with pytest.raises(ValueError, match="apply"):
        ggn_vp_fn(bare, params)


def test_batch_source_fresh_vs_fixed(tiny):
    _, _, batch = tiny
    data = {k: np.asarray(v) for k, v in batch.items()}
    fixed = iter(BatchSource(data, batch_size=8, fresh=False, seed=0))
    a, b = next(fixed), next(fixed)
    np.testing.assert_array_equal(a["x"], b["x"])
    fresh = iter(BatchSource(data, batch_size=8, fresh=True, seed=0))
    c, d = next(fresh), next(fresh)
    assert not np.array_equal(c["x"], d["x"])
    again = iter(BatchSource(data, batch_size=8, fresh=True, seed=0))
    np.testing.assert_array_equal(next(again)["x"], c["x"])  # deterministic for a seed


def test_host_matvec_is_float64_numpy(tiny):
    spec, params, batch = tiny
    data = {k: np.asarray(v) for k, v in batch.items()}
    mv = make_matvec(spec, params, BatchSource(data, batch_size=32, fresh=False))
    flat, _ = ravel_pytree(params)
    out = mv(np.ones(flat.size))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (flat.size,)


# ---- micro-batched products (CurvatureOperator) ----------------------------------------------------
from beam_influence.core import exact  # noqa: E402
from beam_influence.core.curvature import CurvatureOperator  # noqa: E402
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem  # noqa: E402

M = 30  # sample size: not a multiple of 7, so the last micro-batch is padded


@pytest.fixture(scope="module", params=["logreg", "mlp"])
def sample(request):
    spec = digits.logreg(l2=1e-2) if request.param == "logreg" else digits.mlp(hidden=6, l2=1e-2)
    d = digits.load_digits(seed=2)
    host = spec.stack([spec.decode(r) for r in d.train[:M]])  # numpy, on the host
    params = spec.init(4)
    flat, _ = ravel_pytree(params)
    v = np.random.default_rng(5).standard_normal(flat.size)
    return spec, params, host, v


def _dense_ggn(spec, params, batch):
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def one(ex):
        j = jax.jacfwd(lambda f: spec.apply(unravel(f), ex))(flat)
        h_out = jax.hessian(lambda o: spec.output_loss(o, ex))(spec.apply(params, ex))
        return j.T @ h_out @ j

    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return np.asarray(jax.vmap(one)(batch), np.float64).mean(0) + spec.l2 * np.eye(flat.size)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("micro_batch", [1, 7, M])
def test_micro_batched_product_equals_whole_batch_and_dense(sample, curvature, micro_batch):
    spec, params, host, v = sample
    whole = {"hessian": hvp_fn, "ggn": ggn_vp_fn}[curvature](spec, params)
    ref = np.asarray(whole(jnp.asarray(v, jnp.float32), {k: jnp.asarray(x) for k, x in host.items()}), np.float64)
    op = CurvatureOperator(spec, params, curvature=curvature, micro_batch=micro_batch)
    out = op(v, host)
    assert out.dtype == np.float64 and out.shape == v.shape
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * scale)
    dense = exact.dense_hessian(spec, params, host) if curvature == "hessian" else _dense_ggn(spec, params, host)
    np.testing.assert_allclose(out, dense @ v, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_micro_batched_step_compiles_once(sample, curvature):
    spec, params, host, v = sample
    op = CurvatureOperator(spec, params, curvature=curvature, micro_batch=7)
    op(v, host)
    assert op.trace_count == 1
    # other vectors, other samples (fresh batches, other sizes: 30, 12, 3 rows) reuse the one compiled step
    op(2 * v, host)
    op(v, {k: x[::-1][:12] for k, x in host.items()})
    op(v, {k: x[5:8] for k, x in host.items()})
    fresh = make_matvec(spec, params, BatchSource(host, batch_size=20, fresh=True, seed=1), operator=op)
    fresh(v), fresh(v)
    assert op.trace_count == 1, f"the micro-batch step was traced {op.trace_count} times"
    # the counter does catch a retrace: an unpadded 3-row micro-batch is a new shape
    mb, w = next(op.micro_batches({k: x[:3] for k, x in host.items()}))
    op._step(jnp.zeros(v.size, jnp.float32), op._params, jnp.asarray(v, jnp.float32),
             {k: x[:3] for k, x in mb.items()}, w[:3])
    assert op.trace_count == 2


def test_fresh_batches_are_micro_batched_too(sample):
    spec, params, host, v = sample
    src = lambda: BatchSource(host, batch_size=20, fresh=True, seed=3)  # noqa: E731
    a = make_matvec(spec, params, src(), micro_batch=6)
    b = make_matvec(spec, params, src())  # one micro-batch of 20
    assert a.operator.micro_batch == 6 and b.operator.micro_batch == 20
    for _ in range(3):  # the same fresh batches in the same order
        x, y = a(v), b(v)
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(y).max())
    assert a.operator.trace_count == 1


def test_micro_batch_is_validated(sample):
    spec, params, host, v = sample
    with pytest.raises(ValueError, match="micro_batch"):
        CurvatureOperator(spec, params, micro_batch=0)
    with pytest.raises(ValueError, match="micro_batch"):
        EigensystemArgs(micro_batch=0)
    with pytest.raises(ValueError, match="sample_size"):
        EigensystemArgs(sample_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        EigensystemArgs(batch_size=-1)


@pytest.mark.parametrize("micro_batch", [1, 7, 48])
def test_ritz_values_of_fixed_sample_match_dense_eigh(micro_batch):
    spec = digits.logreg(l2=1e-2)
    d = digits.load_digits(seed=3)
    host = spec.stack([spec.decode(r) for r in d.train[:48]])
    params = spec.init(1)
    true = np.linalg.eigvalsh(exact.dense_hessian(spec, params, host))[::-1]
    args = EigensystemArgs(num_iters=60, top_k=5, batch_size=48, fresh_batches=False, micro_batch=micro_batch,
                           sample_size=48, basis_dtype="float64", seed=2)
    es = compute_eigensystem(spec, params, host, args)
    np.testing.assert_allclose(es.ritz_values, true[:5], rtol=1e-5)
    assert es.args["micro_batch_used"] == micro_batch and es.args["sample_size_used"] == 48
    assert es.args["sample_seed"] == 2
    assert np.all(es.residuals < 1e-4 * true[0])


def test_eigensystem_subsamples_to_sample_size():
    spec = digits.logreg()
    d = digits.load_digits(seed=3)
    host = spec.stack([spec.decode(r) for r in d.train[:100]])
    args = EigensystemArgs(num_iters=5, top_k=2, batch_size=16, micro_batch=8, sample_size=40, residuals=False)
    es = compute_eigensystem(spec, spec.init(0), host, args, sample_info={"sample_records_read": 100})
    assert es.args["sample_size_used"] == 40 and es.args["sample_size"] == 40
    assert es.args["sample_records_read"] == 100 and es.args["micro_batch"] == 8
