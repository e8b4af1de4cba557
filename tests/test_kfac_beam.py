"""The K-FAC complement in the Beam jobs (issue 22, item 2): with an eigensystem carrying K-FAC factors
(``beam-influence eigensystem --kfac``), the fused job scores ``--complement kfac`` exactly (the K-FAC complement
vectors w_q projected beside U, in query blocks), the index stores each row's K-FAC self-term and the
self-influence job ranks by it; every score equals the in-memory API's (``pairwise_scores`` /
``self_influence_scores`` with ``complement="kfac"``)."""
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
from pipelines import fused, index, self_influence
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


@pytest.mark.parametrize("block", [None, 4])
def test_fused_kfac_equals_the_in_memory_api(kws, tmp_path, block):
    root, model, train, test, scores, selfs = kws
    out = tmp_path / "f"
    extra = ["--query_block", str(block)] if block else []
    summary = fused.run(model + ["--train_data", str(root / "train-*"), "--test_data", str(root / "test-*"),
                                 "--output", str(out), "--top_k", str(K), "--self_influence_top", "20", *extra])
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
