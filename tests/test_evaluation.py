"""Attribution-quality evaluation: LDS, complement term, baselines (exact, CG, LiSSA, TracIn), mislabel AUC,
agreement, and the ``evaluate`` command.

The digits LDS test retrains logistic regression on 12 random halves through Beam (FnApiRunner) once per
module; everything else runs on a tiny convex model (p = 27) where the dense Hessian is ground truth.
"""
import json

import jax
import numpy as np
import optax
import pytest
from scipy.stats import spearmanr

import beam_influence.evaluation.lds as lds_mod
from beam_influence.evaluation import methods as M
from beam_influence.evaluation.agreement import agreement, top_k_overlap
from beam_influence.core.complement import complement_scores, complement_self_influence, default_rho
from beam_influence.evaluation.gradients import grad_sq_norms, gradient_dots
from beam_influence.evaluation.mislabel import mislabel_auc, roc_auc, stratified_sample
from beam_influence.core.model_spec import FeatureSpec, ModelSpec
from beam_influence.models import digits
from beam_influence.core.scoring import influence_scores
from beam_influence.train import train

# Digits LDS setting of the complement test (measured, see test_complement_beats_truncation_on_digits_lds).
LDS_STEPS, LDS_LR, LDS_SUBSETS, LDS_QUERIES = 300, 0.05, 10, 50


# ---- LDS: the pure function ---------------------------------------------------------------------------
def test_lds_equals_brute_force_spearman():
    rng = np.random.default_rng(0)
    n, q, m = 20, 4, 9
    scores = rng.standard_normal((n, q))
    masks = lds_mod.subset_masks(n, m, seed=1)
    targets = rng.standard_normal((m, q))
    targets[:, 2] = np.round(targets[:, 2])  # ties in one column
    res = lds_mod.lds(scores, masks, targets)
    per_query = []
    for j in range(q):
        pred = [sum(scores[i, j] for i in range(n) if masks[s, i]) for s in range(m)]
        per_query.append(spearmanr(pred, targets[:, j]).statistic)
    np.testing.assert_allclose(res.per_query, per_query, rtol=1e-12, atol=1e-12)
    assert res.score == pytest.approx(np.mean(per_query), abs=1e-12)
    assert masks.shape == (m, n) and np.all(masks.sum(axis=1) == n // 2)
    np.testing.assert_array_equal(masks, lds_mod.subset_masks(n, m, seed=1))  # seeded


def test_lds_constant_query_is_skipped_and_shapes_checked():
    scores = np.ones((6, 2))
    scores[:, 1] = np.arange(6)
    masks = lds_mod.subset_masks(6, 4, seed=0)
    res = lds_mod.lds(scores, masks, np.arange(8.0).reshape(4, 2))
    assert np.isnan(res.per_query[0]) and np.isfinite(res.score)
    with pytest.raises(ValueError, match="targets have shape"):
        lds_mod.lds(scores, masks, np.zeros((4, 3)))


# ---- a tiny convex model (p = 27): ground truth by a dense Hessian -----------------------------------
def _tiny_spec(l2: float) -> ModelSpec:
    def init(seed):
        k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
        return {"w": 0.1 * jax.random.normal(k1, (8, 3)), "b": 0.1 * jax.random.normal(k2, (3,))}

    def apply(params, ex):
        return ex["x"] @ params["w"] + params["b"]

    def out_loss(logits, ex):
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

    return ModelSpec(name="tiny_logreg", init=init, loss=lambda p, ex: out_loss(apply(p, ex), ex),
                     features={"x": FeatureSpec((8,), "float32"), "y": FeatureSpec((), "int32")},
                     apply=apply, output_loss=out_loss, l2=l2)


def _tiny_task(l2: float, n: int = 120, q: int = 5) -> M.Task:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n + q, 8)).astype(np.float32)
    y = (np.argmax(x[:, :3] + 0.7 * rng.standard_normal((n + q, 3)), axis=1)).astype(np.int32)
    spec = _tiny_spec(l2)
    tr, te = {"x": x[:n], "y": y[:n]}, {"x": x[n:], "y": y[n:]}
    params = train(spec, tr, steps=400, learning_rate=0.05)
    return M.Task(spec, params, tr, te, batch_size=64)


