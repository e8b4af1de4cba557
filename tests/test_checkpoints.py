"""Checkpoint interop: every form loads to identical params; bad checkpoints give errors naming the file and
the leaf; an orbax checkpoint gives the same eigensystem and index as msgpack."""
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization
from flax.training import train_state
from safetensors.numpy import save as st_save

from beam_influence import CheckpointError, load_checkpoint, nnx_params, nnx_spec, save_checkpoint
from beam_influence.core.checkpoints import checkpoint_state, detect_form
from beam_influence.core.model_spec import check_spec
from beam_influence.models import digits


@pytest.fixture(scope="module")
def mlp():
    spec = digits.mlp(hidden=16)
    return spec, spec.init(3)


def _assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert np.asarray(a).dtype == np.asarray(b).dtype, jax.tree_util.keystr(kp)
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(kp)


def _flat(tree, sep, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{sep}{k}" if prefix else k
        out.update(_flat(v, sep, name) if isinstance(v, dict) else {name: np.asarray(v)})
    return out


def _train_state(params):
    return train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))


def _orbax_save(path, tree):
    with ocp.StandardCheckpointer() as c:
        c.save(os.path.abspath(path), tree)
        c.wait_until_finished()


# ---- every form ----------------------------------------------------------------------------------
def _write(form, d, params):
    """Write ``params`` as ``form`` under ``d``; return (the path to load, the key path or None, detected form)."""
    if form == "msgpack-bare":
        p = d / "bare.msgpack"
        p.write_bytes(serialization.to_bytes(params))
        return str(p), None, "msgpack"
    if form == "msgpack-params":
        p = d / "wrapped.msgpack"
        p.write_bytes(serialization.to_bytes({"params": params}))
        return str(p), None, "msgpack"
    if form in ("msgpack-trainstate", "msgpack-trainstate-key"):
        p = d / "state.ckpt"  # no extension: the form is sniffed from the bytes
        p.write_bytes(serialization.to_bytes(_train_state(params)))
        return str(p), ("params" if form.endswith("key") else None), "msgpack"
    if form == "safetensors-slash":
        p = d / "w.safetensors"
        p.write_bytes(st_save(_flat(params, "/")))
        return str(p), None, "safetensors"
    if form == "safetensors-dot-prefixed":
        p = d / "model.bin"  # no extension: sniffed
        p.write_bytes(st_save(_flat({"params": params}, ".")))
        return str(p), "params", "safetensors"
    if form == "orbax-bare":
        _orbax_save(d / "orbax_bare", params)
        return str(d / "orbax_bare"), None, "orbax"
    if form in ("orbax-trainstate", "orbax-trainstate-key"):
        _orbax_save(d / "orbax_state", _train_state(params))
        return str(d / "orbax_state"), ("params" if form.endswith("key") else None), "orbax"
    if form == "orbax-manager":  # CheckpointManager root: the latest step, items as the top level
        with ocp.CheckpointManager(os.path.abspath(d / "mgr"), item_names=("state", "meta")) as mgr:
            zeros = jax.tree.map(np.zeros_like, params)
            mgr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(_train_state(zeros)),
                                                meta=ocp.args.JsonSave({"note": "older"})))
            mgr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(_train_state(params)),
                                                meta=ocp.args.JsonSave({"note": "latest"})))
            mgr.wait_until_finished()
        return str(d / "mgr") + "#state/params", None, "orbax"
    if form == "save_checkpoint-orbax":
        save_checkpoint(str(d / "mine") + "/", params)
        return str(d / "mine"), None, "orbax"
    raise AssertionError(form)


FORMS = ["msgpack-bare", "msgpack-params", "msgpack-trainstate", "msgpack-trainstate-key", "safetensors-slash",
         "safetensors-dot-prefixed", "orbax-bare", "orbax-trainstate", "orbax-trainstate-key", "orbax-manager",
         "save_checkpoint-orbax"]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_loads_identical_params(tmp_path, mlp, form):
    spec, params = mlp
    path, key, detected = _write(form, tmp_path, params)
    assert detect_form(path) == detected
    _assert_same(spec.load_params(path, params_key=key), params)


def test_save_params_round_trips_each_form(tmp_path, mlp):
    spec, params = mlp
    for path, form in (("p.msgpack", "msgpack"), ("p.safetensors", "safetensors"), ("p.orbax", "orbax"),
                       ("plain", "msgpack")):
        assert spec.save_params(str(tmp_path / path), params) == form
        assert detect_form(str(tmp_path / path)) == form
        _assert_same(spec.load_params(str(tmp_path / path)), params)


