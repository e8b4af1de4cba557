"""Two-stage queries (issue 20): sketch candidates with a margin, the candidates read back by position and
scored exactly. On the digits MLP (p = 4 810) with a 64-dimensional sketch the sketch-only lists differ from
the exact complement's; the two-stage lists equal the fused job's exact lists."""
import os
import shutil

import numpy as np
import pytest

from beam_influence import formats
from beam_influence.beam.index import read_manifest, shard_refs
from beam_influence.beam.outputs import read_jsonl
from beam_influence.beam.rerank import ReadBackFn, SourceChangedError, read_chunk, source_table
from beam_influence.core import rerank
from beam_influence.core.estimate import EigensystemArgs
from beam_influence.core.candidates import MarginCandidates
from beam_influence.data import load_examples
from beam_influence.formats import write_records
from beam_influence.models import digits
from pipelines import fused, index, query
from tests.conftest import Trained

MLP_SPEC = "beam_influence.models.digits:mlp"
K = 5
MULTI = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]


@pytest.fixture(scope="module")
def rws(tmp_path_factory, digits_noisy, model_files):
    """The digits MLP, 600 training records in 3 Parquet shards, 8 queries, an index with a d = 64 float16
    sketch in parts of 128 records, and the fused job's exact lists."""
    t = Trained(digits.mlp(), digits_noisy, steps=600, lr=1e-2)
    root = tmp_path_factory.mktemp("rerank")
    write_records(t.data.train[:600], str(root / "train"), "parquet", num_shards=3)
    write_records(t.data.test[:8], str(root / "test"), "parquet", num_shards=1)
    _, model = model_files(root, t.spec, t.params, t.train_batch, EigensystemArgs(num_iters=24, top_k=8,
                                                                                  batch_size=4096),
                           spec_path=MLP_SPEC)
    idx = str(root / "index")
    index.run(model + ["--train_data", str(root / "train-*"), "--index_dir", idx, "--sketch_dim", "64",
                       "--sketch_dtype", "float16", "--batch_rows", "128"])
    exact = root / "fused"
    summary = fused.run(model + ["--train_data", str(root / "train-*"), "--test_data", str(root / "test-*"),
                                 "--output", str(exact), "--top_k", str(K), "--batch_rows", "128"])
    assert summary["complement"]["mode"] == "exact"
    return t, root, model, idx, _lists(exact / "topk.jsonl")


def _lists(path):
    return {(r["query_id"], r["kind"], r["rank"]): (r["train_id"], r["score"]) for r in read_jsonl(str(path))}


def _query(rws, out, *extra):
    _, root, model, idx, _ = rws
    return query.run(model + ["--test_data", str(root / "test-*"), "--index_dir", idx, "--output", str(out),
                              "--top_k", str(K), *extra])


def _agreement(got, want):
    assert set(got) == set(want)
    return sum(got[key][0] == want[key][0] for key in want) / len(want)


@pytest.mark.parametrize("runner", ["fnapi", "multi_processing"])
def test_two_stage_lists_equal_the_fused_exact_lists(rws, tmp_path, runner):
    t, root, model, idx, want = rws
    extra = MULTI if runner == "multi_processing" else []
    summary = _query(rws, tmp_path / "q", "--train_data", str(root / "train-*"), *extra)
    info = summary["exact_rerank"]
    assert info["mode"] == "on" and info["lists"] == 16 and info["certified_lists"] == 16
    assert info["candidates"] >= 16 * K
    assert 0 < info["rows_rescored"] <= 600  # d = 64 ≪ p: the margin rules out few rows here
    got = _lists(tmp_path / "q" / "topk.jsonl")
    assert _agreement(got, want) == 1.0
    scale = max(abs(s) for _, s in want.values())
    for key, (_, s) in want.items():
        assert abs(got[key][1] - s) <= 1e-5 * scale, (key, got[key], s)
    if runner == "fnapi":  # the sketch alone ranks differently at d = 64 ≪ p: the rerank is what makes it exact
        off = _query(rws, tmp_path / "off", "--train_data", str(root / "train-*"), "--exact_rerank", "off")
        assert off["exact_rerank"]["mode"] == "off"
        assert _agreement(_lists(tmp_path / "off" / "topk.jsonl"), want) < 0.9
        # query gradients in blocks of 3 (3 stage-2 passes): the same lists
        blocks = _query(rws, tmp_path / "b", "--train_data", str(root / "train-*"), "--query_block", "3")
        assert blocks["exact_rerank"]["query_blocks"] == 3
        in_blocks = _lists(tmp_path / "b" / "topk.jsonl")
        assert {key: tid for key, (tid, _) in in_blocks.items()} == {key: tid for key, (tid, _) in got.items()}
        assert max(abs(in_blocks[key][1] - got[key][1]) for key in got) <= 1e-5 * scale  # float32 products