@pytest.fixture(scope="module")
def tiny():
    """Convex and well conditioned (l2 = 0.1): λ_min / λ_max ≈ 0.15."""
    task = _tiny_task(l2=0.1)
    exact = M.make_method("exact").fit(task)
    return task, exact, exact.scores()


def test_exact_matches_dense_solve(tiny):
    from beam_influence.core.exact import dense_hessian, flat_grads

    task, exact, s_exact = tiny
    h = dense_hessian(task.spec, task.params, task.train)
    ref = flat_grads(task.spec, task.params, task.train) @ np.linalg.solve(h, flat_grads(task.spec, task.params, task.test).T)
    np.testing.assert_allclose(s_exact, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    assert s_exact.shape == (task.n_train, task.n_test)
    si = exact.self_influence(np.arange(10))
    g = flat_grads(task.spec, task.params, {k: v[:10] for k, v in task.train.items()})
    np.testing.assert_allclose(si, np.sum(g * np.linalg.solve(h, g.T).T, axis=1), rtol=1e-3)


def test_complement_with_full_basis_is_truncation_is_exact_pure():
    """k = p: U Uᵀ = I, the complement term vanishes (pure float64 algebra)."""
    rng = np.random.default_rng(1)
    p, n, q = 7, 9, 3
    a = rng.standard_normal((p, p))
    h = a @ a.T + 0.5 * np.eye(p)
    lam, u = np.linalg.eigh(h)
    g_tr, g_te = rng.standard_normal((n, p)), rng.standard_normal((q, p))
    p_tr, p_te = g_tr @ u, g_te @ u
    exact = g_tr @ np.linalg.solve(h, g_te.T)
    trunc = influence_scores(p_te, p_tr, lam)
    comp = complement_scores(p_te, p_tr, lam, g_tr @ g_te.T)
    any_rho = complement_scores(p_te, p_tr, lam, g_tr @ g_te.T, rho=123.0)  # the term is 0 whatever ρ
    for s in (trunc, comp, any_rho):
        np.testing.assert_allclose(s, exact, rtol=1e-10)
    np.testing.assert_allclose(complement_self_influence(p_tr, lam, np.sum(g_tr ** 2, 1)),
                               np.einsum("np,np->n", g_tr, np.linalg.solve(h, g_tr.T).T), rtol=1e-10)
    # k < p: the complement equals U Λ⁻¹ Uᵀ + (I − U Uᵀ)/ρ applied densely
    k = 3
    top = np.argsort(lam)[::-1][:k]
    uk, lk = u[:, top], lam[top]
    approx = uk @ np.diag(1 / lk) @ uk.T + (np.eye(p) - uk @ uk.T) / default_rho(lk)
    np.testing.assert_allclose(complement_scores(g_te @ uk, g_tr @ uk, lk, g_tr @ g_te.T), g_tr @ approx @ g_te.T,
                               rtol=1e-10)
    assert default_rho(lk) == pytest.approx(lk.min())


def test_complement_with_k_equal_p_matches_truncation_and_exact_on_model(tiny):
    task, _, s_exact = tiny
    p = task.num_params
    trunc = M.make_method("arnoldi", top_k=p, eigvecs="exact").fit(task)
    comp = M.make_method("arnoldi_complement", top_k=p, eigvecs="exact").fit(task)
    s_trunc, s_comp = trunc.scores(), comp.scores()
    tol = 2e-4 * np.abs(s_exact).max()
    np.testing.assert_allclose(s_trunc, s_exact, atol=tol)
    np.testing.assert_allclose(s_comp, s_trunc, atol=tol)
    np.testing.assert_allclose(comp.self_influence(), trunc.self_influence(), rtol=1e-3)


def test_complement_improves_agreement_at_small_k(tiny):
    task, _, s_exact = tiny
    trunc = M.make_method("arnoldi", top_k=5, num_iters=27).fit(task).scores()
    comp = M.make_method("arnoldi_complement", top_k=5, num_iters=27).fit(task).scores()
    assert agreement(comp, s_exact).spearman > agreement(trunc, s_exact).spearman


def test_cg_tight_tolerance_agrees_with_exact(tiny):
    task, exact, s_exact = tiny
    cg = M.make_method("cg", tol=1e-6, max_iters=200).fit(task)
    s = cg.scores()
    np.testing.assert_allclose(s, s_exact, atol=1e-3 * np.abs(s_exact).max())
    assert cg.info["max_rel_residual"] <= 1e-6 and cg.info["negative_curvature"] == 0
    np.testing.assert_allclose(cg.self_influence(np.arange(7)), exact.self_influence(np.arange(7)), rtol=1e-3)
    # damping solves the shifted system
    damped = M.make_method("cg", tol=1e-6, damping=0.5).fit(task).scores()
    ref = M.make_method("exact", damping=0.5).fit(task).scores()
    np.testing.assert_allclose(damped, ref, atol=1e-3 * np.abs(ref).max())


def test_cg_solve_on_a_matrix_and_negative_curvature():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    spd = a @ a.T + np.eye(6)
    b = rng.standard_normal((3, 6))
    x, info = M.cg_solve(lambda v: v @ spd, b, tol=1e-12, max_iters=50)
    np.testing.assert_allclose(x, np.linalg.solve(spd, b.T).T, rtol=1e-8)
    assert info.iterations.max() <= 7
    _, info = M.cg_solve(lambda v: -v, b, max_iters=5)
    assert info.negative_curvature.all()


def test_lissa_and_tracin_shapes_and_lissa_converges(tiny):
    task, exact, s_exact = tiny
    assert exact.info["eig_min"] / exact.info["eig_max"] > 0.05
    errors = []
    for depth in (5, 150):
        s = M.make_method("lissa", depth=depth).fit(task).scores()
        assert s.shape == (task.n_train, task.n_test)
        errors.append(np.abs(s - s_exact).max() / np.abs(s_exact).max())
    assert errors[1] < 1e-3 < errors[0]
    lissa = M.make_method("lissa", depth=150).fit(task)
    assert lissa.self_influence(np.arange(4)).shape == (4,)
    stochastic = M.make_method("lissa", depth=150, batch_size=60, repeats=2).fit(task).scores()
    assert agreement(stochastic, s_exact).spearman > 0.95
    tracin = M.make_method("tracin").fit(task)
    s = tracin.scores()
    assert s.shape == (task.n_train, task.n_test) and tracin.self_influence().shape == (task.n_train,)
    from beam_influence.core.exact import flat_grads

    g_tr, g_te = flat_grads(task.spec, task.params, task.train), flat_grads(task.spec, task.params, task.test)
    np.testing.assert_allclose(s, g_tr @ g_te.T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tracin.self_influence(), np.sum(g_tr ** 2, 1), rtol=1e-4)


def test_random_batches_keep_examples_whole(tiny):
    """Mini-batches (stochastic LiSSA, curvature samples) take one index set for every feature."""
    task = tiny[0]
    rows = {(tuple(x), int(y)) for x, y in zip(task.train["x"], task.train["y"])}
    b = task.random_batch(50, np.random.default_rng(3))
    assert {(tuple(np.asarray(x)), int(y)) for x, y in zip(b["x"], b["y"])} <= rows and len(b["y"]) == 50


def test_gradient_products_do_not_depend_on_batch_size(tiny):
    task = tiny[0]
    vecs = np.random.default_rng(0).standard_normal((4, task.num_params)).astype(np.float32)
    a = gradient_dots(task.spec.loss, task.params, task.train, vecs, batch_size=7)
    b = gradient_dots(task.spec.loss, task.params, task.train, vecs, batch_size=256)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_sq_norms(task.spec.loss, task.params, task.train, batch_size=7),
                               grad_sq_norms(task.spec.loss, task.params, task.train, batch_size=256), rtol=1e-5)


