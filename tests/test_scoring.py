"""Influence scores (sign convention, normalisations), exact top-k with id tie-breaking, and the dense ground truth."""
import itertools
import math

import jax
import numpy as np
import pytest

from beam_influence.core import exact, scoring
from beam_influence.models import digits
from beam_influence.core.projection import make_projector


@pytest.fixture
def proj():
    rng = np.random.default_rng(0)
    test = rng.normal(size=(3, 5))
    train = rng.normal(size=(7, 5))
    eigvals = np.array([4.0, 2.0, 1.0, 0.5, -0.25])  # a negative curvature direction is allowed
    return test, train, eigvals


def _loop(test, train, eigvals):
    out = np.zeros((len(train), len(test)))
    for b, q in itertools.product(range(len(train)), range(len(test))):
        out[b, q] = sum(test[q, i] * train[b, i] / eigvals[i] for i in range(len(eigvals)))
    return out


def test_influence_scores_equal_explicit_loop(proj):
    test, train, eigvals = proj
    got = scoring.influence_scores(test, train, eigvals)
    assert got.shape == (7, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, _loop(test, train, eigvals), rtol=1e-12, atol=1e-12)
    # float32 inputs are scored in float64
    np.testing.assert_allclose(scoring.influence_scores(test.astype(np.float32), train.astype(np.float32), eigvals),
                               _loop(test.astype(np.float32).astype(float), train.astype(np.float32).astype(float), eigvals),
                               rtol=1e-12)


def test_scores_do_not_depend_on_the_batch(proj):
    """A (train, test) score is bit-identical whichever rows it is computed with (shards, bundles)."""
    test, train, eigvals = proj
    full = scoring.influence_scores(test, train, eigvals)
    for rows in ([0], [3, 4], [6, 1, 2]):
        np.testing.assert_array_equal(scoring.influence_scores(test[1:], train[rows], eigvals), full[rows, 1:])


def test_train_norm(proj):
    test, train, eigvals = proj
    train = train.copy()
    train[4] = 0.0  # a zero gradient: guarded, scores 0
    got = scoring.influence_scores(test, train, eigvals, normalization="train_norm")
    want = _loop(test, train, eigvals)
    norms = np.linalg.norm(train, axis=1)
    keep = norms > 0
    np.testing.assert_allclose(got[keep], want[keep] / norms[keep, None], rtol=1e-12)
    np.testing.assert_array_equal(got[4], 0.0)