def test_without_train_data_auto_is_off_and_says_why(rws, tmp_path):
    summary = _query(rws, tmp_path / "q")
    assert summary["exact_rerank"]["mode"] == "off" and "--train_data" in summary["exact_rerank"]["why"]
    err = summary["sketch_error"]  # rerank off: the sketch's estimated error is printed and recorded
    assert len(err["sigma_per_query"]) == 8 and err["sigma_median"] > 0 and err["median_abs_rank1_score"] > 0
    with pytest.raises(ValueError, match="--train_data"):
        _query(rws, tmp_path / "q2", "--exact_rerank", "on")


def test_read_back_returns_exactly_the_indexed_records(rws):
    t, root, _, idx, _ = rws
    manifest = read_manifest(idx)
    shards = shard_refs(idx, manifest)
    assert len(shards) >= 5 and all(s["digest"] and s["records"] for s in shards)
    everything = load_examples(t.spec, str(root / "train-*"))
    pos = {rid: i for i, rid in enumerate(everything.ids)}
    fn = ReadBackFn(source_table(str(root / "train-*")), None, 128)
    for shard in shards[:3]:
        chunk = read_chunk(shard["source"], None, shard["offset"], shard["records"], 128)
        assert formats.chunk_digest(chunk) == shard["digest"]
        ids = chunk.batch.column("id").to_pylist()
        want = sorted(ids[::7])
        [got] = list(fn.process((shard, want)))
        assert isinstance(got, formats.Chunk) and sorted(got.batch.column("id").to_pylist()) == want
        dec = t.spec.decode_batch(got.batch)
        rows = [pos[i] for i in dec.ids]
        for key, value in dec.arrays.items():
            np.testing.assert_array_equal(value, np.asarray(everything.batch[key])[rows])


def test_a_changed_or_moved_training_shard_is_named(rws, tmp_path):
    t, root, model, idx, _ = rws
    data = tmp_path / "data"
    shutil.copytree(root, data, ignore=shutil.ignore_patterns("index", "fused", "*.safetensors", "*.msgpack"))
    # changed: one record of one shard (same ids, another pixel value)
    victim = sorted(data.glob("train-*"))[1]
    records = formats.read_records(str(victim))
    records[3]["x"] = (np.asarray(records[3]["x"]) * 0.5).tolist()
    os.remove(victim)
    formats.write_records(records, str(victim)[: -len(".parquet")], "parquet", num_shards=1)
    shutil.move(str(victim)[: -len(".parquet")] + "-00000-of-00001.parquet", victim)
    with pytest.raises(SourceChangedError, match=victim.name):
        _query(rws, tmp_path / "q", "--train_data", str(data / "train-*"))
    assert not (tmp_path / "q").exists()  # nothing published
    # moved away: the pattern no longer names it
    os.remove(victim)
    with pytest.raises(SourceChangedError, match="not among the files of --train_data"):
        _query(rws, tmp_path / "q", "--train_data", str(data / "train-*"))