# ---- mislabel AUC and agreement ------------------------------------------------------------------------
def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = np.round(rng.standard_normal(40), 1)  # ties
    pos = rng.random(40) < 0.3
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in s[pos] for b in s[~pos]]
    assert roc_auc(s, pos) == pytest.approx(np.mean(pairs))
    r = mislabel_auc(np.where(pos, 1.0, 0.0), pos)
    assert r.auc == 1.0 and r.recall_at_10pct == pytest.approx(4 / pos.sum())
    idx = stratified_sample(pos, 20, seed=0)
    assert len(idx) == 20 and pos[idx].sum() == 10


def test_roc_auc_is_the_one_sklearn_auc_with_its_edge_cases():
    from sklearn.metrics import roc_auc_score

    from beam_influence.report import metrics

    assert metrics.roc_auc is roc_auc  # the report uses the same function
    rng = np.random.default_rng(1)
    s, pos = rng.standard_normal(50), rng.random(50) < 0.4
    assert roc_auc(s, pos) == pytest.approx(roc_auc_score(pos, s), abs=1e-12)
    for scores, labels in (([1.0, 2.0], [True, True]), ([1.0, 2.0], [False, False]), ([], []),
                           ([np.nan, 1.0, 2.0], [True, False, True])):
        assert np.isnan(roc_auc(scores, labels))  # one class only, or a NaN score
    assert roc_auc([np.inf, 1.0, -np.inf, 0.0], [True, False, False, True]) == 0.75  # ±inf are ranked
    with pytest.raises(ValueError):
        roc_auc([1.0, 2.0], [True])


