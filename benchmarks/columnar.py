"""The columnar engine against bare single-process floors, at N = 10⁴, 10⁵, 10⁶ (issue: columnar engine).

    python -m benchmarks.columnar [--model logreg|cnn|transformer] [--sizes 1e4,1e5,1e6] [--quick]

Per N, on the same files and machine, run back to back (each in a fresh process, peak RSS of its
process tree sampled every 0.2 s):

* ``index_floor``: one process, no Beam: pyarrow row groups → numpy → the project's own jitted
  projector (fixed batch B) → one Parquet file (id, projection, loss, self-influence).
* ``index_fnapi`` / ``index_multi``: ``pipelines.index`` on the FnApiRunner / on the DirectRunner's
  multi_processing mode with 2 workers (same B).
* ``query_floor``: a blocked float32 matrix product of the index's projections (read with pyarrow)
  against Q = 1000 query projections, with an exact top-100 per query and direction per block (numpy
  argpartition), merged across blocks.  ``query_fnapi``: ``pipelines.query`` (1000 queries, top-100).
* ``self_fnapi``: ``pipelines.self_influence`` (top-100).  ``eigensystem``: ``beam-influence eigensystem``
  (streamed sample of 20 000 examples, n = 40, k = 32).

Ratios are pipeline wall / floor wall of the same N. Wall times include the process start (JAX import,
model load, compile) for the floors too. JSON: ``benchmarks/results/columnar_<model>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import REPO, PeakRSS, loadavg, log, machine_info, write_result

MODELS = {
    "logreg": ("beam_influence.models.digits:logreg", 1024, (10_000, 100_000, 1_000_000)),
    "cnn": ("beam_influence.models.digits:cnn", 256, (10_000, 100_000)),
    "transformer": ("benchmarks.models:transformer", 64, (1_000, 10_000)),
}
K = 32
Q, TOPK = 1000, 100
MULTI = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def _work(model: str, n: int) -> str:
    d = os.path.join(REPO, "benchmarks", ".work", "columnar", model, str(n))
    os.makedirs(d, exist_ok=True)
    return d


def _random_columns(spec, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    cols = {}
    for key, fs in spec.features.items():
        shape = (n,) + tuple(fs.shape)
        if np.dtype(fs.dtype).kind == "f":
            cols[key] = rng.random(shape, dtype=np.float32)
        else:
            lo = int(fs.min if fs.min is not None else 0)
            hi = int(fs.max if fs.max is not None else 9)
            cols[key] = rng.integers(lo, hi + 1, shape).astype(fs.dtype)
    return cols


def _write_parquet(path: str, cols: dict, ids: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {"id": pa.array(ids)}
    for key, v in cols.items():
        if v.ndim == 1:
            arrays[key] = pa.array(v)
        else:
            flat = v.reshape(len(v), -1)
            arrays[key] = pa.ListArray.from_arrays(pa.array(np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)),
                                                   pa.array(flat.reshape(-1)))
    pq.write_table(pa.table(arrays), path, row_group_size=65536)


def prepare(model: str, n: int) -> dict:
    """Data (8 Parquet shards of n rows, a query file of Q rows), checkpoint and eigensystem (cached)."""
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
    from beam_influence.core.model_spec import load_spec

    spec_path, batch, _ = MODELS[model]
    root = _work(model, n)
    spec = load_spec(spec_path)
    ckpt, eig = os.path.join(root, "ckpt.msgpack"), os.path.join(root, "eig.safetensors")
    stamp = os.path.join(root, "ready.json")
    files = {"root": root, "train": os.path.join(root, "train-*.parquet"), "test": os.path.join(root, "test.parquet"),
             "ckpt": ckpt, "eig": eig, "spec": spec_path, "batch": batch}
    if os.path.exists(stamp):
        return files
    t = time.perf_counter()
    params = spec.init(0)
    spec.save_params(ckpt, params)
    m = 2048 if model != "transformer" else 128  # the eigensystem only has to be valid, not good
    sample = _random_columns(spec, m, seed=1)
    es = compute_eigensystem(spec, params, sample, EigensystemArgs(num_iters=40, top_k=K, batch_size=m,
                                                                   fresh_batches=False, residuals=False))
    es.save(eig)
    per = -(-n // 8)
    for s in range(8):
        m = min(per, n - s * per)
        if m <= 0:
            break
        cols = _random_columns(spec, m, seed=100 + s)
        _write_parquet(os.path.join(root, f"train-{s:05d}-of-00008.parquet"), cols,
                       np.char.add(f"r{s}-", np.arange(m).astype(str)))
    cols = _random_columns(spec, Q, seed=7)
    _write_parquet(files["test"], cols, np.char.add("q", np.arange(Q).astype(str)))
    with open(stamp, "w") as f:
        json.dump({"n": n, "seconds": time.perf_counter() - t}, f)
    log(f"{model} N={n}: data + model in {time.perf_counter() - t:.1f}s")
    return files


# ---- the floors (run inside a child process by `--job`) ---------------------------------------------
def index_floor(files: dict, out: str) -> dict:
    import glob

    import jax
    import pyarrow as pa
    import pyarrow.parquet as pq

    from beam_influence.beam.resources import ModelRef
    from beam_influence.core.scoring import self_influence

    ctx = ModelRef(spec=files["spec"], checkpoint=files["ckpt"], eigensystem=files["eig"]).load()
    B = files["batch"]
    writer = None
    rows = 0
    for path in sorted(glob.glob(files["train"])):
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g)
            n = t.num_rows
            feats = {}
            for key, fs in ctx.spec.features.items():
                col = t.column(key).combine_chunks()
                v = col.flatten().to_numpy() if fs.shape else col.to_numpy()
                feats[key] = np.asarray(v, fs.dtype).reshape((n,) + tuple(fs.shape))
            proj = np.empty((n, ctx.eigvals.shape[0]), np.float32)
            loss = np.empty(n, np.float64)
            for s in range(0, n, B):
                m = min(B, n - s)
                part = {k: v[s:s + B] for k, v in feats.items()}
                if m < B:
                    part = {k: np.concatenate([v, np.repeat(v[:1], B - m, 0)]) for k, v in part.items()}
                o = jax.device_get(ctx.projector(ctx.params, part))
                proj[s:s + m] = o.projections[:m]
                loss[s:s + m] = o.losses[:m]
            table = pa.table({"id": t.column("id"), "projection": pa.FixedSizeListArray.from_arrays(
                pa.array(proj.reshape(-1)), proj.shape[1]), "loss": loss,
                "self_influence": self_influence(proj, ctx.eigvals)})
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema, use_dictionary=False)  # as the index writer
            writer.write_table(table)
            rows += n
    writer.close()
    return {"rows": rows}


def query_floor(files: dict, index_dir: str) -> dict:
    """Blocked float32 product + exact per-block top-k (argpartition), merged: the query job's floor."""
    import jax
    import pyarrow.parquet as pq

    from beam_influence.beam.index import read_manifest, shard_refs
    from beam_influence.beam.resources import ModelRef

    ctx = ModelRef(spec=files["spec"], checkpoint=files["ckpt"], eigensystem=files["eig"]).load()
    t = pq.read_table(files["test"])
    feats = {}
    for key, fs in ctx.spec.features.items():
        col = t.column(key).combine_chunks()
        v = col.flatten().to_numpy() if fs.shape else col.to_numpy()
        feats[key] = np.asarray(v, fs.dtype).reshape((t.num_rows,) + tuple(fs.shape))
    qproj = np.asarray(jax.device_get(ctx.projector(ctx.params, feats).projections), np.float32)
    w = (1.0 / ctx.eigvals).astype(np.float32)
    best_hi = best_lo = None
    for shard in shard_refs(index_dir, read_manifest(index_dir)):
        pf = pq.ParquetFile(shard["path"])
        for rb in pf.iter_batches(batch_size=65536, columns=["projection"]):
            p = rb.column(0).flatten().to_numpy().reshape(rb.num_rows, -1)
            s = (p * w) @ qproj.T  # [b, Q]
            kk = min(TOPK, s.shape[0])
            hi = np.partition(s, s.shape[0] - kk, axis=0)[-kk:]
            lo = np.partition(s, kk - 1, axis=0)[:kk]
            best_hi = hi if best_hi is None else np.partition(np.concatenate([best_hi, hi]), -kk, axis=0)[-kk:]
            best_lo = lo if best_lo is None else np.partition(np.concatenate([best_lo, lo]), kk - 1, axis=0)[:kk]
    return {"queries": int(qproj.shape[0])}


