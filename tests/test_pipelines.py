"""End-to-end Beam pipelines on digits against the in-memory core result (columnar engine)."""
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_influence.beam.index import IndexCorruptError, read_manifest
from beam_influence.beam.outputs import read_jsonl
from beam_influence.core import scoring
from beam_influence.core.topk import top_k_per_query
from beam_influence.core.eigensystem import EigensystemMismatchError
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.core.projection import make_projector
from beam_influence.data import load_examples
from beam_influence.formats import write_records
from pipelines import fused, index, query, self_influence

SPEC = "beam_influence.models.digits:logreg"
MULTI = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
K = 7


@pytest.fixture(scope="module")
def ws(tmp_path_factory, logreg_trained):
    """A workspace: digits records as Parquet (3 shards; and one file of many row groups), JSONL, checkpoint,
    eigensystem."""
    t = logreg_trained
    root = tmp_path_factory.mktemp("ws")
    write_records(t.data.train, str(root / "train"), "parquet", num_shards=3)
    write_records(t.data.train, str(root / "train1"), "jsonl", num_shards=1)
    write_records(t.data.test[:40], str(root / "test"), "parquet", num_shards=2)
    one = pa.Table.from_pylist([{"id": r["id"], "x": np.asarray(r["x"]).tolist(), "y": r["y"]} for r in t.data.train])
    (root / "big").mkdir()
    pq.write_table(one, str(root / "big" / "all.parquet"), row_group_size=100)  # 15 row groups
    t.spec.save_params(str(root / "ckpt.msgpack"), t.params)
    es = compute_eigensystem(t.spec, t.params, t.train_batch, EigensystemArgs(num_iters=50, top_k=20, batch_size=4096))
    es.save(str(root / "eig.safetensors"))
    model = ["--spec", SPEC, "--checkpoint", str(root / "ckpt.msgpack"), "--eigensystem", str(root / "eig.safetensors")]
    return root, model, es


@pytest.fixture(scope="module")
def expected(ws, logreg_trained):
    """The in-memory core result: projections → scores → exact top-k per query."""
    root, _, es = ws
    t = logreg_trained
    spec = t.spec
    proj = make_projector(spec.loss, es.eigvecs_tree(t.params))
    train = load_examples(spec, str(root / "train-*"))
    test = load_examples(spec, str(root / "test-*"))
    ptrain = np.asarray(proj(t.params, train.batch).projections)
    ptest = np.asarray(proj(t.params, test.batch).projections)
    scores = scoring.influence_scores(ptest, ptrain, es.eigvals)
    pro, opp = top_k_per_query(scores, train.ids, K)
    rows = {}
    for qid, p, o in zip(test.ids, pro, opp):
        for kind, pairs in (("proponent", p), ("opponent", o)):
            for rank, (tid, s) in enumerate(pairs, 1):
                rows[(qid, kind, rank)] = (tid, s)
    si = scoring.self_influence(ptrain, es.eigvals)
    top_self = [train.ids[i] for i in scoring.top_k(si, train.ids, 25)]
    return rows, top_self, dict(zip(train.ids, ptrain))


def _check_topk(path, expected_rows):
    got = read_jsonl(path)
    assert len(got) == len(expected_rows)
    for r in got:
        tid, s = expected_rows[(r["query_id"], r["kind"], r["rank"])]
        assert r["train_id"] == tid
        assert abs(r["score"] - s) <= 1e-5 * max(1.0, abs(s))  # float32 projections at another batch size


@pytest.mark.parametrize("runner,batch,rows,train", [([], 32, 65536, "train-*"), ([], 100, 97, "train-*"),
                                                      (MULTI, 64, 200, "big/all.parquet")],
                         ids=["inmemory-b32", "inmemory-b100-chunks97", "multiprocess-one-big-file"])
