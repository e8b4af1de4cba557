"""``python -m benchmarks.rerank --mode scale``: two-stage query time at N indexed rows against its two floors.

Digits MLP (p = 4 810; the library's default eigensystem, k = 50, and index: d = 1024 float16 sketch), N training
records = the digits training set replicated with pixel noise (unique ids, 16 Parquet shards), Q queries = the
test set replicated likewise. Measured in one process, one after another:

* the index job (Beam, FnApiRunner) — context;
* the query job with ``--exact_rerank on`` (top-k proponents and opponents): wall and CPU seconds, and per round
  its stage 1 (index scan) and stage 2 (read back + gradients + exact scores) seconds and rows rescored;
* the query job with ``--exact_rerank off`` (the sketch-only lists) — context;
* floor 1, what stage 1 must at least do: read the index's projection and sketch columns, decode the sketch, form
  the same augmented operands, and one blocked float32 matrix product against the queries with a top-k selection
  (argpartition) per block and direction;
* floor 2, what stage 2 must at least do: a bare loop that decodes as many training records as stage 2 rescored,
  computes their per-example gradients (jit, batches of 64) and the dot products with the Q query gradients.
"""
from __future__ import annotations

import glob
import os
import tempfile
import time

import numpy as np

from benchmarks.common import cpu_seconds, log