def test_margin_covers_the_sketch_error_and_the_candidates_hold_the_exact_top():
    """core.rerank + MarginCandidates: with z = 4 the margin bounds the CountSketch error of (nearly) every pair,
    and the candidates (optimistic score reaching the k-th pessimistic one) hold the exact top k."""
    from beam_influence.core.sketch import GradientSketch

    rng = np.random.default_rng(0)
    p, n, q = 3000, 400, 6
    g = rng.standard_normal((n, p)).astype(np.float32)
    # each query is close to K planted training rows: a clear exact top K
    h = np.stack([g[K * j:K * (j + 1)].sum(0) for j in range(q)]) + rng.standard_normal((q, p)).astype(np.float32)
    exact = g.astype(np.float64) @ h.astype(np.float64).T
    for d in (64, 2048):
        sk = GradientSketch({"w": np.zeros((p,), np.float32)}, d, seed=1)
        sg = np.asarray(sk.apply({"w": g}), np.float64)
        sh = np.asarray(sk.apply({"w": h}), np.float64)
        a = rerank.train_factors(np.linalg.norm(g.astype(np.float64), axis=1), None, d, "float32")
        b = rerank.query_factors(np.linalg.norm(h.astype(np.float64), axis=1), sh, dim=d, rho=1.0, z=4.0)
        est, m = sg @ sh.T, a @ b.T
        assert np.mean(np.abs(est - exact) > m) < 1e-3, d  # Chebyshev allows 1/16; near-Gaussian: ~6e-5
        # the sketch's inner products as projections with eigenvalue 1 (what the index scan multiplies)
        state = MarginCandidates([str(j) for j in range(q)], K)
        state.add_projections(sh, sg, np.array([str(i) for i in range(n)]), np.ones(d), (a, b))
        res = state.result()
        for j in range(q):
            for d_, sign in (("proponents", 1), ("opponents", -1)):
                kept = {int(i) for i, _ in res[d_][0][j]}
                top = np.argsort(-sign * exact[:, j], kind="stable")[:K]
                assert set(top.tolist()) <= kept, (d, d_, j)
                if d == 2048 and d_ == "proponents":
                    assert len(kept) < 3 * K  # the planted rows stand out: the margin rules the rest out


def test_fused_exact_in_query_blocks_equals_one_block(rws, tmp_path):
    """The fused job at any Q·p: query gradients in blocks (one pass per block), the same exact lists."""
    _, root, model, _, want = rws
    out = tmp_path / "fused"
    summary = fused.run(model + ["--train_data", str(root / "train-*"), "--test_data", str(root / "test-*"),
                                 "--output", str(out), "--top_k", str(K), "--batch_rows", "128", "--query_block", "3"])
    assert summary["complement"]["mode"] == "exact" and summary["query_blocks"] == summary["passes"] == 3
    got = _lists(out / "topk.jsonl")
    assert {key: tid for key, (tid, _) in got.items()} == {key: tid for key, (tid, _) in want.items()}
    scale = max(abs(s) for _, s in want.values())
    assert max(abs(got[key][1] - want[key][1]) for key in want) <= 1e-5 * scale
    assert len(read_jsonl(str(out / "self_influence_top.jsonl"))) == 100
    assert not list(out.glob("_*"))  # the blocks' internal files are gone