def test_treat_eigenvalues_is_shared_by_the_methods():
    from beam_influence.core.estimate import treat_eigenvalues

    lam = np.array([3.0, -2.0, 0.5])
    np.testing.assert_allclose(treat_eigenvalues(lam, negative="abs", damping=0.1), [3.1, 2.1, 0.6])
    for negative in ("keep", "drop"):
        np.testing.assert_allclose(treat_eigenvalues(lam, negative=negative, damping=0.1), lam + 0.1)
    with pytest.raises(ValueError, match="negative"):
        treat_eigenvalues(lam, negative="clip")


def test_json_helpers_write_atomically_and_read_back(tmp_path):
    from beam_influence import util

    path = str(tmp_path / "sub" / "r.json")
    assert util.read_json(path) is None and util.read_json(path, default={}) == {} and util.count_lines(path) == 0
    util.write_json(path, {"b": np.arange(2), "a": 1.5}, default=util.json_default)
    assert util.read_json(path) == {"a": 1.5, "b": [0, 1]} and util.count_lines(path) == 7
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["r.json"]  # no temporary file left
    util.write_text(str(tmp_path / "r.jsonl"), '{"i": 1}\n\n{"i": 2}\n')
    assert util.read_jsonl(str(tmp_path / "r.jsonl")) == [{"i": 1}, {"i": 2}]
    assert util.read_jsonl(str(tmp_path / "none.jsonl"), default=[]) == []
    with pytest.raises(FileNotFoundError):
        util.read_jsonl(str(tmp_path / "none.jsonl"))


def test_agreement_top_k():
    ref = np.arange(10.0)[:, None] * np.ones((1, 2))
    scores = ref.copy()
    scores[9, 1] = -1.0  # query 1 loses its best example
    np.testing.assert_allclose(top_k_overlap(scores, ref, 3), [1.0, 2 / 3])
    np.testing.assert_allclose(top_k_overlap(scores, ref, 3, largest=False), [1.0, 2 / 3])
    assert agreement(ref, ref, k=3).spearman == pytest.approx(1.0)


