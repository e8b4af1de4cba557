"""Eigensystem computation on digits, the file format, and refusal of mismatched models."""
import dataclasses

import numpy as np
import pytest

from beam_influence.core.eigensystem import CorruptEigensystemError, Eigensystem, EigensystemMismatchError
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.core.model_spec import fingerprint


@pytest.fixture(scope="module")
def es(logreg_trained):
    t = logreg_trained
    return compute_eigensystem(t.spec, t.params, t.train_batch,
                               EigensystemArgs(num_iters=40, top_k=10, batch_size=4096, seed=1))


def test_eigensystem_matches_dense_hessian(es, logreg_trained):
    import jax
    from jax.flatten_util import ravel_pytree

    t = logreg_trained
    flat, unravel = ravel_pytree(t.params)
    h = np.asarray(jax.jit(jax.hessian(lambda f: t.spec.batch_loss(unravel(f), t.train_batch)))(flat), np.float64)
    true = np.linalg.eigvalsh(h)[::-1]
    np.testing.assert_allclose(es.ritz_values[:5], true[:5], rtol=1e-3)
    u = es.flat_eigvecs(t.params)
    np.testing.assert_allclose(u @ u.T, np.eye(es.k), atol=1e-4)
    assert np.all(es.residuals < 1e-3 * es.ritz_values[0])


def test_round_trip(es, tmp_path):
    path = str(tmp_path / "eig.safetensors")
    es.save(path)
    back = Eigensystem.load(path)
    np.testing.assert_array_equal(back.eigvals, es.eigvals)
    np.testing.assert_array_equal(back.residuals, es.residuals)
    np.testing.assert_array_equal(back.krylov_ritz_values, es.krylov_ritz_values)
    np.testing.assert_array_equal(back.ritz_values, es.ritz_values)
    assert back.fingerprint == es.fingerprint and back.args == es.args and back.id == es.id
    assert back.content_sha256 == es.content_sha256  # verified on load against the stored digest
    for key in es.eigvecs:
        np.testing.assert_array_equal(back.eigvecs[key], es.eigvecs[key])


def test_mismatched_model_is_refused(es, logreg_trained):
    t = logreg_trained
    es.check_model(fingerprint(t.spec, t.params))  # same model: fine
    other = t.spec.init(5)
    with pytest.raises(EigensystemMismatchError) as err:
        es.check_model(fingerprint(t.spec, other))
    assert es.fingerprint in str(err.value) and fingerprint(t.spec, other) in str(err.value)


def test_corrupted_file_gives_clear_error(es, tmp_path):
    raw = bytearray(es.to_bytes())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(CorruptEigensystemError, match="not a readable"):
        Eigensystem.load(str(bad))
    (tmp_path / "junk").write_bytes(b"\x00" * 64)
    with pytest.raises(CorruptEigensystemError):
        Eigensystem.load(str(tmp_path / "junk"))
    with pytest.raises(FileNotFoundError, match="cannot open"):
        Eigensystem.load(str(tmp_path / "missing.safetensors"))
    # structurally valid file, inconsistent content
    broken = dataclasses.replace(es, residuals=np.zeros(es.k + 1))
    (tmp_path / "inconsistent").write_bytes(broken.to_bytes())
    with pytest.raises(CorruptEigensystemError, match="residuals"):
        Eigensystem.load(str(tmp_path / "inconsistent"))


def test_negative_treatments_and_ggn(cnn_trained):
    t = cnn_trained
    small = {k: v[:256] for k, v in t.train_batch.items()}
    common = dict(num_iters=20, top_k=8, batch_size=256, residuals=False)
    keep = compute_eigensystem(t.spec, t.params, small, EigensystemArgs(negative="keep", **common))
    absd = compute_eigensystem(t.spec, t.params, small, EigensystemArgs(negative="abs", damping=0.5, **common))
    np.testing.assert_allclose(absd.eigvals, np.abs(absd.ritz_values) + 0.5)
    np.testing.assert_allclose(keep.eigvals, keep.ritz_values)
    drop = compute_eigensystem(t.spec, t.params, small, EigensystemArgs(negative="drop", **common))
    assert np.all(drop.eigvals > 0)
    ggn = compute_eigensystem(t.spec, t.params, small, EigensystemArgs(curvature="ggn", **common))
    assert np.all(ggn.krylov_ritz_values > 0)  # PSD + l2


def test_args_are_validated():
    with pytest.raises(ValueError, match="top_k"):
        EigensystemArgs(num_iters=5, top_k=10)
    with pytest.raises(ValueError, match="curvature"):
        EigensystemArgs(curvature="fisher")


# ---- the default operator: one fixed, seeded sample ------------------------------------------------
def test_defaults_are_a_consistent_fixed_sample():
    a = EigensystemArgs()
    assert a.fresh_batches is False and a.batch_size is None and a.sample_size >= 1024 and a.num_iters >= 2 * a.top_k
    with pytest.raises(ValueError, match="batch_size"):
        EigensystemArgs(batch_size=0)
    with pytest.raises(ValueError, match="mass_sample"):
        EigensystemArgs(mass_sample=-1)


@pytest.mark.parametrize("micro_batch", [7, 64, 300])
def test_fixed_sample_ritz_pairs_equal_the_dense_hessian_of_that_sample(logreg_trained, micro_batch):
    """Whatever the micro-batch, the products are the sample's curvature: Ritz pairs = dense eigenpairs."""
    import jax
    from jax.flatten_util import ravel_pytree

    t = logreg_trained
    n_data = len(t.train_batch["y"])
    args = EigensystemArgs(num_iters=80, top_k=8, sample_size=300, micro_batch=micro_batch, seed=4,
                           basis_dtype="float64", mass_sample=0)
    es = compute_eigensystem(t.spec, t.params, t.train_batch, args)
    # the sample compute_eigensystem takes: a seeded uniform subsample of sample_size rows
    idx = np.sort(np.random.default_rng(4).choice(n_data, 300, replace=False))
    sample = {k: v[idx] for k, v in t.train_batch.items()}
    flat, unravel = ravel_pytree(t.params)
    h = np.asarray(jax.jit(jax.hessian(lambda f: t.spec.batch_loss(unravel(f), sample)))(flat), np.float64)
    vals, vecs = np.linalg.eigh(0.5 * (h + h.T))
    vals, vecs = vals[::-1][:8], vecs[:, ::-1][:, :8]
    np.testing.assert_allclose(es.ritz_values, vals, rtol=1e-5)
    overlap = np.abs(np.sum(es.flat_eigvecs(t.params).astype(np.float64) * vecs.T, axis=1))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-4)
    assert es.args["sample_size_used"] == 300 and es.args["sample_seed"] == 4
    assert es.args["operator"] == "fixed sample" and es.args["batch_size_used"] == 300
    assert np.all(es.residuals < 1e-4 * vals[0])


def test_no_negative_ritz_value_on_a_ggn(cnn_trained):
    """The GGN is positive semi-definite (≥ l2 I), so the consistent operator gives no negative Ritz value,
    even for a non-convex model; the diagnostics stay quiet."""
    from beam_influence.core.diagnostics import diagnose

    t = cnn_trained
    es = compute_eigensystem(t.spec, t.params, t.train_batch, EigensystemArgs(
        num_iters=30, top_k=10, sample_size=256, curvature="ggn", mass_sample=0))
    assert es.krylov_ritz_values.min() > 0, es.krylov_ritz_values.min()
    assert es.args["negative_treated"] == 0
    assert not any("negative" in w for w in diagnose(es).warnings)