def _write_noisy(path_prefix: str, x: np.ndarray, y: np.ndarray, n: int, shards: int, prefix: str, seed: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    per = -(-n // shards)
    for s in range(shards):
        lo, hi = s * per, min(n, (s + 1) * per)
        if lo >= hi:
            break
        idx = rng.integers(0, len(x), hi - lo)
        xs = np.clip(x[idx] + rng.normal(0, 0.5, (hi - lo, x.shape[1])), 0, 16).astype(np.float32)
        xs_arr = pa.ListArray.from_arrays(pa.array(np.arange(0, (hi - lo + 1) * x.shape[1], x.shape[1], dtype=np.int32)),
                                          pa.array(xs.reshape(-1)))
        table = pa.table({"id": pa.array([f"{prefix}{i:07d}" for i in range(lo, hi)]), "x": xs_arr,
                          "y": pa.array(y[idx].astype(np.int64))})
        pq.write_table(table, f"{path_prefix}-{s:05d}-of-{shards:05d}.parquet", row_group_size=16384)


def _matmul_floor(idx_dir: str, ctx, queries: dict, term, m: int) -> dict:
    """Read + decode the index columns, one blocked float32 product with a top-m selection per block."""
    from beam_influence.beam.index import read_manifest, read_shard, shard_refs
    from beam_influence.beam.project import projection_matrix, sketch_matrix
    from beam_influence.core.complement import augment
    from beam_influence.core.sketch import residual_sketch

    out = ctx.projector(ctx.params, queries)
    qp = np.asarray(out.projections, np.float64)
    qs = np.asarray(out.sketches, np.float64)
    test, lam = augment(qp, residual_sketch(qs, qp, term.basis_sketch), ctx.eigvals, term.rho)
    t32 = np.ascontiguousarray((test / lam).T.astype(np.float32))  # [k + d, Q]
    w, c = time.perf_counter(), cpu_seconds()
    best = None
    for shard in shard_refs(idx_dir, read_manifest(idx_dir)):
        for rb in read_shard(shard, ["projection", "sketch"]):
            p = projection_matrix(rb)
            train, _ = augment(p, residual_sketch(sketch_matrix(rb), p, term.basis_sketch), ctx.eigvals, term.rho)
            scores = train.astype(np.float32) @ t32  # [rows, Q]
            kk = min(m, scores.shape[0] - 1)
            top = np.partition(scores, scores.shape[0] - 1 - kk, axis=0)[-kk:]
            bot = np.partition(scores, kk, axis=0)[:kk]
            best = (top, bot) if best is None else best
    return {"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(cpu_seconds() - c, 2)}


def _recompute_floor(spec, params, train_glob: str, rows: int, q_grads: np.ndarray) -> dict:
    """A bare loop: decode ``rows`` training records, their gradients (jit, 64 at a time), dots with the queries."""
    import jax
    import jax.numpy as jnp
    import pyarrow.parquet as pq

    from beam_influence.evaluation.gradients import _grads_jit
    from beam_influence.core.projection import flatten_eigvecs

    fn = _grads_jit(spec.loss)
    g32 = q_grads.astype(np.float32)
    w, c = time.perf_counter(), cpu_seconds()
    left = rows
    for path in sorted(glob.glob(train_glob)):
        if left <= 0:
            break
        t = pq.read_table(path)
        t = t.slice(0, min(left, t.num_rows))
        dec = spec.decode_batch(t.combine_chunks().to_batches()[0]) if t.num_rows else None  # every row group
        if dec is None:
            continue
        arrays = dec.arrays
        n = len(dec.ids)
        for s in range(0, n, 64):
            b = {k: jnp.asarray(np.asarray(v)[s:s + 64]) for k, v in arrays.items()}
            if len(next(iter(b.values()))) < 64:  # pad to the compiled shape, as the projector does
                b = {k: jnp.concatenate([v, jnp.repeat(v[:1], 64 - len(v), axis=0)]) for k, v in b.items()}
            gr = flatten_eigvecs(jax.device_get(fn(params, b)))
            _ = np.asarray(gr, np.float32) @ g32.T
        left -= n
    return {"rows": rows - max(left, 0), "wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(cpu_seconds() - c, 2)}


def measure_scale(*, rows: int, queries: int, top_k: int, check_exact: bool = True) -> dict:
    from benchmarks.sketch_quality import TRAINING
    from beam_influence.beam.complement_term import for_index_queries
    from beam_influence.beam.index import read_manifest
    from beam_influence.beam.resources import ModelRef, with_index_sketch
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
    from beam_influence.evaluation.gradients import flat_grads
    from beam_influence.models import digits
    from beam_influence.train import train
    from pipelines import index, query

    root = tempfile.mkdtemp(prefix="rerank-scale-")
    spec = digits.mlp()
    data = digits.load_digits(test_fraction=0.2, label_noise=0.0, seed=0)
    tr = spec.stack([spec.decode(r) for r in data.train])
    te = spec.stack([spec.decode(r) for r in data.test])
    params = train(spec, tr, seed=0, **TRAINING["mlp"])
    es = compute_eigensystem(spec, params, tr, EigensystemArgs())
    ckpt, eig = f"{root}/ckpt.msgpack", f"{root}/eig.safetensors"
    spec.save_params(ckpt, params)
    es.save(eig)
    _write_noisy(f"{root}/train", np.asarray(tr["x"]), np.asarray(tr["y"]), rows, 16, "z", 1)
    _write_noisy(f"{root}/test", np.asarray(te["x"]), np.asarray(te["y"]), queries, 1, "q", 2)
    model = ["--spec", "beam_influence.models.digits:mlp", "--checkpoint", ckpt, "--eigensystem", eig,
             "--runner=FnApiRunner"]
    train_glob, test_glob, idx = f"{root}/train-*", f"{root}/test-*", f"{root}/index"
    out: dict = {"model": "digits mlp", "p": 4810, "k": int(es.k), "rows": rows, "queries": queries, "top_k": top_k}

    w, c = time.perf_counter(), cpu_seconds()
    index.run(model + ["--train_data", train_glob, "--index_dir", idx, "--sketch_dtype", "float16"])
    out["index"] = {"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(cpu_seconds() - c, 2)}
    man = read_manifest(idx)
    out["index_bytes_per_example"] = round(sum(os.path.getsize(p) for p in glob.glob(f"{idx}/data-*/part-*.parquet"))
                                           / man["rows"], 1)
    log(f"scale: index of {man['rows']} rows in {out['index']['wall_s']} s ({out['index_bytes_per_example']} B/row)")
    common = model + ["--test_data", test_glob, "--index_dir", idx, "--top_k", str(top_k)]

    w, c = time.perf_counter(), cpu_seconds()
    on = query.run(common + ["--output", f"{root}/on", "--train_data", train_glob])
    out["two_stage"] = {"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(cpu_seconds() - c, 2),
                        **{k: on["exact_rerank"][k] for k in ("lists", "certified_lists", "candidates", "rows_rescored",
                                                              "stage1_seconds", "stage2_seconds")}}
    log(f"scale: two-stage query {out['two_stage']['wall_s']} s, {on['exact_rerank']['rows_rescored']} rows rescored")
    w, c = time.perf_counter(), cpu_seconds()
    query.run(common + ["--output", f"{root}/off", "--exact_rerank", "off"])
    out["sketch_only"] = {"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(cpu_seconds() - c, 2)}
    log(f"scale: sketch-only query {out['sketch_only']['wall_s']} s")

    ref = with_index_sketch(ModelRef(spec="beam_influence.models.digits:mlp", checkpoint=ckpt, eigensystem=eig), man)
    ctx = ref.load()
    term = for_index_queries("auto", "none", man, ctx, None)
    import pyarrow.parquet as pq

    qt = pq.read_table(glob.glob(test_glob)[0])
    qdec = spec.decode_batch(qt.combine_chunks().to_batches()[0])
    out["floor_stage1"] = _matmul_floor(idx, ctx, qdec.arrays, term, top_k)
    log(f"scale: stage-1 floor {out['floor_stage1']['wall_s']} s")
    q_grads = flat_grads(spec.loss, params, qdec.arrays)
    out["floor_stage2"] = _recompute_floor(spec, params, train_glob, int(on["exact_rerank"]["rows_rescored"]), q_grads)
    log(f"scale: stage-2 floor {out['floor_stage2']['wall_s']} s for {out['floor_stage2']['rows']} rows")
    if check_exact:  # the fused job's exact lists at the same scale: how close the capped lists are
        from benchmarks.rerank import _lists, agreement
        from pipelines import fused

        w, c = time.perf_counter(), cpu_seconds()
        fused.run(model + ["--train_data", train_glob, "--test_data", test_glob, "--output", f"{root}/fused",
                           "--top_k", str(top_k)])
        out["fused_exact"] = {"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(cpu_seconds() - c, 2)}
        want = _lists(f"{root}/fused/topk.jsonl")
        out["agreement"] = {"two_stage": agreement(_lists(f"{root}/on/topk.jsonl"), want, top_k),
                            "sketch_only": agreement(_lists(f"{root}/off/topk.jsonl"), want, top_k)}
        log(f"scale: fused exact {out['fused_exact']['wall_s']} s; agreement {out['agreement']}")
    s1, s2 = on["exact_rerank"]["stage1_seconds"], on["exact_rerank"]["stage2_seconds"]
    out["ratios"] = {"stage1_over_floor": round(s1 / out["floor_stage1"]["wall_s"], 2),
                     "stage2_over_floor": round(s2 / max(out["floor_stage2"]["wall_s"], 1e-9), 2),
                     "stage1_s": round(s1, 2), "stage2_s": round(s2, 2)}
    return out
