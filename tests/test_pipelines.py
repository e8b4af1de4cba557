"""End-to-end Beam pipelines on digits against the in-memory core result."""
import json

import numpy as np
import pytest

from beam_influence.core import scoring
from beam_influence.beam.outputs import read_jsonl
from beam_influence.data import load_examples
from beam_influence.core.eigensystem import EigensystemMismatchError
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.io import write_records
from beam_influence.models import digits
from beam_influence.core.projection import make_projector
from pipelines import fused, index, query, self_influence

SPEC = "beam_influence.models.digits:logreg"
MULTI = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
K = 7


@pytest.fixture(scope="module")
def ws(tmp_path_factory, logreg_trained):
    """A workspace: digits records as Parquet (3 shards) and JSONL (1 shard), checkpoint, eigensystem."""
    t = logreg_trained
    root = tmp_path_factory.mktemp("ws")
    write_records(t.data.train, str(root / "train"), "parquet", num_shards=3)
    write_records(t.data.train, str(root / "train1"), "jsonl", num_shards=1)
    write_records(t.data.test[:40], str(root / "test"), "parquet", num_shards=2)
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
    pro, opp = scoring.top_k_per_query(scores, train.ids, K)
    rows = {}
    for qid, p, o in zip(test.ids, pro, opp):
        for kind, pairs in (("proponent", p), ("opponent", o)):
            for rank, (tid, s) in enumerate(pairs, 1):
                rows[(qid, kind, rank)] = (tid, s)
    si = scoring.self_influence(ptrain, es.eigvals)
    top_self = [train.ids[i] for i in scoring.top_k(si, train.ids, 25)]
    return rows, top_self


def _check_topk(path, expected_rows):
    got = read_jsonl(path)
    assert len(got) == len(expected_rows)
    for r in got:
        tid, s = expected_rows[(r["query_id"], r["kind"], r["rank"])]
        assert r["train_id"] == tid
        assert abs(r["score"] - s) <= 1e-5 * max(1.0, abs(s))


@pytest.mark.parametrize("runner,batch,shards", [([], 32, 0), ([], 100, 2), (MULTI, 64, 0)],
                         ids=["inmemory-b32", "inmemory-b100-2shards", "multiprocess-2workers"])
def test_index_query_self_influence_equal_core(ws, expected, tmp_path, runner, batch, shards):
    root, model, _ = ws
    rows, top_self = expected
    idx = str(tmp_path / "index")
    manifest = index.run(model + runner + ["--train_data", str(root / "train-*"), "--index_dir", idx,
                                           "--batch_size", str(batch), "--index_shards", str(shards)])
    assert manifest["rows"] == 1438 and manifest["dead_letters"] == 0
    if shards:
        assert len(manifest["shards"]) == shards
    query.run(model + runner + ["--test_data", str(root / "test-*"), "--index_dir", idx,
                                "--output", str(tmp_path / "q"), "--top_k", str(K), "--score_batch_size", "97"])
    _check_topk(str(tmp_path / "q" / "topk.jsonl"), rows)
    self_influence.run(model + ["--index_dir", idx, "--output", str(tmp_path / "a"), "--self_influence_top", "25"])
    assert [r["id"] for r in read_jsonl(str(tmp_path / "a" / "self_influence_top.jsonl"))] == top_self


@pytest.mark.parametrize("runner,train", [([], "train-*"), (MULTI, "train1-*")], ids=["inmemory", "multiprocess"])
def test_fused_equals_core(ws, expected, tmp_path, runner, train):
    root, model, _ = ws
    rows, top_self = expected
    out = tmp_path / "fused"
    summary = fused.run(model + runner + ["--train_data", str(root / train), "--test_data", str(root / "test-*"),
                                          "--output", str(out), "--top_k", str(K), "--self_influence_top", "25",
                                          "--batch_size", "50"])
    assert summary["dead_letters"] == 0
    _check_topk(str(out / "topk.jsonl"), rows)
    assert [r["id"] for r in read_jsonl(str(out / "self_influence_top.jsonl"))] == top_self