def test_cosine_is_symmetric_bounded_and_a_cosine(proj):
    test, train, eigvals = proj
    got = scoring.influence_scores(test, train, eigvals, normalization="cosine")
    np.testing.assert_allclose(got, scoring.influence_scores(train, test, eigvals, normalization="cosine").T,
                               rtol=1e-12)
    assert np.all(np.abs(got) <= 1 + 1e-12)
    # with positive eigenvalues: the cosine between lambda^{-1/2}-scaled projections; 1 with itself
    pos = np.abs(eigvals)
    a, b = train / np.sqrt(pos), test / np.sqrt(pos)
    want = (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(scoring.influence_scores(test, train, pos, normalization="cosine"), want, rtol=1e-10)
    np.testing.assert_allclose(np.diag(scoring.influence_scores(train, train, pos, normalization="cosine")), 1.0)
    zero = scoring.influence_scores(np.zeros((1, 5)), train, eigvals, normalization="cosine")
    np.testing.assert_array_equal(zero, 0.0)


def test_self_influence_is_the_diagonal(proj):
    _, train, eigvals = proj
    got = scoring.self_influence(train, eigvals)
    assert got.shape == (7,)
    np.testing.assert_array_equal(got, np.diag(scoring.influence_scores(train, train, eigvals)))
    assert np.all(scoring.self_influence(train, np.abs(eigvals)) >= 0)


def test_shape_and_argument_errors(proj):
    test, train, eigvals = proj
    with pytest.raises(ValueError, match=r"test \(3, 5\), train \(7, 4\)"):
        scoring.influence_scores(test, train[:, :4], eigvals)
    with pytest.raises(ValueError, match=r"eigvals \(4,\)"):
        scoring.influence_scores(test, train, eigvals[:4])
    with pytest.raises(ValueError, match="nonzero"):
        scoring.influence_scores(test, train, np.array([1.0, 0.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="normalization"):
        scoring.influence_scores(test, train, eigvals, normalization="l1")
    with pytest.raises(ValueError, match=r"scores \(4,\) and ids \(3,\)"):
        scoring.top_k(np.zeros(4), ["a", "b", "c"], 2)


def _brute(scores, ids, k, largest):
    """Sort by (score descending or ascending, id ascending), NaN last."""
    def key(i):
        s = scores[i]
        return (1, 0.0, ids[i]) if math.isnan(s) else (0, -s if largest else s, ids[i])
    return sorted(range(len(scores)), key=key)[:k]


@pytest.mark.parametrize("largest", [True, False])
def test_top_k_equals_brute_force_sort_with_ties(largest):
    rng = np.random.default_rng(1)
    for trial in range(30):
        n = int(rng.integers(1, 40))
        scores = rng.integers(-3, 4, n).astype(np.float64)  # many ties
        if trial % 3 == 0:
            scores[rng.random(n) < 0.2] = np.nan
        ids = [f"ex-{int(i)}" for i in rng.permutation(1000)[:n]]  # random, unique, not in index order
        for k in (0, 1, 3, n - 1, n, n + 5):
            k = max(k, 0)
            got = scoring.top_k(scores, ids, k, largest=largest)
            assert got.dtype == np.int64
            assert list(got) == _brute(scores, ids, k, largest), (trial, k)


def test_scores_sum_in_index_order():
    """Every score is the products accumulated in index order 0..k-1 (so one pair, rescored alone, has the
    same bits as in any batch): check against an explicit scalar loop, bit for bit."""
    rng = np.random.default_rng(5)
    test, train = rng.normal(size=(4, 11)), rng.normal(size=(6, 11)).astype(np.float32)
    eigvals = rng.uniform(0.1, 2.0, 11) * rng.choice([-1.0, 1.0], 11)
    got = scoring.influence_scores(test, train, eigvals)
    w = 1.0 / eigvals
    for b, q in itertools.product(range(6), range(4)):
        acc = (float(train[b, 0]) * w[0]) * test[q, 0]
        for i in range(1, 11):
            acc += (float(train[b, i]) * w[i]) * test[q, i]
        assert got[b, q] == acc
    np.testing.assert_array_equal(scoring.self_influence(train, eigvals),
                                  np.diag(scoring.influence_scores(train, train, eigvals)))


def test_full_eigensystem_projection_reproduces_exact_influence():
    """With all p eigenvectors of the dense Hessian, projected influence = grad_test^T H^{-1} grad_train."""
    spec = digits.logreg(l2=0.1)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape)).astype(a.dtype), jax.eval_shape(spec.init, 0))
    train = {"x": rng.uniform(0, 1, (20, 64)).astype(np.float32), "y": rng.integers(0, 10, 20).astype(np.int32)}
    test = {"x": rng.uniform(0, 1, (4, 64)).astype(np.float32), "y": rng.integers(0, 10, 4).astype(np.int32)}
    h = exact.dense_hessian(spec, params, train)
    assert h.shape == (650, 650)
    want = exact.exact_influence(spec, params, train_batch=train, test_batch=test, hessian=h)
    assert want.shape == (20, 4)
    eigvals, eigvecs = exact.dense_eigensystem(h, params)
    assert np.all(eigvals > 0) and np.all(np.diff(eigvals) <= 0)
    both = {k: np.concatenate([train[k], test[k]]) for k in train}  # one batch shape: one compilation
    p = np.asarray(make_projector(spec.loss, eigvecs)(params, both).projections)
    got = scoring.influence_scores(p[20:], p[:20], eigvals)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    # and self-influence is positive for a positive-definite Hessian
    assert np.all(scoring.self_influence(p[:20], eigvals) > 0)