def test_index_query_self_influence_equal_core(ws, expected, tmp_path, runner, batch, rows, train):
    root, model, _ = ws
    rows_expected, top_self, proj = expected
    idx = str(tmp_path / "index")
    manifest = index.run(model + runner + ["--train_data", str(root / train), "--index_dir", idx,
                                           "--projection_batch_size", str(batch), "--batch_rows", str(rows)])
    assert manifest["rows"] == manifest["records"] == 1438 and manifest["dead_letters"] == 0
    assert all(s["rows"] <= rows for s in manifest["shards"]) and not any(os.path.isabs(s["path"])
                                                                       for s in manifest["shards"])
    if train.startswith("big"):  # one file → several splits, spread over the two workers
        assert manifest["counters"]["splits"] >= 7 and len(manifest["shards"]) >= 7
        assert manifest["counters"]["read_bundles"] >= 2, manifest["counters"]  # read by more than one bundle
    # the index rows hold the core's projections (float32) and pass record fields through as columns
    from beam_influence.beam import index_arrays
    ids, p = index_arrays(idx)
    assert sorted(ids) == sorted(proj)
    np.testing.assert_allclose(p, np.stack([proj[i] for i in ids]), rtol=1e-5, atol=1e-6)
    query.run(model + runner + ["--test_data", str(root / "test-*"), "--index_dir", idx, "--complement", "none",
                                "--output", str(tmp_path / "q"), "--top_k", str(K)])  # truncated (complement: test_complement_paths)
    _check_topk(str(tmp_path / "q" / "topk.jsonl"), rows_expected)
    self_influence.run(model + ["--index_dir", idx, "--output", str(tmp_path / "a"), "--self_influence_top", "25",
                                "--complement", "none"])
    assert [r["id"] for r in read_jsonl(str(tmp_path / "a" / "self_influence_top.jsonl"))] == top_self


@pytest.mark.parametrize("runner,train", [([], "train-*"), (MULTI, "train1-*")], ids=["inmemory", "multiprocess"])
def test_fused_equals_core(ws, expected, tmp_path, runner, train):
    root, model, _ = ws
    rows, top_self, _ = expected
    out = tmp_path / "fused"
    summary = fused.run(model + runner + ["--train_data", str(root / train), "--test_data", str(root / "test-*"),
                                          "--output", str(out), "--top_k", str(K), "--self_influence_top", "25",
                                          "--projection_batch_size", "50", "--batch_rows", "300", "--complement", "none"])
    assert summary["dead_letters"] == 0
    _check_topk(str(out / "topk.jsonl"), rows)
    assert [r["id"] for r in read_jsonl(str(out / "self_influence_top.jsonl"))] == top_self


BAD = [
    {"id": "bad-shape", "x": [0.5] * 63, "y": 1},
    {"id": "bad-nan", "x": [float("nan")] * 64, "y": 2},
    {"id": "bad-missing", "y": 3},
    {"id": "bad-dtype", "x": ["a"] * 64, "y": 4},
    {"id": "bad-label", "x": [0.1] * 64, "y": 12345},  # label out of the spec's range
    {"id": "bad-float-label", "x": [0.1] * 64, "y": 3.7},  # not silently truncated to 3
]


def _mixed_data(tmp_path, good):
    data = tmp_path / "mixed"
    data.mkdir()
    write_records(good[:700] + BAD[:2], str(data / "a"), "jsonl", num_shards=1)
    write_records(good[700:] + BAD[2:4], str(data / "b"), "jsonl", num_shards=1)
    with open(data / "c-00000-of-00001.jsonl", "w") as f:  # bad rows and one unparsable line
        f.write(json.dumps(BAD[4]) + "\n" + json.dumps(BAD[5]) + "\n{not json\n")
    return data


def _check_dead(dead):
    reasons = {d["id"]: d["reason"] for d in dead}
    assert set(reasons) == {r["id"] for r in BAD} | {"c-00000-of-00001:2"}
    assert "shape" in reasons["bad-shape"] and "non-finite" in reasons["bad-nan"]
    assert "missing" in reasons["bad-missing"] and "float32" in reasons["bad-dtype"]
    assert "range" in reasons["bad-label"] and "JSON" in reasons["c-00000-of-00001:2"]
    assert "non-integer" in reasons["bad-float-label"]
    assert all(d["raw"] for d in dead)


