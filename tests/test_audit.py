"""The recurring audit (pipelines.audit) on digits logistic regression with the FnApiRunner:
incremental indexing, idempotent reruns, resume after a crash, diff, thresholds → exit code,
a new eigensystem → a new index. Plus unit tests of the config, diff and state helpers."""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import pytest

from beam_influence.beam.index import read_manifest
from beam_influence.core import scoring
from beam_influence.core.topk import top_k_per_query
from beam_influence.core.complement import complement_scores, complement_self_influence
from beam_influence.evaluation.gradients import flat_grads
from beam_influence.audit import ALERT_EXIT_CODE, AuditConfigError, config_from_dict, diff_suspects, diff_topk, load_config
from beam_influence.audit.state import COMPLETED, IndexState, shard_key
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.formats import read_records, write_records
from beam_influence.core.projection import make_projector
from beam_influence.cli import main as cli_main
from pipelines import audit

SPEC = "beam_influence.models.digits:logreg"
TOP_N, K, NUM_QUERIES = 25, 5, 8


# ------------------------------------------------------------------ workspace
@pytest.fixture(scope="module")
def aws(tmp_path_factory, logreg_trained):
    """4 training shards in a pool (copied into each audit's data dir as they "arrive"), queries,
    checkpoint and two eigensystems."""
    t = logreg_trained
    root = tmp_path_factory.mktemp("audit_ws")
    pool = root / "pool"
    pool.mkdir()
    shards = write_records(t.data.train, str(pool / "train"), "parquet", num_shards=4)
    write_records(t.data.test[:NUM_QUERIES], str(root / "queries"), "parquet", num_shards=1)
    t.spec.save_params(str(root / "ckpt.msgpack"), t.params)
    es = compute_eigensystem(t.spec, t.params, t.train_batch,
                             EigensystemArgs(num_iters=30, top_k=10, batch_size=2048, residuals=False))
    es.save(str(root / "eig.safetensors"))
    es2 = compute_eigensystem(t.spec, t.params, t.train_batch,
                              EigensystemArgs(num_iters=20, top_k=6, batch_size=1024, residuals=False, seed=1))
    es2.save(str(root / "eig2.safetensors"))
    assert es.id != es2.id
    return {"root": root, "shards": shards, "es": es}


def make_audit(aws, name: str, num_shards: int, **overrides) -> tuple[str, str]:
    """A data dir with the first ``num_shards`` pool shards and a config file; returns (config path, data dir)."""
    base = aws["root"] / name
    data = base / "data"
    data.mkdir(parents=True)
    for path in aws["shards"][:num_shards]:
        shutil.copy(path, data)
    cfg = {"audit_root": "state", "spec": SPEC, "checkpoint": str(aws["root"] / "ckpt.msgpack"),
           "eigensystem": str(aws["root"] / "eig.safetensors"), "train_data": ["data/train-*.parquet"],
           "standing_queries": str(aws["root"] / "queries-*.parquet"), "top_k": K, "self_influence_top": TOP_N,
           "projection_batch_size": 64, "batch_rows": 256, "beam_args": ["--runner=FnApiRunner"],
           "sketch_dim": 1024, "sketch_dtype": "float32", **overrides}  # a sketch of d ≥ p = 650 is exact: the complement equals the core's
    path = base / "audit.json"
    path.write_text(json.dumps(cfg))
    return str(path), str(data)


def add_shard(aws, data_dir: str, i: int) -> None:
    shutil.copy(aws["shards"][i], data_dir)


def core_result(aws, logreg_trained, num_shards: int):
    """In-memory reference: (top-N suspect ids, {(query, kind): [train ids]}) over the first shards."""
    cache = aws.setdefault("core", {})
    if num_shards not in cache:
        cache[num_shards] = _core_result(aws, logreg_trained, num_shards)
    return cache[num_shards]


def _core_result(aws, logreg_trained, num_shards: int):
    t, es = logreg_trained, aws["es"]
    spec = t.spec
    train = [r for p in aws["shards"][:num_shards] for r in read_records(p)]
    queries = read_records(str(aws["root"] / "queries-00000-of-00001.parquet"))
    proj = make_projector(spec.loss, es.eigvecs_tree(t.params))
    ptrain = np.asarray(proj(t.params, spec.stack([spec.decode(r) for r in train])).projections)
    ptest = np.asarray(proj(t.params, spec.stack([spec.decode(r) for r in queries])).projections)
    ids = [r["id"] for r in train]
    # the audit scores with the complement term (1/ρ)(I − UUᵀ): exact ‖∇ℓ‖², and an exact sketch (d ≥ p)
    g_tr = flat_grads(spec.loss, t.params, spec.stack([spec.decode(r) for r in train])).astype(np.float64)
    g_te = flat_grads(spec.loss, t.params, spec.stack([spec.decode(r) for r in queries])).astype(np.float64)
    si = complement_self_influence(ptrain, es.eigvals, np.sum(g_tr ** 2, axis=1))
    suspects = [ids[i] for i in scoring.top_k(si, ids, TOP_N)]
    pro, opp = top_k_per_query(complement_scores(ptest, ptrain, es.eigvals, g_tr @ g_te.T), ids, K)
    topk = {}
    for q, p, o in zip(queries, pro, opp):
        topk[(q["id"], "proponent")] = [tid for tid, _ in p]
        topk[(q["id"], "opponent")] = [tid for tid, _ in o]
    return suspects, topk