def test_bfloat16_safetensors_cast_to_the_spec_dtype(tmp_path, mlp):
    spec, params = mlp
    half = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), params)
    p = tmp_path / "bf16.safetensors"
    p.write_bytes(st_save(_flat(half, "/")))
    _assert_same(spec.load_params(str(p)), jax.tree.map(lambda a: a.astype(np.float32), half))


def test_auto_detection_prefers_params_over_optimizer_moments(tmp_path, mlp):
    """Adam's mu/nu have the params' structure; the params are found, not a moment (they differ here)."""
    spec, params = mlp
    st = _train_state(params)
    grads = jax.tree.map(jnp.ones_like, params)
    st = st.apply_gradients(grads=grads)  # mu, nu now non-zero and unlike the params
    p = tmp_path / "state.msgpack"
    p.write_bytes(serialization.to_bytes(st))
    _assert_same(spec.load_params(str(p)), jax.device_get(st.params))
    mu = jax.device_get(st.opt_state[0].mu)
    _assert_same(spec.load_params(str(p), params_key="opt_state/0/mu"), mu)


# ---- errors naming the file, the form and the leaf ------------------------------------------------
def test_wrong_shape_names_file_form_leaf_and_both_shapes(tmp_path, mlp):
    spec, params = mlp
    bigger = digits.mlp(hidden=12)
    for name in ("w.safetensors", "w.msgpack", "w_orbax/"):
        path = str(tmp_path / name)
        save_checkpoint(path, params)
        with pytest.raises(CheckpointError) as err:
            bigger.load_params(path)
        msg = str(err.value)
        assert path in msg and "'Dense_0/kernel'" in msg and "(16, 10)" in msg and "(12, 10)" in msg, msg
        assert detect_form(path) in msg, msg


def test_missing_leaf_is_named(tmp_path, mlp):
    spec, params = mlp
    flat = _flat(params, "/")
    del flat["Dense_1/bias"]
    p = tmp_path / "partial.safetensors"
    p.write_bytes(st_save(flat))
    with pytest.raises(CheckpointError, match=rf"{p}.*safetensors.*missing leaf.*'Dense_1/bias'"):
        spec.load_params(str(p))
    state = serialization.to_state_dict(params)
    del state["Dense_0"]["kernel"]
    _orbax_save(tmp_path / "partial_orbax", state)
    with pytest.raises(CheckpointError, match=r"partial_orbax.*orbax.*missing leaf.*'Dense_0/kernel'"):
        spec.load_params(str(tmp_path / "partial_orbax"))


def test_wrong_key_path_lists_what_is_there(tmp_path, mlp):
    spec, params = mlp
    _orbax_save(tmp_path / "st", _train_state(params))
    with pytest.raises(CheckpointError) as err:
        spec.load_params(str(tmp_path / "st"), params_key="state/params")
    msg = str(err.value)
    assert str(tmp_path / "st") in msg and "'state/params' not found" in msg and "'opt_state', 'params', 'step'" in msg
    with pytest.raises(CheckpointError, match=r"'step'.*expected a map of parameters"):
        spec.load_params(str(tmp_path / "st") + "#step")


def test_unknown_or_unreadable_files(tmp_path, mlp):
    spec, _ = mlp
    junk = tmp_path / "weights.bin"
    junk.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(CheckpointError, match=rf"{junk}.*msgpack.*not a valid"):
        spec.load_params(str(junk))
    for name, raw in (("an_int", b"\x05"), ("a_list", b"\x92\x01\x02")):  # valid msgpack, not a map
        (tmp_path / f"{name}.msgpack").write_bytes(raw)
        with pytest.raises(CheckpointError, match=rf"{name}.msgpack.*msgpack file.*expected a map of parameters"):
            spec.load_params(str(tmp_path / f"{name}.msgpack"))
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=rf"{bad_st}.*safetensors.*not a valid"):
        spec.load_params(str(bad_st))
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"empty_dir.*is not an orbax checkpoint.*notes.txt"):
        spec.load_params(str(tmp_path / "empty_dir"))
    with pytest.raises(FileNotFoundError, match="nowhere.msgpack"):
        spec.load_params(str(tmp_path / "nowhere.msgpack"))


def test_another_models_checkpoint_is_refused(tmp_path, mlp):
    spec, params = mlp
    save_checkpoint(str(tmp_path / "mlp.orbax"), params)
    with pytest.raises(CheckpointError, match=r"mlp.orbax.*another model.*digits_logreg"):
        digits.logreg().load_params(str(tmp_path / "mlp.orbax"))