def test_bad_records_go_to_dead_letter(ws, expected, tmp_path, logreg_trained):
    root, model, _ = ws
    rows, _, _ = expected
    good = list(logreg_trained.data.train)
    data = _mixed_data(tmp_path, good)
    out = tmp_path / "out"
    summary = fused.run(model + ["--train_data", str(data / "*.jsonl"), "--test_data", str(root / "test-*"),
                                 "--output", str(out), "--top_k", str(K), "--batch_rows", "128", "--complement", "none"])
    dead = read_jsonl(str(out / "dead_letter.jsonl"))
    _check_dead(dead)
    counters = summary["counters"]
    train_projected = sum(v for key, v in counters["by_step"].items()
                          if key.startswith("ProjectTrain/") and key.endswith("/examples_projected"))
    assert train_projected == len(good)
    train_read = sum(v for key, v in counters["by_step"].items()
                     if key.startswith("ReadTrain/") and key.endswith("/records_read"))
    assert train_read == len(good) + len(BAD) + 1 == train_projected + len(dead)  # counts add up
    _check_topk(str(out / "topk.jsonl"), rows)  # good records are unaffected
    # the index job: the same dead letters, and records in = rows + dead letters in its manifest
    idx = str(tmp_path / "index")
    manifest = index.run(model + ["--train_data", str(data / "*.jsonl"), "--index_dir", idx, "--batch_rows", "128"])
    assert manifest["rows"] == len(good) and manifest["records"] == len(good) + len(BAD) + 1
    assert manifest["dead_letters"] == len(dead)
    _check_dead(read_jsonl(os.path.join(idx, manifest["dead_letter_file"])))


def test_record_decode_agrees_with_batch_decode(logreg_trained, tmp_path):
    """``ModelSpec.decode(record)`` and ``decode_batch`` (on the chunks the readers yield) give the same
    arrays and the same reasons, for every format."""
    from beam_influence.core.model_spec import RecordError
    from beam_influence.formats import iter_chunks, read_records

    spec = logreg_trained.spec
    recs = list(logreg_trained.data.train[:5]) + [dict(r) for r in BAD]
    for fmt in ("jsonl", "parquet"):
        rs = recs if fmt == "jsonl" else [r for r in recs if r["id"] != "bad-dtype"]  # Parquet cannot mix types
        paths = write_records(rs, str(tmp_path / f"d-{fmt}"), fmt, num_shards=1)
        batch_reasons, arrays = {}, {}
        for chunk in iter_chunks(paths[0]):
            dec = spec.decode_batch(chunk.batch)
            batch_reasons.update({rid: reason for _, rid, reason in dec.rejected})
            for i, rid in enumerate(dec.ids):
                arrays[rid] = {k: v[i] for k, v in dec.arrays.items()}
        for r in read_records(paths[0]):
            try:
                one = spec.decode(r)
            except RecordError as e:
                want = batch_reasons[r["id"]]
                assert (str(e).split(" (has")[0] == want.split(" (has")[0]), (fmt, r["id"], str(e), want)
                assert r["id"] not in arrays
            else:
                for key in spec.features:
                    np.testing.assert_array_equal(one[key], arrays[r["id"]][key])
        assert len(arrays) == 5 and len(batch_reasons) == len(rs) - 5


def test_query_refuses_index_from_other_eigensystem(ws, tmp_path, logreg_trained):
    root, model, es = ws
    t = logreg_trained
    idx = str(tmp_path / "index")
    index.run(model + ["--train_data", str(root / "train-*"), "--index_dir", idx])
    other = compute_eigensystem(t.spec, t.params, t.train_batch, EigensystemArgs(num_iters=30, top_k=5, batch_size=512))
    other.save(str(tmp_path / "other.safetensors"))
    model2 = model[:4] + ["--eigensystem", str(tmp_path / "other.safetensors")]
    with pytest.raises(EigensystemMismatchError, match="Rebuild the index"):
        query.run(model2 + ["--test_data", str(root / "test-*"), "--index_dir", idx, "--output", str(tmp_path / "q")])
    with pytest.raises(ValueError, match="refusing to overwrite"):
        index.run(model2 + ["--train_data", str(root / "train-*"), "--index_dir", idx])