@pytest.mark.parametrize("seed", range(4))
def test_margin_candidates_hold_every_row_that_can_be_in_the_top_k(seed):
    """MarginCandidates against brute force, over batches and merges: a complete list holds every row whose
    optimistic score reaches the k-th pessimistic one (and, up to the float32 bound, nothing else); a capped
    list holds exactly ``cap`` rows."""
    from beam_influence.core import scoring

    rng = np.random.default_rng(seed)
    for trial in range(10):
        b, q, n, k = int(rng.integers(5, 3000)), int(rng.integers(1, 20)), int(rng.integers(1, 30)), int(rng.integers(1, 8))
        cap = int(rng.integers(k, k + 60)) if trial % 3 else None
        test, train = rng.normal(size=(q, n)), rng.normal(size=(b, n))
        lam = np.abs(rng.normal(size=n)) + 0.1
        a, bq = np.abs(rng.normal(size=(b, 2))) * rng.uniform(0, 0.5), np.abs(rng.normal(size=(q, 2)))
        ids = np.array([f"r{i:05d}" for i in range(b)])
        cuts = sorted(set(rng.integers(0, b, 3).tolist() + [0, b]))
        parts = [MarginCandidates([str(i) for i in range(q)], k, cap).add_projections(
            test, train[lo:hi], ids[lo:hi], lam, (a[lo:hi], bq)) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]
        state = parts[0]
        for other in parts[1:]:
            state.merge(other)
        s, m = scoring.influence_scores(test, train, lam), a @ bq.T
        res = state.result()
        for d, sign in (("proponents", 1), ("opponents", -1)):
            opt, pess = s + sign * m, s - sign * m
            lists, _ = res[d]
            complete = state.complete(d)
            for j in range(q):
                kth = sign * np.sort(sign * pess[:, j])[::-1][k - 1]
                need = set(ids[sign * opt[:, j] >= sign * kth])
                got = {i for i, _ in lists[j]}
                if complete[j]:
                    assert need <= got
                    assert got <= set(ids[sign * opt[:, j] >= sign * kth - 1e-4 * np.abs(s).max()])
                else:
                    assert cap is not None and len(got) == cap < len(need)


def test_an_index_without_source_digests_queries_sketch_only_and_says_why(rws, tmp_path):
    """An index built before read-back (no digests in its manifest): auto falls back to the sketch's lists with
    the reason recorded; --exact_rerank on is a clear error."""
    import json

    t, root, model, idx, _ = rws
    old = tmp_path / "old_index"
    shutil.copytree(idx, old)
    man = json.loads((old / "manifest.json").read_text())
    for s in man["shards"]:
        s.pop("digest", None)
        s.pop("records", None)
    (old / "manifest.json").write_text(json.dumps(man))
    base = model + ["--test_data", str(root / "test-*"), "--index_dir", str(old), "--top_k", str(K),
                    "--train_data", str(root / "train-*")]
    summary = query.run(base + ["--output", str(tmp_path / "q")])
    assert summary["exact_rerank"]["mode"] == "off" and "predates" in summary["exact_rerank"]["why"]
    with pytest.raises(ValueError, match="older version"):
        query.run(base + ["--output", str(tmp_path / "q2"), "--exact_rerank", "on"])


