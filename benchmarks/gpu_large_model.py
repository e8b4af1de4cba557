"""The 110M-parameter decoder LM end to end on one GPU (issue 18, item 5): one prepared script.

    python benchmarks/gpu_large_model.py              # one GPU, within --budget seconds (default 480)
    python benchmarks/gpu_large_model.py --dry-run    # the 1m LM on the CPU: checks every stage here

It needs jax, flax, optax, numpy and this repository (not Beam). Results go to ``$OUT/gpu_large_model.json``
when ``OUT`` is set (dry run: ``gpu_large_model_dry_run.json``), else ``benchmarks/results/``, rewritten after
every stage so a run cut short keeps what it measured. Model: ``benchmarks.models.decoder_lm("110m")``
(12 layers, d = 768, vocab 32 000, T = 64; untrained params: memory and time do not depend on training).

Stages (each skipped, and said so, when the time left cannot hold it):
 1. ``plan``: ``core.memory``'s plans on this device for the eigensystem with the library defaults
    (``EigensystemArgs()``: n = 150, k = 50, a fixed sample of 8 192, micro-batch 256, basis auto) and for the
    projection at k = 50: the one-line plans (or the refusal).
 2. ``default_products``: the default eigensystem's curvature operator on its 8 192-example sample: the first
    product (with compilation) and the second; the estimated total of the default run (n + k products + the
    device Gram-Schmidt) against docs/accelerators.md's prediction (≈ 15 minutes plus compilation).
 3. ``eigensystem``: ``compute_eigensystem`` with ``basis="device"`` and the defaults, n lowered to what the
    time left holds (k = n // 3): seconds, the plan, the estimate it printed, peak device memory against the
    plan's device bytes.
 4. ``index``: the planned projector (``choose_method``: leafwise bf16, the plan's micro-batch) with that
    eigensystem's U: seconds per example against a training step (fwd+bwd of the mean loss) on the same rows,
    and peak device memory against the plan.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import log, machine_info, write_result  # noqa: E402

FULL = dict(size="110m", sample=8192, rows=512, batch=64, budget=480.0, compile_guess=40.0)
DRY = dict(size="1m", sample=64, rows=64, batch=16, budget=300.0, compile_guess=5.0, micro_batch=16)


def _peak_device(dev) -> int | None:
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - the CPU backend has none
        return None
    return stats.get("peak_bytes_in_use")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the 1m LM on whatever device JAX has (CPU here)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 480)")
    a = ap.parse_args(argv)
    cfg = dict(DRY if a.dry_run else FULL)
    budget = a.budget or cfg["budget"]
    t_start = time.perf_counter()
    left = lambda: budget - (time.perf_counter() - t_start)  # noqa: E731

    import jax
    import jax.numpy as jnp

    from beam_influence.core import memory as M
    from beam_influence.core.curvature import BatchSource, CurvatureOperator, make_matvec, num_params
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
    from beam_influence.core.projection import choose_method, make_projector
    from benchmarks.models import LM_SIZES, decoder_lm

    name = "gpu_large_model" + ("_dry_run" if a.dry_run else "")
    out_dir = os.environ.get("OUT") or None
    dev = jax.local_devices()[0]
    result = {"benchmark": name, "machine": machine_info(), "device": str(dev), "platform": dev.platform,
              "budget_s": budget, "size": cfg["size"], "stages": {}, "skipped": []}

    def save():
        write_result(name, result, out_dir)

    spec = decoder_lm(cfg["size"])
    params = jax.device_put(spec.init(0), dev)
    p = num_params(params)
    lm = LM_SIZES[cfg["size"]]
    rng = np.random.default_rng(0)
    sample = {"tok": rng.integers(0, lm["vocab"], (cfg["sample"], lm["T"]), dtype=np.int32)}
    rows = {"tok": rng.integers(0, lm["vocab"], (cfg["rows"], lm["T"]), dtype=np.int32)}
    result["p"] = p
    defaults = EigensystemArgs(micro_batch=cfg.get("micro_batch", EigensystemArgs().micro_batch))
    mem = M.device_memory(dev)
    free_dev = None if mem is None else mem["free"]
    log(f"{name}: p={p:,} on {dev}, budget {budget:.0f}s")

    # 1. the plans with the library defaults
    stage = result["stages"]["plan"] = {}
    for what, make in (
        ("eigensystem", lambda: M.plan_eigensystem(p=p, num_iters=defaults.num_iters, top_k=defaults.top_k,
                                                   basis="auto", platform=dev.platform, host_free=M.host_free_bytes(),
                                                   device_free=free_dev)),
        ("projection", lambda: choose_method(batch_size=1 << 20, k=defaults.top_k, num_params=p, device=dev).memory),
    ):
        try:
            plan = make()
            stage[what] = plan.as_dict() if hasattr(plan, "as_dict") else plan
            log((plan.line() if hasattr(plan, "line") else (plan or {}).get("line", "no plan")))
        except M.MemoryPlanError as e:
            stage[what] = {"refused": str(e)}
            log(f"refused: {e}")
    save()

    # 2. the default eigensystem's first products on its fixed sample
    if left() > 3 * cfg["compile_guess"]:
        op = CurvatureOperator(spec, params, curvature=defaults.curvature, micro_batch=defaults.micro_batch,
                               devices=[dev])
        mv = make_matvec(spec, params, BatchSource(sample, batch_size=cfg["sample"], fresh=False, seed=0), operator=op)
        v = rng.standard_normal(p).astype(np.float32)
        times = []
        for _ in range(2):
            t = time.perf_counter()
            mv(v)
            times.append(time.perf_counter() - t)
        n, k = defaults.num_iters, defaults.top_k
        gs_s_per_vector = 0.45e-3 * (p / 110e6)  # the H200 anchor's device Gram-Schmidt, per basis vector and step
        est = times[0] + (n + k - 1) * times[1] + gs_s_per_vector * n * (n + 1) / 2
        result["stages"]["default_products"] = {"first_s": times[0], "product_s": times[1], "sample": cfg["sample"],
                                                "n": n, "k": k, "estimated_default_total_s": est,
                                                "predicted_s_docs": 15 * 60}
        log(f"default eigensystem: product {times[1]:.2f}s after {times[0]:.1f}s; the default run would take ≈ {est:.0f}s")
        del op, mv
        save()
    else:
        result["skipped"].append("default_products")

    # 3. the eigensystem on the device, n what the time left holds
    prod = result["stages"].get("default_products", {}).get("product_s")
    index_s = 3 * cfg["compile_guess"] + 30.0  # what the index stage needs (compiling the projector and a step)
    room = left() - index_s - 2 * cfg["compile_guess"]  # the eigensystem compiles its own operator again
    n_fit = int(min(defaults.num_iters, room / (1.2 * prod))) if prod else 0  # 20 %: Gram-Schmidt, distill
    if n_fit >= 6:
        args = EigensystemArgs(num_iters=n_fit, top_k=max(2, n_fit // 3), basis="device" if dev.platform != "cpu"
                               else "host", micro_batch=defaults.micro_batch, residuals=False, mass_sample=0)
        lines: list[str] = []
        t = time.perf_counter()
        try:
            es = compute_eigensystem(spec, params, sample, args, log=lambda s: (lines.append(s), log(s)))
            secs = time.perf_counter() - t
            plan = es.args["memory_plan"]
            result["stages"]["eigensystem"] = {
                "n": args.num_iters, "k": args.top_k, "seconds": secs, "lines": lines, "plan": plan,
                "basis_used": es.args["basis_used"], "estimated_total_s": es.args["estimated_total_s"],
                "peak_device_bytes": _peak_device(dev), "planned_device_bytes": plan["device_bytes"],
                "ritz_values": es.ritz_values.tolist()}
            eigvecs = es.eigvecs_tree(params)
        except Exception as e:  # noqa: BLE001 - record and go on to the index stage with random U
            result["stages"]["eigensystem"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            eigvecs = None
        save()
    else:
        result["skipped"].append(f"eigensystem (n that fits the time left: {n_fit})")
        eigvecs = None

    # 4. index throughput with the planned projector against a training step
    if left() > cfg["compile_guess"] * 2:
        k = defaults.top_k if eigvecs is None else int(jax.tree.leaves(eigvecs)[0].shape[0])
        if eigvecs is None:
            eigvecs = jax.tree.map(lambda x: rng.standard_normal((k,) + x.shape).astype(np.float32) / np.sqrt(p), params)
        plan = choose_method(batch_size=cfg["batch"], k=k, num_params=p, device=dev)
        proj = make_projector(spec.loss, eigvecs, method=plan.method, micro_batch=plan.micro_batch,
                              compute_dtype=plan.compute_dtype)
        batch = {"tok": jnp.asarray(rows["tok"][: cfg["batch"]])}
        step = jax.jit(jax.value_and_grad(lambda th, b: jnp.mean(jax.vmap(spec.loss, in_axes=(None, 0))(th, b))))

        def timed(fn, reps=3):
            jax.block_until_ready(fn())  # compile
            t = time.perf_counter()
            for _ in range(reps):
                jax.block_until_ready(fn())
            return (time.perf_counter() - t) / reps

        t_proj = timed(lambda: proj(params, batch).projections)
        t_step = timed(lambda: step(params, batch))
        result["stages"]["index"] = {"k": k, "plan": plan._asdict(), "batch": cfg["batch"],
                                     "projection_s_per_example": t_proj / cfg["batch"],
                                     "train_step_s_per_example": t_step / cfg["batch"], "ratio": t_proj / t_step,
                                     "peak_device_bytes": _peak_device(dev),
                                     "planned_device_bytes": (plan.memory or {}).get("device_bytes")}
        log(f"index: projection {t_proj / t_step:.2f}x a training step (k={k}, m={plan.micro_batch}, {plan.method})")
    else:
        result["skipped"].append("index")
    result["seconds"] = time.perf_counter() - t_start
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
