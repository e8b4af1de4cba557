"""The K-FAC curvature in the eigensystem file (issue 22, item 1 "saved in the eigensystem file"): fitted on the
same fixed sample as Arnoldi, saved as checksummed ``kfac/<param path>/<field>`` tensors, rebuilt without
recomputation, used by ``pairwise_scores`` / ``self_influence_scores`` (no refit, the same scores), written by
``beam-influence eigensystem --kfac``; files without it load as before."""
import json

import numpy as np
import pytest

import beam_influence as bi
from beam_influence.api import fit_eigensystem_kfac, resolve_fisher
from beam_influence.core import kfac
from beam_influence.core.eigensystem import CorruptEigensystemError, Eigensystem
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem

SAMPLE = 200  # < the training set: the fixed sample is a seeded subsample


@pytest.fixture(scope="module")
def setup(logreg_trained):
    t = logreg_trained
    train = {k: np.asarray(v) for k, v in t.train_batch.items()}
    test = {k: np.asarray(v)[:6] for k, v in t.test_batch.items()}
    args = EigensystemArgs(top_k=5, num_iters=20, sample_size=SAMPLE, seed=3, mass_sample=0)
    plain = compute_eigensystem(t.spec, t.params, train, args)
    sample = kfac.fixed_sample(train, SAMPLE, 3)
    with_k = fit_eigensystem_kfac(t.spec, t.params, sample, plain)
    return t.spec, t.params, train, test, plain, with_k, sample


