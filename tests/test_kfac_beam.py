"""The K-FAC complement in the Beam jobs (issue 22, item 2): with an eigensystem carrying K-FAC factors
(``beam-influence eigensystem --kfac``), the fused job scores ``--complement kfac`` exactly (the K-FAC complement
vectors w_q projected beside U, in query blocks), the index stores each row's K-FAC self-term and the
self-influence job ranks by it, and queries against such an index score the K-FAC complement through the sketch of
each row's whitened residual (``--sketch_space kfac``), exactly after the two-stage rerank; every score equals the
in-memory API's (``pairwise_scores`` / ``self_influence_scores`` with ``complement="kfac"``)."""
import numpy as np
import pytest

import beam_influence as bi
from beam_influence.api import fit_eigensystem_kfac
from beam_influence.beam.index import read_manifest
from beam_influence.beam.outputs import read_jsonl
from beam_influence.core import kfac, scoring
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.data import load_examples
from beam_influence.formats import write_records
from pipelines import fused, index, query, self_influence
from tests.conftest import expected_lists

K = 5


@pytest.fixture(scope="module")
def kws(tmp_path_factory, logreg_trained):
    t = logreg_trained
    root = tmp_path_factory.mktemp("kfac_beam")
    write_records(t.data.train[:300], str(root / "train"), "parquet", num_shards=2)
    write_records(t.data.test[:6], str(root / "test"), "parquet", num_shards=1)
    train = load_examples(t.spec, str(root / "train-*"))
    test = load_examples(t.spec, str(root / "test-*"))
    args = EigensystemArgs(top_k=6, num_iters=20, sample_size=200, seed=3, mass_sample=0)
    plain = compute_eigensystem(t.spec, t.params, train.batch, args)
    es = fit_eigensystem_kfac(t.spec, t.params, kfac.fixed_sample(train.batch, 200, 3), plain)
    ckpt, eig = str(root / "ckpt.msgpack"), str(root / "eig.safetensors")
    t.spec.save_params(ckpt, t.params)
    es.save(eig)
    model = ["--spec", "beam_influence.models.digits:logreg", "--checkpoint", ckpt, "--eigensystem", eig]
    scores = bi.pairwise_scores(t.spec, t.params, train.batch, test.batch, es, complement="kfac")
    selfs = bi.self_influence_scores(t.spec, t.params, train.batch, es, complement="kfac")
    return root, model, train, test, scores, selfs


@pytest.mark.parametrize("block", [None, 4, "rerank"])
def test_fused_kfac_equals_the_in_memory_api(kws, tmp_path, block):
    """The fused job's K-FAC lists and self-influence = the in-memory API's: in one pass, in query blocks, and
    through an index of whitened sketches and the two-stage rerank (``--exact_scoring rerank``)."""
    root, model, train, test, scores, selfs = kws
    out = tmp_path / "f"
    extra = (["--exact_scoring", "rerank", "--sketch_dim", "64"] if block == "rerank" else
             ["--query_block", str(block)] if block else [])
    summary = fused.run(model + ["--train_data", str(root / "train-*"), "--test_data", str(root / "test-*"),
                                 "--output", str(out), "--top_k", str(K), "--self_influence_top", "20", *extra])
    if block == "rerank":
        route = summary["exact_scoring"]
        assert route["route"] == "rerank" and route["certified_lists"] == route["lists"] == 2 * len(test.ids)
        assert summary["complement"]["curvature"] == "kfac"
    else:
        assert summary["complement"]["mode"] == "kfac"  # auto: the eigensystem carries the factors
        assert summary["complement"]["compose"] == "schur" and summary["query_blocks"] == (2 if block else 1)
    want = expected_lists(scores, train.ids, test.ids, K)
    got = {(r["query_id"], r["kind"], r["rank"]): (r["train_id"], r["score"]) for r in read_jsonl(str(out / "topk.jsonl"))}
    assert set(got) == set(want)
    scale = np.abs(scores).max()
    for key, (tid, s) in want.items():
        assert got[key][0] == tid and abs(got[key][1] - s) <= 1e-4 * scale, (key, got[key], (tid, s))
    top = scoring.top_k(selfs, train.ids, 20)
    rows = read_jsonl(str(out / "self_influence_top.jsonl"))
    assert [r["id"] for r in rows] == [train.ids[i] for i in top]
    np.testing.assert_allclose([r["self_influence"] for r in rows], selfs[top], rtol=1e-4)


def test_index_stores_kfac_self_terms_and_self_influence_ranks_by_them(kws, tmp_path):
    root, model, train, _, _, selfs = kws
    idx = str(tmp_path / "index")
    index.run(model + ["--train_data", str(root / "train-*"), "--index_dir", idx])
    man = read_manifest(idx)
    assert man["args"]["kfac_self"] and man["args"]["kfac_complement"]["kind"] == "ekfac"
    s = self_influence.run(model + ["--index_dir", idx, "--output", str(tmp_path / "s"), "--self_influence_top", "20"])
    assert s["complement"]["mode"] == "kfac"
    rows = read_jsonl(str(tmp_path / "s" / "self_influence_top.jsonl"))
    top = scoring.top_k(selfs, train.ids, 20)
    assert [r["id"] for r in rows] == [train.ids[i] for i in top]
    np.testing.assert_allclose([r["self_influence"] for r in rows], selfs[top], rtol=1e-4)
    # the scalar complement from the same index on request
    e = self_influence.run(model + ["--index_dir", idx, "--output", str(tmp_path / "e"), "--complement", "exact"])
    assert e["complement"]["mode"] == "exact"


