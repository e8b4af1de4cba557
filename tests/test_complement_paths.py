"""The complement term (1/ρ)(I − UUᵀ) in every path: the gradient sketch, the projector's ‖∇ℓ‖² and sketch outputs,
the index (grad_sq_norm, sketch columns), query (sketch), fused (exact) and self-influence (exact), against the
in-memory complement on full gradients."""
import jax
import numpy as np
import pytest

from beam_influence.beam.index import read_index_table, read_manifest
from beam_influence.beam.outputs import read_jsonl
from beam_influence.beam.project import projection_matrix
from beam_influence.core import scoring
from beam_influence.core.complement import complement_scores, complement_self_influence, default_rho
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.core.projection import make_projector
from beam_influence.core.sketch import GradientSketch, residual_sketch
from beam_influence.data import load_examples
from beam_influence.evaluation.gradients import flat_grads
from beam_influence.formats import write_records
from pipelines import fused, index, query, self_influence
from tests.conftest import expected_lists

K = 5


def _inner(a, b):
    return sum(float(np.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sketch_is_exact_when_the_budget_covers_the_params(logreg_trained):
    params = logreg_trained.params
    p = sum(np.size(x) for x in jax.tree.leaves(params))
    sk = GradientSketch(params, p + 10, seed=3)
    assert sk.dim == p and all(leaf.kind == "exact" for leaf in sk.leaves)
    rng = np.random.default_rng(0)
    g = jax.tree.map(lambda x: rng.standard_normal((4,) + np.shape(x)).astype(np.float32), params)
    s = np.asarray(sk.apply(g))
    flat = np.concatenate([np.reshape(x, (4, -1)) for x in jax.tree.leaves(g)], axis=1)
    np.testing.assert_allclose(s @ s.T, flat @ flat.T, rtol=1e-5)


def test_sketch_is_seeded_unbiased_and_sized(cnn_trained):
    params = cnn_trained.params
    rng = np.random.default_rng(1)
    x = jax.tree.map(lambda v: rng.standard_normal((1,) + np.shape(v)).astype(np.float32), params)
    y = jax.tree.map(lambda v: (0.5 * np.asarray(v) + rng.standard_normal(np.shape(v))).astype(np.float32), x)
    truth = _inner(x, y)
    for method in ("count", "kron"):
        a, b = GradientSketch(params, 128, 7, method), GradientSketch(params, 128, 7, method)
        np.testing.assert_array_equal(np.asarray(a.apply(x)), np.asarray(b.apply(x)))  # a function of (shapes, d, seed)
        assert abs(a.dim - 128) <= 0.1 * 128 and a.method == method
        est = [float(np.vdot(np.asarray(s.apply(x)), np.asarray(s.apply(y))))
               for s in (GradientSketch(params, 128, i, method) for i in range(120))]
        se = np.std(est) / np.sqrt(len(est))
        assert abs(np.mean(est) - truth) < 4 * se, method  # unbiased: E⟨Sx, Sy⟩ = ⟨x, y⟩
        assert np.std(est) > 0  # and really random across seeds
        if method == "count":  # CountSketch variance ≤ (‖x‖²‖y‖² + ⟨x,y⟩²)/d, as a dense Gaussian map
            bound = (_inner(x, x) * _inner(y, y) + truth ** 2) / a.dim
            assert np.var(est) < 1.5 * bound, (np.var(est), bound)


def test_projector_returns_grad_norms_and_sketches(cnn_trained):
    t = cnn_trained
    es = compute_eigensystem(t.spec, t.params, t.train_batch, EigensystemArgs(num_iters=12, top_k=6, batch_size=256))
    sk = GradientSketch(t.params, 96, seed=0)
    batch = {k: v[:40] for k, v in t.train_batch.items()}
    flat = flat_grads(t.spec.loss, t.params, batch)
    outs = {m: make_projector(t.spec.loss, es.eigvecs_tree(t.params), method=m, micro_batch=16, sketch=sk)(t.params, batch)
            for m in ("leafwise", "flat")}
    for out in outs.values():
        np.testing.assert_allclose(np.asarray(out.grad_sq_norms), np.sum(flat.astype(np.float64) ** 2, axis=1),
                                   rtol=1e-4)
        assert out.sketches.shape == (40, sk.dim)
    np.testing.assert_allclose(np.asarray(outs["leafwise"].sketches), np.asarray(outs["flat"].sketches),
                               rtol=1e-4, atol=1e-6)
    unflat = jax.vmap(lambda v: jax.flatten_util.ravel_pytree(t.params)[1](v))(flat)
    np.testing.assert_allclose(np.asarray(outs["leafwise"].sketches), np.asarray(sk.apply(unflat)), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="jvp"):
        make_projector(t.spec.loss, es.eigvecs_tree(t.params), method="jvp", sketch=sk)


def test_sketched_complement_approaches_the_exact_one(cnn_trained):
    """The complement estimated from sketches → the exact complement as d grows (CNN: p ≫ d)."""
    t = cnn_trained
    es = compute_eigensystem(t.spec, t.params, t.train_batch, EigensystemArgs(num_iters=30, top_k=10, batch_size=512))
    train = {k: v[:200] for k, v in t.train_batch.items()}
    test = {k: v[:16] for k, v in t.test_batch.items()}
    g_tr, g_te = flat_grads(t.spec.loss, t.params, train), flat_grads(t.spec.loss, t.params, test)
    u = es.flat_eigvecs(t.params).astype(np.float64)
    p_tr, p_te = g_tr @ u.T, g_te @ u.T
    exact = (g_tr @ g_te.T) - p_tr @ p_te.T  # ⟨(I−UUᵀ)g, (I−UUᵀ)g'⟩
    errors = []
    for d in (32, 128, 512, 2048):
        e = []
        for seed in range(2):
            sk = GradientSketch(t.params, d, seed=seed)  # CountSketch
            su = sk.sketch_vectors(es.eigvecs_tree(t.params))
            unravel = jax.flatten_util.ravel_pytree(t.params)[1]
            s_tr = np.asarray(sk.apply(jax.vmap(unravel)(g_tr)), np.float64)
            s_te = np.asarray(sk.apply(jax.vmap(unravel)(g_te)), np.float64)
            est = residual_sketch(s_tr, p_tr, su) @ residual_sketch(s_te, p_te, su).T
            e.append(np.linalg.norm(est - exact) / np.linalg.norm(exact))
        errors.append(np.mean(e))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors  # monotone in d
    assert errors[-1] < 0.35 * errors[0], errors  # ≈ 1/√d: 64× the dimensions, ~8× smaller error


# ---- the Beam paths against the in-memory complement (digits LR, p = 650: a sketch of d ≥ p is exact) ----
@pytest.fixture(scope="module")
def ws(tmp_path_factory, logreg_trained, logreg_files):
    t = logreg_trained
    root = tmp_path_factory.mktemp("complement")
    write_records(t.data.train[:600], str(root / "train"), "parquet", num_shards=2)
    write_records(t.data.test[:12], str(root / "test"), "parquet", num_shards=1)
    es, model = logreg_files(root, EigensystemArgs(num_iters=40, top_k=12, batch_size=4096))
    spec = t.spec
    train, test = load_examples(spec, str(root / "train-*")), load_examples(spec, str(root / "test-*"))
    proj = make_projector(spec.loss, es.eigvecs_tree(t.params))
    p_tr = np.asarray(proj(t.params, train.batch).projections, np.float64)
    p_te = np.asarray(proj(t.params, test.batch).projections, np.float64)
    g_tr, g_te = flat_grads(spec.loss, t.params, train.batch), flat_grads(spec.loss, t.params, test.batch)
    dots = g_tr.astype(np.float64) @ g_te.astype(np.float64).T
    rho = default_rho(es.eigvals)
    want = {"scores": complement_scores(p_te, p_tr, es.eigvals, dots, rho=rho),
            "self": complement_self_influence(p_tr, es.eigvals, np.sum(g_tr.astype(np.float64) ** 2, axis=1), rho=rho),
            "truncated": scoring.influence_scores(p_te, p_tr, es.eigvals)}
    return root, model, es, train.ids, test.ids, want


def _check(path, scores, train_ids, test_ids, rtol):
    expected = expected_lists(scores, train_ids, test_ids, K)
    got = read_jsonl(path)
    assert len(got) == len(expected) == 2 * K * len(test_ids)
    scale = np.abs(scores).max()
    for r in got:
        tid, s = expected[(r["query_id"], r["kind"], r["rank"])]
        assert abs(r["score"] - s) <= rtol * scale, (r, s)
    return sum(r["train_id"] == expected[(r["query_id"], r["kind"], r["rank"])][0] for r in got) / len(got)


def test_index_stores_grad_norms_and_sketch_and_query_scores_the_complement(ws, tmp_path):
    root, model, es, train_ids, test_ids, want = ws
    idx = str(tmp_path / "index")
    index.run(model + ["--train_data", str(root / "train-*"), "--index_dir", idx, "--sketch_dim", "2000",
                       "--sketch_dtype", "float32"])  # d ≥ p in float32: the sketch is the exact complement
    manifest = read_manifest(idx)
    assert manifest["args"]["grad_sq_norm"] and manifest["args"]["sketch"]["dim"] == 650  # capped at p: exact
    t = read_index_table(idx, ["id", "grad_sq_norm", "sketch", "projection"])
    assert projection_matrix(t, "sketch").shape == (600, 650) and np.all(t.column("grad_sq_norm").to_numpy() > 0)
    summary = query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", idx,
                                 "--output", str(tmp_path / "q"), "--top_k", str(K)])
    assert summary["complement"]["mode"] == "sketch"
    assert _check(str(tmp_path / "q" / "topk.jsonl"), want["scores"], train_ids, test_ids, 1e-5) == 1.0
    # the complement changes the answer: the truncated ranking is not the complement's
    none = query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", idx, "--complement", "none",
                              "--output", str(tmp_path / "q0"), "--top_k", str(K)])
    assert none["complement"]["mode"] == "none"
    assert _check(str(tmp_path / "q0" / "topk.jsonl"), want["truncated"], train_ids, test_ids, 1e-5) == 1.0
    # self-influence with the exact ‖∇ℓ‖² from the index
    s = self_influence.run(model + ["--index_dir", idx, "--output", str(tmp_path / "s"), "--self_influence_top", "20"])
    assert s["complement"]["mode"] == "exact"
    got = read_jsonl(str(tmp_path / "s" / "self_influence_top.jsonl"))
    top = scoring.top_k(want["self"], train_ids, 20)
    assert [r["id"] for r in got] == [train_ids[i] for i in top]
    np.testing.assert_allclose([r["self_influence"] for r in got], want["self"][top], rtol=1e-4)


