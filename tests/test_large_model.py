"""A decoder-only LM of the large-model benchmark (``benchmarks.models.decoder_lm``) end to end through the
command line and the Beam jobs: eigensystem, index, query, self-influence and the fused job, each planning
its memory first, with results that are finite and consistent across paths:

* the self-influence job (from the index) and the fused job give the same top list and scores;
* with ``--complement none`` the index + query lists equal the fused job's.

Marked slow. ``BEAM_INFLUENCE_LARGE_SIZE`` picks the size (default ``1m``; ``110m`` is the paper's
scale: about 10 minutes and 9 GiB here, see docs/benchmarks.md).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SIZE = os.environ.get("BEAM_INFLUENCE_LARGE_SIZE", "1m")
N_TRAIN, N_TEST, TOP = 24, 3, 4


def test_a_large_lm_end_to_end_is_finite_and_consistent(tmp_path, capsys):
    from benchmarks.models import LM_SIZES, decoder_lm
    from beam_influence.beam.outputs import read_jsonl
    from beam_influence.cli import main
    from beam_influence.core.eigensystem import Eigensystem
    from beam_influence.formats import write_records
    from pipelines import fused, index, query, self_influence

    cfg = LM_SIZES[SIZE]
    spec = decoder_lm(SIZE)
    ckpt, eig = str(tmp_path / "params.msgpack"), str(tmp_path / "eig.safetensors")
    spec.save_params(ckpt, spec.init(0))
    rng = np.random.default_rng(0)
    rows = [{"id": f"r{i:03d}", "tok": rng.integers(0, cfg["vocab"], cfg["T"]).tolist()} for i in range(N_TRAIN + N_TEST)]
    write_records(rows[:N_TRAIN], str(tmp_path / "train"), "parquet", num_shards=2)
    write_records(rows[N_TRAIN:], str(tmp_path / "test"), "parquet", num_shards=1)
    model = ["--spec", "benchmarks.models:decoder_lm", "--spec_arg", f"size={SIZE}", "--checkpoint", ckpt]
    train, test = str(tmp_path / "train-*"), str(tmp_path / "test-*")

    assert main(["eigensystem", *model, "--train_data", train, "--output", eig, "--num_iters", "6",
                 "--num_eigenpairs", "3", "--sample_size", "8", "--micro_batch", "4", "--no_residuals"]) == 0
    out = capsys.readouterr().out
    assert "plan eigensystem: p=" in out and "eigensystem: the first product took" in out
    es = Eigensystem.load(eig)
    assert es.args["memory_plan"]["choices"]["n"] == 6 and np.all(np.isfinite(es.eigvals))

    jobs = [*model, "--eigensystem", eig, "--runner=FnApiRunner"]
    idx = str(tmp_path / "index")
    index.run(jobs + ["--train_data", train, "--index_dir", idx])
    assert "plan projection: p=" in capsys.readouterr().out
    query.run(jobs + ["--test_data", test, "--index_dir", idx, "--output", str(tmp_path / "q"), "--top_k", str(TOP),
                      "--complement", "none"])
    self_influence.run(jobs + ["--index_dir", idx, "--output", str(tmp_path / "s"), "--self_influence_top",
                               str(N_TRAIN)])
    fused.run(jobs + ["--train_data", train, "--test_data", test, "--output", str(tmp_path / "f"), "--top_k", str(TOP),
                      "--self_influence_top", str(N_TRAIN), "--complement", "none"])
    fused.run(jobs + ["--train_data", train, "--test_data", test, "--output", str(tmp_path / "fc"),
                      "--top_k", str(TOP), "--self_influence_top", str(N_TRAIN)])

    def lists(d):
        got = {}
        for r in read_jsonl(str(tmp_path / d / "topk.jsonl")):
            assert np.isfinite(r["score"])
            got.setdefault((r["query_id"], r["kind"]), []).append((r["rank"], r["train_id"], r["score"]))
        return {k: sorted(v) for k, v in got.items()}

    q, f = lists("q"), lists("f")
    assert len(q) == 2 * N_TEST and q.keys() == f.keys()
    for key in q:
        assert [t for _, t, _ in q[key]] == [t for _, t, _ in f[key]], key
        np.testing.assert_allclose([s for *_, s in q[key]], [s for *_, s in f[key]], rtol=1e-4, atol=1e-6)
    # self-influence with the complement (the default: exact ‖∇ℓ‖² from the index) equals the fused job's
    s = read_jsonl(str(tmp_path / "s" / "self_influence_top.jsonl"))
    fc = read_jsonl(str(tmp_path / "fc" / "self_influence_top.jsonl"))
    assert len(s) == len(fc) == N_TRAIN
    assert [r["id"] for r in s] == [r["id"] for r in fc]
    sc = np.array([r["self_influence"] for r in s])
    assert np.all(np.isfinite(sc)) and np.all(sc > 0)
    np.testing.assert_allclose(sc, [r["self_influence"] for r in fc], rtol=1e-4)