# ---- digits logistic regression: retraining through Beam, LDS of truncation vs complement --------------
@pytest.fixture(scope="module")
def digits_lds(tmp_path_factory):
    spec = digits.logreg()
    data = digits.load_digits(label_noise=0.0, seed=0)
    tr = spec.stack([spec.decode(r) for r in data.train])
    te = spec.stack([spec.decode(r) for r in data.test])
    q = np.sort(np.random.default_rng(0).choice(len(data.test), LDS_QUERIES, replace=False))
    te = {k: v[q] for k, v in te.items()}
    params = train(spec, tr, steps=LDS_STEPS, learning_rate=LDS_LR)
    masks = lds_mod.subset_masks(len(data.train), LDS_SUBSETS, seed=0)
    job = lds_mod.retrain_job("beam_influence.models.digits:logreg", {}, tr, te, masks, steps=LDS_STEPS,
                              learning_rate=LDS_LR)
    cache = str(tmp_path_factory.mktemp("lds_cache"))
    targets = lds_mod.run_retraining(job, pipeline_args=["--runner=FnApiRunner"], cache_dir=cache)
    return M.Task(spec, params, tr, te), job, masks, targets, cache


def test_retraining_pipeline_matches_local_retraining(digits_lds):
    _, job, masks, targets, cache = digits_lds
    assert targets.shape == (LDS_SUBSETS, LDS_QUERIES) and np.all(np.isfinite(targets))
    np.testing.assert_allclose(targets[3], -lds_mod.retrain_subset(job, 3), rtol=1e-5, atol=1e-6)
    # cached: a rerun reads the file instead of retraining
    np.testing.assert_array_equal(lds_mod.run_retraining(job, cache_dir=cache), targets)


def test_complement_beats_truncation_on_digits_lds(digits_lds):
    """Measured (k = 50, n = 100 Arnoldi steps, 10 subsets, 50 queries): truncated 0.606, complement
    0.849 (margin 0.243); with 12 subsets 0.616 / 0.864. docs/fidelity.md has the 50-subset numbers."""
    task, _, masks, targets, _ = digits_lds
    trunc = M.make_method("arnoldi", top_k=50, num_iters=100).fit(task)
    comp = M.make_method("arnoldi_complement", top_k=50, num_iters=100).fit(task)
    lds_trunc = lds_mod.lds(trunc.scores(), masks, targets).score
    lds_comp = lds_mod.lds(comp.scores(), masks, targets).score
    assert lds_comp - lds_trunc > 0.22, (lds_trunc, lds_comp)
    assert lds_comp > 0.82


def test_evaluate_command_end_to_end(digits_lds, tmp_path, capsys):
    """The CLI on the same setting (the retraining comes from the fixture's cache)."""
    from beam_influence import cli

    _, _, _, _, cache = digits_lds
    out = tmp_path / "res.json"
    argv = ["evaluate", "--spec", "beam_influence.models.digits:logreg", "--methods", "arnoldi_complement,tracin",
            "--num_subsets", str(LDS_SUBSETS), "--queries", str(LDS_QUERIES), "--steps", str(LDS_STEPS),
            "--learning_rate", str(LDS_LR), "--num_eigenpairs", "20", "--num_iters", "40", "--label_noise", "0.1",
            "--max_exact_params", "0", "--retrain_cache", cache, "--output", str(out), "--no_progress",
            "--runner=FnApiRunner"]
    assert cli.main(argv) == 0
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"arnoldi_complement", "tracin"}
    for row in res["methods"].values():
        assert -1 <= row["lds"] <= 1 and 0 <= row["mislabel_auc"] <= 1 and row["seconds"] > 0
    assert res["methods"]["arnoldi_complement"]["lds"] > res["methods"]["tracin"]["lds"]
    assert res["methods"]["arnoldi_complement"]["mislabel_auc"] > 0.8
    md = (tmp_path / "res.md").read_text()
    assert "| `tracin` |" in md and "LDS" in md
    assert "arnoldi_complement" in capsys.readouterr().out
    assert cli.main([a if a != "20" else "21" for a in argv]) == 2
    assert "other arguments" in capsys.readouterr().err


