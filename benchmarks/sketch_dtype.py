"""A lighter index (issue 20, item 3): the gradient sketch stored in float16 / bfloat16 against float32, at several d.

For digits models (LR p = 650, MLP p = 4 810), the library's default eigensystem (``EigensystemArgs()``) on the clean
digits split (as ``benchmarks/sketch_quality.py``), and for each sketch dimension d and storage dtype:

* ``lds``: LDS over retrainings on half subsets (``beam_influence.evaluation.lds``) of the query scores with the
  sketched complement, exactly as ``pipelines.query`` computes them (the index's sketch encoded in the dtype and
  decoded, ``core.sketch.encode_rows``/``decode_rows``; the queries' sketches float32), mean over sketch seeds;
* ``top10_slots`` / ``top10_sets``: agreement of the top-10 proponent and opponent lists with those of the exact
  complement (full gradients: the fused job's answer): the fraction of equal slots (same id at the same rank) and
  of shared ids; ``recall_at_m``: the fraction of the exact top-10 found in the sketch's top-M (M = 10, 50, 100):
  what a two-stage query that re-scores M candidates exactly would recover;
* ``score_rel_err``: max |score(dtype) − score(float32)| / max |score(float32)| (the storage error alone);
* ``bytes_per_example``: the Parquet sketch columns (``sketch`` + ``sketch_scale``) of the training rows written as
  an index part file is (``index.WriteIndexPartFn``): stored (snappy) and before compression.

    python -m benchmarks.sketch_dtype [--models logreg,mlp] [--subsets 50] [--seeds 3] [--quick]
    python -m benchmarks.sketch_dtype --models cnn --subsets 0 --name sketch_dtype_cnn   # agreement only

Writes ``benchmarks/results/sketch_dtype.json`` (``--name``).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from benchmarks.common import log, loadavg, machine_info, write_result
from benchmarks.sketch_quality import TRAINING, digits_task

DIMS = (128, 256, 512, 1024)
DTYPES = ("float32", "float16", "bfloat16")
TOP = 10
RECALL_M = (10, 50, 100)


def _lists(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-n proponents (largest first) and opponents (smallest first) per query: ``[Q, n]`` row indices (ties by
    index, as ``core.topk`` breaks them by id)."""
    pro = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    opp = np.argsort(scores, axis=1, kind="stable")[:, :n]
    return pro, opp


def agreement(exact: np.ndarray, approx: np.ndarray) -> dict:
    """Top-10 slot and set agreement of ``approx`` with ``exact`` (both ``[N, Q]``: train × query, as
    ``core.scoring.influence_scores``), and recall of the exact top-10 in the approximate top-M, over proponents and
    opponents."""
    e_pro, e_opp = _lists(np.asarray(exact).T, TOP)
    a_pro, a_opp = _lists(np.asarray(approx).T, max(RECALL_M))
    slots = sets = 0.0
    recall = {m: 0.0 for m in RECALL_M}
    for e, a in ((e_pro, a_pro), (e_opp, a_opp)):
        slots += float(np.mean(e == a[:, :TOP]))
        sets += float(np.mean([len(set(x) & set(y)) / TOP for x, y in zip(e, a[:, :TOP])]))
        for m in RECALL_M:
            recall[m] += float(np.mean([len(set(x) & set(y)) / TOP for x, y in zip(e, a[:, :m])]))
    return {"top10_slots": slots / 2, "top10_sets": sets / 2, "recall_at_m": {str(m): v / 2 for m, v in recall.items()}}


