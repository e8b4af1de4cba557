"""Exact answers from an index (issue 20): sketch-only vs two-stage queries against the fused job's exact lists.

``agreement`` (the default): for each model, the Beam jobs as a user runs them (in-process FnApiRunner): the fused
job (exact complement: the reference lists), then for each sketch dimension d an index (float16 sketch) and two
queries — ``--exact_rerank off`` (the sketch's estimate) and ``on`` (candidates read back and scored exactly).
Per (model, d): the fraction of equal top-10 slots (same id at the same rank, proponents and opponents) and of
shared ids against the exact lists, the lists certified, the rows rescored, wall and CPU seconds of each query,
the index's bytes per example. Models: digits MLP and CNN (trained as ``benchmarks.sketch_quality``), the built-in
translation Transformer (trained briefly), and the 1M-parameter decoder LM of the large-model benchmark
(untrained, random tokens).

``scale``: query time at N indexed examples (digits MLP records replicated with pixel noise, unique ids) and Q
queries, top-100 proponents and opponents, with rerank on, against two floors measured in the same process:
a blocked float32 matmul over the same index columns ([projection, decoded sketch] × queries, top-k per block:
what stage 1 must at least do) and a bare loop that recomputes the same candidates' gradients and their dot
products with the query gradients (what stage 2 must at least do).

    python -m benchmarks.rerank [--models mlp,cnn,translation,lm1m] [--dims 64,256,1024] [--queries 50] [--quick]
    python -m benchmarks.rerank --kfac --models mlp,cnn      # the K-FAC complement (rerank_kfac.json)
    python -m benchmarks.rerank --mode scale --rows 1000000 --queries 1000 --top_k 100

Writes ``benchmarks/results/rerank.json`` (``rerank_scale.json`` for ``--mode scale``; ``--name``).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks.common import cpu_seconds, loadavg, log, machine_info, write_result

TOP = 10


def _timed(fn):
    w, c = time.perf_counter(), cpu_seconds()
    out = fn()
    return out, round(time.perf_counter() - w, 2), round(cpu_seconds() - c, 2)


def _lists(path: str) -> dict:
    from beam_influence.beam.outputs import read_jsonl

    out: dict = {}
    for r in read_jsonl(path):
        out.setdefault((r["query_id"], r["kind"]), {})[r["rank"]] = r["train_id"]
    return {key: [v[i] for i in sorted(v)] for key, v in out.items()}


def agreement(got: dict, want: dict, top: int = TOP) -> dict:
    """Equal slots and shared ids of the top-``top`` lists (every query, both kinds) against ``want``."""
    slots = sets = 0.0
    for key, w in want.items():
        g = got.get(key, [])
        w, g = w[:top], g[:top]
        slots += sum(a == b for a, b in zip(w, g)) / len(w)
        sets += len(set(w) & set(g)) / len(w)
    return {"top10_slots": round(slots / len(want), 4), "top10_sets": round(sets / len(want), 4)}


# ---- the models ------------------------------------------------------------------------------------
def _digits(model: str, root: str, queries: int):
    from benchmarks.sketch_quality import TRAINING
    from beam_influence.formats import write_records
    from beam_influence.models import digits
    from beam_influence.train import train

    spec = getattr(digits, model)()
    data = digits.load_digits(test_fraction=0.2, label_noise=0.0, seed=0)
    tr = spec.stack([spec.decode(r) for r in data.train])
    params = train(spec, tr, seed=0, **TRAINING[model])
    write_records(data.train, f"{root}/train", "parquet", num_shards=4)
    write_records(data.test[:queries], f"{root}/test", "parquet", num_shards=1)
    return spec, params, tr, f"beam_influence.models.digits:{model}", [], {}


def _translation(root: str, queries: int, quick: bool):
    from beam_influence.formats import write_records
    from beam_influence.models import sequence
    from beam_influence.train import train

    spec = sequence.translation()
    data = sequence.translation_data(n_train=400 if quick else 1000, n_test=queries, noise=0.1, seed=0)
    batch = spec.stack([spec.decode(r) for r in data.train])
    params = train(spec, batch, steps=300 if quick else 1500, learning_rate=3e-3, batch_size=64, seed=0)
    write_records(data.train, f"{root}/train", "parquet", num_shards=4)
    write_records(data.test, f"{root}/test", "parquet", num_shards=1)
    return spec, params, batch, "beam_influence.models.sequence:translation", [], {"num_iters": 40, "top_k": 10}


def _lm(root: str, queries: int, quick: bool):
    from benchmarks.models import LM_SIZES, decoder_lm
    from beam_influence.formats import write_records

    cfg = LM_SIZES["1m"]
    spec = decoder_lm("1m")
    params = spec.init(0)
    rng = np.random.default_rng(0)
    n = 120 if quick else 400
    rows = [{"id": f"r{i:05d}", "tok": rng.integers(0, cfg["vocab"], cfg["T"]).tolist()} for i in range(n + queries)]
    write_records(rows[:n], f"{root}/train", "parquet", num_shards=4)
    write_records(rows[n:], f"{root}/test", "parquet", num_shards=1)
    batch = spec.stack([spec.decode(r) for r in rows[:n]])
    return spec, params, batch, "benchmarks.models:decoder_lm", ["--spec_arg", "size=1m"], \
        {"num_iters": 12, "top_k": 8, "sample_size": 64}


def measure_model(name: str, dims, queries: int, quick: bool, kfac: bool = False) -> dict:
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
    from beam_influence.core.curvature import num_params
    from pipelines import fused, index, query

    root = tempfile.mkdtemp(prefix=f"rerank-{name}-")
    if name in ("mlp", "cnn"):
        spec, params, batch, spec_path, spec_args, es_kw = _digits(name, root, queries)
    elif name == "translation":
        spec, params, batch, spec_path, spec_args, es_kw = _translation(root, queries, quick)
    elif name == "lm1m":
        spec, params, batch, spec_path, spec_args, es_kw = _lm(root, queries, quick)
    else:
        raise ValueError(f"unknown model {name!r}")
    if quick and name in ("mlp", "cnn"):
        es_kw = {"num_iters": 40, "top_k": 20}
    es_args = EigensystemArgs(**es_kw)
    es = compute_eigensystem(spec, params, batch, es_args)
    if kfac:  # the K-FAC complement everywhere: fused exact, the index sketches the whitened residual
        from beam_influence.api import fit_eigensystem_kfac
        from beam_influence.core.kfac import fixed_sample

        es = fit_eigensystem_kfac(spec, params, fixed_sample(batch, es_args.sample_size, es_args.seed), es)
    ckpt, eig = f"{root}/ckpt.msgpack", f"{root}/eig.safetensors"
    spec.save_params(ckpt, params)
    es.save(eig)
    model = ["--spec", spec_path, *spec_args, "--checkpoint", ckpt, "--eigensystem", eig, "--runner=FnApiRunner"]
    train, test = f"{root}/train-*", f"{root}/test-*"
    common = ["--test_data", test, "--top_k", str(TOP)]
    log(f"{name}: p={num_params(params):,}, k={es.k}{', K-FAC complement' if kfac else ''}; fused (exact) …")
    fsum, fw, fc = _timed(lambda: fused.run(model + common + ["--train_data", train, "--output", f"{root}/fused"]))
    assert fsum["complement"]["mode"] == ("kfac" if kfac else "exact"), fsum["complement"]
    want = _lists(f"{root}/fused/topk.jsonl")
    rows = []
    for d in dims:
        idx = f"{root}/index-{d}"
        index.run(model + ["--train_data", train, "--index_dir", idx, "--sketch_dim", str(d),
                           "--sketch_dtype", "float16"])
        from beam_influence.beam.index import read_manifest

        man = read_manifest(idx)
        off, ow, oc = _timed(lambda: query.run(model + common + ["--index_dir", idx, "--output", f"{root}/off-{d}",
                                                                 "--exact_rerank", "off"]))
        on, nw, nc = _timed(lambda: query.run(model + common + ["--index_dir", idx, "--output", f"{root}/on-{d}",
                                                                "--train_data", train]))
        info = on["exact_rerank"]
        assert on["complement"].get("curvature") == ("kfac" if kfac else None), on["complement"]
        row = {"model": name, "d": man["args"]["sketch"]["dim"], "sketch_dtype": "float16",
               "complement": "kfac" if kfac else "scalar",
               "sketch_bytes_per_example": man["args"]["sketch"]["bytes_per_example"],
               "index_rows": man["rows"],
               "sketch_only": {**agreement(_lists(f"{root}/off-{d}/topk.jsonl"), want), "wall_s": ow, "cpu_s": oc,
                               "sigma_median": (off.get("sketch_error") or {}).get("sigma_median")},
               "two_stage": {**agreement(_lists(f"{root}/on-{d}/topk.jsonl"), want), "wall_s": nw, "cpu_s": nc,
                             "lists": info["lists"], "certified_lists": info["certified_lists"],
                             "candidates": info["candidates"], "rows_rescored": info["rows_rescored"],
                             "stage1_s": info["stage1_seconds"], "stage2_s": info["stage2_seconds"]}}
        log(f"  d={row['d']}: sketch-only slots {row['sketch_only']['top10_slots']:.3f} ({ow:.1f}s), two-stage "
            f"{row['two_stage']['top10_slots']:.3f} ({nw:.1f}s, {info['rows_rescored']} rows rescored, "
            f"{info['certified_lists']}/{info['lists']} certified)")
        rows.append(row)
    return {"model": name + ("+kfac" if kfac else ""), "p": int(num_params(params)), "k": int(es.k), "queries": queries,
            "complement": "kfac" if kfac else "scalar",
            "fused_exact": {"wall_s": fw, "cpu_s": fc}, "rows": rows}


def table(result: dict) -> str:
    """The agreement result as a markdown table (docs/benchmarks.md)."""
    out = ["| model (p, k, train rows) | d | sketch-only: top-10 slots / ids, s | two-stage: slots / ids, s | rows "
           "read back | lists certified |", "|---|---:|---:|---:|---:|---:|"]
    for m in result["models"]:
        for r in m["rows"]:
            so, ts = r["sketch_only"], r["two_stage"]
            out.append(f"| {m['model']} ({m['p']:,}, {m['k']}, {r['index_rows']}) | {r['d']} | "
                       f"{so['top10_slots']:.3f} / {so['top10_sets']:.3f}, {so['wall_s']:.1f} | "
                       f"{ts['top10_slots']:.3f} / {ts['top10_sets']:.3f}, {ts['wall_s']:.1f} | {ts['rows_rescored']} | "
                       f"{ts['certified_lists']}/{ts['lists']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("agreement", "scale"), default="agreement")
    ap.add_argument("--models", default="mlp,cnn,translation,lm1m")
    ap.add_argument("--dims", default="64,256,1024")
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--top_k", type=int, default=100)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kfac", action="store_true", help="agreement: the K-FAC complement (eigensystem with factors; "
                    "the index sketches the whitened residual) instead of the scalar one")
    ap.add_argument("--no_check_exact", action="store_true", help="scale: skip the fused job's exact lists")
    ap.add_argument("--name", default=None)
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of an agreement result and exit")
    a = ap.parse_args(argv)
    if a.table:
        import json

        print(table(json.load(open(a.table))))
        return 0
    t0 = time.time()
    load0 = loadavg()
    if a.mode == "scale":
        from benchmarks.rerank_scale import measure_scale

        result = measure_scale(rows=a.rows, queries=a.queries or 1000, top_k=a.top_k, check_exact=not a.no_check_exact)
    else:
        dims = [int(x) for x in a.dims.split(",")]
        queries = a.queries or (10 if a.quick else 50)
        result = {"models": [measure_model(m, dims, queries, a.quick, a.kfac) for m in a.models.split(",") if m]}
    result.update(machine=machine_info(), load_before=load0, load_after=loadavg(), seconds=round(time.time() - t0, 1),
                  args=vars(a))
    path = write_result(a.name or ("rerank_scale" if a.mode == "scale" else "rerank_kfac" if a.kfac else "rerank"),
                        result)
    log(f"→ {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
