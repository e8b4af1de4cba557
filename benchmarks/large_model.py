"""Large models on bounded memory: a decoder-only LM (``benchmarks.models.decoder_lm``, ≈1M/10M/50M/110M
parameters, T = 64, untrained) through the eigensystem, the index projection, a query and self-influence, each
stage in its own subprocess, its peak RSS against the floor of issue 18:

* eigensystem: (n + 1 + 6)·p·4 bytes + 1 GiB (the basis, six p-sized arrays, the runtime);
* index / query / self-influence: (k + m + 5)·p·4 bytes + 1 GiB (U once, m per-example gradients, five
  p-sized arrays, the runtime), m the micro-batch the plan picked.

Every stage goes through the library as the jobs do: ``compute_eigensystem`` on the checkpoint loaded with
``ModelSpec.load_params`` (then ``Eigensystem.save``), ``ModelRef.load`` (the worker context: spec, checkpoint,
eigensystem, planned projector) and its projector over handler batches, ``core.scoring`` for the query and
self-influence. Each stage prints its memory plan (``beam_influence.core.memory``) first. The self-influence stage
also checks the projector's self-influence of a few rows against a direct computation (one flat gradient each,
Σ_i ⟨g, u_i⟩²/λ_i). The projection time per example is compared with a training step (fwd+bwd of the mean loss)
at the same micro-batch m.

    python -m benchmarks.large_model [--quick] [--sizes 1m 10m 50m 110m] [--num-iters 8] [--top-k 4] [--rows 64]

Writes ``benchmarks/results/large_model.json`` after every stage.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

GIB = 2**30


# ---- the stages (run in a child process each) ------------------------------------------------------
def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _spec(size: str):
    from benchmarks.models import decoder_lm

    return decoder_lm(size)


def stage_setup(a) -> dict:
    """Untrained params (seed 0) as a msgpack checkpoint, and the token data (npz)."""
    import flax.serialization

    from benchmarks.models import random_lm_tokens

    spec = _spec(a.size)
    params = spec.init(0)
    p = int(sum(np.size(x) for x in __import__("jax").tree.leaves(params)))
    with open(os.path.join(a.workdir, "params.msgpack"), "wb") as f:
        f.write(flax.serialization.to_bytes(params))
    data = random_lm_tokens(spec, a.rows + a.queries + a.sample, seed=1)
    np.savez(os.path.join(a.workdir, "tokens.npz"), **data)
    return {"p": p}


def _load(a):
    spec = _spec(a.size)
    params = spec.load_params(os.path.join(a.workdir, "params.msgpack"))
    with np.load(os.path.join(a.workdir, "tokens.npz"), allow_pickle=False) as z:
        tok = np.asarray(z["tok"])
    return spec, params, tok


def stage_eigensystem(a) -> dict:
    from beam_influence.core.curvature import num_params
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem

    import jax

    spec, params, tok = _load(a)
    params = jax.device_put(params)  # as the eigensystem command does: θ once (the device copy, not beside it)
    p = num_params(params)
    args = EigensystemArgs(num_iters=a.num_iters, top_k=a.top_k, sample_size=a.sample, micro_batch=a.curv_micro_batch,
                           mass_sample=0, residuals=True)
    sample = {"tok": tok[a.rows + a.queries:]}
    t = time.perf_counter()
    es = compute_eigensystem(spec, params, sample, args, progress=False, log=lambda line: print(line, flush=True))
    secs = time.perf_counter() - t
    peak_before_save = _peak_rss()  # the Arnoldi part; saving adds the file's bytes
    es.save(os.path.join(a.workdir, "eigensystem.safetensors"))
    return {"p": p, "seconds": secs, "ritz_values": es.ritz_values.tolist(), "residuals": es.residuals.tolist(),
            "plan": es.args.get("memory_plan"), "first_product_s": es.args.get("first_product_s"),
            "estimated_total_s": es.args.get("estimated_total_s"), "product_s": es.args.get("product_s"),
            "peak_rss_before_save_bytes": peak_before_save}


def _context(a):
    from beam_influence.beam.resources import ModelRef

    ref = ModelRef(spec="benchmarks.models:decoder_lm", spec_args=json.dumps({"size": a.size}),
                   checkpoint=os.path.join(a.workdir, "params.msgpack"),
                   eigensystem=os.path.join(a.workdir, "eigensystem.safetensors"), method="auto",
                   micro_batch=a.micro_batch or None)
    ctx = ref.load()
    if ctx.memory_plan:
        print(ctx.memory_plan["line"], flush=True)
    return ctx


def _project(ctx, rows: np.ndarray, batch: int):
    import jax

    out_p, out_si = [], []
    from beam_influence.core.scoring import self_influence

    for s in range(0, len(rows), batch):
        part = rows[s:s + batch]
        if len(part) < batch:
            part = np.concatenate([part, np.repeat(part[-1:], batch - len(part), axis=0)])
        got = jax.device_get(ctx.projector(ctx.params, {"tok": part}))
        n = min(batch, len(rows) - s)
        proj = np.asarray(got.projections, np.float32)[:n, : ctx.eigvals.shape[0]]
        out_p.append(proj)
        out_si.append(self_influence(proj, ctx.eigvals))
    return np.concatenate(out_p), np.concatenate(out_si)


def _train_step_time(ctx, tok: np.ndarray, m: int) -> float:
    """Seconds per example of one fwd+bwd of the mean loss over m examples (the floor)."""
    import jax
    import jax.numpy as jnp

    spec, params = ctx.spec, ctx.params
    grad = jax.jit(jax.grad(lambda prm, b: jnp.mean(jax.vmap(spec.loss, in_axes=(None, 0))(prm, b))))
    batch = {"tok": jnp.asarray(tok[:m])}
    jax.block_until_ready(grad(params, batch))
    reps, t = 2, time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(grad(params, batch))
    return (time.perf_counter() - t) / reps / m


def stage_index(a) -> dict:
    _, _, tok = _load(a)
    t = time.perf_counter()
    ctx = _context(a)
    load_s = time.perf_counter() - t
    m = int(ctx.plan.micro_batch)
    B = ctx.device_batch_size(None)
    rows = tok[: a.rows]
    t = time.perf_counter()
    _project(ctx, rows[:B], B)  # compile
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    proj, si = _project(ctx, rows, B)
    secs = time.perf_counter() - t
    np.savez(os.path.join(a.workdir, "index.npz"), projections=proj, self_influence=si)
    per_ex = secs / len(rows)
    step = _train_step_time(ctx, rows, m)
    return {"k": int(ctx.eigvals.shape[0]), "micro_batch": m, "batch": B, "plan": ctx.plan._asdict(),
            "memory_plan": getattr(ctx, "memory_plan", None), "load_s": load_s, "compile_s": compile_s,
            "rows": len(rows), "seconds": secs, "per_example_s": per_ex, "train_step_per_example_s": step,
            "ratio_to_train_step": per_ex / step, "finite": bool(np.isfinite(proj).all() and np.isfinite(si).all())}


def stage_query(a) -> dict:
    from beam_influence.core.scoring import influence_scores

    _, _, tok = _load(a)
    ctx = _context(a)
    queries = tok[a.rows: a.rows + a.queries]
    qp, _ = _project(ctx, queries, ctx.device_batch_size(None))
    with np.load(os.path.join(a.workdir, "index.npz")) as z:
        train = z["projections"]
    scores = influence_scores(qp, train, ctx.eigvals)
    top = np.argsort(-scores, axis=1)[:, :5]
    return {"queries": len(queries), "finite": bool(np.isfinite(scores).all()), "top5_first_query": top[0].tolist()}


def stage_self_influence(a) -> dict:
    import jax
    from jax.flatten_util import ravel_pytree

    _, _, tok = _load(a)
    ctx = _context(a)
    with np.load(os.path.join(a.workdir, "index.npz")) as z:
        si_index = z["self_influence"]
    # direct: one flat gradient at a time, projected on the eigenvectors leaf by leaf (no [k, p] copy)
    loss = ctx.spec.loss
    grad = jax.jit(jax.grad(loss))
    direct = []
    for i in range(a.check_rows):
        g, _ = ravel_pytree(grad(ctx.params, {"tok": tok[i]}))
        g = np.asarray(g)
        proj = np.zeros(ctx.eigvals.shape[0])
        off = 0
        for kp, leaf in jax.tree_util.tree_leaves_with_path(ctx.params):
            size = int(np.size(leaf))
            block = np.asarray(ctx.eigensystem.eigvecs[jax.tree_util.keystr(kp)], np.float64).reshape(len(proj), -1)
            proj += block @ g[off: off + size].astype(np.float64)
            off += size
        direct.append(float(np.sum(proj**2 / ctx.eigvals)))
    direct = np.asarray(direct)
    rel = np.abs(direct - si_index[: a.check_rows]) / np.maximum(np.abs(direct), 1e-30)
    order = np.argsort(-si_index)
    return {"rows": len(si_index), "finite": bool(np.isfinite(si_index).all()), "top5": order[:5].tolist(),
            "check_rows": a.check_rows, "direct": direct.tolist(), "from_index": si_index[: a.check_rows].tolist(),
            "max_rel_err": float(rel.max())}


STAGES = {"setup": stage_setup, "eigensystem": stage_eigensystem, "index": stage_index, "query": stage_query,
          "self_influence": stage_self_influence}


def _child(a) -> None:
    t = time.perf_counter()
    out = STAGES[a.stage](a)
    out.update(stage=a.stage, size=a.size, wall_s=time.perf_counter() - t, peak_rss_bytes=_peak_rss())
    print("RESULT " + json.dumps(out, default=str), flush=True)


# ---- the driver ----------------------------------------------------------------------------------
def floors(p: int, *, n: int, k: int, m: int) -> dict:
    """The issue's floors, bytes (``core.memory``): eigensystem (n+1+6)·p·4 + 1 GiB, projection stages
    (k+m+5)·p·4 + 1 GiB."""
    from beam_influence.core.memory import eigensystem_floor, projection_floor

    return {"eigensystem": eigensystem_floor(p, n), "projection": projection_floor(p, k, m)}


def run_size(a, size: str, workdir: str, log) -> dict:
    row: dict = {"size": size, "stages": {}}
    for stage in ("setup",) + tuple(a.stages):
        cmd = [sys.executable, "-m", "benchmarks.large_model", "--stage", stage, "--size", size, "--workdir", workdir,
               "--num-iters", str(a.num_iters), "--top-k", str(a.top_k), "--rows", str(a.rows), "--queries",
               str(a.queries), "--sample", str(a.sample), "--curv-micro-batch", str(a.curv_micro_batch),
               "--micro-batch", str(a.micro_batch), "--check-rows", str(a.check_rows)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            log(f"{size} {stage} FAILED rc={proc.returncode}: {proc.stderr[-2000:]}")
            row["stages"][stage] = {"failed": True, "rc": proc.returncode, "stderr": proc.stderr[-4000:]}
            break
        res = json.loads(lines[-1][len("RESULT "):])
        res["process_wall_s"] = wall
        res["plan_lines"] = [ln for ln in proc.stdout.splitlines() if ln.startswith(("plan ", "eigensystem: "))]
        if stage == "setup":
            row["p"] = res["p"]
        row["stages"][stage] = res
        p = row["p"]
        m = int(row["stages"].get("index", {}).get("micro_batch", a.micro_batch or 1))
        fl = floors(p, n=a.num_iters, k=a.top_k, m=m)
        floor = fl["eigensystem"] if stage == "eigensystem" else fl["projection"] if stage != "setup" else None
        if floor:
            res["floor_bytes"] = floor
            res["ratio_to_floor"] = res["peak_rss_bytes"] / floor
        log(f"{size} {stage}: peak RSS {res['peak_rss_bytes'] / GIB:.2f} GiB"
            + (f" (floor {floor / GIB:.2f} GiB, ratio {res['ratio_to_floor']:.2f})" if floor else "")
            + f", {wall:.0f} s" + "".join("\n    " + ln for ln in res["plan_lines"]))
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1m", "10m", "50m", "110m"])
    ap.add_argument("--quick", action="store_true", help="1m and 10m only (make bench --quick)")
    ap.add_argument("--stages", nargs="+", default=["eigensystem", "index", "query", "self_influence"])
    ap.add_argument("--num-iters", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--sample", type=int, default=8)
    ap.add_argument("--curv-micro-batch", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=0, help="projection micro-batch (0: the plan's)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--check-rows", type=int, default=2)
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--name", default="large_model")
    a = ap.parse_args(argv)
    if a.stage:
        _child(a)
        return {}
    if a.quick:
        a.sizes = [x for x in a.sizes if x in ("1m", "10m")]
    from benchmarks.common import log, machine_info, write_result

    result = {"benchmark": "large_model", "machine": machine_info(), "uptime_start": os.getloadavg(),
              "settings": {k: v for k, v in vars(a).items() if k not in ("stage", "size", "workdir")}, "sizes": []}
    for size in a.sizes:
        with tempfile.TemporaryDirectory(prefix=f"large_{size}_") as wd:
            result["sizes"].append(run_size(a, size, wd, log))
        write_result(a.name, result, a.out_dir)
    return result


if __name__ == "__main__":
    main()