def result_files(report: dict) -> tuple[list[str], dict]:
    """(suspect ids in rank order, {(query, kind): [train ids]}) from a run folder."""
    d = report["run_dir"]
    with open(os.path.join(d, "self_influence_top.jsonl")) as f:
        suspects = [json.loads(line)["id"] for line in f]
    topk: dict = {}
    with open(os.path.join(d, "topk.jsonl")) as f:
        rows = sorted((json.loads(line) for line in f), key=lambda r: (r["query_id"], r["kind"], r["rank"]))
    for r in rows:
        topk.setdefault((r["query_id"], r["kind"]), []).append(r["train_id"])
    return suspects, topk


def read_bytes(report: dict, name: str) -> bytes:
    with open(os.path.join(report["run_dir"], name), "rb") as f:
        return f.read()


# ------------------------------------------------------------------ lifecycle: 3 shards, +1 shard, rerun
@pytest.fixture(scope="module")
def lifecycle(aws):
    config, data = make_audit(aws, "lifecycle", 3, shards_per_job=2, thresholds={"max_new_suspects": 0})
    r1 = audit.run(["--config", config])
    add_shard(aws, data, 3)
    r2 = audit.run(["--config", config])
    r3 = audit.run(["--config", config])
    return {"config": config, "data": data, "runs": [r1, r2, r3]}


def test_first_run_indexes_every_shard_and_is_a_baseline(lifecycle, aws, logreg_trained):
    r1 = lifecycle["runs"][0]
    assert len(r1["shards"]["indexed_this_run"]) == 3 and len(r1["index_jobs"]) == 2  # shards_per_job=2
    assert r1["rows"] == sum(len(read_records(p)) for p in aws["shards"][:3])
    assert r1["previous_run_id"] is None and r1["diff"]["suspects"]["baseline"] and r1["changed"]
    assert r1["exit_code"] == 0  # no baseline: max_new_suspects is not evaluated
    assert result_files(r1) == core_result(aws, logreg_trained, 3)
    for name in ("report.json", "report.md", "self_influence_top.parquet", "topk.parquet"):
        assert os.path.exists(os.path.join(r1["run_dir"], name))


def test_second_run_indexes_only_the_new_shard(lifecycle, aws, logreg_trained):
    r1, r2, _ = lifecycle["runs"]
    new = os.path.join(lifecycle["data"], os.path.basename(aws["shards"][3]))
    assert r2["shards"]["indexed_this_run"] == [new] and len(r2["index_jobs"]) == 1
    assert r2["shards"]["new_since_previous_run"] == [new]
    assert r2["previous_run_id"] == r1["run_id"] and r2["run_id"] != r1["run_id"]
    suspects4, topk4 = core_result(aws, logreg_trained, 4)
    assert result_files(r2) == (suspects4, topk4)
    # the diff is exactly the change of the core result from 3 to 4 shards
    suspects3, topk3 = core_result(aws, logreg_trained, 3)
    d = r2["diff"]["suspects"]
    assert [s["id"] for s in d["new"]] == [i for i in suspects4 if i not in suspects3]
    assert [s["id"] for s in d["dropped"]] == [i for i in suspects3 if i not in suspects4]
    changed_q = {q for (q, kind) in topk4 if topk4[(q, kind)] != topk3[(q, kind)]}
    assert set(r2["diff"]["standing_queries"]["changed_queries"]) == changed_q
    # shard 4 brings new suspects: max_new_suspects=0 is crossed → exit code 3, listed as an alert
    assert d["num_new"] > 0
    assert r2["alerts"] == ["max_new_suspects"] and r2["exit_code"] == ALERT_EXIT_CODE
    assert "ALERT" in read_bytes(r2, "report.md").decode()