@pytest.mark.parametrize("seed", range(3))
def test_candidate_pairs_scored_chunk_by_chunk_rank_like_the_dense_top_k(seed):
    """Stage 2's sparse scoring: every candidate pair of a read-back row is found whatever the chunking and row
    order; pair scores equal the dense ones; the lists' top k equals ``TopK`` over each list's candidates; a lost
    pair and a foreign row are errors, not silent."""
    from beam_influence.core.candidates import CandidateLists, CandidateScores
    from beam_influence.core.complement import complement_pair_scores, complement_scores
    from beam_influence.core.topk import TopK

    rng = np.random.default_rng(seed)
    b, q, n, k = 400, 7, 6, 5
    ids = np.array([f"z{i:04d}" for i in rng.permutation(b)])
    qids = [f"q{j}" for j in range(q)]
    test, train, lam = rng.normal(size=(q, n)), rng.normal(size=(b, n)), np.abs(rng.normal(size=n)) + 0.1
    dots = rng.normal(size=(b, q))
    dense = complement_scores(test, train, lam, dots, rho=0.3)
    rows, cols = np.nonzero(rng.random((b, q)) < 0.2)
    got = complement_pair_scores(test, train, lam, dots[rows, cols], rows, cols, rho=0.3)
    np.testing.assert_allclose(got, dense[rows, cols], rtol=1e-12, atol=1e-12)

    member = {d: rng.random((b, q)) < 0.3 for d in ("proponents", "opponents")}
    lists = CandidateLists(qids, ids, {d: np.nonzero(m) for d, m in member.items()})
    assert lists.num_pairs == sum(int(m.sum()) for m in member.values())
    parts = []
    for chunk in np.array_split(rng.permutation(b), 4):  # read back in any order and chunking
        state = CandidateScores(qids)
        for d, (row, col, pos) in lists.pairs(ids[chunk]).items():
            r = chunk[row]
            assert np.all(member[d][r, col])
            state.add(d, pos, dense[r, col])
        state.seen += len(chunk)
        parts.append(state)
    total = parts[0]
    for other in parts[1:]:
        total.merge(other)
    pro, opp = total.topk(lists, k).result()
    for d, lists_got in (("proponents", pro), ("opponents", opp)):
        for j in range(q):
            cand = np.nonzero(member[d][:, j])[0]
            ref = TopK([qids[j]], k).add(dense[cand, j][:, None], ids[cand]).result()
            assert lists_got[j] == (ref[0] if d == "proponents" else ref[1])[0]
    with pytest.raises(RuntimeError, match="never"):
        parts[1].topk(lists, k)  # a quarter of the rows: the other pairs were never scored
    with pytest.raises(ValueError, match="no candidates"):
        lists.pairs(["not-a-candidate"])


def test_fused_job_through_an_index_and_the_rerank_gives_the_exact_lists(rws, tmp_path):
    """``run --exact_scoring rerank`` (what auto picks when the query gradients need several blocks): one indexing
    pass, the two-stage query and self-influence on that index — the fused job's exact lists and self-influence,
    its output files under the fused names, the route and the certified lists in its summary."""
    _, root, model, _, want = rws
    out = tmp_path / "via"
    args = model + ["--train_data", str(root / "train-*"), "--test_data", str(root / "test-*"), "--top_k", str(K),
                    "--batch_rows", "128", "--sketch_dim", "64"]
    summary = fused.run(args + ["--output", str(out), "--exact_scoring", "rerank"])
    route = summary["exact_scoring"]
    assert route["route"] == "rerank" and route["lists"] == route["certified_lists"] == 16
    got = _lists(out / "topk.jsonl")
    assert _agreement(got, want) == 1.0
    scale = max(abs(s) for _, s in want.values())
    assert max(abs(got[key][1] - s) for key, (_, s) in want.items()) <= 1e-5 * scale
    ref = read_jsonl(str(root / "fused" / "self_influence_top.jsonl"))
    mine = read_jsonl(str(out / "self_influence_top.jsonl"))
    assert [r["id"] for r in mine] == [r["id"] for r in ref]
    assert sorted(os.listdir(out)) == sorted(os.listdir(root / "fused"))  # no internal folder left behind
    assert fused.exact_route("auto", 1, given_block=False, sketch_dim=64)[0] == "passes"
    assert fused.exact_route("auto", 3, given_block=False, sketch_dim=64)[0] == "rerank"
    assert fused.exact_route("auto", 3, given_block=True, sketch_dim=64)[0] == "passes"
    assert fused.exact_route("auto", 3, given_block=False, sketch_dim=0)[0] == "passes"
    with pytest.raises(ValueError, match="--sketch_dim"):
        fused.exact_route("rerank", 1, given_block=False, sketch_dim=0)
    passes = fused.run(args + ["--output", str(tmp_path / "passes")])["exact_scoring"]
    assert passes == {"route": "passes", "why": "one block holds every query", "blocks": 1}
    with pytest.raises(ValueError, match="complement here is 'none'"):
        fused.run(args + ["--output", str(tmp_path / "none"), "--exact_scoring", "rerank", "--complement", "none"])
