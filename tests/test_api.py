"""The in-memory API (beam_influence.pairwise_scores / self_influence_scores): the scalar complement equals the
existing scoring path, the K-FAC complement's pairwise diagonal equals its self-influence, defaults are used."""
import numpy as np
import pytest

import beam_influence as bi
from beam_influence.core.complement import complement_scores, complement_self_influence
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.core.projection import make_projector
from beam_influence.evaluation.gradients import flat_grads, gradient_dots
from beam_influence.models import digits


@pytest.fixture(scope="module")
def small():
    spec = digits.mlp(hidden=8)
    rng = np.random.default_rng(0)
    train = {"x": rng.random((120, 64)).astype(np.float32), "y": rng.integers(0, 10, 120).astype(np.int32)}
    test = {"x": rng.random((7, 64)).astype(np.float32), "y": rng.integers(0, 10, 7).astype(np.int32)}
    from beam_influence.train import train as fit

    params = fit(spec, train, steps=200, learning_rate=1e-2, seed=0)
    es = compute_eigensystem(spec, params, train, EigensystemArgs(top_k=10, num_iters=30))
    return spec, params, train, test, es


def test_scalar_complement_equals_the_existing_scoring_path(small):
    spec, params, train, test, es = small
    got = bi.pairwise_scores(spec, params, train, test, es, complement="scalar")
    proj = make_projector(spec.loss, es.eigvecs_tree(params), micro_batch=16)
    p_train, p_test = np.asarray(proj(params, train).projections), np.asarray(proj(params, test).projections)
    dots = gradient_dots(spec.loss, params, train, flat_grads(spec.loss, params, test))
    want = complement_scores(p_test, p_train, es.eigvals, dots)
    assert got.shape == (120, 7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    si = bi.self_influence_scores(spec, params, train, es, complement="scalar")
    out = proj(params, train)
    np.testing.assert_allclose(si, complement_self_influence(np.asarray(out.projections), es.eigvals,
                                                             np.asarray(out.grad_sq_norms)), rtol=1e-3)
    none = bi.pairwise_scores(spec, params, train, test, es, complement="none")
    np.testing.assert_allclose(none, bi.influence_scores(p_test, p_train, es.eigvals), rtol=1e-4,
                               atol=1e-4 * np.abs(none).max())


@pytest.mark.parametrize("eigensystem", ["es", False])
def test_kfac_pairwise_diagonal_is_the_self_influence(small, eigensystem):
    spec, params, train, test, es = small
    es = es if eigensystem == "es" else False
    rows = {k: v[:9] for k, v in train.items()}
    pair, det = bi.pairwise_scores(spec, params, train, rows, es, return_details=True)
    si = bi.self_influence_scores(spec, params, train, es, examples=rows, curvature=det["complement"].curvature)
    np.testing.assert_allclose(si, np.diag(pair[:9]), rtol=2e-3)
    assert det["complement"].compose == bi.KFACOptions().compose


def test_defaults_compute_the_default_eigensystem(small, monkeypatch):
    spec, params, train, test, _ = small
    import beam_influence.api as api

    seen = {}
    real = api.default_eigensystem

    def spy(spec, params, train, args=None, **kw):
        seen["args"] = args
        return real(spec, params, train, EigensystemArgs(top_k=5, num_iters=15))

    monkeypatch.setattr(api, "default_eigensystem", spy)
    out = bi.pairwise_scores(spec, params, train, test)
    assert seen["args"] is None and out.shape == (120, 7) and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="complement"):
        bi.pairwise_scores(spec, params, train, test, False, complement="scalar")


def test_evaluate_methods_give_the_api_scores(small):
    from beam_influence.evaluation.methods import Task, make_method

    spec, params, train, test, es = small
    task = Task(spec, params, train, test)
    m = make_method("arnoldi_kfac", top_k=10, num_iters=30).fit(task)
    np.testing.assert_allclose(m.scores(), bi.pairwise_scores(spec, params, train, test, es), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m.self_influence(np.arange(5)),
                               bi.self_influence_scores(spec, params, train, es)[:5], rtol=1e-4)
    e = make_method("ekfac", damping=1e-3).fit(task)
    want = bi.pairwise_scores(spec, params, train, test, False, damping=1e-3, relative_damping=False)
    np.testing.assert_allclose(e.scores(), want, rtol=1e-4, atol=1e-6)