def test_small_sketch_is_close_and_refusals_are_clear(ws, tmp_path):
    root, model, es, train_ids, test_ids, want = ws
    idx = str(tmp_path / "index")
    index.run(model + ["--train_data", str(root / "train-*"), "--index_dir", idx, "--sketch_dim", "0"])
    assert read_manifest(idx)["args"]["sketch"] is None
    out = query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", idx,
                             "--output", str(tmp_path / "q"), "--top_k", str(K)])
    assert out["complement"]["mode"] == "none"  # auto: the index has no sketch
    with pytest.raises(ValueError, match="no gradient sketch"):
        query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", idx, "--complement", "sketch",
                           "--output", str(tmp_path / "q2")])
    with pytest.raises(ValueError, match="fused"):
        query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", idx, "--complement", "exact",
                           "--output", str(tmp_path / "q3")])
    with pytest.raises(ValueError, match="normalization none"):
        query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", idx, "--complement", "sketch",
                           "--normalization", "cosine", "--output", str(tmp_path / "q4")])


def test_fused_scores_the_exact_complement(ws, tmp_path):
    root, model, es, train_ids, test_ids, want = ws
    out = tmp_path / "fused"
    summary = fused.run(model + ["--train_data", str(root / "train-*"), "--test_data", str(root / "test-*"),
                                 "--output", str(out), "--top_k", str(K), "--self_influence_top", "20",
                                 "--batch_rows", "256"])
    assert summary["complement"]["mode"] == "exact"
    assert _check(str(out / "topk.jsonl"), want["scores"], train_ids, test_ids, 1e-5) == 1.0
    got = read_jsonl(str(out / "self_influence_top.jsonl"))
    assert [r["id"] for r in got] == [train_ids[i] for i in scoring.top_k(want["self"], train_ids, 20)]
    # the sketch fallback (Q·p too large for the exact term) gives the same answer with an exact sketch (d ≥ p)
    out2 = tmp_path / "fused_sketch"
    summary = fused.run(model + ["--train_data", str(root / "train-*"), "--test_data", str(root / "test-*"),
                                 "--output", str(out2), "--top_k", str(K), "--complement", "sketch",
                                 "--sketch_dim", "1000"])
    assert summary["complement"] == {"mode": "sketch", "rho": default_rho(es.eigvals), "sketch_dim": 650}
    assert _check(str(out2 / "topk.jsonl"), want["scores"], train_ids, test_ids, 1e-5) == 1.0