def test_kfac_without_factors_is_a_clear_error(kws, tmp_path, logreg_trained):
    root, model, train, _, _, _ = kws
    t = logreg_trained
    plain = compute_eigensystem(t.spec, t.params, train.batch, EigensystemArgs(top_k=6, num_iters=20, mass_sample=0))
    eig = str(tmp_path / "plain.safetensors")
    plain.save(eig)
    flags = ["--spec", "beam_influence.models.digits:logreg", "--checkpoint", model[3], "--eigensystem", eig]
    with pytest.raises(ValueError, match="eigensystem --kfac"):
        fused.run(flags + ["--train_data", str(root / "train-*"), "--test_data", str(root / "test-*"),
                           "--output", str(tmp_path / "f"), "--complement", "kfac"])


def _lists(path):
    return {(r["query_id"], r["kind"], r["rank"]): (r["train_id"], r["score"]) for r in read_jsonl(path)}


def _assert_lists(got, want, scores, rtol=1e-4):
    assert set(got) == set(want)
    scale = np.abs(scores).max()
    for key, (tid, s) in want.items():
        assert got[key][0] == tid and abs(got[key][1] - s) <= rtol * scale, (key, got[key], (tid, s))


@pytest.fixture(scope="module")
def kfac_indexes(kws, tmp_path_factory):
    """Two indexes under the K-FAC eigensystem (sketch space auto → kfac): d = 1024 ≥ p = 650 (the sketch is the
    identity) and d = 64 ≪ p."""
    root, model = kws[0], kws[1]
    out = {}
    for d in (1024, 64):
        idx = str(tmp_path_factory.mktemp(f"kfac_index_{d}"))
        index.run(model + ["--train_data", str(root / "train-*"), "--index_dir", idx, "--sketch_dim", str(d)])
        out[d] = idx
    return out


def test_queries_against_a_kfac_index_score_the_kfac_complement(kws, kfac_indexes, tmp_path):
    """With the identity sketch the index's estimate is the K-FAC complement itself: the sketch-only lists equal
    the exact ones; with d = 64 ≪ p they differ, and the two-stage rerank (--train_data) makes them exact."""
    root, model, train, test, scores, _ = kws
    man = read_manifest(kfac_indexes[1024])
    assert man["args"]["sketch"]["space"] == "kfac" and man["args"]["kfac_self"]
    base = model + ["--test_data", str(root / "test-*"), "--top_k", str(K)]
    s = query.run(base + ["--index_dir", kfac_indexes[1024], "--output", str(tmp_path / "q1")])
    assert s["complement"]["curvature"] == "kfac" and s["exact_rerank"]["mode"] == "off"
    _assert_lists(_lists(str(tmp_path / "q1" / "topk.jsonl")), expected_lists(scores, train.ids, test.ids, K), scores)

    want = expected_lists(scores, train.ids, test.ids, K)
    s = query.run(base + ["--index_dir", kfac_indexes[64], "--output", str(tmp_path / "q2"), "--exact_rerank", "off"])
    assert "sketch_error" in s
    sketched = _lists(str(tmp_path / "q2" / "topk.jsonl"))
    assert sum(sketched[key][0] == want[key][0] for key in want) < len(want)  # d ≪ p: an estimate

    s = query.run(base + ["--index_dir", kfac_indexes[64], "--output", str(tmp_path / "q3"),
                          "--train_data", str(root / "train-*")])
    rr = s["exact_rerank"]
    assert rr["mode"] == "on" and rr["lists"] == 2 * len(test.ids) == rr["certified_lists"]
    assert rr["rows_rescored"] < len(train.ids) * len(test.ids)
    _assert_lists(_lists(str(tmp_path / "q3" / "topk.jsonl")), want, scores)


def test_kfac_index_refuses_the_scalar_sketch_and_gradient_space_on_request(kws, kfac_indexes, tmp_path):
    root, model, train, test, _, _ = kws
    base = model + ["--test_data", str(root / "test-*"), "--top_k", str(K)]
    with pytest.raises(ValueError, match="--complement kfac"):
        query.run(base + ["--index_dir", kfac_indexes[64], "--output", str(tmp_path / "q"), "--complement", "sketch"])
    idx = str(tmp_path / "grad_index")
    index.run(model + ["--train_data", str(root / "train-*"), "--index_dir", idx, "--sketch_space", "gradient"])
    assert read_manifest(idx)["args"]["sketch"]["space"] == "gradient"
    s = query.run(base + ["--index_dir", idx, "--output", str(tmp_path / "g")])
    assert s["complement"]["mode"] == "sketch" and "curvature" not in s["complement"]
    with pytest.raises(ValueError, match="sketch_space kfac"):
        query.run(base + ["--index_dir", idx, "--output", str(tmp_path / "g2"), "--complement", "kfac"])