def _assert_same_curvature(a, b):
    assert len(a.factors) == len(b.factors) and a.fisher == b.fisher and a.num_examples == b.num_examples
    assert a.l2 == b.l2 and a.treedef == b.treedef
    for fa, fb in zip(a.factors, b.factors):
        assert fa.kind == fb.kind and fa.shape == fb.shape and fa.mat_shape == fb.mat_shape and fa.s == fb.s
        for name in ("qa", "qb", "la", "lb", "corr", "diag"):
            x, y = getattr(fa, name), getattr(fb, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert np.array_equal(np.asarray(x), np.asarray(y)), name


def _header(raw: bytes):
    n = int.from_bytes(raw[:8], "little")
    return 8 + n, json.loads(raw[8:8 + n])


def test_round_trip_gives_the_same_factors(setup):
    spec, params, train, _, plain, with_k, sample = setup
    assert with_k.kfac and any(key.endswith("/corr") for key in with_k.kfac)  # kernel: kron with EK-FAC
    assert any(key.endswith("/diag") for key in with_k.kfac)  # bias: diagonal
    meta = with_k.args["kfac"]
    assert meta["num_examples"] == SAMPLE and meta["fisher"] == resolve_fisher(spec) and meta["ekfac"]
    loaded = Eigensystem.from_bytes(with_k.to_bytes())
    assert loaded.id == with_k.id != plain.id  # the factors are in the content digest
    assert set(loaded.kfac) == set(with_k.kfac)
    for key, v in with_k.kfac.items():
        assert loaded.kfac[key].dtype == np.float64 and np.array_equal(loaded.kfac[key], v)
    fresh = kfac.fit(spec, params, sample, fisher=meta["fisher"], ekfac=True)
    _assert_same_curvature(loaded.kfac_curvature(params), fresh)
    _, head = _header(with_k.to_bytes())
    assert all(head[name]["dtype"] == "F64" for name in head if name.startswith("kfac/"))


def test_save_and_load_from_a_file(setup, tmp_path):
    _, params, _, _, _, with_k, _ = setup
    path = str(tmp_path / "eig.safetensors")
    with_k.save(path)
    loaded = Eigensystem.load(path)
    assert loaded.id == with_k.id
    _assert_same_curvature(loaded.kfac_curvature(params), with_k.kfac_curvature(params))


def test_a_tampered_kfac_tensor_fails_the_checksum(setup):
    with_k = setup[5]
    raw = bytearray(with_k.to_bytes())
    start, head = _header(bytes(raw))
    name = next(n for n in sorted(head) if n.startswith("kfac/") and n.endswith("/la"))
    lo, hi = head[name]["data_offsets"]
    vals = np.frombuffer(bytes(raw[start + lo:start + hi]), "<f8").copy()
    vals[-1] *= 1.5  # still finite, still float64: only the digest can tell
    raw[start + lo:start + hi] = vals.tobytes()
    with pytest.raises(CorruptEigensystemError, match="content check failed"):
        Eigensystem.from_bytes(bytes(raw))


def test_factors_that_do_not_fit_the_parameters_are_refused(setup):
    with_k = setup[5]
    key = next(k for k in with_k.kfac if k.endswith("/la"))
    bad = dict(with_k.kfac)
    bad[key] = bad[key][:-1]
    import dataclasses

    broken = dataclasses.replace(with_k, kfac=bad)  # a consistent digest over inconsistent factors
    with pytest.raises(CorruptEigensystemError, match="K-FAC leaf"):
        Eigensystem.from_bytes(broken.to_bytes())
    no_meta = dataclasses.replace(with_k, args={k: v for k, v in with_k.args.items() if k != "kfac"})
    with pytest.raises(CorruptEigensystemError, match="no K-FAC metadata"):
        Eigensystem.from_bytes(no_meta.to_bytes())


def test_an_eigensystem_without_kfac_loads_as_before(setup):
    _, params, _, _, plain, _, _ = setup
    raw = plain.to_bytes()
    _, head = _header(raw)
    assert not any(name.startswith("kfac/") for name in head)
    loaded = Eigensystem.from_bytes(raw)
    assert loaded.kfac is None and loaded.kfac_curvature(params) is None and loaded.id == plain.id
    assert "kfac" not in loaded.args


def test_scores_with_saved_factors_equal_a_fresh_fit_without_refitting(setup, monkeypatch):
    spec, params, train, test, plain, with_k, _ = setup
    rows = {k: v[:40] for k, v in train.items()}
    want_pair = bi.pairwise_scores(spec, params, train, test, plain)  # fits on the eigensystem's sample
    want_self = bi.self_influence_scores(spec, params, train, plain, examples=rows)
    loaded = Eigensystem.from_bytes(with_k.to_bytes())

    def no_fit(*a, **k):
        raise AssertionError("the K-FAC curvature was refitted")

    monkeypatch.setattr(kfac, "fit", no_fit)
    got_pair, det = bi.pairwise_scores(spec, params, train, test, loaded, return_details=True)
    got_self = bi.self_influence_scores(spec, params, train, loaded, examples=rows)
    assert det["complement"].curvature.info.get("from_file")
    np.testing.assert_allclose(got_pair, want_pair, rtol=1e-9, atol=1e-12 * np.abs(want_pair).max())
    np.testing.assert_allclose(got_self, want_self, rtol=1e-6)
    # options the saved fit does not answer (another factor layout) fit anew
    with pytest.raises(AssertionError, match="refitted"):
        bi.pairwise_scores(spec, params, train, test, loaded, max_factor_dim=8)


def test_cli_eigensystem_kfac_writes_the_factors(tmp_path, logreg_trained):
    from beam_influence.cli import main
    from beam_influence.formats import write_records

    t = logreg_trained
    write_records(t.data.train[:300], str(tmp_path / "train"), "parquet", num_shards=2)
    ckpt = str(tmp_path / "ckpt.msgpack")
    t.spec.save_params(ckpt, t.params)
    common = ["eigensystem", "--spec", "beam_influence.models.digits:logreg", "--checkpoint", ckpt,
              "--train_data", str(tmp_path / "train-*"), "--num_iters", "20", "--num_eigenpairs", "5",
              "--no_residuals"]
    assert main(common + ["--output", str(tmp_path / "k.safetensors"), "--kfac"]) == 0
    assert main(common + ["--output", str(tmp_path / "p.safetensors")]) == 0
    with_k, plain = Eigensystem.load(str(tmp_path / "k.safetensors")), Eigensystem.load(str(tmp_path / "p.safetensors"))
    assert plain.kfac is None and "kfac" not in plain.args
    assert np.array_equal(with_k.eigvals, plain.eigvals)  # the same Arnoldi run
    meta = with_k.args["kfac"]
    assert meta["num_examples"] == with_k.args["sample_size_used"] == 300 and meta["ekfac"]
    batch = t.spec.stack([t.spec.decode(r) for r in t.data.train[:300]])
    fresh = kfac.fit(t.spec, t.params, batch, fisher=meta["fisher"], ekfac=True)
    saved = with_k.kfac_curvature(t.params)
    for fa, fb in zip(saved.factors, fresh.factors):  # the same rows (read in file order: round-off only)
        assert fa.kind == fb.kind
        for name in ("la", "lb", "corr", "diag"):
            if getattr(fa, name) is not None:
                np.testing.assert_allclose(getattr(fa, name), getattr(fb, name), rtol=1e-5,
                                           atol=1e-9 * np.abs(getattr(fb, name)).max())
