"""Artefact integrity: eigensystem content digests and basis checks, checkpoint validation, check_spec."""
import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beam_influence.core import eigensystem as es_mod
from beam_influence.core.eigensystem import CorruptEigensystemError, Eigensystem, UnverifiedEigensystemWarning
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.core.model_spec import check_spec
from beam_influence.models import digits


@pytest.fixture(scope="module")
def es(logreg_trained):
    t = logreg_trained
    return compute_eigensystem(t.spec, t.params, t.train_batch,
                               EigensystemArgs(num_iters=24, top_k=6, batch_size=4096, seed=3))


def _regions(raw: bytes) -> dict[str, tuple[int, int]]:
    """Absolute [start, end) byte range of every tensor in a safetensors buffer."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return {name: (8 + n + h["data_offsets"][0], 8 + n + h["data_offsets"][1])
            for name, h in header.items() if name != "__metadata__"}


def _flip(raw: bytes, pos: int, bit: int = 0) -> bytes:
    b = bytearray(raw)
    b[pos] ^= 1 << bit
    return bytes(b)


def _meta(raw: bytes) -> dict:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(json.loads(raw[8 : 8 + n])["__metadata__"]["beam_influence"])


def _resave(es: Eigensystem, *, meta_update=None, drop=()) -> bytes:
    """A file of ``es`` with edited metadata (written like to_bytes, then the metadata rewritten)."""
    from safetensors.numpy import save

    meta = _meta(es.to_bytes())
    meta.update(meta_update or {})
    for k in drop:
        meta.pop(k, None)
    return save(es._tensors(), metadata={"beam_influence": json.dumps(meta, sort_keys=True)})


# ---- the id ----------------------------------------------------------------------------------
def test_id_is_deterministic_and_survives_round_trip(es, tmp_path):
    path = str(tmp_path / "eig.safetensors")
    es.save(path)
    back = Eigensystem.load(path)
    assert back.id == es.id and len(es.id) == 16
    assert back.content_sha256 == es.content_sha256 == _meta(es.to_bytes())["sha256"]
    assert es.to_bytes() == es.to_bytes()  # deterministic bytes
    copy = dataclasses.replace(es, eigvecs={k: v.copy() for k, v in es.eigvecs.items()},
                               eigvals=es.eigvals.copy())
    assert copy.id == es.id  # a pure function of the content, not of the instance
    assert Eigensystem.from_bytes(back.to_bytes()).id == es.id


def test_id_changes_when_any_tensor_or_metadata_changes(es):
    seen = {es.id}

    def bump(a, i=0):
        a = np.array(a, copy=True)
        a.reshape(-1)[i] = np.nextafter(a.reshape(-1)[i], np.inf) if np.isfinite(a.reshape(-1)[i]) else 1.0
        return a

    variants = [dataclasses.replace(es, eigvals=bump(es.eigvals, 2)),
                dataclasses.replace(es, ritz_values=bump(es.ritz_values)),
                dataclasses.replace(es, residuals=bump(es.residuals, 1)),
                dataclasses.replace(es, krylov_ritz_values=bump(es.krylov_ritz_values, -1)),
                dataclasses.replace(es, fingerprint=es.fingerprint[:-1] + "x"),
                dataclasses.replace(es, spec_name=es.spec_name + "-2"),
                dataclasses.replace(es, args={**es.args, "seed": es.args["seed"] + 1})]
    for key, u in es.eigvecs.items():  # every eigenvector leaf, first and last element
        for i in (0, u.size - 1):
            variants.append(dataclasses.replace(es, eigvecs={**es.eigvecs, key: bump(u, i)}))
        # same bytes under another leaf name / shape must differ too
        variants.append(dataclasses.replace(es, eigvecs={**{k: v for k, v in es.eigvecs.items() if k != key},
                                                         key + "_": u}))
    for v in variants:
        assert v.id not in seen
        seen.add(v.id)


# ---- corruption on disk ----------------------------------------------------------------------
def test_flipped_byte_in_eigenvectors_is_detected(es, tmp_path):
    raw = es.to_bytes()
    regions = _regions(raw)
    rng = np.random.default_rng(0)
    checked = 0
    for name, (start, end) in regions.items():
        if not name.startswith("u/"):
            continue
        positions = {start, start + 1, (start + end) // 2, end - 1, *rng.integers(start, end, 6).tolist()}
        for pos in positions:
            for bit in (0, 7):  # lowest mantissa bit (a change of ~1e-7 relative) and a high bit
                bad = tmp_path / "bad.safetensors"
                bad.write_bytes(_flip(raw, pos, bit))
                with pytest.raises(CorruptEigensystemError) as err:
                    Eigensystem.load(str(bad))
                msg = str(err.value)
                assert str(bad) in msg and "altered or truncated after it was written" in msg
                assert es.id in msg and "beam-influence eigensystem" in msg
                checked += 1
    assert checked >= 20


@pytest.mark.parametrize("name", ["eigvals", "ritz_values", "residuals", "krylov_ritz_values"])
def test_flipped_byte_in_spectra_is_detected(es, name):
    raw = es.to_bytes()
    start, end = _regions(raw)[name]
    for pos in (start, end - 1):
        with pytest.raises(CorruptEigensystemError, match="altered or truncated"):
            Eigensystem.from_bytes(_flip(raw, pos))


def test_edited_metadata_is_detected(es):
    raw = es.to_bytes()
    # a flipped bit in the fingerprint keeps the JSON valid: the digest catches it
    i = raw.index(es.fingerprint.encode())
    with pytest.raises(CorruptEigensystemError, match="altered or truncated"):
        Eigensystem.from_bytes(_flip(raw, i))
    with pytest.raises(CorruptEigensystemError, match="stored eigensystem id"):
        Eigensystem.from_bytes(_resave(es, meta_update={"args": {**es.args, "top_k": 99}}))
    # a current-version file must carry its digest
    with pytest.raises(CorruptEigensystemError, match="no stored content digest"):
        Eigensystem.from_bytes(_resave(es, drop=["sha256"]))
    with pytest.raises(CorruptEigensystemError, match="unsupported eigensystem format version"):
        Eigensystem.from_bytes(_resave(es, meta_update={"version": 99}))
    # an extra tensor is not silently ignored
    from safetensors.numpy import save

    tensors = {**es._tensors(), "extra": np.zeros(3)}
    with pytest.raises(CorruptEigensystemError, match="unexpected tensors"):
        Eigensystem.from_bytes(save(tensors, metadata={"beam_influence": json.dumps(_meta(raw))}))


def test_truncated_file_is_refused(es, tmp_path):
    raw = es.to_bytes()
    for cut in (len(raw) - 1, len(raw) - 4, len(raw) // 2, 9):
        p = tmp_path / f"cut{cut}"
        p.write_bytes(raw[:cut])
        with pytest.raises(CorruptEigensystemError, match=str(p)):
            Eigensystem.load(str(p))


def test_legacy_file_loads_with_a_warning(es):
    legacy = _resave(es, meta_update={"version": 1}, drop=["sha256"])
    with pytest.warns(UnverifiedEigensystemWarning, match="cannot be verified"):
        back = Eigensystem.from_bytes(legacy, source="'old.safetensors'")
    assert back.id == es.id
    np.testing.assert_array_equal(back.eigvals, es.eigvals)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Eigensystem.from_bytes(es.to_bytes())  # a verified file: no warning


# ---- basis sanity ----------------------------------------------------------------------------
def _with_flat(es, params, u):
    from beam_influence.core.projection import unflatten_eigvecs

    return dataclasses.replace(es, eigvecs=Eigensystem.eigvecs_by_path(unflatten_eigvecs(u.astype(np.float32),
                                                                                            params)))


def test_non_orthonormal_basis_is_refused(es, logreg_trained):
    params = logreg_trained.params
    u = es.flat_eigvecs(params).astype(np.float64)
    scaled = u.copy()
    scaled[2] *= 1.1
    # re-signed with a correct digest: only the basis check can catch it
    with pytest.raises(CorruptEigensystemError, match=r"eigenvector 2 has norm 1\.1.*not orthonormal"):
        Eigensystem.from_bytes(_with_flat(es, params, scaled).to_bytes())
    mixed = u.copy()
    mixed[3] = (u[1] + u[3]) / np.sqrt(2)
    with pytest.raises(CorruptEigensystemError, match=r"eigenvectors 1 and 3 have inner product 0\.7.*not orthogonal"):
        Eigensystem.from_bytes(_with_flat(es, params, mixed).to_bytes())
    nan = u.copy()
    nan[0, 5] = np.nan
    with pytest.raises(CorruptEigensystemError, match="non-finite values"):
        Eigensystem.from_bytes(_with_flat(es, params, nan).to_bytes())
    with pytest.raises(CorruptEigensystemError, match="non-zero"):
        Eigensystem.from_bytes(dataclasses.replace(es, eigvals=np.r_[0.0, es.eigvals[1:]]).to_bytes())
    with pytest.raises(CorruptEigensystemError, match="finite"):
        Eigensystem.from_bytes(dataclasses.replace(es, eigvals=np.r_[np.inf, es.eigvals[1:]]).to_bytes())
    # small deviations within tolerance pass
    slight = u.copy()
    slight[0] *= 1 + 1e-4
    Eigensystem.from_bytes(_with_flat(es, params, slight).to_bytes())


def test_blocked_gram_matches_dense(es, logreg_trained, monkeypatch):
    params = logreg_trained.params
    monkeypatch.setattr(es_mod, "_GRAM_BLOCK_BYTES", 8 * es.k * 7)  # 7 columns per block: many blocks
    es.check_basis()
    u = es.flat_eigvecs(params).astype(np.float64)
    mixed = u.copy()
    mixed[4] = 0.99 * u[4] + np.sqrt(1 - 0.99 ** 2) * u[0]  # unit norm, inner product ~0.141 with u_0
    with pytest.raises(ValueError, match=r"eigenvectors 0 and 4 have inner product 0\.14"):
        _with_flat(es, params, mixed).check_basis()


# ---- checkpoints -----------------------------------------------------------------------------
def test_corrupt_checkpoints_are_value_errors_naming_the_file(tmp_path, logreg_trained):
    spec, params = logreg_trained.spec, logreg_trained.params
    good = tmp_path / "good.msgpack"
    spec.save_params(str(good), params)
    back = spec.load_params(str(good))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    raw = good.read_bytes()
    cases = {f"trunc{n}": raw[:n] for n in (1, 10, len(raw) // 3, len(raw) // 2, len(raw) - 1)}
    cases["random"] = np.random.default_rng(0).bytes(4096)
    cases["random_small"] = np.random.default_rng(1).bytes(7)
    cases["empty"] = b""
    cases["an_int"] = b"\x05"  # valid msgpack: the integer 5
    cases["a_list"] = b"\x92\x01\x02"  # valid msgpack: [1, 2]
    for name, data in cases.items():
        p = tmp_path / f"{name}.msgpack"
        p.write_bytes(data)
        with pytest.raises(ValueError) as err:
            spec.load_params(str(p))
        assert str(p) in str(err.value), (name, str(err.value))
    with pytest.raises(FileNotFoundError, match="missing.msgpack"):
        spec.load_params(str(tmp_path / "missing.msgpack"))


def test_checkpoint_of_another_spec_is_refused(tmp_path):
    mlp, logreg = digits.mlp(), digits.logreg()
    p = tmp_path / "mlp.msgpack"
    mlp.save_params(str(p), mlp.init(0))
    with pytest.raises(ValueError, match=rf"{p}.*another model.*{logreg.name}"):
        logreg.load_params(str(p))
    q = tmp_path / "logreg.msgpack"
    logreg.save_params(str(q), logreg.init(0))
    with pytest.raises(ValueError, match=str(q)):
        mlp.load_params(str(q))


def test_nan_parameter_is_refused_naming_the_leaf(tmp_path):
    spec = digits.logreg()
    params = spec.init(0)
    leaves, tree = jax.tree.flatten(params)
    paths = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]
    for i, path in enumerate(paths):
        bad = [np.array(x) for x in leaves]
        bad[i].reshape(-1)[0] = np.nan if i % 2 == 0 else np.inf
        p = tmp_path / f"nan{i}.msgpack"
        spec.save_params(str(p), jax.tree.unflatten(tree, bad))
        with pytest.raises(ValueError) as err:
            spec.load_params(str(p))
        assert str(p) in str(err.value) and path in str(err.value) and "non-finite" in str(err.value)


def test_wrong_dtype_parameter_is_refused(tmp_path):
    spec = digits.logreg()
    params = spec.init(0)
    leaves, tree = jax.tree.flatten(params)
    bad = [np.array(x) for x in leaves]
    bad[0] = bad[0].astype(np.complex64)
    p = tmp_path / "complex.msgpack"
    spec.save_params(str(p), jax.tree.unflatten(tree, bad))
    with pytest.raises(ValueError, match=rf"{p}.*dtype complex64"):
        spec.load_params(str(p))


# ---- check_spec ------------------------------------------------------------------------------
def _example(spec):
    return spec.decode(digits.load_digits(seed=0).train[0])


@pytest.mark.parametrize("make", [digits.logreg, digits.mlp, digits.cnn])
def test_digits_specs_pass(make):
    spec = make()
    assert check_spec(spec, spec.init(0), _example(spec)) is None  # raises ValueError on any failed check


def per_token_spec():
    """A spec whose loss is per class (a vector): the per-token mistake."""
    spec = digits.logreg()

    def loss(params, z):
        logits = spec.apply(params, z)
        return -jax.nn.log_softmax(logits) * jax.nn.one_hot(z["y"], 10)

    return dataclasses.replace(spec, loss=loss)


def test_vector_loss_is_refused():
    spec = per_token_spec()
    with pytest.raises(ValueError, match=r"must return a per-example scalar \(shape \(\)\), it returned shape \(10,\)"):
        check_spec(spec, spec.init(0), _example(spec))


def test_other_bad_losses_are_refused():
    base = digits.logreg()
    params, ex = base.init(0), _example(base)
    cases = {
        "nan": (lambda p, z: base.loss(p, z) * jnp.nan, "is nan on the first example; it must be finite"),
        "inf": (lambda p, z: base.loss(p, z) + jnp.inf, "is inf on the first example"),
        "int": (lambda p, z: z["y"], "must return a float scalar"),
        "tuple": (lambda p, z: (base.loss(p, z), base.loss(p, z)), "per-example scalar"),
        "grad_nan": (lambda p, z: base.loss(p, z) + jnp.sqrt(0.0 * jnp.sum(jax.tree.leaves(p)[0])),
                     "gradient of the loss on the first example is not finite"),
        "raises": (lambda p, z: z["missing"], "fails on one example"),
    }
    for name, (loss, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            check_spec(dataclasses.replace(base, loss=loss), params, ex)


def test_bad_feature_specs_are_refused():
    base = digits.logreg()
    params, ex = base.init(0), _example(base)
    from beam_influence.core.model_spec import FeatureSpec

    cases = {
        "negative": (FeatureSpec((-1,), "float32"), "non-negative ints"),
        "list": (FeatureSpec([64], "float32"), "tuple"),
        "float_dim": (FeatureSpec((64.0,), "float32"), "non-negative ints"),
        "dtype": (FeatureSpec((64,), "not-a-dtype"), "not a numpy dtype"),
        "object": (FeatureSpec((64,), "object"), "numeric"),
        "bounds": (FeatureSpec((64,), "float32", min=2.0, max=1.0), "min 2.0 > max 1.0"),
    }
    for name, (fs, msg) in cases.items():
        spec = dataclasses.replace(base, features={**base.features, "x": fs})
        with pytest.raises(ValueError, match=msg):
            check_spec(spec, params, ex)
    with pytest.raises(ValueError, match="has no feature"):
        check_spec(base, params, {"x": ex["x"]})
    with pytest.raises(ValueError, match="unbatched"):
        check_spec(base, params, {k: np.stack([v, v]) for k, v in ex.items()})


def test_eigensystem_cli_refuses_a_vector_loss(tmp_path, capsys):
    from beam_influence.cli import main
    from beam_influence.formats import write_records

    d = digits.load_digits(seed=0)
    write_records(d.train[:200], str(tmp_path / "train"), "jsonl", 1)
    spec = per_token_spec()
    ckpt = str(tmp_path / "params.msgpack")
    spec.save_params(ckpt, spec.init(0))
    out = tmp_path / "eig.safetensors"
    rc = main(["eigensystem", "--spec", "test_integrity:per_token_spec", "--checkpoint", ckpt,
               "--train_data", str(tmp_path / "train*"), "--output", str(out), "--num_iters", "6", "--num_eigenpairs", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "per-example scalar" in err and "(10,)" in err
    assert not out.exists()


# ---- index manifests: paths stay inside the index directory, every total is checked (issue 21, class 4) ------
def _small_index(root) -> tuple[str, dict]:
    """An index of two parts (5 rows) and 2 dead letters, written as the index job writes one."""
    import pyarrow as pa

    from beam_influence.beam.index import DEAD_LETTERS, ENTRIES, MANIFEST, WriteIndexPartFn, collect
    from beam_influence.beam.project import ProjectedChunk

    idx = root / "idx"
    data = idx / "data-1"
    data.mkdir(parents=True)
    fn = WriteIndexPartFn(str(data))
    entries = []
    for off, ids in ((0, ["a", "b", "c"]), (4, ["d", "e"])):
        t = pa.table({"id": ids, "loss": [1.0] * len(ids), "grad_sq_norm": [1.0] * len(ids)})
        entries += fn.process(ProjectedChunk("s.jsonl", off, len(ids) + 1, t))
    (data / (ENTRIES + ".jsonl")).write_text("".join(json.dumps(e) + "\n" for e in entries))
    (data / (DEAD_LETTERS + ".jsonl")).write_text('{"id": "s:3"}\n{"id": "s:7"}\n')
    manifest = collect(str(data))
    (idx / MANIFEST).write_text(json.dumps(manifest))
    return str(idx), manifest


def _with(idx: str, manifest: dict) -> None:
    import os

    with open(os.path.join(idx, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def test_manifest_paths_outside_the_index_are_refused(tmp_path):
    import os
    import shutil

    from beam_influence.beam.index import IndexCorruptError, read_index_table, read_manifest

    idx, good = _small_index(tmp_path)
    assert read_index_table(idx).num_rows == 5 and read_manifest(idx)["rows"] == 5
    part = os.path.join(idx, good["shards"][0]["path"])
    outside = tmp_path / "x.parquet"
    shutil.copy(part, outside)  # same bytes: the checksum would match
    for bad in ("../x.parquet", "data-1/../../x.parquet", str(outside), "file://" + str(outside), ""):
        m = json.loads(json.dumps(good))
        m["shards"][0]["path"] = bad
        _with(idx, m)
        with pytest.raises(IndexCorruptError, match="not a plain path|not a relative path"):
            read_manifest(idx)
    os.symlink(outside, os.path.join(idx, "data-1", "part-link.parquet"))  # a link out of the index
    m = json.loads(json.dumps(good))
    m["shards"][0]["path"] = "data-1/part-link.parquet"
    _with(idx, m)
    with pytest.raises(IndexCorruptError, match="outside the index directory"):
        read_index_table(idx)
    m = json.loads(json.dumps(good))
    m["dead_letter_file"] = "../dead.jsonl"
    _with(idx, m)
    with pytest.raises(IndexCorruptError, match="dead-letter file"):
        read_manifest(idx)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(rows=m["rows"] + 5), "states 10 rows, but its 2 shards hold 5"),
    (lambda m: m.update(records=m["records"] + 1), "records read, but 5 rows \\+ 2 dead letters"),
    (lambda m: m.update(dead_letters=3, records=8), "states 3 dead letters, but .* holds 2"),
    (lambda m: m["shards"][0].update(rows=True), "not a count"),
    (lambda m: m.update(rows=-5), "not a count"),
    (lambda m: m.update(zero_gradient_rows=6), "6 zero-gradient rows of 5"),
    (lambda m: m["shards"][1].update(rows=3), "but its 2 shards hold 6|holds 2 rows, the manifest says 3"),
])
def test_every_manifest_total_is_checked(tmp_path, edit, match):
    from beam_influence.beam.index import IndexCorruptError, check_dead_letters, read_index_table, read_manifest

    idx, good = _small_index(tmp_path)
    m = json.loads(json.dumps(good))
    edit(m)
    _with(idx, m)
    with pytest.raises(IndexCorruptError, match=match):
        check_dead_letters(idx, read_manifest(idx))
        read_index_table(idx)
