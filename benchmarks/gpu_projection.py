"""The 110M-parameter Transformer on one GPU (H200): beam_influence's projector vs a training step,
and what the Arnoldi eigensystem costs. Self-contained: run it from the repository root on the GPU machine

    python benchmarks/gpu_projection.py                 # ~8 minutes on one H200 (see --budget)
    python benchmarks/gpu_projection.py --tiny          # a tiny config, for checking on a CPU

It needs jax, flax, optax, numpy and this repository (``beam_influence``, ``benchmarks``); not Apache Beam.
Results go to ``$OUT/gpu_projection.json`` when ``OUT`` is set, else ``benchmarks/results/``; the file is
rewritten after every stage, so a run cut short still leaves what it measured.

Model (``../shared/reference/h200_anchor.md``): Flax Transformer encoder classifier, 12 layers, d=768,
12 heads, MLP 3072, vocab 32000, T=128, 2 classes (109.6M parameters), bf16 activations, float32 params.

Stages, in order (each is skipped, and says so, when the time left can not hold it):
 1. training step: fwd+bwd of the mean loss (``jit(value_and_grad)``), batch B (128) and 64 (the anchor's).
 2. projector: ``make_projector(spec.loss, U, method="leafwise", compute_dtype=bfloat16, micro_batch=m)``
    on a batch of B=128 for k in {32, 128} and m in {64, 128, 32, 16} (interleaved, most useful first):
    seconds per example, ratio to the training step and to the FLOP floor 1 + k/(3T).
 3. Arnoldi with the basis on the host: ``beam_influence.core.arnoldi.arnoldi`` over the Hessian-vector product
    ``beam_influence.core.curvature.hvp_fn`` on a fixed batch of 64, n steps (``--n``, default 200) or until its
    time budget (``--arnoldi-budget``) or host-memory limit is reached; per step: HVP+transfer time, host
    Gram-Schmidt time, RSS. Fitted ``step(j) = a + b·j`` extrapolates the total time and memory to n.
    Beside it, per-element costs of the alternatives: Gram-Schmidt on the device (basis [j, p] float32 in
    GPU memory) and float32 BLAS on the host.
 4. accuracy of the bf16 contraction: leafwise bf16 vs float32 projections on 16 examples (relative error).
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the largest micro-batches need the room
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import PeakRSS, log, machine_info, time_calls, tree_rss, write_result  # noqa: E402

FULL = dict(cfg=dict(vocab=32000, d=768, heads=12, layers=12, mlp=3072, T=128, classes=2), dtype="bfloat16",
            batch=128, train_batches=(128, 64), ks=(32, 128), mbs=(64, 128, 32, 16), hvp_batch=64, n=200,
            budget=480.0, arnoldi_budget=100.0, reps=5)
TINY = dict(cfg=dict(vocab=500, d=64, heads=4, layers=2, mlp=128, T=16, classes=2), dtype="bfloat16",
            batch=16, train_batches=(16, 8), ks=(4, 8), mbs=(8, 16, 4), hvp_batch=16, n=24,
            budget=300.0, arnoldi_budget=20.0, reps=3)


class _Stop(Exception):
    """Raised from the Arnoldi callback to end the iteration at the time or memory budget."""


def _device_mem() -> dict | None:
    import jax

    try:
        s = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - the CPU backend has none
        return None
    if not s:
        return None
    return {k: s.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:400]}"


def _host_mem_limit_gb(arg: float | None, backend: str) -> float:
    """Host memory the Arnoldi basis may take: ``--host-mem-gb``, else 80% of MemTotal (on a GPU machine at least
    of 128 GiB: its RAM starts small and grows as it is used)."""
    from beam_influence.util import mem_total_gb

    if arg:
        return arg
    total = mem_total_gb() or 16.0
    return 0.8 * (max(total, 128.0) if backend == "gpu" else total)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="projection vs training step and Arnoldi cost, 110M Transformer, one GPU")
    ap.add_argument("--tiny", action="store_true", help="tiny model and sizes (checks the script on a CPU)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 480; tiny 300)")
    ap.add_argument("--n", type=int, default=None, help="Arnoldi steps (default 200)")
    ap.add_argument("--arnoldi-budget", type=float, default=None, help="seconds for the Arnoldi iteration (default 100)")
    ap.add_argument("--host-mem-gb", type=float, default=None,
                    help="stop Arnoldi before the host basis would pass this (default 0.8 × max(MemTotal, 128 GiB))")
    ap.add_argument("--ks", default=None, help="comma-separated k (default 32,128)")
    ap.add_argument("--mbs", default=None, help="comma-separated micro-batches, in the order to run (default 64,128,32,16)")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip: train,projector,arnoldi,accuracy")
    ap.add_argument("--out", default=None, help="output directory (default $OUT, else benchmarks/results)")
    a = ap.parse_args(argv)

    t_start = time.monotonic()
    C = dict(TINY if a.tiny else FULL)
    budget = a.budget or C["budget"]
    n_arnoldi = a.n or C["n"]
    arnoldi_budget = a.arnoldi_budget or C["arnoldi_budget"]
    ks = tuple(int(x) for x in a.ks.split(",")) if a.ks else C["ks"]
    mbs = tuple(int(x) for x in a.mbs.split(",")) if a.mbs else C["mbs"]
    skip = set(filter(None, a.skip.split(",")))
    out_dir = a.out or os.environ.get("OUT") or None
    name = "gpu_projection_tiny" if a.tiny else "gpu_projection"
    reserve_arnoldi = 0.0 if "arnoldi" in skip else arnoldi_budget + (20.0 if a.tiny else 60.0)

    def left() -> float:
        return budget - (time.monotonic() - t_start)

    import jax
    import jax.numpy as jnp

    from beam_influence.core import arnoldi as arn
    from beam_influence.core.curvature import hvp_fn, num_params
    from beam_influence.core.projection import make_projector
    from benchmarks.models import random_tokens, transformer

    mem = PeakRSS(interval_s=0.5).start()
    res: dict = {"benchmark": "gpu_projection", "tiny": a.tiny, "machine": machine_info(),
                 "settings": {"budget_s": budget, "n": n_arnoldi, "arnoldi_budget_s": arnoldi_budget, "ks": ks,
                              "micro_batches": mbs, "batch": C["batch"], "hvp_batch": C["hvp_batch"],
                              "compute_dtype": C["dtype"], "reps": C["reps"]},
                 "train": {}, "projection": [], "skipped": [], "errors": []}

    def save(stage: str):
        res["host_peak_rss_gb"] = mem.peak / 2**30
        res["device_memory"] = _device_mem()
        res["elapsed_s"] = time.monotonic() - t_start
        res["last_stage"] = stage
        path = write_result(name, res, out_dir)
        log(f"[{stage}] saved {path} ({res['elapsed_s']:.0f}s elapsed, {left():.0f}s left)")

    log(f"backend {jax.default_backend()}, devices {jax.devices()}, budget {budget:.0f}s, load {res['machine']['loadavg']}")
    cfg = C["cfg"]
    spec = transformer(**cfg, dtype=C["dtype"])
    T = cfg["T"]
    t = time.perf_counter()
    params = jax.jit(spec.init, static_argnums=0)(0)
    jax.block_until_ready(params)
    p = num_params(params)
    res.update(params=p, model=dict(cfg, dtype=C["dtype"]), init_s=time.perf_counter() - t)
    log(f"model: {p:,} parameters (init {res['init_s']:.1f}s)")
    B = C["batch"]
    host_batch = random_tokens(spec, max(B, C["hvp_batch"]), seed=0)
    batch = {k2: jnp.asarray(v[:B]) for k2, v in host_batch.items()}

    # ---- 1. training step -------------------------------------------------------------------------
    def mean_loss(q, b):
        return jnp.mean(jax.vmap(spec.loss, in_axes=(None, 0))(q, b))

    train_ex = None
    if "train" not in skip:
        for tb in C["train_batches"]:
            try:
                b = {k2: v[:tb] for k2, v in batch.items()} if tb <= B else \
                    {k2: jnp.asarray(v[:tb]) for k2, v in host_batch.items()}
                t = time.perf_counter()
                fn = jax.jit(jax.value_and_grad(mean_loss)).lower(params, b).compile()
                c = time.perf_counter() - t
                r = time_calls(lambda: fn(params, b), reps=max(C["reps"], 5))
                res["train"][f"batch{tb}"] = {**r, "s_per_ex": r["median_s"] / tb, "compile_s": c}
                log(f"train fwd+bwd batch {tb}: {r['median_s'] / tb * 1e3:.4f} ms/ex (compile {c:.1f}s)")
                del fn
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: record and go on
                res["errors"].append({"stage": f"train batch {tb}", "error": _err(e)})
                log(f"train batch {tb} failed: {_err(e)}")
        first = res["train"].get(f"batch{B}") or next(iter(res["train"].values()), None)
        train_ex = first["s_per_ex"] if first else None
        res["train_s_per_ex"] = train_ex
        save("train")

    # ---- 2. projector -----------------------------------------------------------------------------
    cdt = jnp.dtype(C["dtype"])
    leaves, treedef = jax.tree.flatten(params)

    shapes = [tuple(x.shape) for x in leaves]

    @functools.partial(jax.jit, static_argnums=0)
    def _random_leaves(k: int):  # one compiled program per k (eager ops would compile per leaf shape)
        keys = jax.random.split(jax.random.PRNGKey(k), len(shapes))
        scale = 1.0 / np.sqrt(p)
        return [(jax.random.normal(kk, (k,) + sh, jnp.float32) * scale).astype(cdt) for kk, sh in zip(keys, shapes)]

    def eigvecs(k: int):
        """Random directions of norm ~1, leaf by leaf in the compute dtype, generated on the device."""
        return jax.tree.unflatten(treedef, _random_leaves(k))

    compile_est = 30.0 if not a.tiny else 5.0
    keep16: dict = {}
    if "projector" not in skip:
        order = [(k, m) for m in mbs for k in ks]  # interleave k so that both get the most useful m first
        for k, m in order:
            base = {"k": k, "micro_batch": m, "method": "leafwise", "compute_dtype": C["dtype"], "batch": B}
            need = compile_est * 1.3 + 10.0
            if left() - reserve_arnoldi < need:
                res["skipped"].append({**base, "reason": f"time: {left():.0f}s left, {reserve_arnoldi:.0f}s kept for "
                                                         f"Arnoldi, needs ~{need:.0f}s"})
                log(f"skip k={k} m={m}: out of time")
                continue
            eig = proj = fn = None
            try:
                eig = eigvecs(k)
                proj = make_projector(spec.loss, eig, method="leafwise", micro_batch=m, compute_dtype=cdt)
                t = time.perf_counter()
                fn = proj.jitted.lower(params, batch, proj.eigvecs).compile()
                c = time.perf_counter() - t
                compile_est = max(compile_est * 0.5, c)
                r = time_calls(lambda: fn(params, batch, proj.eigvecs), reps=C["reps"])
                s_ex = r["median_s"] / B
                floor = 1 + k / (3 * T)
                row = {**base, "s_per_ex": s_ex, "compile_s": c, **r, "floor": floor}
                if train_ex:
                    row.update(ratio=s_ex / train_ex, gap_to_floor=s_ex / train_ex / floor)
                if k == min(ks) and "k" not in keep16:
                    keep16.update(k=k, m=m, proj=np.asarray(fn(params, batch, proj.eigvecs).projections[:16]))
                res["projection"].append(row)
                log(f"leafwise bf16 k={k} m={m}: {s_ex * 1e3:.4f} ms/ex"
                    + (f" = {row['ratio']:.2f}x train (floor {floor:.2f})" if train_ex else "") + f"; compile {c:.1f}s")
            except Exception as e:  # noqa: BLE001 - out of memory at the largest micro-batch: record, go on
                res["errors"].append({"stage": f"projector k={k} m={m}", "error": _err(e)})
                log(f"projector k={k} m={m} failed: {_err(e)}")
            finally:
                del eig, proj, fn
                gc.collect()
            save(f"projector k={k} m={m}")

    # ---- 3. Arnoldi -------------------------------------------------------------------------------
    if "arnoldi" not in skip:
        try:
            res["arnoldi"] = _arnoldi(spec, params, host_batch, C, n_arnoldi, arnoldi_budget,
                                      _host_mem_limit_gb(a.host_mem_gb, jax.default_backend()), left, hvp_fn, arn, mem)
        except Exception as e:  # noqa: BLE001
            res["errors"].append({"stage": "arnoldi", "error": _err(e), "trace": traceback.format_exc()[-2000:]})
            log(f"arnoldi failed: {_err(e)}")
        gc.collect()
        save("arnoldi")

    # ---- 4. accuracy of the bf16 contraction ---------------------------------------------------------
    if "accuracy" not in skip and keep16 and left() > compile_est * 1.3 + 5:
        try:
            k = keep16["k"]
            eig = eigvecs(k)
            eig32 = jax.tree.map(lambda u: u.astype(jnp.float32), eig)  # the same directions, float32
            b16 = {k2: v[:16] for k2, v in batch.items()}
            ref = np.asarray(make_projector(spec.loss, eig32, method="leafwise", micro_batch=16)(params, b16).projections)
            got = keep16["proj"]
            res["accuracy"] = {"k": k, "micro_batch_bf16": keep16["m"], "examples": 16,
                               "rel_error_bf16_vs_f32": float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)),
                               "max_abs_ref": float(np.max(np.abs(ref)))}
            log(f"bf16 vs float32 projections: relative error {res['accuracy']['rel_error_bf16_vs_f32']:.2e}")
            del eig, eig32
        except Exception as e:  # noqa: BLE001
            res["errors"].append({"stage": "accuracy", "error": _err(e)})
            log(f"accuracy check failed: {_err(e)}")
        save("accuracy")
    elif "accuracy" not in skip:
        res["skipped"].append({"stage": "accuracy", "reason": "time or no k=min projection measured"})

    mem.stop()
    save("done")
    _print_summary(res)
    return res


def _arnoldi(spec, params, host_batch, C, n, budget_s, host_limit_gb, left, hvp_fn, arn, mem) -> dict:
    """Time and memory of ``beam_influence.core.arnoldi.arnoldi`` (basis on the host) over ``curvature.hvp_fn``.

    Runs ``n_run <= n`` steps: as many as the time budget and the host-memory limit hold (predicted from a
    micro-benchmark of the host Gram-Schmidt products), fits step(j) = a + b·j and extrapolates to n.
    """
    import jax
    import jax.numpy as jnp

    from beam_influence.core.curvature import num_params

    p = num_params(params)
    hb = C["hvp_batch"]
    batch = {k: jnp.asarray(v[:hb]) for k, v in host_batch.items()}
    out: dict = {"n_requested": n, "p": p, "hvp_batch": hb, "budget_s": budget_s, "host_mem_limit_gb": host_limit_gb,
                 "host_basis_gb_at_n": (n + 1) * p * 4 / 2**30}
    hvp = hvp_fn(spec, params)
    v = jax.random.normal(jax.random.PRNGKey(1), (p,), jnp.float32)
    t = time.perf_counter()
    jax.block_until_ready(hvp(v, batch))
    out["hvp_compile_and_first_s"] = time.perf_counter() - t
    out["hvp_device_s"] = time_calls(lambda: hvp(v, batch), reps=C["reps"])["median_s"]
    log(f"HVP on a batch of {hb}: {out['hvp_device_s']:.4f}s on the device "
        f"(compile+first {out['hvp_compile_and_first_s']:.1f}s)")

    # host Gram-Schmidt products, per basis element: float32 basis × float64 vector (numpy's mixed-dtype matmul,
    # no BLAS: what arnoldi() did before commit ea8dbc7) and float32 BLAS (what it does since)
    rows = 2  # at p = 110M one mixed-dtype product over 2 rows takes ~1 s
    q = np.empty((rows, p), np.float32)
    q.fill(1.0 / np.sqrt(p))
    w = np.random.default_rng(0).standard_normal(p)
    c = np.full(rows, 0.1)
    w32, c32 = w.astype(np.float32), c.astype(np.float32)
    per = lambda s: s / (rows * p) * 1e9  # noqa: E731 - ns per basis element
    micro = {
        "mixed_q_at_w": per(time_calls(lambda: q @ w, reps=2)["median_s"]),
        "mixed_c_at_q": per(time_calls(lambda: c @ q, reps=2)["median_s"]),
        "f32_q_at_w": per(time_calls(lambda: q @ w32, reps=2)["median_s"]),
        "f32_c_at_q": per(time_calls(lambda: c32 @ q, reps=2)["median_s"]),
    }
    out["host_gemv_ns_per_element"] = micro
    del q
    gc.collect()
    # arnoldi(): per step j, two passes of (q @ w, coeffs @ q) over the j+1 basis rows, in the basis dtype since
    # commit ea8dbc7 (an older arnoldi() is slower; the callback's time guard then stops it early)
    gs_per_j = 2 * (micro["f32_q_at_w"] + micro["f32_c_at_q"]) * p * 1e-9
    step0 = out["hvp_device_s"] + 4 * p * 8 / 10e9  # + the two host<->device copies, guessed at ~10 GB/s
    avail = min(budget_s, max(left() - 30.0, 5.0))
    n_time = 1
    while n_time < n and sum(step0 + gs_per_j * (j + 1) for j in range(n_time + 1)) < avail / 1.3:
        n_time += 1
    n_mem = max(2, int(host_limit_gb * 2**30 / (p * 4)) - 4)
    n_run = max(2, min(n, n_time, n_mem))
    out.update(n_run=n_run, n_run_limits={"time": n_time, "memory": n_mem},
               predicted_gs_s_per_j=gs_per_j)
    log(f"arnoldi: running {n_run} of {n} steps (time allows ~{n_time}, memory ~{n_mem}); predicted host "
        f"Gram-Schmidt {gs_per_j:.3f}s per basis vector per step")

    mv_times: list[float] = []

    def matvec(x):  # what curvature.make_matvec does, around the one jitted hvp (no second compile)
        t0 = time.perf_counter()
        y = np.asarray(jax.device_get(hvp(jax.device_put(np.asarray(x, np.float32)), batch)), np.float64)
        mv_times.append(time.perf_counter() - t0)
        return y

    steps: list[dict] = []
    budget_end = time.monotonic() + avail
    t_last = [time.perf_counter()]
    stop_reason = [None]

    def callback(j, beta):
        now = time.perf_counter()
        dt = now - t_last[0]
        t_last[0] = now
        rss = tree_rss(os.getpid())
        steps.append({"j": j, "step_s": dt, "matvec_s": mv_times[-1], "gram_schmidt_s": dt - mv_times[-1],
                      "rss_gb": rss / 2**30})
        if j % 5 == 0 or j < 3:
            log(f"arnoldi step {j}: {dt:.2f}s (matvec {mv_times[-1]:.2f}s), RSS {rss / 2**30:.1f} GiB")
        if time.monotonic() + dt * (j + 1) / max(j, 1) > budget_end:
            stop_reason[0] = f"time budget after {j} steps"
            raise _Stop

    rss0 = tree_rss(os.getpid())
    t = time.perf_counter()
    t_last[0] = t
    with PeakRSS(interval_s=0.2) as amem:
        try:
            arn.arnoldi(matvec, num_iters=n_run, dim=p, seed=0, basis_dtype=np.float32, callback=callback)
        except _Stop:
            pass
        except MemoryError as e:
            stop_reason[0] = f"MemoryError after {len(steps)} steps: {e}"
    out["wall_s"] = time.perf_counter() - t
    out.update(steps_done=len(steps), stop_reason=stop_reason[0] or f"completed {n_run} steps", steps=steps,
               host_peak_rss_gb=amem.peak / 2**30, host_rss_before_gb=rss0 / 2**30,
               host_rss_growth_gb=(amem.peak - rss0) / 2**30)
    if len(steps) >= 3:  # fit step(j) = a + b·j on the Gram-Schmidt part; the matvec part is ~constant
        js = np.array([s["j"] for s in steps[1:]], float)
        gs = np.array([s["gram_schmidt_s"] for s in steps[1:]], float)
        b_, a_ = np.polyfit(js, gs, 1)
        mv = float(np.median([s["matvec_s"] for s in steps]))
        total = n * (mv + a_) + b_ * n * (n + 1) / 2
        out["fit"] = {"matvec_s": mv, "gs_a_s": float(a_), "gs_b_s_per_j": float(b_),
                      "gs_ns_per_basis_element": float(b_ / p * 1e9), "predicted_total_s_at_n": float(total),
                      "predicted_host_basis_gb_at_n": (n + 1) * p * 4 / 2**30}
        log(f"arnoldi: {len(steps)} steps in {out['wall_s']:.1f}s; matvec {mv:.3f}s, Gram-Schmidt "
            f"{b_ / p * 1e9:.2f} ns per basis element; predicted n={n}: {total:.0f}s, host basis "
            f"{(n + 1) * p * 4 / 2**30:.1f} GiB")
    try:  # the alternative: the basis on the device (float32), Gram-Schmidt there
        j_dev = min(64, n)
        Q = jax.random.normal(jax.random.PRNGKey(2), (j_dev, p), jnp.float32) / np.sqrt(p)

        @jax.jit
        def gs_step(Q, w):
            for _ in range(2):
                h = Q @ w
                w = w - Q.T @ h
            return w / jnp.linalg.norm(w)

        wd = jnp.asarray(w32)
        jax.block_until_ready(gs_step(Q, wd))
        r = time_calls(lambda: gs_step(Q, wd), reps=C["reps"])["median_s"]
        hv = out["hvp_device_s"]
        out["device_gram_schmidt"] = {"j": j_dev, "s": r, "ns_per_basis_element": r / (j_dev * p) * 1e9,
                                      "predicted_total_s_at_n": n * hv + (r / j_dev) * n * (n + 1) / 2,
                                      "device_basis_gb_at_n": (n + 1) * p * 4 / 2**30}
        log(f"device Gram-Schmidt (2 passes) against {j_dev} vectors: {r:.4f}s; predicted n={n} with the basis "
            f"on the device: {out['device_gram_schmidt']['predicted_total_s_at_n']:.0f}s")
        del Q, wd
    except Exception as e:  # noqa: BLE001 - e.g. no room on the device
        out["device_gram_schmidt_error"] = _err(e)
    return out


def _print_summary(res: dict) -> None:
    print("\nsummary (seconds per example; ratio to the training step at the projector's batch)")
    print(f"train: {res.get('train_s_per_ex')}")
    print("| k | micro-batch | ms/ex | × train | floor |")
    print("|---|---|---|---|---|")
    for r in res["projection"]:
        print(f"| {r['k']} | {r['micro_batch']} | {r['s_per_ex'] * 1e3:.4f} | {r.get('ratio', float('nan')):.2f} | "
              f"{r['floor']:.2f} |")
    ar = res.get("arnoldi") or {}
    if ar:
        print(f"arnoldi: {ar.get('steps_done')} steps in {ar.get('wall_s', 0):.1f}s ({ar.get('stop_reason')}); "
              f"fit {ar.get('fit')}; device GS {ar.get('device_gram_schmidt')}")
    if res.get("errors"):
        print("errors:", [e["stage"] + ": " + e["error"][:120] for e in res["errors"]])


if __name__ == "__main__":
    main()