def test_identical_rerun_changes_nothing(lifecycle):
    _, r2, r3 = lifecycle["runs"]
    assert r3["shards"]["indexed_this_run"] == [] and r3["index_jobs"] == [] and not r3["refreshed"]
    assert not r3["changed"] and r3["diff"]["suspects"]["num_new"] == 0 and r3["diff"]["standing_queries"]["num_changed"] == 0
    assert r3["exit_code"] == 0 and r3["alerts"] == []
    for name in ("self_influence_top.jsonl", "topk.jsonl", "self_influence_top.parquet", "topk.parquet"):
        assert read_bytes(r3, name) == read_bytes(r2, name)
    assert "nothing changed" in read_bytes(r3, "report.md").decode()


def test_new_eigensystem_reindexes_everything_into_a_new_directory(lifecycle, aws):
    cfg = json.loads(open(lifecycle["config"]).read())
    cfg["eigensystem"] = str(aws["root"] / "eig2.safetensors")
    path = os.path.join(os.path.dirname(lifecycle["config"]), "audit-eig2.json")
    with open(path, "w") as f:
        json.dump({**cfg, "shards_per_job": 4, "standing_queries": None}, f)
    r4 = audit.run(["--config", path])
    r3 = lifecycle["runs"][2]
    assert r4["eigensystem_id"] != r3["eigensystem_id"] and r4["eigensystem_changed"]
    assert len(r4["shards"]["indexed_this_run"]) == 4 and len(r4["index_jobs"]) == 1
    assert r4["index_root"] != r3["index_root"] and os.path.isdir(r3["index_root"])  # old index kept
    assert r4["rows"] == r3["rows"] and r4["exit_code"] == 0  # max_new_suspects not evaluated across eigensystems


# ------------------------------------------------------------------ interrupted run
class Crash(RuntimeError):
    pass


def test_interrupted_run_resumes_and_equals_an_uninterrupted_run(aws, lifecycle):
    config, _ = make_audit(aws, "crash", 4, shards_per_job=1)  # one shard per job: crash after the first
    done = []

    def crash_after_first(shards):
        done.extend(shards)
        raise Crash("simulated crash after the first index job")

    with pytest.raises(Crash):
        audit.run(["--config", config], after_index_job=crash_after_first)
    cfg = load_config(config)
    state = IndexState(cfg.audit_root, aws["es"].id)
    assert list(state.shards) == done and len(done) == 1
    assert not os.path.exists(os.path.join(cfg.audit_root, "state.json"))  # no finished run yet
    inputs = sorted(str(p) for p in (aws["root"] / "crash" / "data").iterdir())
    # A kill in the middle of the next shard's job leaves part files but no _COMPLETED marker ...
    half = state.shard_dir(inputs[1])
    os.makedirs(half)
    with open(os.path.join(half, "part-00000-of-00001.parquet"), "wb") as f:
        f.write(b"truncated")
    # ... and a kill between a shard's marker and the manifest update leaves the marker only.
    # (The resumed run may index the rest in one job: shards_per_job does not change the results.)
    with open(config) as f:
        raw = json.load(f)
    with open(config, "w") as f:
        json.dump({**raw, "shards_per_job": 4}, f)
    first = done[0]
    entry = dict(state.shards[first])
    marker_mtime = os.path.getmtime(os.path.join(state.shard_dir(first), COMPLETED))
    state.data["shards"].clear()
    state.save()

    resumed = audit.run(["--config", config])
    assert resumed["shards"]["adopted"] == [first]  # recovered from its marker, not re-indexed
    assert os.path.getmtime(os.path.join(state.shard_dir(first), COMPLETED)) == marker_mtime
    assert sorted(resumed["shards"]["indexed_this_run"]) == [p for p in inputs if p != first]
    assert IndexState(cfg.audit_root, aws["es"].id).shards[first]["rows"] == entry["rows"]
    # same results as the uninterrupted lifecycle run over the same 4 shards
    uninterrupted = lifecycle["runs"][1]
    assert resumed["rows"] == uninterrupted["rows"]
    for name in ("self_influence_top.jsonl", "topk.jsonl"):
        assert read_bytes(resumed, name) == read_bytes(uninterrupted, name)