def test_nan_in_orbax_checkpoint_names_the_leaf(tmp_path, mlp):
    spec, params = mlp
    bad = jax.tree.map(np.array, params)
    bad["Dense_1"]["kernel"][0, 0] = np.nan
    save_checkpoint(str(tmp_path / "nan.orbax"), bad)
    with pytest.raises(CheckpointError, match=r"nan.orbax.*'Dense_1/kernel'.*1 non-finite"):
        spec.load_params(str(tmp_path / "nan.orbax"))


def test_checkpoint_state_follows_changes_inside_an_orbax_dir(tmp_path, mlp):
    spec, params = mlp
    path = str(tmp_path / "c.orbax")
    save_checkpoint(path, params)
    before = checkpoint_state(path)
    assert before == checkpoint_state(path) and len(before) > 1
    save_checkpoint(path, jax.tree.map(lambda a: a + 1, params))  # overwritten in place
    assert checkpoint_state(path) != before
    assert checkpoint_state(path + "#params") == checkpoint_state(path)


# ---- Flax NNX ------------------------------------------------------------------------------------
class _NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(64, 16, rngs=rngs), nnx.Linear(16, 10, rngs=rngs)])
        self.norm = nnx.BatchNorm(16, rngs=rngs)

    def __call__(self, x):
        return self.layers[1](jnp.tanh(self.norm(self.layers[0](x), use_running_average=True)))


def _xent(logits, z):
    return optax.softmax_cross_entropy_with_integer_labels(logits, z["y"])


def _nnx(model):
    return nnx_spec(model, name="nnx_net", features=digits.FEATURES, loss_fn=lambda m, z: _xent(m(z["x"]), z),
                    output_fn=lambda m, z: m(z["x"]), output_loss=_xent)


def test_nnx_spec_split_save_load_and_loss(tmp_path):
    spec = _nnx(_NNXNet)
    params = spec.init(5)
    assert set(params) == {"layers", "norm"} and set(params["layers"]) == {"0", "1"}
    module = _NNXNet(nnx.Rngs(5))
    _assert_same(nnx_params(module), params)
    example = spec.decode(digits.load_digits(seed=0).train[0])
    check_spec(spec, params, example)
    direct = float(_xent(module(jnp.asarray(example["x"])), example))
    assert float(spec.loss(params, example)) == pytest.approx(direct, rel=1e-6)
    assert float(spec.output_loss(spec.apply(params, example), example)) == pytest.approx(direct, rel=1e-6)
    for name in ("n.msgpack", "n.safetensors", "n.orbax"):
        spec.save_params(str(tmp_path / name), params)
        _assert_same(spec.load_params(str(tmp_path / name)), params)
    _orbax_save(tmp_path / "nnx_state", {"model": params, "step": np.int32(3)})  # an nnx training loop's layout
    _assert_same(spec.load_params(str(tmp_path / "nnx_state")), params)


def test_nnx_spec_of_a_trained_module_instance(tmp_path):
    module = _NNXNet(nnx.Rngs(1))
    module.layers[0].kernel.value = module.layers[0].kernel.value * 2  # "trained"
    spec = _nnx(module)
    _assert_same(spec.init(0), nnx_params(module))
    linear = nnx_spec(lambda rngs: nnx.Linear(64, 10, rngs=rngs), name="nnx_linear", features=digits.FEATURES,
                      loss_fn=lambda m, z: _xent(m(z["x"]), z))
    spec.save_params(str(tmp_path / "m.orbax"), spec.init(0))
    # {kernel, bias} is the structure of layers/0 and layers/1, but their shapes are not (64, 10) and (10,)
    with pytest.raises(CheckpointError, match=r"m.orbax.*another model.*nnx_linear"):
        linear.load_params(str(tmp_path / "m.orbax"))


def test_load_checkpoint_takes_any_template(tmp_path, mlp):
    _, params = mlp
    save_checkpoint(str(tmp_path / "x.safetensors"), params)
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    _assert_same(load_checkpoint(str(tmp_path / "x.safetensors"), template), params)


