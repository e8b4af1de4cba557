"""Eigensystem diagnostics: they fire on crafted and real bad cases and stay quiet on a good one."""
import numpy as np
import pytest

from beam_influence.core.diagnostics import RESIDUAL_WARN, diagnose, gradient_mass, hutchinson_trace
from beam_influence.core.eigensystem import Eigensystem
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem


def _crafted(ritz, residuals, krylov, **args) -> Eigensystem:
    k = len(ritz)
    u = np.eye(max(k, 4), dtype=np.float32)[:k]
    used = np.abs(np.asarray(ritz, np.float64))
    return Eigensystem(eigvals=used, ritz_values=np.asarray(ritz, np.float64),
                       residuals=np.asarray(residuals, np.float64), eigvecs={"['w']": u},
                       krylov_ritz_values=np.asarray(krylov, np.float64), fingerprint="f", spec_name="s",
                       args=dict(args))


def test_crafted_bad_case_fires_every_warning():
    es = _crafted([3.0, 1.0, -0.5], [2.5, 0.01, 0.2], [3.0, 1.0, -0.5, -0.1],
                  curvature="ggn", negative="abs", negative_treated=1, negative_unresolved_dropped=2,
                  operator="fresh batches", sample_size_used=100, sample_seed=0, batch_size_used=10)
    d = diagnose(es)
    assert d.residual_comparable == 2  # 2.5/3 and 0.2/0.5 are ≥ RESIDUAL_WARN; 0.01/1 is not
    assert d.krylov_negative == 2 and d.negative_treated == 1 and d.negative_unresolved_dropped == 2
    text = "\n".join(d.warnings)
    assert "residuals" in text and "fresh batch" in text
    assert "positive semi-definite" in text  # a GGN cannot have negative eigenvalues
    assert "scored with |λ|" in text and "2 more" in text
    assert "warning:" in es.summary()
    assert d.krylov_mass == pytest.approx(4.5 / 4.6)


def test_crafted_good_case_is_quiet_and_convexity_matters():
    good = _crafted([3.0, 1.0], [1e-6, 1e-6], [3.0, 1.0, 0.1], curvature="hessian", negative="abs",
                    operator="fixed sample")
    assert diagnose(good).warnings == () and diagnose(good, convex=True).warnings == ()
    assert "warning:" not in good.summary()
    # a Hessian with negative Ritz values: only a warning when the loss is known to be convex
    nonconvex = _crafted([3.0, 1.0], [1e-6, 1e-6], [3.0, 1.0, -0.2], curvature="hessian", negative="abs",
                         operator="fixed sample")
    assert diagnose(nonconvex).warnings == ()
    assert any("convex" in w for w in diagnose(nonconvex, convex=True).warnings)


def test_residual_threshold_is_relative():
    es = _crafted([10.0, 1.0], [RESIDUAL_WARN * 10.0 * 0.99, RESIDUAL_WARN * 1.0 * 1.01], [10.0, 1.0])
    assert diagnose(es).residual_comparable == 1


def test_gradient_mass_and_hutchinson_trace():
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((20, 3)))[0].T  # [3, 20] orthonormal rows
    inside = rng.standard_normal((5, 3)) @ u  # gradients in the subspace
    assert gradient_mass(inside @ u.T, np.sum(inside ** 2, 1)) == pytest.approx(1.0)
    g = rng.standard_normal((50, 20))
    m = gradient_mass(g @ u.T, np.sum(g ** 2, 1))
    assert 0.0 < m < 0.4  # about k/p = 0.15 for isotropic gradients
    a = rng.standard_normal((20, 20))
    a = a @ a.T
    est = hutchinson_trace(lambda v: a @ v, 20, probes=400, seed=1)
    assert est == pytest.approx(np.trace(a), rel=0.1)


# ---- on a real model: the default fixed sample is quiet, fresh batches are flagged -------------------
@pytest.fixture(scope="module")
def fixed_and_fresh(logreg_trained):
    t = logreg_trained
    common = dict(num_iters=40, top_k=10, mass_sample=128)
    fixed = compute_eigensystem(t.spec, t.params, t.train_batch, EigensystemArgs(**common))
    fresh = compute_eigensystem(t.spec, t.params, t.train_batch,
                                EigensystemArgs(fresh_batches=True, batch_size=64, **common))
    return fixed, fresh


def test_default_fixed_sample_is_quiet(fixed_and_fresh):
    fixed, _ = fixed_and_fresh
    d = diagnose(fixed, convex=True)  # logistic regression: convex
    assert d.warnings == (), d.warnings
    assert d.operator == "fixed sample" and d.sample_size == fixed.args["sample_size_used"]
    assert d.rel_residual_max < 1e-3
    assert 0.5 < d.gradient_mass <= 1.0 + 1e-6  # the top-10 subspace holds most of the gradients
    assert "captured:" in fixed.summary() and "warning:" not in fixed.summary(convex=True)


def test_fresh_batches_are_flagged(fixed_and_fresh):
    _, fresh = fixed_and_fresh
    d = diagnose(fresh, convex=True)
    assert d.operator == "fresh batches" and d.warnings
    assert d.residual_comparable > 0  # each product saw another batch: the pairs are not eigenpairs
    assert "fresh" in fresh.summary(convex=True)
