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