def test_bad_records_go_to_dead_letter(ws, expected, tmp_path, logreg_trained):
    root, model, _ = ws
    rows, _ = expected
    good = list(logreg_trained.data.train)
    bad = [
        {"id": "bad-shape", "x": [0.5] * 63, "y": 1},
        {"id": "bad-nan", "x": [float("nan")] * 64, "y": 2},
        {"id": "bad-missing", "y": 3},
        {"id": "bad-dtype", "x": ["a"] * 64, "y": 4},
        {"id": "bad-label", "x": [0.1] * 64, "y": 12345},  # label out of the spec's range
    ]
    data = tmp_path / "mixed"
    data.mkdir()
    write_records(good[:700] + bad[:2], str(data / "a"), "jsonl", num_shards=1)
    write_records(good[700:] + bad[2:4], str(data / "b"), "jsonl", num_shards=1)
    with open(data / "c-00000-of-00001.jsonl", "w") as f:  # one unparsable line among good ones
        f.write(json.dumps(bad[4]) + "\n{not json\n")
    out = tmp_path / "out"
    summary = fused.run(model + ["--train_data", str(data / "*.jsonl"), "--test_data", str(root / "test-*"),
                                 "--output", str(out), "--top_k", str(K)])
    dead = read_jsonl(str(out / "dead_letter.jsonl"))
    reasons = {d["id"]: d["reason"] for d in dead}
    assert set(reasons) == {"bad-shape", "bad-nan", "bad-missing", "bad-dtype", "bad-label", "c-00000-of-00001:1"}
    assert "shape" in reasons["bad-shape"] and "non-finite" in reasons["bad-nan"]
    assert "missing" in reasons["bad-missing"] and "float32" in reasons["bad-dtype"]
    assert "range" in reasons["bad-label"] and "JSON" in reasons["c-00000-of-00001:1"]
    assert all(d["raw"] for d in dead)
    # every input record is accounted for: scored or dead-lettered
    by_step = summary["counters"]["by_step"]
    projected = sum(v for key, v in by_step.items() if key.startswith("ProjectTrain/") and key.endswith("/examples_projected"))
    assert projected == len(good)
    assert projected + summary["dead_letters"] == len(good) + len(bad) + 1
    assert summary["counters"]["records_dead_lettered"] == len(dead) == 6
    # good records are unaffected: the result equals the core result on the clean data
    _check_topk(str(out / "topk.jsonl"), rows)


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


def test_topk_combiner_equals_brute_force_with_ties(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from beam_influence.beam.topk import TopKInfluence

    rng = np.random.default_rng(0)
    k_dim, n, q, k = 3, 500, 4, 9
    eig = np.array([1.0, 2.0, 4.0])
    train = rng.integers(-2, 3, (n, k_dim)).astype(np.float32)  # few distinct scores: many ties
    test = rng.integers(-2, 3, (q, k_dim)).astype(np.float32)
    ids = [f"t{rng.integers(10**6):06d}-{i}" for i in range(n)]
    scores = scoring.influence_scores(test, train, eig)
    pro, opp = scoring.top_k_per_query(scores, ids, k)
    want = [{"query_id": f"q{j}", "kind": kind, "rank": r, "train_id": tid, "score": s}
            for j in range(q) for kind, lists in (("proponent", pro), ("opponent", opp))
            for r, (tid, s) in enumerate(lists[j], 1)]
    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(["--runner=FnApiRunner"])) as p:
        queries = p | "Q" >> beam.Create([{"id": f"q{j}", "projection": test[j]} for j in range(q)])
        rows = (p | "T" >> beam.Create([{"id": ids[i], "projection": train[i]} for i in range(n)])
                | beam.Reshuffle())
        out = rows | TopKInfluence(queries, eig, k=k, batch_size=37)
        assert_that(out, equal_to(want))


def test_eigensystem_file_is_not_pickled_into_the_pipeline(ws):
    """The DoFns carry paths (ModelRef), never the eigenvectors."""
    import pickle

    from beam_influence.beam.options import model_ref
    from beam_influence.beam.project import ProjectBatchFn
    from pipelines._job import parse

    _, model, _ = ws
    _, opts = parse(model)
    size = len(pickle.dumps(ProjectBatchFn(model_ref(opts), 64)))
    assert size < 4096
