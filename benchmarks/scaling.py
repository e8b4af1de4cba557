"""Scaling: time per example and peak memory of the index and query pipelines for N = 1e4, 1e5, 1e6.

Tiny model on purpose (``benchmarks.models:logreg16``: multinomial logistic regression, 16 features,
4 classes, p = 68; eigensystem k = 16), so that what is measured is the pipeline, not the model. Records
are generated with numpy (``benchmarks.models.synthetic_arrays``) and written straight to Parquet shards
of 25,000 rows with pyarrow (the schema ``write_records`` produces: id string, x list<float32>, y int64).
Queries: Q = 1000 records of the same distribution; top-k = 100 proponents and opponents per query.

Every (N, job) runs in a child process (``python -m benchmarks.scaling --child ...``), so that its memory
is its own; the parent polls the RSS of the child and all its descendants every 0.2 s (peak reported)
and the child reports its ``ru_maxrss``. Reported per N: the pipeline's own seconds (build + run, as
``pipelines._job.execute`` measures it), the child's wall time (with Python/JAX/Beam start-up), seconds
per example, the marginal seconds per example between consecutive N, and peak RSS.
Target: seconds per example flat within 20% and memory flat in N. Writes ``benchmarks/results/scaling.json``.

    python -m benchmarks.scaling [--quick] [--ns 10000,100000,1000000] [--runner fnapi|multiprocess]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import REPO, PeakRSS, fmt_table, loadavg, log, machine_info, write_result
from benchmarks.workspace import _stamp_ok, _write_stamp, model_files, work_dir

SPEC = "benchmarks.models:logreg16"
K = 16
Q = 1000
TOP_K = 100
ROWS_PER_SHARD = 25_000
RUNNERS = {"fnapi": ["--runner=FnApiRunner"],
           "multiprocess": ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                            "--direct_num_workers=2"]}


def write_synthetic(d: str, n: int, *, seed: int, prefix: str = "train", id_prefix: str = "s") -> tuple[str, dict]:
    """Write n synthetic logreg16 records as Parquet shards of ``ROWS_PER_SHARD`` rows (cached by stamp)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.models import LOGREG_FEATURES, synthetic_arrays

    os.makedirs(d, exist_ok=True)
    stamp = os.path.join(d, "stamp.json")
    key = {"n": n, "seed": seed, "rows_per_shard": ROWS_PER_SHARD, "prefix": prefix}
    pattern = os.path.join(d, f"{prefix}-*.parquet")
    if _stamp_ok(stamp, key):
        return pattern, {"cached": True}
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    t = time.perf_counter()
    shards = max(1, -(-n // ROWS_PER_SHARD))
    for s in range(shards):
        lo, hi = s * ROWS_PER_SHARD, min(n, (s + 1) * ROWS_PER_SHARD)
        x, y = synthetic_arrays(hi - lo, seed=seed, offset=lo)
        ids = pa.array([f"{id_prefix}{i:08d}" for i in range(lo, hi)], pa.string())
        xs = pa.ListArray.from_arrays(pa.array(np.arange(0, (hi - lo + 1) * LOGREG_FEATURES, LOGREG_FEATURES,
                                                         dtype=np.int32)), pa.array(x.ravel()))
        table = pa.table({"id": ids, "x": xs, "y": pa.array(y.astype(np.int64))})
        pq.write_table(table, os.path.join(d, f"{prefix}-{s:05d}-of-{shards:05d}.parquet"))
    _write_stamp(stamp, key)
    info = {"cached": False, "write_s": time.perf_counter() - t, "shards": shards}
    log(f"wrote {n:,} synthetic records in {shards} shards ({info['write_s']:.1f}s)")
    return pattern, info


# ---- child: run one job and report ------------------------------------------------------------------
def child(a) -> None:
    args = json.loads(a.child_args)
    if a.child == "index":
        from pipelines import index

        out = index.run(args)
        res = {"seconds": out["seconds"], "rows": out["rows"], "shards": len(out["shards"]),
               "dead_letters": out["dead_letters"], "counters": {k: v for k, v in out.get("counters", {}).items()
                                                                 if k != "by_step"}}
    elif a.child == "index_prototype":
        from benchmarks.beam_prototypes import run_batched_index_job

        out = run_batched_index_job(args)
        res = {"seconds": out["seconds"], "rows": out["rows"], "shards": out["shards"]}
    elif a.child == "query_prototype":
        from benchmarks.beam_prototypes import run_batched_query

        out = run_batched_query(args)
        res = {"seconds": out["seconds"], "rows": out["index_rows"], "index_shards": out["shards"]}
    else:
        from pipelines import query

        out = query.run(args)
        res = {"seconds": out["seconds"], "rows": out["index_rows"], "topk_rows": out["topk_rows"],
               "query_dead_letters": out["query_dead_letters"],
               "counters": {k: v for k, v in out.get("counters", {}).items() if k != "by_step"}}
    res["ru_maxrss_self_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["ru_maxrss_children_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with open(a.child_out, "w") as f:
        json.dump(res, f)


def run_child(job: str, args: list[str], out_json: str, timeout_s: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--child", job, "--child-args", json.dumps(args),
           "--child-out", out_json]
    t = time.perf_counter()
    la = loadavg()
    log_path = out_json + ".log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT)
        with PeakRSS(pid=proc.pid, interval_s=0.2) as mem:
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "timeout"
    wall = time.perf_counter() - t
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        return {"error": f"exit {rc}", "log_tail": tail, "wall_s": wall, "peak_rss_tree_mb": mem.peak / 2**20}
    with open(out_json) as f:
        res = json.load(f)
    res.update(wall_s=wall, peak_rss_tree_mb=mem.peak / 2**20, rss_samples=mem.samples, loadavg_before=la,
               loadavg_after=loadavg())
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N up to 1e5 only")
    ap.add_argument("--ns", default=None, help="comma-separated N (default 10000,100000,1000000; quick 10000,100000)")
    ap.add_argument("--runner", default="fnapi", choices=sorted(RUNNERS))
    ap.add_argument("--jobs", default="index,query",
                    help="index,query[,index_prototype,query_prototype] (the prototypes of benchmarks.beam_prototypes)")
    ap.add_argument("--reuse-index", action="store_true", help="skip the index job where its index exists")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per child job")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--name", default="scaling")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a)
        return {}
    ns = [int(x) for x in a.ns.split(",")] if a.ns else ([10_000, 100_000] if a.quick else [10_000, 100_000, 1_000_000])
    jobs = a.jobs.split(",")
    machine = machine_info()
    log(f"scaling: N={ns}, runner {a.runner}, Q={Q}, top-k={TOP_K}, {machine['cpu_count']} CPUs, load {machine['loadavg']}")

    from benchmarks.models import logreg16, synthetic_arrays

    root = work_dir(a.work_dir, "scaling")
    spec = logreg16()
    x, y = synthetic_arrays(4096, seed=99)
    ckpt, eig, model_info = model_files(root, SPEC, spec, {"x": x, "y": y}, k=K, num_iters=48, train_steps=300)
    qpattern, _ = write_synthetic(os.path.join(root, "queries"), Q, seed=7, prefix="test", id_prefix="q")
    model_args = ["--spec", SPEC, "--checkpoint", ckpt, "--eigensystem", eig] + RUNNERS[a.runner]
    res = {"benchmark": "scaling", "machine": machine,
           "settings": {"ns": ns, "runner": a.runner, "q": Q, "top_k": TOP_K, "k": K, "spec": SPEC,
                        "rows_per_shard": ROWS_PER_SHARD, "batch_size": 256, "quick": a.quick},
           "model": model_info, "runs": []}
    for n in ns:
        pattern, data_info = write_synthetic(os.path.join(root, f"data_n{n}"), n, seed=0)
        idx = os.path.join(root, f"index_n{n}_{a.runner}")
        qout = os.path.join(root, f"query_n{n}_{a.runner}")
        for job in jobs:
            if job == "index" and a.reuse_index and os.path.exists(os.path.join(idx, "manifest.json")):
                log(f"N={n:,} index: reusing {idx}")
                continue
            if job in ("index", "index_prototype"):
                args = model_args + ["--train_data", pattern, "--batch_size", "256",
                                     "--index_dir", idx + ("_prototype" if job == "index_prototype" else "")]
            else:
                args = model_args + ["--test_data", qpattern, "--index_dir", idx,
                                     "--output", qout + ("_prototype" if job == "query_prototype" else ""),
                                     "--top_k", str(TOP_K), "--batch_size", "256"]
            log(f"N={n:,} {job}: running (load {loadavg()})")
            r = run_child(job, args, os.path.join(root, f"{job}_n{n}_{a.runner}.json"), a.timeout)
            r.update(n=n, job=job, data=data_info)
            if "seconds" in r:
                r["s_per_example"] = r["seconds"] / n
                r["wall_s_per_example"] = r["wall_s"] / n
                log(f"N={n:,} {job}: {r['seconds']:.1f}s pipeline ({r['s_per_example'] * 1e6:.1f} us/example), "
                    f"wall {r['wall_s']:.1f}s, peak RSS {r['peak_rss_tree_mb']:.0f} MiB")
            else:
                log(f"N={n:,} {job}: FAILED {r.get('error')}\n{r.get('log_tail', '')[-1500:]}")
            res["runs"].append(r)
            write_result(a.name, res, a.out_dir)
    # marginal cost between consecutive N (removes the fixed start-up cost)
    table = []
    for job in jobs:
        done = [r for r in res["runs"] if r["job"] == job and "seconds" in r]
        prev = None
        for r in done:
            row = {"job": job, "N": r["n"], "pipeline_s": r["seconds"], "us_per_example": r["s_per_example"] * 1e6,
                   "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_tree_mb"], "load": r["loadavg_before"]}
            if prev is not None:
                row["marginal_us_per_example"] = (r["seconds"] - prev["seconds"]) / (r["n"] - prev["n"]) * 1e6
                r["marginal_s_per_example"] = row["marginal_us_per_example"] * 1e-6
            table.append(row)
            prev = r
        per = [r["s_per_example"] for r in done]
        if len(per) >= 2:
            res.setdefault("flatness", {})[job] = {
                "max_over_min_s_per_example": max(per) / min(per),
                "last_over_first_marginal": (done[-1].get("marginal_s_per_example") or np.nan) /
                                            (done[1].get("marginal_s_per_example") or np.nan) if len(done) >= 3 else None,
                "peak_rss_max_over_min": max(r["peak_rss_tree_mb"] for r in done) /
                                         min(r["peak_rss_tree_mb"] for r in done)}
    res["table"] = table
    path = write_result(a.name, res, a.out_dir)
    print(fmt_table(table, ["job", "N", "pipeline_s", "us_per_example", "marginal_us_per_example", "wall_s",
                            "peak_rss_mb", "load"]))
    log(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