# ------------------------------------------------------------------ thresholds through the CLI
def test_dead_letter_threshold_gives_nonzero_exit_code(aws, logreg_trained, tmp_path):
    config, data = make_audit(aws, "deadletters", 1, thresholds={"max_dead_letter_fraction": 0.001},
                              standing_queries=None)
    good = logreg_trained.data.train[:50]
    bad = [{"id": "bad-shape", "x": [0.5] * 63, "y": 1}, {"id": "bad-nan", "x": [float("nan")] * 64, "y": 2}]
    write_records(good + bad, os.path.join(data, "train-extra"), "jsonl", num_shards=1)
    cfg = json.loads(open(config).read())
    cfg["train_data"] = ["data/train-*"]
    with open(config, "w") as f:
        json.dump(cfg, f)

    assert cli_main(["audit", "--config", config, "--run_id", "first"]) == ALERT_EXIT_CODE
    report = json.load(open(os.path.join(load_config(config).audit_root, "runs", "first", "report.json")))
    assert report["dead_letters_this_run"] == 2 and report["alerts"] == ["max_dead_letter_fraction"]
    assert report["dead_letter_fraction_this_run"] == pytest.approx(2 / (len(good) + 1438 // 4 + 2), rel=0.02)
    # the dead letters are in the shard's index directory
    extra = [p for p in report["shards"]["indexed"] if "extra" in p][0]
    shard_dir = IndexState(report["config"]["audit_root"], report["eigensystem_id"]).shard_dir(extra)
    with open(os.path.join(shard_dir, read_manifest(shard_dir)["dead_letter_file"])) as f:
        assert {json.loads(line)["id"] for line in f} == {"bad-shape", "bad-nan"}
    # retrying run "first" under its own id compares with that run's baseline again: same verdict
    assert cli_main(["audit", "--config", config, "--run_id", "first"]) == ALERT_EXIT_CODE
    # a new run has no new dead letters: exit 0, nothing re-indexed
    assert cli_main(["audit", "--config", config]) == 0


# ------------------------------------------------------------------ units: config, diff, state
def _raw(**kw):
    return {"audit_root": "/a", "spec": SPEC, "checkpoint": "/c", "eigensystem": "/e", "train_data": ["/d/*"], **kw}


def test_config_validation_and_paths(tmp_path):
    cfg = config_from_dict(_raw(train_data="rel/*.parquet", audit_root="st"), base_dir="/base")
    assert cfg.train_data == ("/base/rel/*.parquet",) and cfg.audit_root == "/base/st"
    assert config_from_dict(_raw(audit_root="gs://b/x"), base_dir="/base").audit_root == "gs://b/x"
    for bad, match in [({"bogus": 1}, "unknown field"), ({"top_k": 0}, "top_k"), ({"spec": "nomodule"}, "spec"),
                       ({"thresholds": {"max_new_suspects": -1}}, "max_new_suspects"),
                       ({"thresholds": {"max_dead_letter_fraction": 2}}, "fraction"),
                       ({"thresholds": {"nope": 1}}, "unknown thresholds"), ({"normalization": "x"}, "normalization"),
                       ({"beam_args": ["runner=x"]}, "beam_args"), ({"train_data": []}, "train_data")]:
        with pytest.raises(AuditConfigError, match=match):
            config_from_dict(_raw(**bad))
    with pytest.raises(AuditConfigError, match="missing required"):
        config_from_dict({"spec": SPEC})
    (tmp_path / "a.yaml").write_text("audit_root: st\nspec: %s\ncheckpoint: c\neigensystem: e\ntrain_data: [d/*]\n"
                                     "thresholds: {max_new_suspects: 3}\n" % SPEC)
    cfg = load_config(str(tmp_path / "a.yaml"))
    assert cfg.thresholds.max_new_suspects == 3 and cfg.audit_root == str(tmp_path / "st")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(AuditConfigError, match="does not parse"):
        load_config(str(tmp_path / "b.json"))


def test_diff_functions():
    prev = [{"rank": 1, "id": "a", "self_influence": 3.0}, {"rank": 2, "id": "b", "self_influence": 2.0}]
    cur = [{"rank": 1, "id": "c", "self_influence": 4.0}, {"rank": 2, "id": "a", "self_influence": 3.0}]
    d = diff_suspects(prev, cur)
    assert [s["id"] for s in d["new"]] == ["c"] and [s["id"] for s in d["dropped"]] == ["b"] and d["changed"]
    assert diff_suspects(None, cur)["baseline"] and not diff_suspects(prev, prev)["changed"]

    def rows(q, pro):
        return [{"query_id": q, "kind": "proponent", "rank": r, "train_id": t, "score": 0.0} for r, t in enumerate(pro, 1)]

    t = diff_topk(rows("q1", ["a", "b"]) + rows("q2", ["x"]), rows("q1", ["b", "c"]) + rows("q3", ["y"]))
    assert t["changed_queries"]["q1"]["proponent"]["entered"] == ["c"]
    assert t["changed_queries"]["q1"]["proponent"]["left"] == ["a"]
    assert t["new_queries"] == ["q3"] and t["removed_queries"] == ["q2"] and t["num_changed"] == 1
    assert not diff_topk(rows("q1", ["a"]), rows("q1", ["a"]))["changed"]


def test_shard_keys_are_stable_and_distinct():
    a, b = shard_key("/data/x/train-00000.parquet"), shard_key("/data/y/train-00000.parquet")
    assert a != b and a.startswith("train-00000.parquet-") and a == shard_key("/data/x/train-00000.parquet")
    assert "/" not in shard_key("gs://bucket/dir with space/f[1].jsonl")
