"""The real index and query pipelines on a standalone Flink cluster and on Prism give the FnApiRunner's
result: the same index row count, the same projection per training id, the same top-k ids per query
and scores within 1e-6.

One Flink cluster + worker pool per test session (``tools.flink.pytest_fixtures``), two Flink jobs in
all (index, then query); the reference runs once on the FnApiRunner. Skipped, naming
``make runners-fetch``, only when the Flink / Prism artefacts are absent.

    .venv/bin/python -m pytest -q -s tests/test_flink_pipelines.py            # both runners
    .venv/bin/python -m pytest -q -s tests/test_flink_pipelines.py -m flink   # only Flink
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_influence.beam.outputs import read_jsonl
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.beam.index import shard_refs
from beam_influence.formats import write_records
from pipelines import index, query

SPEC = "beam_influence.models.digits:logreg"
K = 5  # top-k per query
NUM_QUERIES = 12
TOL = 1e-6


@pytest.fixture(scope="module")
def runner_ws(tmp_path_factory, logreg_trained):
    """Digits logistic regression: 3 Parquet training shards, 1 query shard, checkpoint, eigensystem."""
    t = logreg_trained
    root = tmp_path_factory.mktemp("runner_ws")
    write_records(t.data.train, str(root / "train"), "parquet", num_shards=3)
    write_records(t.data.test[:NUM_QUERIES], str(root / "test"), "parquet", num_shards=1)
    t.spec.save_params(str(root / "ckpt.msgpack"), t.params)
    es = compute_eigensystem(t.spec, t.params, t.train_batch,
                             EigensystemArgs(num_iters=30, top_k=10, batch_size=2048, residuals=False))
    es.save(str(root / "eig.safetensors"))
    model = ["--spec", SPEC, "--checkpoint", str(root / "ckpt.msgpack"), "--eigensystem", str(root / "eig.safetensors")]
    return root, model


@dataclasses.dataclass
class Result:
    manifest: dict
    projections: dict[str, np.ndarray]  # train id -> projection
    topk: dict[tuple[str, str], list[tuple[str, float]]]  # (query id, kind) -> [(train id, score)] in rank order
    seconds: dict[str, float]


def run_index_and_query(runner_args: list[str], root, model: list[str], out) -> Result:
    """The real jobs: pipelines.index.run, then pipelines.query.run on that index."""
    idx, q = str(out / "index"), str(out / "query")
    t0 = time.monotonic()
    manifest = index.run(model + runner_args + ["--train_data", str(root / "train-*.parquet"), "--index_dir", idx,
                                                "--projection_batch_size", "64", "--batch_rows", "256"])
    t1 = time.monotonic()
    query.run(model + runner_args + ["--test_data", str(root / "test-*.parquet"), "--index_dir", idx,
                                     "--output", q, "--top_k", str(K), "--batch_rows", "256"])
    t2 = time.monotonic()
    projections = {}
    for shard in shard_refs(idx, manifest):  # manifest paths are relative to the index directory
        table = pq.read_table(shard["path"], columns=["id", "projection"]).to_pydict()
        for rid, p in zip(table["id"], table["projection"]):
            assert rid not in projections, f"training id {rid} indexed twice"
            projections[rid] = np.asarray(p, np.float64)
    topk: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for r in sorted(read_jsonl(f"{q}/topk.jsonl"), key=lambda r: (r["query_id"], r["kind"], r["rank"])):
        topk.setdefault((r["query_id"], r["kind"]), []).append((r["train_id"], r["score"]))
    return Result(manifest, projections, topk, {"index": t1 - t0, "query": t2 - t1})


@pytest.fixture(scope="module")
def reference(runner_ws, logreg_trained, tmp_path_factory):
    root, model = runner_ws
    res = run_index_and_query(["--runner=FnApiRunner"], root, model, tmp_path_factory.mktemp("fnapi"))
    print(f"\n[flink_pipelines] FnApiRunner: index {res.seconds['index']:.1f}s, query {res.seconds['query']:.1f}s")
    assert res.manifest["rows"] == len(logreg_trained.data.train) and res.manifest["dead_letters"] == 0
    assert len(res.topk) == 2 * NUM_QUERIES and all(len(v) == K for v in res.topk.values())
    return res


def assert_same_result(got: Result, want: Result) -> None:
    assert got.manifest["rows"] == want.manifest["rows"]
    assert got.manifest["dead_letters"] == want.manifest["dead_letters"] == 0
    assert got.manifest["eigensystem_id"] == want.manifest["eigensystem_id"]
    assert set(got.projections) == set(want.projections)
    worst = max(float(np.max(np.abs(got.projections[i] - want.projections[i]))) for i in want.projections)
    assert worst <= TOL, f"projections differ by up to {worst:g}"
    assert set(got.topk) == set(want.topk)
    for key, pairs in want.topk.items():
        assert [tid for tid, _ in got.topk[key]] == [tid for tid, _ in pairs], key
        np.testing.assert_allclose([s for _, s in got.topk[key]], [s for _, s in pairs], rtol=0, atol=TOL,
                                   err_msg=str(key))


@pytest.mark.flink
def test_index_and_query_on_flink_equal_fnapi(flink_env, runner_ws, reference, tmp_path):
    root, model = runner_ws
    before = flink_env.cluster.overview()
    got = run_index_and_query(flink_env.args, root, model, tmp_path)
    print(f"\n[flink_pipelines] Flink: index {got.seconds['index']:.1f}s, query {got.seconds['query']:.1f}s")
    assert_same_result(got, reference)
    # Both jobs really ran on the standalone cluster (not on an embedded mini-cluster) and finished.
    after = flink_env.cluster.overview()
    assert after["jobs-finished"] == before["jobs-finished"] + 2, (before, after)
    assert after["jobs-failed"] == before["jobs-failed"]


@pytest.mark.prism
def test_index_and_query_on_prism_equal_fnapi(prism_env, runner_ws, reference, tmp_path):
    root, model = runner_ws
    got = run_index_and_query(prism_env.args, root, model, tmp_path)
    print(f"\n[flink_pipelines] Prism: index {got.seconds['index']:.1f}s, query {got.seconds['query']:.1f}s")
    assert_same_result(got, reference)
