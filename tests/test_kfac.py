"""The Kronecker-factored complement (beam_influence.core.kfac): exact where the factored curvature is exact,
consistent between its pairwise and self-influence paths, invariant to the micro-batch."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from beam_influence.core import kfac
from beam_influence.core.model_spec import FeatureSpec, ModelSpec


def _dense_spec(d_in=5, d_out=4, bias=False, l2=0.0):
    """One dense layer (optionally with a bias), softmax cross-entropy: the case K-FAC is exact for one example."""

    def init(seed):
        k = jax.random.PRNGKey(seed)
        p = {"w": 0.3 * jax.random.normal(k, (d_in, d_out))}
        if bias:
            p["b"] = 0.1 * jnp.ones((d_out,))
        return p

    def apply(params, z):
        out = z["x"] @ params["w"]
        return out + params["b"] if bias else out

    def xent(out, z):
        return optax.softmax_cross_entropy_with_integer_labels(out, z["y"])

    return ModelSpec(name="dense", init=init, loss=lambda p, z: xent(apply(p, z), z),
                     features={"x": FeatureSpec((d_in,), "float32"), "y": FeatureSpec((), "int32")},
                     apply=apply, output_loss=xent, l2=l2)


def _data(n, d_in=5, d_out=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, d_in)).astype(np.float32), "y": rng.integers(0, d_out, n).astype(np.int32)}


def _flat_grads(spec, params, data):
    g = jax.vmap(jax.grad(spec.loss), in_axes=(None, 0))(params, {k: jnp.asarray(v) for k, v in data.items()})
    return np.concatenate([np.asarray(x, np.float64).reshape(len(data["y"]), -1) for x in jax.tree.leaves(g)], axis=1)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_one_example_of_a_dense_layer_is_exact(kind):
    spec, data = _dense_spec(), _data(1)
    params = spec.init(0)
    curv = kfac.fit(spec, params, data)
    g = _flat_grads(spec, params, data)
    np.testing.assert_allclose(curv.dense(damping=0.1, kind=kind), g.T @ g + 0.1 * np.eye(g.shape[1]), atol=1e-5)


def test_ggn_of_one_example_of_a_linear_model_is_its_hessian():
    spec, data = _dense_spec(), _data(1)
    params = spec.init(1)
    curv = kfac.fit(spec, params, data, fisher="ggn")
    z = {k: jnp.asarray(v[0]) for k, v in data.items()}
    h = jax.hessian(lambda w: spec.loss({"w": w}, z))(params["w"]).reshape(20, 20)
    np.testing.assert_allclose(curv.dense(kind="kfac"), h, atol=1e-5)
    np.testing.assert_allclose(curv.dense(kind="ekfac"), h, atol=1e-5)


def test_ekfac_eigenvalues_are_the_exact_diagonal_in_the_kronecker_basis():
    spec, data = _dense_spec(bias=True), _data(40)
    params = spec.init(0)
    curv = kfac.fit(spec, params, data, micro_batch=16)
    g = _flat_grads(spec, params, data)
    c = g.T @ g / len(g)
    assert [x.kind for x in curv.factors] == ["diag", "kron"]
    f = curv.factors[1]
    q = np.kron(f.qa, f.qb)
    cw = c[4:, 4:]  # w follows b in ravel order
    np.testing.assert_allclose(np.diag(q.T @ cw @ q).reshape(5, 4), f.corr, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(curv.factors[0].diag, np.diag(c)[:4], rtol=1e-5)


@pytest.mark.parametrize("compose", ["residual", "schur", "additive"])
@pytest.mark.parametrize("k", [0, 1, 7, 20])
def test_complement_is_exact_influence_when_the_curvature_is_exact(compose, k):
    """One example of a dense layer: the factored curvature C is exact, U = the top-k eigenvectors of C + μI;
    truncated + complement = ⟨g, (C + μI)⁻¹ g'⟩ for every k (k = p: the complement is zero)."""
    spec, data = _dense_spec(), _data(1)
    params = spec.init(0)
    curv = kfac.fit(spec, params, data)
    mu = 0.05
    cm = curv.dense(damping=mu)
    lam, vec = np.linalg.eigh(cm)
    order = np.argsort(-lam)[:k]
    u, lam = vec[:, order].T, lam[order]
    others = _flat_grads(spec, params, _data(6, seed=3))
    exact = others @ np.linalg.solve(cm, others.T)
    comp = kfac.Complement(curv, u, damping=mu, compose=compose)
    p = others @ u.T
    trunc = (p / lam) @ p.T if k else 0.0
    if compose == "additive" and k:  # counts the top-k space twice: exact only at k = 0, by design
        return
    w = comp.vectors(others)
    np.testing.assert_allclose(trunc + others @ w.T, exact, rtol=1e-6, atol=1e-6)
    rows = {"x": _data(6, seed=3)["x"], "y": _data(6, seed=3)["y"]}
    np.testing.assert_allclose(np.diag(np.atleast_2d(trunc)) if k else 0.0,
                               np.diag(exact) - comp.self_terms(spec.loss, params, rows), rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("compose", ["residual", "schur"])
def test_pairwise_and_self_paths_agree_and_ignore_the_micro_batch(compose):
    from beam_influence.models import digits

    spec = digits.mlp(hidden=8)
    params = spec.init(0)
    rng = np.random.default_rng(0)
    data = {"x": rng.random((50, 64)).astype(np.float32), "y": rng.integers(0, 10, 50).astype(np.int32)}
    fits = [kfac.fit(spec, params, data, micro_batch=m) for m in (1, 7, 64)]
    for kind in ("kfac", "ekfac"):
        ref = fits[0].dense(kind=kind)
        for f in fits[1:]:  # the same matrix up to float32 round-off (eigenbases of tiny eigenvalues may differ)
            np.testing.assert_allclose(f.dense(kind=kind), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    u = np.linalg.qr(rng.standard_normal((fits[0].num_params, 5)))[0].T
    comps = [kfac.Complement(f, u, damping=1e-3, compose=compose) for f in fits]
    g = _flat_grads(spec, params, data)
    pair = np.diag(g @ comps[0].vectors(g).T)
    for c in comps:
        for m in (3, 64):
            np.testing.assert_allclose(c.self_terms(spec.loss, params, data, micro_batch=m), pair, rtol=2e-3)


def _small_mlp_fit(n: int, k: int, seed: int):
    """(spec, params, data, curvature, U [k, p] orthonormal float64): a small digits MLP, n random rows, its
    factored curvature and a random k-dimensional eigenspace."""
    from beam_influence.models import digits

    spec = digits.mlp(hidden=8)
    params = spec.init(0)
    rng = np.random.default_rng(seed)
    data = {"x": rng.random((n, 64)).astype(np.float32), "y": rng.integers(0, 10, n).astype(np.int32)}
    curv = kfac.fit(spec, params, data, micro_batch=16)
    return spec, params, data, curv, np.linalg.qr(rng.standard_normal((curv.num_params, k)))[0].T


@pytest.mark.parametrize("compose", ["residual", "schur", "additive"])
def test_whitened_residual_sketch_estimates_the_complement_term(compose):
    """The index's K-FAC sketch: with an identity sketch (d ≥ p) ⟨Sv̄(z), Sv̄(z')⟩ is exactly the complement term
    gᵀ w' of ``vectors``, and ‖v̄‖² the self-term; with a CountSketch of d ≪ p, an unbiased estimate whose error
    is within the rerank's 4 σ bound, √(2/d)·‖v̄‖‖v̄'‖, for nearly every pair."""
    from beam_influence.core.sketch import GradientSketch

    spec, params, data, curv, u = _small_mlp_fit(40, 4, seed=1)
    comp = kfac.Complement(curv, u, damping=1e-3, compose=compose)
    g = _flat_grads(spec, params, data)
    term = g @ comp.vectors(g).T
    q, sk = comp.whitened(spec.loss, params, data, sketch=GradientSketch(params, curv.num_params + 1), micro_batch=16)
    scale = np.abs(term).max()
    np.testing.assert_allclose(sk.astype(np.float64) @ sk.T, term, rtol=0, atol=2e-5 * scale)
    np.testing.assert_allclose(q, np.diag(term), rtol=2e-3)
    d = 64
    q, sk = comp.whitened(spec.loss, params, data, sketch=GradientSketch(params, d, seed=5), micro_batch=7)
    assert sk.shape == (40, d)
    err = np.abs(sk.astype(np.float64) @ sk.T - term)
    bound = 4 * np.sqrt(2 / d) * np.sqrt(np.outer(np.maximum(q, 0), np.maximum(q, 0)))
    off = ~np.eye(40, dtype=bool)
    assert np.mean(err[off] > bound[off]) < 0.01 and err[off].max() > 1e-3 * scale  # a sketch, not the identity


def test_complement_holds_u_once_until_vectors_need_more():
    """A worker's Complement (self-terms and sketches only) holds U once in its own dtype and no [k, p] float64
    C⁻¹U; ``vectors`` forms it on demand, and both paths give the same terms as a float64 U."""
    spec, params, data, curv, u64 = _small_mlp_fit(30, 6, seed=2)
    u32 = u64.astype(np.float32)
    comp = kfac.Complement(curv, u32, damping=1e-3, compose="schur")
    q = comp.self_terms(spec.loss, params, data, micro_batch=8)
    held = [v for v in vars(comp).values() if isinstance(v, np.ndarray)]
    assert comp.u.dtype == np.float32 and "_cinv_u" not in vars(comp)
    assert sum(x.nbytes for x in held) <= u32.nbytes + 8 * 6 * 6  # U once (+ the k × k S⁻¹)
    ref = kfac.Complement(curv, u32.astype(np.float64), damping=1e-3, compose="schur")
    g = _flat_grads(spec, params, data)
    np.testing.assert_allclose(g @ comp.vectors(g).T, g @ ref.vectors(g).T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(q, ref.self_terms(spec.loss, params, data, micro_batch=8), rtol=1e-5)


def test_memory_plan_counts_what_a_kfac_worker_holds():
    """``core.memory.kfac_buffers`` (in a K-FAC worker's projection plan) covers what the Complement and its terms
    hold, measured: the Complement's own arrays (host) and the live device arrays its terms add — inside the
    projector (W, not U: the projector's projections are P) and in the Complement's own step (U and W, each once:
    as closure constants of a jitted function they were held twice). The projector's K-FAC output equals the
    Complement's own step."""
    import gc

    from beam_influence.core.memory import kfac_buffers
    from beam_influence.core.projection import make_projector

    spec, params, data, curv, u64 = _small_mlp_fit(30, 6, seed=3)
    tensors = kfac.curvature_tensors(curv, params)
    factor_bytes = sum(v.nbytes for v in tensors.values())
    k, p = u64.shape
    plans = {flag: {b.name: b.bytes for b in kfac_buffers(p=p, k=k, factor_bytes=factor_bytes, in_projector=flag)}
             for flag in (True, False)}
    bases = plans[True]["K-FAC step: bases and D^-1/2 (float32)"]

    def added(before):
        gc.collect()
        return sum(x.nbytes for x in jax.live_arrays() if id(x) not in before)

    comp = kfac.Complement(kfac.curvature_from_tensors(tensors, params, kfac.curvature_metadata(curv)),
                           u64.astype(np.float32), damping=1e-3, compose="schur")
    host = sum(x.nbytes for x in vars(comp).values() if isinstance(x, np.ndarray))
    assert host <= plans[True][f"K-FAC: U [{k}, p] held by the complement"] + 8 * k * k  # + S⁻¹
    assert plans[True]["K-FAC factors (float64)"] == factor_bytes

    u_tree = kfac._unflatten(u64.astype(np.float32), curv)
    before = {id(x) for x in jax.live_arrays()}
    proj = make_projector(spec.loss, u_tree, extra=comp.per_example())
    out = proj(params, {k_: v[:8] for k_, v in data.items()})
    fused_q = np.asarray(out.extra[:, 0], np.float64)
    del out
    own_u = sum(x.nbytes for x in jax.tree.leaves(proj.eigvecs))  # the projector's U: planned as the projection's
    assert 0 < added(before) - own_u <= plans[True][f"K-FAC terms: W [{k}, p] float32"] + bases

    before = {id(x) for x in jax.live_arrays()}
    q = comp.self_terms(spec.loss, params, {k_: v[:8] for k_, v in data.items()}, micro_batch=8)
    assert 0 < added(before) <= plans[False][f"K-FAC step: U and W [{k}, p] float32"] + bases
    np.testing.assert_allclose(fused_q, q, rtol=1e-4)


def test_auto_fisher_is_empirical_for_a_large_output():
    """``fisher="auto"`` factors the output Hessian (GGN) only for a small output: a language model's T × vocab
    logits take the empirical Fisher, so ``eigensystem --kfac`` and the API's default fit work for it (they
    raised "use fisher='empirical'" with no way to ask for it from the CLI)."""
    from benchmarks.models import decoder_lm, random_lm_tokens

    from beam_influence.api import fit_eigensystem_kfac, resolve_fisher
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem

    lm = decoder_lm(vocab=50, d=8, heads=1, layers=1, mlp=16, T=8)
    params = lm.init(0)
    assert kfac.output_dim(lm, params) == 8 * 50
    assert resolve_fisher(lm, "auto", params) == "empirical" and resolve_fisher(lm, "ggn", params) == "ggn"
    spec, small_params = _small_mlp_fit(30, 6, seed=4)[:2]
    assert resolve_fisher(spec, "auto", small_params) == "ggn"
    data = random_lm_tokens(lm, 24, seed=1)
    es = compute_eigensystem(lm, params, data, EigensystemArgs(top_k=3, num_iters=8, sample_size=24, mass_sample=0))
    fitted = fit_eigensystem_kfac(lm, params, kfac.fixed_sample(data, 24, 0), es)
    assert fitted.args["kfac"]["fisher"] == "empirical"


def test_layouts_conv_embedding_and_small_leaves():
    assert kfac.leaf_layout((3, 3, 8, 16)) == ("kron", (72, 16), True, True)
    assert kfac.leaf_layout((256, 4, 64)) == ("kron", (256, 256), True, True)  # attention [d, heads, head_dim]
    assert kfac.leaf_layout((256, 4, 64), rule="last") == ("kron", (1024, 64), True, True)  # files before the rule
    assert kfac.leaf_layout((4, 64, 256)) == ("kron", (256, 256), True, True)  # its output projection
    assert kfac.leaf_layout((16,)) == ("diag",)
    assert kfac.leaf_layout((1, 16)) == ("diag",)
    assert kfac.leaf_layout((50_000, 64), max_factor_dim=4096) == ("kron", (50_000, 64), False, True)
    assert kfac.leaf_layout((50_000, 8192), max_factor_dim=4096) == ("diag",)


def test_attention_kernels_factor_as_d_by_heads_and_old_files_still_load(monkeypatch):
    """A fit records its layout rule; a file written before it (no ``layout``: the last-axis split) loads with that
    rule and gives the same curvature it was fitted as."""
    from benchmarks.models import decoder_lm, random_lm_tokens

    lm = decoder_lm(vocab=30, d=8, heads=2, layers=1, mlp=16, T=6)
    params = lm.init(0)
    data = random_lm_tokens(lm, 12, seed=2)
    curv = kfac.fit(lm, params, data, fisher="empirical")
    shapes = {f.shape: f.mat_shape for f in curv.factors if f.kind == "kron"}
    assert shapes[(8, 2, 4)] == (8, 8)  # query/key/value kernels [d, heads, head_dim]
    meta, tensors = kfac.curvature_metadata(curv), kfac.curvature_tensors(curv, params)
    assert meta["layout"] == "balanced"
    back = kfac.curvature_from_tensors(tensors, params, meta)
    assert [f.mat_shape for f in back.factors] == [f.mat_shape for f in curv.factors]

    legacy = {k: v for k, v in meta.items() if k != "layout"}
    with pytest.raises(ValueError, match="needs"):  # balanced tensors under the old rule: named, not misread
        kfac.curvature_from_tensors(tensors, params, legacy)
    monkeypatch.setattr(kfac, "LAYOUT_RULES", ("last", "balanced"))  # fit as before the rule
    old = kfac.fit(lm, params, data, fisher="empirical")
    assert {f.shape: f.mat_shape for f in old.factors if f.kind == "kron"}[(8, 2, 4)] == (16, 4)
    old_meta = {k: v for k, v in kfac.curvature_metadata(old).items() if k != "layout"}  # an old file's metadata
    back = kfac.curvature_from_tensors(kfac.curvature_tensors(old, params), params, old_meta)
    assert [f.mat_shape for f in back.factors] == [f.mat_shape for f in old.factors]
    np.testing.assert_allclose(back.eigenvalues("ekfac")[0], old.eigenvalues("ekfac")[0])
    with pytest.raises(ValueError, match="layout"):
        kfac.curvature_from_tensors(tensors, params, dict(meta, layout="sideways"))


def test_embedding_with_a_diagonal_side_is_exact_in_its_diagonal():
    """A large side keeps a diagonal factor; EK-FAC stays the exact diagonal in the (identity ⊗ Q_B) basis."""
    def init(seed):
        return {"emb": 0.1 * jax.random.normal(jax.random.PRNGKey(seed), (30, 6)),
                "out": 0.1 * jax.random.normal(jax.random.PRNGKey(seed + 1), (6, 3))}

    def loss(p, z):
        h = p["emb"][z["t"]].sum(0)
        return optax.softmax_cross_entropy_with_integer_labels(h @ p["out"], z["y"])

    spec = ModelSpec(name="emb", init=init, loss=loss,
                     features={"t": FeatureSpec((4,), "int32"), "y": FeatureSpec((), "int32")})
    rng = np.random.default_rng(0)
    data = {"t": rng.integers(0, 30, (25, 4)).astype(np.int32), "y": rng.integers(0, 3, 25).astype(np.int32)}
    params = spec.init(0)
    curv = kfac.fit(spec, params, data, max_factor_dim=10)
    emb = curv.factors[0]
    assert emb.kind == "kron" and emb.qa is None and emb.qb is not None
    g = _flat_grads(spec, params, data)[:, :180]
    q = np.kron(np.eye(30), emb.qb)
    np.testing.assert_allclose(np.diag(q.T @ (g.T @ g / 25) @ q).reshape(30, 6), emb.corr, rtol=1e-4, atol=1e-8)


def test_evaluate_runs_every_composition_by_name_and_counts_the_shared_fit():
    """``evaluate --methods arnoldi_kfac_residual,...`` (the measured rows of docs/quality.md): the method name
    picks the composition, takes the eigensystem flags, and a curvature fitted by another method on the same task
    still counts in each method's time (as the shared eigensystem does)."""
    from beam_influence.evaluation import METHOD_NAMES
    from beam_influence.evaluation.methods import Task, make_method
    from beam_influence.evaluation.run import EvalArgs
    from beam_influence.models import digits

    spec = digits.mlp(hidden=4)
    rng = np.random.default_rng(0)
    train = {"x": rng.random((40, 64)).astype(np.float32), "y": rng.integers(0, 10, 40).astype(np.int32)}
    task = Task(spec, spec.init(0), train, {k: v[:3] for k, v in train.items()})
    a = EvalArgs(spec="beam_influence.models.digits:mlp", num_eigenpairs=6, num_iters=12,
                 methods=("arnoldi_kfac", "arnoldi_kfac_residual", "arnoldi_kfac_additive", "ekfac", "kfac"))
    assert set(a.methods) <= set(METHOD_NAMES)
    ms = {n: make_method(n, **a.method_options(n)).fit(task) for n in a.methods}
    assert [ms[n].options.compose for n in a.methods[:3]] == ["schur", "residual", "additive"]
    assert [ms[n].name for n in a.methods] == list(a.methods)
    assert all(ms[n].k == 6 for n in a.methods[:3]) and ms["kfac"].options.kind == "kfac"
    fit_s = ms["arnoldi_kfac"].info["kfac_fit_seconds"]
    assert all(m.fit_seconds >= fit_s for m in ms.values())
    g = np.concatenate([np.asarray(x).reshape(3, -1) for x in jax.tree.leaves(
        jax.vmap(jax.grad(spec.loss), in_axes=(None, 0))(task.params, task.test))], axis=1)
    u = ms["arnoldi_kfac"].comp.u
    r = g - (g @ u.T) @ u
    res = ms["arnoldi_kfac_residual"].comp
    np.testing.assert_allclose(res.vectors(g), res._cinv(r) - (res._cinv(r) @ u.T) @ u, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="compose"):
        make_method("arnoldi_kfac_bogus")