def test_index_is_verified_and_published_atomically(ws, expected, tmp_path, monkeypatch):
    """Relative index dirs work from any cwd; a missing or altered shard fails loudly; a killed rerun leaves
    the previous index usable and the next run cleans it up."""
    root, model, _ = ws
    rows, top_self, _ = expected
    monkeypatch.chdir(tmp_path)
    index.run(model + ["--train_data", str(root / "train-*"), "--index_dir", "rel/index", "--batch_rows", "500"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    idx = str(tmp_path / "rel" / "index")
    self_influence.run(model + ["--index_dir", "../rel/index", "--output", "a", "--self_influence_top", "25",
                                "--complement", "none"])
    assert [r["id"] for r in read_jsonl("a/self_influence_top.jsonl")] == top_self
    # a killed rerun: a data folder with partial parts, the manifest untouched → still the old, complete index
    manifest = read_manifest(idx)
    stray = os.path.join(idx, "data-killed")
    os.makedirs(stray)
    shutil.copy(os.path.join(idx, manifest["shards"][0]["path"]), os.path.join(stray, "part-x.parquet"))
    query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", idx, "--output", "q", "--top_k", str(K),
                       "--complement", "none"])
    _check_topk("q/topk.jsonl", rows)
    index.run(model + ["--train_data", str(root / "train-*"), "--index_dir", idx, "--batch_rows", "500"])
    assert not os.path.exists(stray)
    manifest = read_manifest(idx)
    # an altered shard (same size, other bytes) and a missing shard are detected
    part = os.path.join(idx, manifest["shards"][1]["path"])
    t = pq.read_table(part)
    pq.write_table(t.set_column(t.schema.get_field_index("id"), "id",
                                pa.array([f"x{i}" for i in range(t.num_rows)])), part)
    with pytest.raises(Exception, match="checksum|rows"):
        self_influence.run(model + ["--index_dir", idx, "--output", "b"])
    os.remove(part)
    with pytest.raises(IndexCorruptError, match="missing"):
        query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", idx, "--output", "c"])


def test_empty_and_missing_inputs_are_errors(ws, tmp_path):
    root, model, _ = ws
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        index.run(model + ["--train_data", str(root / "nothing-here-*"), "--index_dir", str(tmp_path / "i")])
    with pytest.raises(FileNotFoundError, match="typo"):
        fused.run(model + ["--train_data", str(root / "train-*"), "--test_data", str(root / "typo.parquet"),
                           "--output", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--top_k"):
        fused.run(model + ["--train_data", str(root / "train-*"), "--test_data", str(root / "test-*"),
                           "--output", str(tmp_path / "o"), "--top_k", "0"])


def test_mismatched_checkpoint_fails_before_any_work(ws, tmp_path, logreg_trained):
    root, model, _ = ws
    t = logreg_trained
    t.spec.save_params(str(tmp_path / "other.msgpack"), t.spec.init(9))
    bad_model = [model[0], model[1], "--checkpoint", str(tmp_path / "other.msgpack"), *model[4:]]
    out = tmp_path / "never"
    with pytest.raises(EigensystemMismatchError, match="fingerprint"):
        fused.run(bad_model + ["--train_data", str(root / "train-*"), "--test_data", str(root / "test-*"),
                               "--output", str(out)])
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="eigensystem"):
        index.run(model[:4] + ["--eigensystem", str(tmp_path / "missing.safetensors"),
                               "--train_data", str(root / "train-*"), "--index_dir", str(out)])
    with pytest.raises(ValueError, match="--index_dir"):
        index.run(model + ["--train_data", str(root / "train-*")])


def test_handler_carries_paths_not_arrays(ws):
    """The RunInference handler pickles paths (ModelRef), never the eigenvectors."""
    import pickle

    from beam_influence.beam.preflight import model_ref
    from beam_influence.beam.project import ProjectionModelHandler
    from beam_influence.options import IndexOptions
    from pipelines._job import parse

    _, model, _ = ws
    opts, _ = parse(IndexOptions, model + ["--train_data", "x", "--index_dir", "y"])
    assert len(pickle.dumps(ProjectionModelHandler(model_ref(opts), 64))) < 4096
