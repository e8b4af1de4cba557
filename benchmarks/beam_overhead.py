"""Beam overhead: the index pipeline against a bare JAX loop doing the same work on the same records.

Data: the digits training set (1438 records) repeated to N records (default 30,000; --quick 10,000) with
unique ids, written as Parquet shards by ``beam_influence.io.write_records``; the digits CNN, trained
briefly, with an eigensystem of k=32 (all cached under ``benchmarks/.work/``).

Timed, each from a cold start of the model (load checkpoint + eigensystem, build and compile the projector):
  ``bare``            one Python process: ``beam_influence.io.iter_records`` (the parser ``ReadExamples`` uses)
                      → ``ModelSpec.decode`` + metadata JSON per record (as ``DecodeFn``) → batches of B=64
                      (padded like ``ProjectBatchFn``) → the same ``InfluenceContext.projector`` → self-influence
                      → one Parquet file with the index schema (columns built from numpy);
  ``bare_vectorized`` the floor of the same work: Parquet columns straight to numpy arrays, no per-record Python;
  ``fnapi``           ``pipelines.index.run`` on the FnApiRunner (in-process);
  ``multiprocess``    ``pipelines.index.run`` on the DirectRunner, ``multi_processing`` with 2 workers;
  ``fnapi_profile``   the FnApiRunner run again under cProfile: top functions by cumulative and own time, and
                      own time grouped by where it is spent (coders, runner, DoFns, JAX, Parquet, ...).
Ratio = pipeline seconds / bare seconds (target ≤ 1.25). Writes ``benchmarks/results/beam_overhead.json``.

    python -m benchmarks.beam_overhead [--quick] [--n 30000] [--skip multiprocess,profile]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import time

import numpy as np

from benchmarks.common import PeakRSS, fmt_table, loadavg, log, machine_info, write_result
from benchmarks.workspace import decoded_digits, model_files, work_dir, write_digits_shards

SPEC = "beam_influence.models.digits:cnn"
MULTI = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]


# ---- the bare loops ---------------------------------------------------------------------------------
def _write_index_parquet(path: str, ids, proj, losses, self_inf, labels, metas) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from beam_influence.beam.index import index_schema

    proj = np.ascontiguousarray(proj, np.float32)
    n, k = proj.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "projection": pa.ListArray.from_arrays(offsets, pa.array(proj.ravel())),
        "loss": pa.array(np.asarray(losses, np.float64)),
        "self_influence": pa.array(np.asarray(self_inf, np.float64)),
        "label": pa.array(labels, pa.int64()),
        "metadata": pa.array(metas, pa.string()),
    }, schema=index_schema())
    pq.write_table(table, path)


def bare_loop(ref, pattern: str, out_path: str, batch_size: int) -> dict:
    """Read → decode → batch → project → write, one process, the same parser, decoder and projector."""
    import jax

    from beam_influence.beam.project import json_safe
    from beam_influence.io import ERROR_KEY, iter_records, match_files
    from beam_influence.core.model_spec import RecordError

    tm = dict.fromkeys(("load", "read_parse", "decode", "stack", "project", "write"), 0.0)
    t_all = time.perf_counter()
    t = time.perf_counter()
    ctx = ref.load()
    spec, feats = ctx.spec, list(ctx.spec.features)
    tm["load"] = time.perf_counter() - t
    ids, labels, metas, projs, losses, bad = [], [], [], [], [], 0
    pending: list[dict] = []
    first_call = [None]

    def flush():
        n = len(pending)
        pad = batch_size - n
        t0 = time.perf_counter()
        batch = {k: np.stack([e[k] for e in pending] + [pending[0][k]] * pad) for k in feats}
        t1 = time.perf_counter()
        out = jax.device_get(ctx.projector(ctx.params, batch))
        t2 = time.perf_counter()
        if first_call[0] is None:
            first_call[0] = t2 - t1  # includes the compile
        tm["stack"] += t1 - t0
        tm["project"] += t2 - t1
        projs.append(np.asarray(out.projections[:n], np.float32))
        losses.append(np.asarray(out.losses[:n]))
        pending.clear()

    for path in match_files(pattern):
        t = time.perf_counter()
        records = iter_records(path)
        while True:
            t = time.perf_counter()
            rec = next(records, None)
            tm["read_parse"] += time.perf_counter() - t
            if rec is None:
                break
            t = time.perf_counter()
            if ERROR_KEY in rec:
                bad += 1
                continue
            try:
                ex = spec.decode(rec)
            except RecordError:
                bad += 1
                continue
            meta = {k: json_safe(v) for k, v in rec.items() if k != "id" and k not in spec.features}
            ids.append(str(rec["id"]))
            labels.append(int(ex["y"]))
            metas.append(json.dumps(meta, sort_keys=True))
            pending.append(ex)
            tm["decode"] += time.perf_counter() - t
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    t = time.perf_counter()
    proj = np.concatenate(projs)
    self_inf = (proj.astype(np.float64) ** 2 / ctx.eigvals).sum(axis=1)
    _write_index_parquet(out_path, ids, proj, np.concatenate(losses), self_inf, labels, metas)
    tm["write"] = time.perf_counter() - t
    total = time.perf_counter() - t_all
    return {"seconds": total, "rows": len(ids), "bad": bad, "stages_s": tm, "first_project_call_s": first_call[0]}


def bare_vectorized(ref, pattern: str, out_path: str, batch_size: int) -> dict:
    """The floor: Parquet columns → numpy (no per-record Python) → the same projector → write."""
    import jax
    import pyarrow.parquet as pq

    from beam_influence.io import match_files

    tm = dict.fromkeys(("load", "read", "project", "write"), 0.0)
    t_all = time.perf_counter()
    t = time.perf_counter()
    ctx = ref.load()
    tm["load"] = time.perf_counter() - t
    t = time.perf_counter()
    tables = [pq.read_table(p) for p in match_files(pattern)]
    xs = np.concatenate([t_.column("x").combine_chunks().flatten().to_numpy().reshape(-1, 64) for t_ in tables])
    ys = np.concatenate([t_.column("y").to_numpy() for t_ in tables]).astype(np.int32)
    ids = [i for t_ in tables for i in t_.column("id").to_pylist()]
    meta_cols = [c for c in tables[0].column_names if c not in ("id", "x", "y")]
    metas = [json.dumps(dict(zip(meta_cols, vals)), sort_keys=True)
             for t_ in tables for vals in zip(*(t_.column(c).to_pylist() for c in meta_cols))]
    xs = xs.astype(np.float32)
    tm["read"] = time.perf_counter() - t
    n = len(ys)
    t = time.perf_counter()
    projs, losses = [], []
    for s in range(0, n, batch_size):
        xb, yb = xs[s:s + batch_size], ys[s:s + batch_size]
        m = len(yb)
        if m < batch_size:
            xb = np.concatenate([xb, np.repeat(xb[:1], batch_size - m, 0)])
            yb = np.concatenate([yb, np.repeat(yb[:1], batch_size - m, 0)])
        out = jax.device_get(ctx.projector(ctx.params, {"x": xb, "y": yb}))
        projs.append(np.asarray(out.projections[:m], np.float32))
        losses.append(np.asarray(out.losses[:m]))
    tm["project"] = time.perf_counter() - t
    t = time.perf_counter()
    proj = np.concatenate(projs)
    self_inf = (proj.astype(np.float64) ** 2 / ctx.eigvals).sum(axis=1)
    _write_index_parquet(out_path, ids, proj, np.concatenate(losses), self_inf, ys.tolist(), metas)
    tm["write"] = time.perf_counter() - t
    return {"seconds": time.perf_counter() - t_all, "rows": n, "stages_s": tm}


# ---- the Beam runs ----------------------------------------------------------------------------------
def run_index(model_args: list[str], runner_args: list[str], pattern: str, index_dir: str, batch_size: int) -> dict:
    from pipelines import index

    if os.path.exists(index_dir):
        shutil.rmtree(index_dir)
    t = time.perf_counter()
    with PeakRSS() as mem:
        manifest = index.run(model_args + runner_args + ["--train_data", pattern, "--index_dir", index_dir,
                                                         "--batch_size", str(batch_size)])
    total = time.perf_counter() - t
    c = manifest.get("counters", {})
    return {"seconds": total, "pipeline_seconds": manifest["seconds"], "rows": manifest["rows"],
            "shards": len(manifest["shards"]), "dead_letters": manifest["dead_letters"],
            "batches": c.get("batches"), "padding_rows": c.get("padding_rows"),
            "peak_rss_gb": mem.peak / 2**30}


_BUCKETS = [  # (bucket, substrings of "file:function"), first match wins
    ("JAX/XLA (projector call = XLA execution, compile, device_get)",
     ("beam_influence/projection.py", "/jax/", "/jaxlib/", "jax._src", "xla", "/flax/", "/optax/")),
    ("beam_influence DoFn bodies (beam/project.py, beam/index.py)", ("beam_influence/beam/",)),
    ("record parsing (beam_influence/io)", ("beam_influence/io/",)),
    ("ModelSpec.decode", ("beam_influence/model_spec.py",)),
    ("pyarrow / Parquet", ("pyarrow",)),
    ("Beam coders / pickling", ("apache_beam/coders", "pickle", "dill", "cloudpickle")),
    ("Beam SDK worker (operations, bundle processing)", ("apache_beam/runners/worker",)),
    ("Beam FnApiRunner (orchestration, data channels)", ("apache_beam/runners/",)),
    ("Beam transforms (BatchElements, Reshuffle, core)", ("apache_beam/transforms",)),
    ("Beam I/O (fileio, WriteToParquet, filesystems)", ("apache_beam/io",)),
    ("Beam metrics/utils/typehints/other", ("apache_beam/", "objsize")),
    ("pipeline construction (inspect)", ("inspect.py",)),
    ("json", ("json/",)),
    ("numpy", ("numpy",)),
    ("grpc / threading / queue", ("grpc", "threading", "queue", "concurrent")),
]


def _bucket(key: tuple) -> str:
    fname, _, func = key
    s = f"{fname}:{func}"
    for name, subs in _BUCKETS:
        if any(x in s for x in subs):
            return name
    return "other (builtins, stdlib)"


def run_prototype(ref, runner_args: list[str], pattern: str, index_dir: str, batch_size: int) -> dict:
    """The batched prototype of ``benchmarks.beam_prototypes`` on the same data (what the recommendations buy)."""
    import glob

    import pyarrow.parquet as pq

    from benchmarks.beam_prototypes import run_batched_index

    if os.path.exists(index_dir):
        shutil.rmtree(index_dir)
    t = time.perf_counter()
    with PeakRSS() as mem:
        r = run_batched_index(ref, runner_args, pattern, index_dir, batch_size)
    total = time.perf_counter() - t
    files = sorted(glob.glob(os.path.join(index_dir, "part-*.parquet")))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return {"seconds": total, "pipeline_seconds": r["pipeline_seconds"], "rows": rows, "shards": len(files),
            "peak_rss_gb": mem.peak / 2**30}


def profile_index(model_args, pattern, index_dir, batch_size, top: int = 40) -> dict:
    from pipelines import index

    if os.path.exists(index_dir):
        shutil.rmtree(index_dir)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    try:
        manifest = index.run(model_args + ["--runner=FnApiRunner", "--train_data", pattern, "--index_dir",
                                           index_dir, "--batch_size", str(batch_size)])
    finally:
        prof.disable()
    total = time.perf_counter() - t
    st = pstats.Stats(prof)
    rows = []
    for key, (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": f"{os.path.relpath(key[0]) if key[0].startswith('/') else key[0]}:{key[1]}({key[2]})",
                     "ncalls": nc, "tottime_s": tt, "cumtime_s": ct, "bucket": _bucket(key)})
    by_cum = sorted(rows, key=lambda r: -r["cumtime_s"])[:top]
    by_own = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    buckets: dict[str, float] = {}
    for r in rows:
        buckets[r["bucket"]] = buckets.get(r["bucket"], 0.0) + r["tottime_s"]
    own_total = sum(buckets.values())
    rows_n = manifest["rows"]
    phases = _phases(st, rows_n, total)
    return {"seconds_profiled": total, "phases": phases, "rows": rows_n, "own_time_total_s": own_total,
            "buckets_own_time_s": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
            "buckets_share": {k: v / own_total for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])},
            "top_cumulative": by_cum, "top_own": by_own,
            "function_calls_per_row": sum(r["ncalls"] for r in rows) / max(rows_n, 1)}


def _code_key(fn) -> tuple:
    c = fn.__code__
    return (c.co_filename, c.co_firstlineno, c.co_name)


def _phases(st: pstats.Stats, rows: int, total: float) -> dict:
    """Cumulative seconds (and us per row) of the functions that make up an index run."""
    import apache_beam as beam
    from apache_beam.io import parquetio
    from apache_beam.runners.worker import bundle_processor

    from beam_influence.beam.index import to_index_row, write_manifest
    from beam_influence.beam.project import DecodeFn, ProjectBatchFn
    from beam_influence.beam.resources import ModelRef
    from beam_influence.io.beam_io import _ParseShardFn
    from beam_influence.core.model_spec import ModelSpec
    from beam_influence.core.projection import Projector

    targets = {
        "Pipeline.run (runner: all bundles)": beam.Pipeline.run,
        "BundleProcessor.__init__ (per-bundle set-up)": bundle_processor.BundleProcessor.__init__,
        "BundleProcessor.process_bundle (all bundle work)": bundle_processor.BundleProcessor.process_bundle,
        "_ParseShardFn.process (Parquet → canonical record dicts)": _ParseShardFn.process,
        "DecodeFn.process (decode + metadata JSON)": DecodeFn.process,
        "ModelSpec.decode": ModelSpec.decode,
        "ProjectBatchFn.process (stack, project, rows)": ProjectBatchFn.process,
        "Projector.__call__ (JAX dispatch + compute + first compile)": Projector.__call__,
        "to_index_row (projection → list)": to_index_row,
        "WriteToParquet row dicts → Arrow (_RowDictionariesToArrowTable.process)":
            parquetio._RowDictionariesToArrowTable.process,
        "ModelRef.load (checkpoint, eigensystem, projector; launcher + worker)": ModelRef.load,
        "write_manifest": write_manifest,
    }
    cum = {}
    for name, fn in targets.items():
        try:
            v = st.stats.get(_code_key(fn))
        except AttributeError:
            v = None
        cum[name] = float(v[3]) if v else 0.0
    cum["XLA compile (backend_compile*)"] = sum(v[3] for k, v in st.stats.items() if "backend_compile" in k[2])
    dofns = sum(cum[k] for k in ("_ParseShardFn.process (Parquet → canonical record dicts)",
                                 "DecodeFn.process (decode + metadata JSON)",
                                 "ProjectBatchFn.process (stack, project, rows)", "to_index_row (projection → list)",
                                 "WriteToParquet row dicts → Arrow (_RowDictionariesToArrowTable.process)"))
    cum["Beam framework inside bundles (process_bundle − the DoFn bodies above)"] = \
        cum["BundleProcessor.process_bundle (all bundle work)"] - dofns
    cum["outside the runner (pipeline construction, pre-flight load, manifest)"] = \
        total - cum["Pipeline.run (runner: all bundles)"]
    return {k: {"s": v, "us_per_row": v / max(rows, 1) * 1e6, "share": v / total} for k, v in cum.items()}


def compare_outputs(bare_path: str, index_dir: str) -> dict:
    """Same rows and (to float32 round-off) the same projections in the bare output and the Beam index."""
    import glob

    import pyarrow.parquet as pq

    a = pq.read_table(bare_path).to_pydict()
    b_tables = [pq.read_table(p) for p in sorted(glob.glob(os.path.join(index_dir, "part-*.parquet")))]
    b = {"id": [], "projection": []}
    for t in b_tables:
        b["id"] += t.column("id").to_pylist()
        b["projection"] += t.column("projection").to_pylist()
    pa_ = dict(zip(a["id"], a["projection"]))
    pb = dict(zip(b["id"], b["projection"]))
    common = sorted(set(pa_) & set(pb))
    diff = max((float(np.max(np.abs(np.asarray(pa_[i]) - np.asarray(pb[i])))) for i in common[:2000]), default=None)
    return {"rows_bare": len(pa_), "rows_beam": len(pb), "same_ids": set(pa_) == set(pb),
            "max_abs_projection_diff_2000_rows": diff}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=10,000 records")
    ap.add_argument("--n", type=int, default=None, help="records (default 30,000; quick 10,000)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--small-n", type=int, default=640,
                    help="records of the small runs that measure the fixed start-up cost (0: none)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip", default="", help="comma-separated: vectorized,fnapi,multiprocess,prototype,profile")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--name", default="beam_overhead")
    a = ap.parse_args(argv)
    n = a.n or (10_000 if a.quick else 30_000)
    skip = set(filter(None, a.skip.split(",")))
    machine = machine_info()
    log(f"beam overhead: N={n}, k={a.k}, B={a.batch_size}, {machine['cpu_count']} CPUs, load {machine['loadavg']}")

    from beam_influence.beam.resources import ModelRef
    from beam_influence.core.model_spec import load_spec

    root = work_dir(a.work_dir, "beam_overhead")
    spec = load_spec(SPEC)
    ckpt, eig, model_info = model_files(root, SPEC, spec, decoded_digits(spec), k=a.k, num_iters=max(64, 2 * a.k),
                                        train_steps=300)
    pattern, data_info = write_digits_shards(root, n, a.shards)
    model_args = ["--spec", SPEC, "--checkpoint", ckpt, "--eigensystem", eig]
    ref = ModelRef(spec=SPEC, checkpoint=ckpt, eigensystem=eig)
    res = {"benchmark": "beam_overhead", "machine": machine,
           "settings": {"n": n, "shards": a.shards, "k": a.k, "batch_size": a.batch_size, "spec": SPEC, "quick": a.quick},
           "data": data_info, "model": model_info, "runs": {}}

    def record(name: str, fn):
        la = loadavg()
        log(f"{name}: running (load {la})")
        r = fn()
        r["loadavg_before"], r["loadavg_after"] = la, loadavg()
        res["runs"][name] = r
        log(f"{name}: {r.get('seconds', r.get('seconds_profiled', 0)):.1f}s for {r['rows']} rows "
            f"({r.get('seconds', r.get('seconds_profiled', 0)) / max(r['rows'], 1) * 1e6:.0f} us/row)")
        write_result(a.name, res, a.out_dir)

    out = os.path.join(root, "out")
    os.makedirs(out, exist_ok=True)
    bare_path = os.path.join(out, "bare.parquet")
    record("bare", lambda: bare_loop(ref, pattern, bare_path, a.batch_size))
    if "vectorized" not in skip:
        record("bare_vectorized", lambda: bare_vectorized(ref, pattern, os.path.join(out, "bare_vec.parquet"),
                                                          a.batch_size))
    if "fnapi" not in skip:
        record("fnapi", lambda: run_index(model_args, ["--runner=FnApiRunner"], pattern, os.path.join(out, "idx_fnapi"),
                                          a.batch_size))
        res["check_fnapi_vs_bare"] = compare_outputs(bare_path, os.path.join(out, "idx_fnapi"))
    if "multiprocess" not in skip:
        record("multiprocess", lambda: run_index(model_args, MULTI, pattern, os.path.join(out, "idx_mp"), a.batch_size))
    if "prototype" not in skip:
        record("prototype_fnapi", lambda: run_prototype(ref, ["--runner=FnApiRunner"], pattern,
                                                        os.path.join(out, "idx_proto"), a.batch_size))
        res["check_prototype_vs_bare"] = compare_outputs(bare_path, os.path.join(out, "idx_proto"))
        if "multiprocess" not in skip:
            record("prototype_multiprocess", lambda: run_prototype(ref, MULTI, pattern,
                                                                   os.path.join(out, "idx_proto_mp"), a.batch_size))
    if a.small_n and "small" not in skip:  # fixed cost: the same jobs on a tiny input
        spattern, _ = write_digits_shards(root, a.small_n, 1)
        record("bare_small", lambda: bare_loop(ref, spattern, os.path.join(out, "bare_small.parquet"), a.batch_size))
        if "fnapi" not in skip:
            record("fnapi_small", lambda: run_index(model_args, ["--runner=FnApiRunner"], spattern,
                                                    os.path.join(out, "idx_fnapi_small"), a.batch_size))
        if "multiprocess" not in skip:
            record("multiprocess_small", lambda: run_index(model_args, MULTI, spattern, os.path.join(out, "idx_mp_small"),
                                                           a.batch_size))
        if "prototype" not in skip:
            record("prototype_fnapi_small", lambda: run_prototype(ref, ["--runner=FnApiRunner"], spattern,
                                                                  os.path.join(out, "idx_proto_small"), a.batch_size))
    if "profile" not in skip:
        record("fnapi_profile", lambda: profile_index(model_args, pattern, os.path.join(out, "idx_prof"), a.batch_size))

    bare = res["runs"]["bare"]["seconds"]
    big = {name: r for name, r in res["runs"].items() if "seconds" in r and not name.endswith("_small")}
    res["ratios"] = {name: r["seconds"] / bare for name, r in big.items()}
    if "bare_small" in res["runs"]:  # fixed (start-up) seconds and marginal us per row, from the two sizes
        res["fixed_and_marginal"] = {}
        for name, r in big.items():
            small = res["runs"].get(name + "_small")
            if small:
                marg = (r["seconds"] - small["seconds"]) / (r["rows"] - small["rows"])
                res["fixed_and_marginal"][name] = {"fixed_s": small["seconds"] - marg * small["rows"],
                                                   "marginal_us_per_row": marg * 1e6}
        mb = res["fixed_and_marginal"].get("bare")
        if mb:
            res["marginal_ratios"] = {k: v["marginal_us_per_row"] / mb["marginal_us_per_row"]
                                      for k, v in res["fixed_and_marginal"].items()}
    if "bare_vectorized" in res["runs"]:
        vec = res["runs"]["bare_vectorized"]["seconds"]
        res["ratios_vs_vectorized"] = {name: r["seconds"] / vec for name, r in big.items()}
    path = write_result(a.name, res, a.out_dir)
    rows = [{"run": k, "seconds": r.get("seconds", r.get("seconds_profiled")), "us_per_row":
             r.get("seconds", r.get("seconds_profiled", 0)) / max(r["rows"], 1) * 1e6, "ratio_vs_bare":
             res["ratios"].get(k), "load": r["loadavg_before"]} for k, r in res["runs"].items()]
    print(fmt_table(rows, ["run", "seconds", "us_per_row", "ratio_vs_bare", "load"]))
    if res.get("fixed_and_marginal"):
        print("\nfixed start-up seconds and marginal us per row (from N and --small-n):")
        for k, v in res["fixed_and_marginal"].items():
            print(f"  {k:24s} fixed {v['fixed_s']:6.1f}s  marginal {v['marginal_us_per_row']:7.1f} us/row"
                  f"  ({res['marginal_ratios'].get(k, float('nan')):.2f}x bare)")
    if "fnapi_profile" in res["runs"]:
        print("\nphases (FnApiRunner, cProfile, cumulative):")
        for k, v in res["runs"]["fnapi_profile"]["phases"].items():
            print(f"  {v['s']:8.2f}s {v['us_per_row']:8.1f} us/row  {k}")
        print("\nown time by bucket (FnApiRunner, cProfile):")
        for k, v in res["runs"]["fnapi_profile"]["buckets_own_time_s"].items():
            print(f"  {v:8.2f}s  {k}")
    log(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