# ---- end to end: an orbax checkpoint gives the msgpack result ------------------------------------
def test_digits_eigensystem_and_index_from_orbax_equal_msgpack(tmp_path, logreg_trained):
    from beam_influence.beam import index_arrays
    from beam_influence.cli import main
    from beam_influence.core.eigensystem import Eigensystem
    from beam_influence.formats import write_records
    from pipelines import index

    t = logreg_trained
    write_records(t.data.train[:300], str(tmp_path / "train"), "parquet", num_shards=2)
    t.spec.save_params(str(tmp_path / "ckpt.msgpack"), t.params)
    _orbax_save(tmp_path / "ckpt_orbax", _train_state(t.params))  # a TrainState: params found automatically
    spec = "beam_influence.models.digits:logreg"
    results = {}
    for name, ckpt in (("msgpack", str(tmp_path / "ckpt.msgpack")), ("orbax", str(tmp_path / "ckpt_orbax"))):
        eig = str(tmp_path / f"eig_{name}.safetensors")
        assert main(["eigensystem", "--spec", spec, "--checkpoint", ckpt, "--train_data", str(tmp_path / "train-*"),
                     "--output", eig, "--num_iters", "20", "--num_eigenpairs", "5", "--curvature_batch_size", "128",
                     "--no_residuals"]) == 0
        idx = str(tmp_path / f"index_{name}")
        index.run(["--spec", spec, "--checkpoint", ckpt, "--eigensystem", eig, "--train_data",
                   str(tmp_path / "train-*"), "--index_dir", idx, "--projection_batch_size", "64"])
        results[name] = Eigensystem.load(eig), index_arrays(idx)
    (es_m, (ids_m, p_m)), (es_o, (ids_o, p_o)) = results["msgpack"], results["orbax"]
    assert es_o.id == es_m.id and np.array_equal(es_o.eigvals, es_m.eigvals)
    order_m, order_o = np.argsort(ids_m), np.argsort(ids_o)
    assert [ids_m[i] for i in order_m] == [ids_o[i] for i in order_o] and len(ids_m) == 300
    assert np.array_equal(p_m[order_m], p_o[order_o])


# ---- the README's worked example (examples/own_model) --------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "own_model")
SECTION = "## Your own Flax model and checkpoint in three commands"


def _readme_blocks(lang):
    """The ``lang`` code blocks of the README section of the worked example, in order."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [b.split("```", 1)[0] for b in section.split(f"```{lang}\n")[1:]]


def test_readme_nnx_snippet_runs_and_its_checkpoint_loads(tmp_path, monkeypatch):
    (snippet,) = _readme_blocks("python")
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(snippet, "README.md:nnx", "exec"), ns)  # noqa: S102 - our own README
    spec = ns["make_spec"]()
    _assert_same(spec.load_params(str(tmp_path / "ckpt.orbax")), nnx_params(ns["model"]))
    example = {"x": np.linspace(0, 1, 64, dtype=np.float32), "y": np.int32(3)}
    check_spec(spec, spec.init(0), example)


def test_own_model_example_trains_saves_orbax_and_loads(tmp_path, monkeypatch):
    """The fast part: the example's spec is valid, and its training script's orbax TrainState loads."""
    monkeypatch.syspath_prepend(EXAMPLE)
    import train_and_save
    from my_pkg.my_module import make_data, make_spec

    spec = make_spec()
    records = make_data(50, label_noise=0.2, seed=3)
    assert sum(r["flipped"] for r in records) > 0 and all(r["label"] != r["true_label"] for r in records
                                                          if r["flipped"])
    assert spec.decode(records[0])["tokens"].shape == (16,)  # (the slow test's eigensystem runs check_spec)
    train_and_save.main(["--output", str(tmp_path), "--n_train", "64", "--n_test", "8", "--steps", "2",
                         "--train_batch_size", "16"])
    got = spec.load_params(str(tmp_path / "ckpt"))
    with ocp.StandardCheckpointer() as c:
        raw = c.restore(str(tmp_path / "ckpt"))
    _assert_same(got, serialization.from_state_dict(spec.init(0), raw["params"]))
    assert not np.array_equal(np.asarray(got["Dense_0"]["kernel"]), np.asarray(spec.init(0)["Dense_0"]["kernel"]))
    assert sorted(os.listdir(tmp_path / "data")) == ["test-00000-of-00001.parquet", "train-00000-of-00002.parquet",
                                                     "train-00001-of-00002.parquet"]


@pytest.mark.slow
def test_readme_own_model_commands_as_written(tmp_path):
    """The README's bash block, as written, in a copy of examples/own_model (a few minutes on 2 busy cores)."""
    import shutil
    import subprocess
    import sys

    from beam_influence.beam.index import read_manifest
    from beam_influence.beam.outputs import read_jsonl

    (block,) = _readme_blocks("bash")
    shutil.copytree(EXAMPLE, tmp_path / "examples" / "own_model", ignore=shutil.ignore_patterns("out", "__pycache__"))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "examples" / "own_model" / "out"
    manifest = read_manifest(str(out / "index"))
    assert manifest["rows"] == 1500 and manifest["dead_letters"] == 0
    rows = read_jsonl(str(out / "query" / "topk.jsonl"))
    assert len(rows) == 1000 and {r["kind"] for r in rows} == {"proponent", "opponent"}
    assert all(r["score"] > 0 for r in rows if r["kind"] == "proponent" and r["rank"] == 1)