def column_bytes(sketches: np.ndarray, dtype: str) -> dict:
    """Bytes per row of the sketch columns of a part file holding ``sketches`` in ``dtype``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from beam_influence.beam.index import _statistics_columns
    from beam_influence.beam.project import encode_sketch_column

    n, d = sketches.shape
    table = pa.table({"id": pa.array([str(i) for i in range(n)]),
                      "sketch": pa.FixedSizeListArray.from_arrays(pa.array(sketches.astype(np.float32).ravel()), d)})
    table = encode_sketch_column(table, dtype)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=65536, use_dictionary=False, write_statistics=_statistics_columns(table))
    meta = pq.ParquetFile(pa.BufferReader(sink.getvalue())).metadata
    stored = raw = 0
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            if col.path_in_schema.split(".")[0] in ("sketch", "sketch_scale"):
                stored += col.total_compressed_size
                raw += col.total_uncompressed_size
    return {"stored": stored / n, "uncompressed": raw / n}


def _measure(model: str, *, subsets: int, queries: int, dims, dtypes, seeds: int, cache: str) -> dict:
    from beam_influence.core import scoring
    from beam_influence.core.complement import augment, complement_scores, default_rho
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
    from beam_influence.core.projection import make_projector
    from beam_influence.core.sketch import GradientSketch, decode_rows, encode_rows, residual_sketch, storage_bytes
    from beam_influence.evaluation import lds as lds_mod
    from beam_influence.evaluation.gradients import flat_grads

    spec, data, tr, te, params = digits_task(model, queries)
    hp = TRAINING[model]
    es = compute_eigensystem(spec, params, tr, EigensystemArgs())
    tree = es.eigvecs_tree(params)
    proj = make_projector(spec.loss, tree)
    p_tr = np.asarray(proj(params, tr).projections, np.float64)
    p_te = np.asarray(proj(params, te).projections, np.float64)
    g_tr, g_te = flat_grads(spec.loss, params, tr), flat_grads(spec.loss, params, te)
    rho = default_rho(es.eigvals)
    exact = complement_scores(p_te, p_tr, es.eigvals, g_tr.astype(np.float64) @ g_te.astype(np.float64).T, rho=rho)
    truncated = scoring.influence_scores(p_te, p_tr, es.eigvals)
    lds_on = subsets > 0
    if lds_on:
        masks = lds_mod.subset_masks(len(data.train), subsets, seed=0)
        job = lds_mod.retrain_job(f"beam_influence.models.digits:{model}", {}, tr, te, masks, seed=0, **hp)
        t0 = time.perf_counter()
        targets = lds_mod.run_retraining(job, progress=False, cache_dir=cache)
        retrain_s = time.perf_counter() - t0

    def lds(s):
        return float(lds_mod.lds(s, masks, targets).score) if lds_on else None

    unravel = jax.flatten_util.ravel_pytree(params)[1]
    p = int(g_tr.shape[1])
    rows = []
    for d in dims:
        per = {dt: {"lds": [], "slots": [], "sets": [], "recall": [], "rel": []} for dt in dtypes}
        bytes_ = {}
        for seed in range(seeds):
            sk = GradientSketch(params, d, seed=seed)
            su = sk.sketch_vectors(tree)
            s_tr = np.asarray(sk.apply(jax.vmap(unravel)(g_tr)), np.float32)
            s_te = np.asarray(sk.apply(jax.vmap(unravel)(g_te)), np.float64)
            r_te = residual_sketch(s_te, p_te, su)
            a_te, _ = augment(p_te, r_te, es.eigvals, rho)
            base = None
            for dt in dtypes:
                stored = decode_rows(*encode_rows(s_tr, dt))  # the index's copy, as the query job decodes it
                a_tr, lam = augment(p_tr, residual_sketch(stored, p_tr, su), es.eigvals, rho)
                scores = scoring.influence_scores(a_te, a_tr, lam)
                if dt == "float32":
                    base = scores
                agr = agreement(exact, scores)
                per[dt]["lds"].append(lds(scores))
                per[dt]["slots"].append(agr["top10_slots"])
                per[dt]["sets"].append(agr["top10_sets"])
                per[dt]["recall"].append(agr["recall_at_m"])
                per[dt]["rel"].append(float(np.max(np.abs(scores - base)) / np.max(np.abs(base))))
                if seed == 0:
                    bytes_[dt] = column_bytes(s_tr, dt)
            if sk.dim >= p:
                break
        for dt in dtypes:
            v = per[dt]
            rows.append({"d": d, "dim_used": min(d, p), "exact_sketch": d >= p, "dtype": dt, "seeds": len(v["slots"]),
                         "lds_mean": float(np.mean(v["lds"])) if lds_on else None,
                         "lds_min": float(np.min(v["lds"])) if lds_on else None,
                         "lds_max": float(np.max(v["lds"])) if lds_on else None,
                         "top10_slots": float(np.mean(v["slots"])), "top10_sets": float(np.mean(v["sets"])),
                         "recall_at_m": {m: float(np.mean([r[m] for r in v["recall"]])) for m in v["recall"][0]},
                         "score_rel_err_vs_float32": float(np.max(v["rel"])),
                         "bytes_per_example": {"formula": storage_bytes(min(d, p), dt), **bytes_[dt]}})
    exact_agr = agreement(exact, exact)
    trunc_agr = agreement(exact, truncated)
    return {"model": model, "num_params": p, "k": es.k, "rho": rho, "n_train": len(data.train), "queries": len(q_idx),
            "subsets": subsets, "lds_truncated": lds(truncated), "lds_complement_exact": lds(exact),
            "truncated_vs_exact": trunc_agr, "exact_vs_exact": exact_agr, "rows": rows,
            "retrain_seconds": retrain_s if lds_on else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="logreg,mlp")
    ap.add_argument("--subsets", type=int, default=50, help="LDS retrainings (0: agreement only)")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dims", default=",".join(map(str, DIMS)))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--quick", action="store_true", help="LR only, 10 retrainings, one sketch seed")
    ap.add_argument("--name", default="sketch_dtype", help="result file benchmarks/results/<name>.json")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "beam_influence_retrain_cache"))
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.subsets, a.seeds, a.name = "logreg", min(a.subsets, 10), 1, a.name + "_quick"
    dims = tuple(int(x) for x in a.dims.split(","))
    dtypes = tuple(a.dtypes.split(","))
    if dtypes[0] != "float32":
        dtypes = ("float32",) + tuple(d for d in dtypes if d != "float32")
    out = {"benchmark": "sketch_dtype", "machine": machine_info(), "loadavg_start": loadavg(), "models": []}
    for m in a.models.split(","):
        t0 = time.perf_counter()
        r = _measure(m, subsets=a.subsets, queries=a.queries, dims=dims, dtypes=dtypes, seeds=a.seeds, cache=a.cache)
        r["seconds"] = time.perf_counter() - t0
        r["loadavg_end"] = loadavg()
        out["models"].append(r)
        for row in r["rows"]:
            log(f"{m} d={row['d']} {row['dtype']}: LDS {row['lds_mean'] if row['lds_mean'] is None else round(row['lds_mean'], 3)} "
                f"top-10 slots {row['top10_slots']:.3f} sets {row['top10_sets']:.3f} "
                f"recall@50 {row['recall_at_m']['50']:.3f} rel.err {row['score_rel_err_vs_float32']:.1e} "
                f"bytes {row['bytes_per_example']['stored']:.0f}/{row['bytes_per_example']['uncompressed']:.0f}")
        write_result(a.name, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
