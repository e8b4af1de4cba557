"""Projection vs a training step on this machine (CPU here): seconds per example and the ratio.

For each model (the digits CNN, ``beam_influence.models.digits.cnn()``, and a small Flax Transformer
classifier, ``benchmarks.models.transformer()``: 2 layers, d=128, T=64, vocab 1000) and a batch of B=64:

* ``train``: fwd+bwd of the mean loss over the batch (``jit(value_and_grad)``), the floor;
* ``pexgrad``: per-example gradients only (``vmap(grad)`` in micro-batches of m, no projection);
* ``make_projector`` for every k in {16, 64, 128, 256}, method in {leafwise, flat, jvp} and micro-batch
  m in {8, 16, 32, 64}: seconds per example and ``ratio`` = that / the training step's.

FLOP floors (the projection's ratio can not go below them):
  ``floor_formula`` = 1 + k/(3T) for the Transformer (DESIGN.md; every weight is used T times);
  ``floor_xla`` = (F_train + 2·p·k·B) / F_train with F_train the XLA cost analysis of the training step,
  for both models (for the CNN, whose weights are reused far less than T=64 times, 2pk dominates).

Median of several timed calls after compile, ``block_until_ready``; every configuration's calls are
interleaved with training-step calls and ``ratio`` is the ratio of the two medians, so that the drifting
load of a shared machine cancels (``ratio_vs_first_train_timing`` uses the one training timing at the start). Slow configurations (forward mode
at large k) are skipped when their predicted time exceeds ``--config_budget`` seconds; the skip and
the predicted ratio are recorded. Writes ``benchmarks/results/projection.json``.

    python -m benchmarks.projection [--quick] [--models cnn,transformer] [--ks 16,64] [--methods leafwise]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from benchmarks.common import fmt_table, log, machine_info, time_calls, time_interleaved, write_result

KS = (16, 64, 128, 256)
METHODS = ("leafwise", "flat", "jvp")
MICRO_BATCHES = (8, 16, 32, 64)
BATCH = 64


def _model(name: str):
    from beam_influence.models import digits
    from benchmarks import models

    if name == "cnn":
        spec = digits.cnn()
        data = digits.load_digits(seed=0)
        recs = data.train[:BATCH]
        batch = {"x": np.asarray([r["x"] for r in recs], np.float32), "y": np.asarray([r["y"] for r in recs], np.int32)}
        return spec, batch, None
    if name == "transformer":
        spec = models.transformer(**{k: v for k, v in models.SMALL_TRANSFORMER.items()})
        return spec, models.random_tokens(spec, BATCH, seed=0), spec.config["T"]
    raise ValueError(f"unknown model {name!r}; choose cnn or transformer")


def _flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca["flops"]) if ca and "flops" in ca else None
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def jitted_args(proj, params, batch) -> tuple:
    """The arguments of ``proj.jitted`` for one batch: (params, batch, eigenvector operand[, sketch operands])
    (what ``Projector.__call__`` passes; a projector with a gradient sketch takes its operands too)."""
    extra = (proj.sketch_operands,) if hasattr(proj, "sketch_operands") else ()
    return (params, batch, proj.eigvecs) + extra


def _random_eigvecs(params, k: int, seed: int):
    from beam_influence.core.curvature import num_params
    from beam_influence.core.projection import unflatten_eigvecs

    u = np.random.default_rng(seed).standard_normal((k, num_params(params))).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return unflatten_eigvecs(u, params)


def bench_model(name: str, *, ks, methods, mbs, reps: int, config_budget_s: float, seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp

    from beam_influence.core.curvature import num_params
    from beam_influence.core.projection import make_projector

    spec, batch, T = _model(name)
    t0 = time.perf_counter()
    params = spec.init(seed)
    init_s = time.perf_counter() - t0
    p = num_params(params)
    B = int(batch["y"].shape[0])
    batch = jax.tree.map(jnp.asarray, batch)
    log(f"[{name}] p={p:,} B={B} (init {init_s:.1f}s)")

    def mean_loss(q, b):
        return jnp.mean(jax.vmap(spec.loss, in_axes=(None, 0))(q, b))

    t = time.perf_counter()
    train = jax.jit(jax.value_and_grad(mean_loss)).lower(params, batch).compile()
    train_compile = time.perf_counter() - t
    f_train = _flops(train)
    tt = time_calls(lambda: train(params, batch), reps=max(reps, 5))
    train_ex = tt["median_s"] / B
    log(f"[{name}] train fwd+bwd: {train_ex * 1e6:.1f} us/ex (compile {train_compile:.1f}s, "
        f"XLA flops/ex {f_train / B if f_train else float('nan'):.3g})")
    out = {"params": p, "batch": B, "T": T, "init_s": init_s, "config": dict(spec.config),
           "train": {**tt, "s_per_ex": train_ex, "compile_s": train_compile, "flops": f_train,
                     "flops_per_ex": None if f_train is None else f_train / B},
           "pexgrad": [], "projection": [], "skipped": []}

    # per-example gradients alone (the part of the projection that does not depend on k)
    for m in mbs:
        def pex(q, b, m=m):
            n = B // m
            mb = jax.tree.map(lambda x: x.reshape((n, m) + x.shape[1:]), b)
            g = jax.lax.map(lambda z: jax.vmap(jax.grad(spec.loss), in_axes=(None, 0))(q, z), mb)
            return g
        t = time.perf_counter()
        fn = jax.jit(pex).lower(params, batch).compile()
        c = time.perf_counter() - t
        tr = time_interleaved({"train": lambda: train(params, batch), "pexgrad": lambda: fn(params, batch)},
                              reps=reps, budget_s=config_budget_s)
        r = tr["pexgrad"]
        row = {"micro_batch": m, "s_per_ex": r["median_s"] / B, "ratio": r["median_s"] / tr["train"]["median_s"],
               "train_s_per_ex_interleaved": tr["train"]["median_s"] / B, "compile_s": c, **r}
        out["pexgrad"].append(row)
        log(f"[{name}] pexgrad m={m}: {row['s_per_ex'] * 1e6:.1f} us/ex = {row['ratio']:.2f}x train")

    jvp_cost: dict[int, float] = {}  # micro-batch -> seconds per example per eigenvector (to predict skips)
    for k in ks:
        eig = _random_eigvecs(params, k, seed)
        floor_formula = None if T is None else 1 + k / (3 * T)
        floor_xla = None if f_train is None else (f_train + 2.0 * p * k * B) / f_train
        ref = None
        for method in methods:
            for m in mbs:
                base = {"model": name, "k": k, "method": method, "micro_batch": m}
                if method == "jvp" and m in jvp_cost:
                    pred = jvp_cost[m] * k * B
                    if pred * (1 + reps) > config_budget_s:
                        out["skipped"].append({**base, "reason": f"predicted {pred:.1f}s per call > budget",
                                               "predicted_ratio": pred / B / train_ex})
                        log(f"[{name}] skip jvp k={k} m={m}: predicted {pred / B / train_ex:.1f}x train")
                        continue
                proj = make_projector(spec.loss, eig, method=method, micro_batch=m)
                t = time.perf_counter()
                args = jitted_args(proj, params, batch)
                fn = proj.jitted.lower(*args).compile()
                c = time.perf_counter() - t
                tr = time_interleaved({"train": lambda: train(params, batch),
                                       "proj": lambda: fn(*args)},
                                      reps=reps, budget_s=config_budget_s)
                r = tr["proj"]
                s_ex = r["median_s"] / B
                train_local = tr["train"]["median_s"] / B  # the training step timed between these calls
                if method == "jvp":
                    jvp_cost[m] = max(jvp_cost.get(m, 0.0), s_ex / k)
                if m == mbs[0]:  # the three methods must agree (float32 round-off)
                    got = np.asarray(fn(*args).projections)
                    if ref is None:
                        ref = got
                    else:
                        base["max_rel_diff_vs_first_method"] = float(
                            np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
                row = {**base, "s_per_ex": s_ex, "ratio": s_ex / train_local, "train_s_per_ex_interleaved": train_local,
                       "ratio_vs_first_train_timing": s_ex / train_ex, "floor_formula": floor_formula,
                       "floor_xla": floor_xla,
                       "gap_to_floor": s_ex / train_local / (floor_formula or floor_xla or math.nan),
                       "compile_s": c, **r}
                out["projection"].append(row)
                log(f"[{name}] {method:8s} k={k:3d} m={m:2d}: {s_ex * 1e6:9.1f} us/ex = {row['ratio']:6.2f}x train "
                    f"(floor {floor_formula or floor_xla:.2f}; compile {c:.1f}s)")
                del proj, fn
    best = {}
    for row in out["projection"]:
        if row["k"] not in best or row["ratio"] < best[row["k"]]["ratio"]:
            best[row["k"]] = row
    out["best"] = [{"k": k, "method": r["method"], "micro_batch": r["micro_batch"], "ratio": r["ratio"],
                    "floor_formula": r["floor_formula"], "floor_xla": r["floor_xla"], "gap_to_floor": r["gap_to_floor"]}
                   for k, r in sorted(best.items())]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="micro-batches 8 and 64 only, 3 timed calls, a tighter budget per configuration")
    ap.add_argument("--models", default="cnn,transformer")
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--micro_batches", default=None, help="default 8,16,32,64 (quick: 8,64)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per configuration (default 5, quick 3)")
    ap.add_argument("--config_budget", type=float, default=None,
                    help="seconds of timed calls per configuration (default 60, quick 15)")
    ap.add_argument("--output_dir", default=None)
    ap.add_argument("--name", default="projection")
    a = ap.parse_args(argv)
    reps = a.reps or (3 if a.quick else 5)
    budget = a.config_budget or (15.0 if a.quick else 60.0)
    ks = [int(x) for x in a.ks.split(",")]
    mbs = [int(x) for x in a.micro_batches.split(",")] if a.micro_batches else \
        ([8, 64] if a.quick else list(MICRO_BATCHES))
    methods = a.methods.split(",")
    machine = machine_info()
    log(f"projection benchmark on {machine['cpu_count']} CPUs ({machine['jax_backend']}), load {machine['loadavg']}")
    res = {"benchmark": "projection", "machine": machine,
           "settings": {"quick": a.quick, "reps": reps, "config_budget_s": budget, "ks": ks, "methods": methods,
                        "micro_batches": mbs, "batch": BATCH},
           "models": {}}
    for name in a.models.split(","):
        res["models"][name] = bench_model(name, ks=ks, methods=methods, mbs=mbs, reps=reps, config_budget_s=budget)
        res["models"][name]["loadavg_after"] = machine_info()["loadavg"]
        path = write_result(a.name, res, a.output_dir)  # after each model: partial results survive
    for name, r in res["models"].items():
        print(f"\n{name}: p={r['params']:,}, train {r['train']['s_per_ex'] * 1e6:.1f} us/ex")
        print(fmt_table(r["projection"], ["k", "method", "micro_batch", "s_per_ex", "ratio", "floor_formula",
                                          "floor_xla"]))
    log(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