# ---- evaluate for any spec: dataset, spec and training function by import path -----------------------
_CUSTOM_MODULE = '''
import numpy as np, jax, optax
from types import SimpleNamespace
from beam_influence.core.model_spec import FeatureSpec, ModelSpec
from beam_influence.train import train as _train

CALLS = []


def make_spec(l2=0.05):
    def init(seed):
        k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
        return {"w": 0.1 * jax.random.normal(k1, (6, 3)), "b": 0.1 * jax.random.normal(k2, (3,))}

    def apply(params, ex):
        return ex["x"] @ params["w"] + params["b"]

    def out_loss(logits, ex):
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

    return ModelSpec(name="custom_blobs", init=init, loss=lambda p, ex: out_loss(apply(p, ex), ex),
                     features={"x": FeatureSpec((6,), "float32"), "y": FeatureSpec((), "int32")},
                     apply=apply, output_loss=out_loss, l2=l2, label_key="y")


def load(*, test_fraction, label_noise, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 6)) * 1.5
    y = rng.integers(0, 3, 150)
    x = (centres[y] + rng.standard_normal((150, 6))).astype(np.float32)
    n_test = int(round(test_fraction * 150))
    recs = [{"id": f"r{i:03d}", "x": x[i].tolist(), "y": int(y[i])} for i in range(150)]
    train, test = recs[n_test:], recs[:n_test]
    flip = rng.choice(len(train), int(round(label_noise * len(train))), replace=False)
    for i in flip:
        train[i]["y"] = (train[i]["y"] + 1) % 3
    return SimpleNamespace(train=train, test=test, flipped_ids=[train[i]["id"] for i in flip])


def train_fn(spec, batch, *, steps, learning_rate, batch_size, seed):
    CALLS.append(len(batch["y"]))
    return _train(spec, batch, steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed)
'''


@pytest.mark.parametrize("noise", ["uniform", "swap"])
def test_evaluate_with_a_custom_spec_dataset_and_training_by_import_path(tmp_path, monkeypatch, noise):
    import importlib

    from beam_influence import cli

    (tmp_path / "custom_eval_mod.py").write_text(_CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("custom_eval_mod")
    mod.CALLS.clear()
    out = tmp_path / "res.json"
    argv = ["evaluate", "--spec", "custom_eval_mod:make_spec", "--data", "custom_eval_mod:load",
            "--train_fn", "custom_eval_mod:train_fn", "--methods", "arnoldi_complement,ideal_complement,exact,tracin",
            "--num_subsets", "5", "--queries", "4", "--steps", "150", "--learning_rate", "0.05", "--num_eigenpairs", "4",
            "--num_iters", "12", "--label_noise", "0.2", "--noise", noise, "--retrain_cache", "",
            "--output", str(out), "--no_progress", "--runner=FnApiRunner"]
    assert cli.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["lds_task"]["num_params"] == 21 and res["lds_task"]["n_train"] == 120
    assert len(mod.CALLS) == 1 + 5 + 1  # base model, 5 retrainings, the mislabel model: all through train_fn
    assert sorted(res["baselines"]) == ["grad_norm", "loss"]
    for row in [*res["methods"].values(), *res["baselines"].values()]:
        assert 0 <= row["mislabel_auc"] <= 1
    comp = res["methods"]["arnoldi_complement"]
    assert -1 <= comp["lds"] <= 1 and "spearman_vs_exact" in comp
    assert comp["lds_gap_vs_ideal"] == pytest.approx(comp["lds"] - res["methods"]["ideal_complement"]["lds"])
    assert res["mislabel_task"]["noise"] == noise and res["mislabel_task"]["n_flipped"] > 0
    md = (tmp_path / "res.md").read_text()
    assert "| `loss (baseline)` |" in md and "LDS − ideal" in md