def _child(job: str, files: dict, arg: str) -> dict:
    t = time.perf_counter()
    out = {"index_floor": lambda: index_floor(files, arg), "query_floor": lambda: query_floor(files, arg)}[job]()
    out["inner_s"] = time.perf_counter() - t
    return out


# ---- the parent: run each job in a fresh process, time it, sample its memory --------------------------
def _run(cmd: list[str], env: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    with PeakRSS(proc.pid) as mem:
        output, _ = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{output[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": mem.peak / 2**20, "tail": output.strip().splitlines()[-1:]}


def bench(model: str, n: int, env: dict, jobs: list[str]) -> dict:
    files = prepare(model, n)
    root = files["root"]
    py = sys.executable
    m = ["--spec", files["spec"], "--checkpoint", files["ckpt"], "--eigensystem", files["eig"]]
    idx = os.path.join(root, "index")
    b = ["--projection_batch_size", str(files["batch"])]
    cmds = {
        "index_floor": [py, "-m", "benchmarks.columnar", "--child", "index_floor", "--files", json.dumps(files),
                        "--arg", os.path.join(root, "floor.parquet")],
        "index_fnapi": [py, "-m", "pipelines.index", *m, "--train_data", files["train"], "--index_dir", idx, *b],
        "index_multi": [py, "-m", "pipelines.index", *m, *MULTI, "--train_data", files["train"],
                        "--index_dir", idx + "_multi", *b],
        "query_floor": [py, "-m", "benchmarks.columnar", "--child", "query_floor", "--files", json.dumps(files),
                        "--arg", idx],
        "query_fnapi": [py, "-m", "pipelines.query", *m, "--test_data", files["test"], "--index_dir", idx,
                        "--output", os.path.join(root, "q"), "--top_k", str(TOPK), *b],
        "self_fnapi": [py, "-m", "pipelines.self_influence", *m, "--index_dir", idx,
                       "--output", os.path.join(root, "s"), "--self_influence_top", str(TOPK)],
        "eigensystem": [py, "-m", "beam_influence.cli", "eigensystem", "--spec", files["spec"], "--checkpoint",
                        files["ckpt"], "--train_data", files["train"], "--output", os.path.join(root, "eig2.safetensors"),
                        "--sample_size", "20000", "--num_iters", "40", "--num_eigenpairs", str(K), "--no_residuals"],
    }
    out = {"n": n, "load_before": loadavg()}
    for job in jobs:
        if job.startswith("index_") and job != "index_floor":
            import shutil

            shutil.rmtree(idx if job == "index_fnapi" else idx + "_multi", ignore_errors=True)
        log(f"{model} N={n}: {job} ...")
        out[job] = _run(cmds[job], env)
        log(f"{model} N={n}: {job} {out[job]['wall_s']:.1f}s, peak {out[job]['peak_rss_mb']:.0f} MB")
    for job, floor in (("index_fnapi", "index_floor"), ("index_multi", "index_floor"), ("query_fnapi", "query_floor")):
        if job in out and floor in out:
            out[f"{job}_ratio"] = out[job]["wall_s"] / out[floor]["wall_s"]
    out["load_after"] = loadavg()
    return out


def table(model: str) -> str:
    """The markdown table of ``benchmarks/results/columnar_<model>.json`` (for docs/benchmarks.md)."""
    from benchmarks.common import RESULTS_DIR

    with open(os.path.join(RESULTS_DIR, f"columnar_{model}.json")) as f:
        res = json.load(f)
    jobs = ["index_floor", "index_fnapi", "index_multi", "query_floor", "query_fnapi", "self_fnapi", "eigensystem"]
    lines = ["| N | " + " | ".join(j for j in jobs) + " | index FnApi / floor | index multi / floor | query / floor |",
             "|---:|" + "---:|" * (len(jobs) + 3)]
    for r in res["runs"]:
        cells = [f"{r[j]['wall_s']:.1f} s, {r[j]['peak_rss_mb']:.0f} MB" if j in r else "–" for j in jobs]
        ratios = [f"{r[k]:.2f}×" if k in r else "–" for k in ("index_fnapi_ratio", "index_multi_ratio",
                                                               "query_fnapi_ratio")]
        lines.append(f"| {r['n']:.0e} | " + " | ".join(cells + ratios) + " |")
    growth = res.get("rss_growth_last_decade")
    if growth:
        lines.append("")
        lines.append("Peak RSS, largest N / the N before it: " + ", ".join(f"{j} {g:.2f}×" for j, g in growth.items()))
    loads = [f"{r['n']:.0e}: {r.get('load_before')}→{r.get('load_after')}" for r in res["runs"]]
    lines.append("")
    lines.append("Load average (1/5/15 min) before→after each N: " + "; ".join(loads))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="logreg", choices=sorted(MODELS))
    ap.add_argument("--sizes", default=None, help="comma-separated N (default: the model's list)")
    ap.add_argument("--jobs", default="index_floor,index_fnapi,index_multi,query_floor,query_fnapi,self_fnapi,eigensystem")
    ap.add_argument("--quick", action="store_true", help="N ≤ 1e5")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the model's last results")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--files", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--arg", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, json.loads(a.files), a.arg)))
        return 0
    if a.table:
        print(table(a.model))
        return 0
    sizes = [int(float(s)) for s in a.sizes.split(",")] if a.sizes else list(MODELS[a.model][2])
    if a.quick:
        sizes = [s for s in sizes if s <= 100_000]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    result = {"benchmark": "columnar", "model": a.model, "k": K, "queries": Q, "top_k": TOPK,
              "machine": machine_info(), "runs": []}
    jobs = a.jobs.split(",")
    for n in sizes:
        result["runs"].append(bench(a.model, n, env, jobs))
        write_result(f"columnar_{a.model}", result)
    runs = {r["n"]: r for r in result["runs"]}
    if len(runs) >= 2:
        big, small = max(runs), sorted(runs)[-2]
        result["rss_growth_last_decade"] = {
            job: runs[big][job]["peak_rss_mb"] / runs[small][job]["peak_rss_mb"]
            for job in jobs if job in runs[big] and job in runs[small]}
    write_result(f"columnar_{a.model}", result)
    for r in result["runs"]:
        log(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                        if k.endswith("_ratio") or k == "n"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
