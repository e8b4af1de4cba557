"""The accelerator check, one prepared script: the 110M-parameter Transformer on one GPU (H200).

    python benchmarks/gpu_projection.py                # the GPU run: ~8 minutes on one H200 (--budget 480)
    python benchmarks/gpu_projection.py --dry-run      # a tiny model on the CPU: checks every stage here (~3 min on 2 busy cores)

It needs jax, flax, optax, numpy and this repository (``beam_influence``, ``benchmarks``). Apache Beam only
for the index handler stage (skipped, and said so, where ``apache_beam`` does not import; then the same
loop runs without Beam). Results go to ``$OUT/gpu_projection.json`` when ``OUT`` is set (dry run:
``gpu_projection_dry_run.json``), else ``benchmarks/results/``; the file is rewritten after every stage, so a
run cut short still leaves what it measured.

Model (``../shared/reference/h200_anchor.md``): Flax Transformer encoder classifier, 12 layers, d=768,
12 heads, MLP 3072, vocab 32000, T=128, 2 classes (109.6M parameters), bf16 activations, float32 params.

Stages, in order (each skipped, and said so, when the time left can not hold it):
 1. ``train``: fwd+bwd of the mean loss (``jit(value_and_grad)``), batch B (128) and 64 (the anchor's).
 2. ``projector``: what ``choose_method`` plans on this device (``plan``), then leafwise bf16 for k in {32, 128}
    and micro-batches {64, 128, 32}: seconds per example, ratio to the training step, and ``gap_to_floor`` =
    ratio / (1 + k/(3T)) against the targets 1.2x (k=32) and 1.45x (k=128) the training step.
 3. ``arnoldi``: ``core.arnoldi.arnoldi(basis="auto")`` (device on an H200: ``choose_basis``) over
    ``core.curvature.CurvatureOperator``'s on-device product on a fixed batch of 64, n = 200 steps; the wall
    time including compile, Gram-Schmidt and the distillation to k=32 Ritz vectors (target ≤ 600 s), the
    HVP alone, the orthogonality of the basis.
 4. ``handler``: rows per second of the index job's ``ProjectionModelHandler.project`` on a chunk of N rows
    (k=32, the plan's batch), against the bare projector loop on the same rows (the Beam floor; target
    ≤ 1.25x). Needs ``apache_beam``; without it only the bare loop is timed.
 5. ``accuracy``: leafwise bf16 vs float32 projections on 16 examples (relative error).
 6. ``arnoldi_host`` (only with ``--stages ...,arnoldi_host``): the host-basis fallback, time-boxed, per-step
    Gram-Schmidt cost extrapolated to n.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import threading
import time
import traceback
import types

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the basis (88 GB at n=200) needs the room
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import PeakRSS, log, machine_info, time_calls, tree_rss, write_result  # noqa: E402

STAGES = ("train", "projector", "arnoldi", "handler", "accuracy")
FULL = dict(cfg=dict(vocab=32000, d=768, heads=12, layers=12, mlp=3072, T=128, classes=2), dtype="bfloat16",
            batch=128, train_batches=(128, 64), ks=(32, 128), mbs=(64, 128, 32), hvp_batch=64, n=200,
            top_k=32, handler_rows=4096, budget=480.0, reps=5, compile_guess=30.0)
DRY = dict(cfg=dict(vocab=500, d=64, heads=4, layers=2, mlp=128, T=16, classes=2), dtype="bfloat16",
           batch=16, train_batches=(16,), ks=(4, 8), mbs=(8,), hvp_batch=16, n=24,
           top_k=4, handler_rows=256, budget=600.0, reps=3, compile_guess=5.0)
TARGETS = {32: 1.2, 128: 1.45}  # projection / training step (the issue); the floor is 1 + k/(3T)
ARNOLDI_TARGET_S = 600.0


class _Stop(Exception):
    """Raised from the Arnoldi callback to end the iteration at the time budget."""


def _device_mem() -> dict | None:
    from beam_influence.core.arnoldi import device_memory

    return device_memory()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:400]}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="projection vs training step, on-device Arnoldi and the index handler, "
                                             "110M Transformer, one GPU")
    ap.add_argument("--dry-run", "--tiny", dest="dry_run", action="store_true",
                    help="a tiny model and sizes: checks every stage on a CPU")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 480; dry run 600)")
    ap.add_argument("--n", type=int, default=None, help="Arnoldi steps (default 200)")
    ap.add_argument("--basis", default=None, choices=["auto", "device", "host", "mmap"],
                    help="Arnoldi basis (default auto; the dry run forces device: the CPU reports no memory)")
    ap.add_argument("--ks", default=None, help="comma-separated k (default 32,128)")
    ap.add_argument("--mbs", default=None, help="comma-separated micro-batches beside the plan's (default 64,128,32)")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated stages to run (default {','.join(STAGES)}; also: arnoldi_host)")
    ap.add_argument("--out", default=None, help="output directory (default $OUT, else benchmarks/results)")
    a = ap.parse_args(argv)

    t_start = time.monotonic()
    C = dict(DRY if a.dry_run else FULL)
    budget = a.budget or C["budget"]
    n_arnoldi = a.n or C["n"]
    ks = tuple(int(x) for x in a.ks.split(",")) if a.ks else C["ks"]
    mbs = tuple(int(x) for x in a.mbs.split(",")) if a.mbs else C["mbs"]
    stages = [s for s in a.stages.split(",") if s]
    unknown = set(stages) - set(STAGES) - {"arnoldi_host"}
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES + ('arnoldi_host',)}")
    basis = a.basis or ("device" if a.dry_run else "auto")
    out_dir = a.out or os.environ.get("OUT") or None
    name = "gpu_projection_dry_run" if a.dry_run else "gpu_projection"
    compile_est = [C["compile_guess"]]

    def left() -> float:
        return budget - (time.monotonic() - t_start)

    import jax
    import jax.numpy as jnp

    from beam_influence.core.curvature import num_params
    from beam_influence.core.projection import choose_method, device_info, make_projector
    from benchmarks.models import random_tokens, transformer
    from benchmarks.projection import jitted_args

    mem = PeakRSS(interval_s=0.5).start()
    res: dict = {"benchmark": "gpu_projection", "dry_run": a.dry_run, "machine": machine_info(),
                 "settings": {"budget_s": budget, "n": n_arnoldi, "basis": basis, "ks": ks, "micro_batches": mbs,
                              "batch": C["batch"], "hvp_batch": C["hvp_batch"], "compute_dtype": C["dtype"],
                              "reps": C["reps"], "stages": stages, "targets": TARGETS,
                              "arnoldi_target_s": ARNOLDI_TARGET_S},
                 "device": device_info()._asdict(), "train": {}, "projection": [], "skipped": [], "errors": []}

    def save(stage: str):
        res["host_peak_rss_gb"] = mem.peak / 2**30
        res["device_memory"] = _device_mem()
        res["elapsed_s"] = time.monotonic() - t_start
        res["last_stage"] = stage
        path = write_result(name, res, out_dir)
        log(f"[{stage}] saved {path} ({res['elapsed_s']:.0f}s elapsed, {left():.0f}s left)")

    def stage_failed(stage: str, e: BaseException):
        res["errors"].append({"stage": stage, "error": _err(e), "trace": traceback.format_exc()[-2000:]})
        log(f"{stage} failed: {_err(e)}")

    log(f"backend {jax.default_backend()}, devices {jax.devices()}, budget {budget:.0f}s, "
        f"load {res['machine']['loadavg']}")
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
    host_batch = random_tokens(spec, max(B, C["hvp_batch"], C["handler_rows"]), seed=0)
    batch = {k2: jnp.asarray(v[:B]) for k2, v in host_batch.items()}

    # ---- 1. training step -------------------------------------------------------------------------
    def mean_loss(q, b):
        return jnp.mean(jax.vmap(spec.loss, in_axes=(None, 0))(q, b))

    train_ex = None
    if "train" in stages:
        for tb in C["train_batches"]:
            try:
                b = {k2: jnp.asarray(v[:tb]) for k2, v in host_batch.items()}
                t = time.perf_counter()
                fn = jax.jit(jax.value_and_grad(mean_loss)).lower(params, b).compile()
                c = time.perf_counter() - t
                r = time_calls(lambda: fn(params, b), reps=max(C["reps"], 5))
                res["train"][f"batch{tb}"] = {**r, "s_per_ex": r["median_s"] / tb, "compile_s": c}
                log(f"train fwd+bwd batch {tb}: {r['median_s'] / tb * 1e3:.4f} ms/ex (compile {c:.1f}s)")
                del fn
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: record and go on
                stage_failed(f"train batch {tb}", e)
        first = res["train"].get(f"batch{B}") or next(iter(res["train"].values()), None)
        train_ex = first["s_per_ex"] if first else None
        res["train_s_per_ex"] = train_ex
        save("train")

    # ---- 2. projector -----------------------------------------------------------------------------
    leaves, treedef = jax.tree.flatten(params)
    shapes = [tuple(x.shape) for x in leaves]

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def _random_leaves(k: int, dtype: str):  # one compiled program per k (eager ops would compile per leaf)
        keys = jax.random.split(jax.random.PRNGKey(k), len(shapes))
        scale = 1.0 / np.sqrt(p)
        return [(jax.random.normal(kk, (k,) + sh, jnp.float32) * scale).astype(dtype) for kk, sh in zip(keys, shapes)]

    def eigvecs(k: int, dtype: str = C["dtype"]):
        """Random directions of norm ~1, leaf by leaf, generated on the device."""
        return jax.tree.unflatten(treedef, _random_leaves(k, dtype))

    plans = {k: choose_method(batch_size=B, k=k, num_params=p) for k in ks}
    res["plans"] = {str(k): pl._asdict() for k, pl in plans.items()}
    keep = {}  # the planned projector at min(ks), kept for the handler and accuracy stages
    if "projector" in stages:
        order = []
        for k in ks:  # the plan first, then the sweep (interleaving k so both get the most useful m first)
            order.append((k, plans[k].method, plans[k].micro_batch, plans[k].compute_dtype, True))
        for m in mbs:
            for k in ks:
                if (k, "leafwise", m, C["dtype"], True) not in order:
                    order.append((k, "leafwise", m, C["dtype"], False))
        reserve = 0.0
        if "arnoldi" in stages:
            reserve += 90.0 if not a.dry_run else 20.0
        if "handler" in stages:
            reserve += 30.0 if not a.dry_run else 10.0
        for k, method, m, cdt, planned in order:
            base = {"k": k, "micro_batch": m, "method": method, "compute_dtype": cdt, "batch": B, "planned": planned}
            need = compile_est[0] * 1.3 + 10.0
            if left() - reserve < need:
                res["skipped"].append({**base, "reason": f"time: {left():.0f}s left, {reserve:.0f}s kept for later "
                                                         f"stages, needs ~{need:.0f}s"})
                log(f"skip k={k} {method} m={m}: out of time")
                continue
            eig = proj = fn = None
            try:
                eig = eigvecs(k, cdt or "float32")
                proj = make_projector(spec.loss, eig, method=method, micro_batch=m,
                                      compute_dtype=None if cdt is None else jnp.dtype(cdt))
                args = jitted_args(proj, params, batch)
                t = time.perf_counter()
                fn = proj.jitted.lower(*args).compile()
                c = time.perf_counter() - t
                compile_est[0] = max(compile_est[0] * 0.5, c)
                r = time_calls(lambda: fn(*args), reps=C["reps"])
                s_ex = r["median_s"] / B
                floor = 1 + k / (3 * T)
                row = {**base, "s_per_ex": s_ex, "compile_s": c, **r, "floor": floor, "target": TARGETS.get(k)}
                if train_ex:
                    row.update(ratio=s_ex / train_ex, gap_to_floor=s_ex / train_ex / floor)
                    if k in TARGETS:
                        row["meets_target"] = bool(row["ratio"] <= TARGETS[k])
                res["projection"].append(row)
                log(f"{method} {cdt or 'float32'} k={k} m={m}{' (plan)' if planned else ''}: {s_ex * 1e3:.4f} ms/ex"
                    + (f" = {row['ratio']:.2f}x train (floor {floor:.2f})" if train_ex else "") + f"; compile {c:.1f}s")
                if planned and k == min(ks):
                    keep.update(k=k, proj=proj, eig=eig,
                                out16=np.asarray(fn(*args).projections[:16], np.float32))
            except Exception as e:  # noqa: BLE001 - out of memory at the largest micro-batch: record, go on
                stage_failed(f"projector k={k} {method} m={m}", e)
            finally:
                del eig, proj, fn
                gc.collect()
            save(f"projector k={k} m={m}")

    # ---- 3. Arnoldi, basis on the device ------------------------------------------------------------
    if "arnoldi" in stages:
        try:
            res["arnoldi"] = _arnoldi_device(spec, params, host_batch, C, n_arnoldi, basis, left)
        except Exception as e:  # noqa: BLE001
            stage_failed("arnoldi", e)
        gc.collect()
        save("arnoldi")

    # ---- 4. the index handler ------------------------------------------------------------------------
    if "handler" in stages:
        if left() < compile_est[0] * 2 + 10:
            res["skipped"].append({"stage": "handler", "reason": f"time: {left():.0f}s left"})
        else:
            try:
                res["handler"] = _handler(spec, params, host_batch, C, keep, plans[min(ks)], eigvecs)
            except Exception as e:  # noqa: BLE001
                stage_failed("handler", e)
        save("handler")

    # ---- 5. accuracy of the bf16 contraction -------------------------------------------------------
    if "accuracy" in stages and keep.get("out16") is not None and left() > compile_est[0] * 1.3 + 5:
        try:
            plan = plans[keep["k"]]
            eig32 = jax.tree.map(lambda u: u.astype(jnp.float32), keep["eig"])  # the same directions, float32
            b16 = {k2: v[:16] for k2, v in batch.items()}
            ref = np.asarray(make_projector(spec.loss, eig32, method="leafwise", micro_batch=16)(params, b16).projections)
            got = keep["out16"]
            res["accuracy"] = {"k": keep["k"], "plan": plan._asdict(), "examples": 16,
                               "rel_error_vs_f32": float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)),
                               "max_abs_ref": float(np.max(np.abs(ref)))}
            log(f"{plan.compute_dtype or 'float32'} vs float32 projections: relative error "
                f"{res['accuracy']['rel_error_vs_f32']:.2e}")
            del eig32
        except Exception as e:  # noqa: BLE001
            stage_failed("accuracy", e)
        save("accuracy")
    elif "accuracy" in stages:
        res["skipped"].append({"stage": "accuracy", "reason": "time, or no planned projection at min(k) measured"})
    keep.clear()
    gc.collect()

    # ---- 6. (optional) the host-basis fallback -------------------------------------------------------
    if "arnoldi_host" in stages:
        try:
            res["arnoldi_host"] = _arnoldi_host(spec, params, host_batch, C, n_arnoldi, left, mem)
        except Exception as e:  # noqa: BLE001
            stage_failed("arnoldi_host", e)
        save("arnoldi_host")

    mem.stop()
    save("done")
    _print_summary(res)
    return res


def _arnoldi_device(spec, params, host_batch, C, n: int, basis: str, left) -> dict:
    """``arnoldi(basis=...)`` over ``CurvatureOperator`` on a fixed batch (the eigensystem job's operator), n steps
    or until the time left; then the distillation to the top-k Ritz vectors. Times include compilation."""
    import jax
    import jax.numpy as jnp

    from beam_influence.core import arnoldi as arn
    from beam_influence.core.curvature import BatchSource, CurvatureOperator, make_matvec, num_params

    p = num_params(params)
    hb = C["hvp_batch"]
    fixed = {k: v[:hb] for k, v in host_batch.items()}
    resolved = arn.choose_basis(basis, num_iters=n, dim=p)
    out: dict = {"n_requested": n, "p": p, "hvp_batch": hb, "basis_requested": basis, "basis": resolved,
                 "basis_gb": arn.basis_bytes(n, p) / 2**30, "device_memory_before": arn.device_memory(),
                 "target_s": ARNOLDI_TARGET_S}
    log(f"arnoldi: basis {basis} -> {resolved} ({out['basis_gb']:.1f} GiB at n={n}); device memory "
        f"{out['device_memory_before']}")
    t_all = time.perf_counter()
    op = CurvatureOperator(spec, params, micro_batch=hb, devices=1)
    mv = make_matvec(spec, params, BatchSource(fixed, batch_size=hb, fresh=False), operator=op)
    v = jax.device_put(jnp.asarray(np.random.default_rng(1).standard_normal(p), op.dtype))
    t = time.perf_counter()
    jax.block_until_ready(mv.on_device(v))
    out["hvp_compile_and_first_s"] = time.perf_counter() - t
    out["hvp_s"] = time_calls(lambda: mv.on_device(v), reps=C["reps"])["median_s"]
    log(f"HVP (CurvatureOperator, batch {hb}): {out['hvp_s']:.4f}s (compile+first {out['hvp_compile_and_first_s']:.1f}s)")
    del v

    steps: list[float] = []
    t_last = [time.perf_counter()]
    stop = [None]
    deadline = time.monotonic() + max(left() - 45.0, 10.0)

    def callback(j, beta):
        now = time.perf_counter()
        steps.append(now - t_last[0])
        t_last[0] = now
        if j % 25 == 0 or j < 3:
            log(f"arnoldi step {j}: {steps[-1]:.3f}s, beta {beta:.3g}")
        if time.monotonic() + 2 * steps[-1] > deadline:
            stop[0] = f"time budget after {j} steps"
            raise _Stop

    t_last[0] = t = time.perf_counter()
    result = None
    try:
        result = arn.arnoldi(mv, num_iters=n, dim=p, seed=0, basis=resolved, callback=callback,
                             basis_path=os.path.join(os.environ.get("TMPDIR", "/tmp"), "arnoldi_basis.npy")
                             if resolved == "mmap" else None)
    except _Stop:
        pass
    out["iteration_s"] = time.perf_counter() - t
    out.update(steps_done=len(steps), stop_reason=stop[0] or f"completed {len(steps)} steps",
               step_s_median=float(np.median(steps)) if steps else None,
               step_s_first=steps[0] if steps else None, step_s_last=steps[-1] if steps else None)
    if steps:
        out["gram_schmidt_s_per_step_last"] = steps[-1] - out["hvp_s"]
    if result is not None:
        out["basis_kind"] = result.basis_kind
        t = time.perf_counter()
        vals, vecs = arn.distill(result, top_k=min(C["top_k"], result.num_steps))
        out["distill_s"] = time.perf_counter() - t
        out["top_ritz_values"] = [float(x) for x in vals[:8]]
        q = result.basis
        m = min(20, result.num_steps)
        if result.basis_kind == "device":
            gram = np.asarray(jax.jit(lambda Q: Q[:m] @ Q[:m].T)(q), np.float64)
        else:
            gram = np.asarray(q[:m], np.float64) @ np.asarray(q[:m], np.float64).T
        out["orthogonality_err_first20"] = float(np.abs(gram - np.eye(m)).max())
        del vecs, q, result, gram
        gc.collect()
    out["total_s"] = time.perf_counter() - t_all
    out["meets_target"] = bool(out["total_s"] <= ARNOLDI_TARGET_S) if out["steps_done"] == n else None
    if out["steps_done"] and out["steps_done"] < n:  # extrapolate: step j costs hvp + c·j
        js = np.arange(1, len(steps) + 1, dtype=float)
        b_, a_ = np.polyfit(js, np.asarray(steps), 1) if len(steps) > 2 else (0.0, float(np.mean(steps)))
        out["predicted_iteration_s_at_n"] = float(n * a_ + b_ * n * (n + 1) / 2)
    log(f"arnoldi ({out.get('basis_kind')}): {out['steps_done']} steps in {out['iteration_s']:.1f}s, total with "
        f"compile and distill {out['total_s']:.1f}s; orthogonality {out.get('orthogonality_err_first20')}")
    return out


def _handler(spec, params, host_batch, C, keep, plan, eigvecs) -> dict:
    """Rows per second of ``ProjectionModelHandler.project`` (the index job's per-chunk work: fixed padded batches,
    asynchronous dispatch, one fetch, self-influence, the Arrow table) on a chunk of N rows, against the bare
    projector loop over the same batches (no Beam, no table)."""
    import jax

    from beam_influence.core.projection import make_projector

    k = keep.get("k")
    proj = keep.get("proj")
    if proj is None:  # the projector stage did not run: build the plan's projector
        k = int(C["ks"][0])
        proj = make_projector(spec.loss, eigvecs(k, plan.compute_dtype or "float32"), method=plan.method,
                              micro_batch=plan.micro_batch,
                              compute_dtype=None if plan.compute_dtype is None else plan.compute_dtype)
    n_rows = C["handler_rows"]
    Bh = C["batch"]
    rows = {key: np.asarray(v[:n_rows]) for key, v in host_batch.items()}
    out: dict = {"rows": n_rows, "batch": Bh, "k": k, "plan": plan._asdict()}

    def bare():
        outs = [proj(params, {key: v[s:s + Bh] for key, v in rows.items()}) for s in range(0, n_rows, Bh)]
        return jax.device_get([o.projections for o in outs])

    bare()  # compile for this batch shape
    r = time_calls(bare, reps=3, warm=False)
    out["bare_s"] = r["median_s"]
    out["bare_rows_per_s"] = n_rows / r["median_s"]
    try:
        import pyarrow as pa

        from beam_influence.beam.project import DecodedChunk, ProjectionModelHandler
    except ImportError as e:
        out["handler_skipped"] = f"apache_beam not importable here ({e}); docs/accelerators.md says how to carry it"
        log(f"handler: {out['handler_skipped']}; bare loop {out['bare_rows_per_s']:.0f} rows/s")
        return out
    ctx = types.SimpleNamespace(eigvals=np.ones(k), projector=proj, params=params, spec=spec, sketch=None,
                                basis_sketch=None, query_ids=[], lock=threading.Lock(), devices=jax.local_devices()[:1])
    ids = np.array([f"r{i}" for i in range(n_rows)])
    chunk = DecodedChunk("bench", 0, n_rows, ids, rows, pa.table({}))
    handler = ProjectionModelHandler(None, Bh)  # no ModelRef: the context is handed to project() directly
    handler.project(chunk, ctx)  # warm
    r = time_calls(lambda: handler.project(chunk, ctx), reps=3, warm=False)
    out["handler_s"] = r["median_s"]
    out["handler_rows_per_s"] = n_rows / r["median_s"]
    out["handler_over_bare"] = r["median_s"] / out["bare_s"]
    out["meets_target_1.25"] = bool(out["handler_over_bare"] <= 1.25)
    log(f"handler: {out['handler_rows_per_s']:.0f} rows/s = {out['handler_over_bare']:.2f}x the bare loop "
        f"({out['bare_rows_per_s']:.0f} rows/s)")
    return out


def _arnoldi_host(spec, params, host_batch, C, n, left, mem) -> dict:
    """The host-basis fallback (``basis="host"``), time-boxed: per-step time and RSS, fitted step(j) = a + b·j and
    extrapolated to n."""
    from beam_influence.core import arnoldi as arn
    from beam_influence.core.curvature import BatchSource, CurvatureOperator, make_matvec, num_params

    p = num_params(params)
    hb = C["hvp_batch"]
    op = CurvatureOperator(spec, params, micro_batch=hb, devices=1)
    mv = make_matvec(spec, params, BatchSource({k: v[:hb] for k, v in host_batch.items()}, batch_size=hb,
                                               fresh=False), operator=op)
    steps: list[dict] = []
    budget_end = time.monotonic() + max(min(120.0, left() - 30.0), 5.0)
    t_last = [time.perf_counter()]

    def callback(j, beta):
        now = time.perf_counter()
        steps.append({"j": j, "step_s": now - t_last[0], "rss_gb": tree_rss(os.getpid()) / 2**30})
        t_last[0] = now
        if time.monotonic() + steps[-1]["step_s"] * 1.5 > budget_end:
            raise _Stop

    t = t_last[0] = time.perf_counter()
    try:
        arn.arnoldi(mv, num_iters=n, dim=p, seed=0, basis="host", callback=callback)
    except _Stop:
        pass
    out = {"p": p, "n_requested": n, "steps_done": len(steps), "wall_s": time.perf_counter() - t, "steps": steps,
           "host_basis_gb_at_n": arn.basis_bytes(n, p) / 2**30, "host_peak_rss_gb": mem.peak / 2**30}
    if len(steps) >= 4:
        js = np.array([s["j"] for s in steps[1:]], float)
        st = np.array([s["step_s"] for s in steps[1:]], float)
        b_, a_ = np.polyfit(js, st, 1)
        out["fit"] = {"a_s": float(a_), "b_s_per_j": float(b_), "ns_per_basis_element": float(b_ / p * 1e9),
                      "predicted_total_s_at_n": float(n * a_ + b_ * n * (n + 1) / 2)}
    return out


def _print_summary(res: dict) -> None:
    print("\nsummary (seconds per example; ratio to the training step at the projector's batch)")
    print(f"device: {res.get('device')}; train: {res.get('train_s_per_ex')}")
    print("| k | method | dtype | micro-batch | plan | ms/ex | × train | floor | target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["projection"]:
        print(f"| {r['k']} | {r['method']} | {r['compute_dtype'] or 'float32'} | {r['micro_batch']} | "
              f"{'yes' if r['planned'] else ''} | {r['s_per_ex'] * 1e3:.4f} | {r.get('ratio', float('nan')):.2f} | "
              f"{r['floor']:.2f} | {r.get('target')} |")
    ar = res.get("arnoldi") or {}
    if ar:
        print(f"arnoldi ({ar.get('basis_kind')}): {ar.get('steps_done')}/{ar.get('n_requested')} steps, iteration "
              f"{ar.get('iteration_s', 0):.1f}s, total {ar.get('total_s', 0):.1f}s (target {ar.get('target_s')}s); "
              f"HVP {ar.get('hvp_s')}s; orthogonality {ar.get('orthogonality_err_first20')}")
    h = res.get("handler") or {}
    if h:
        print(f"handler: {h.get('handler_rows_per_s')} rows/s vs bare {h.get('bare_rows_per_s')} rows/s "
              f"({h.get('handler_over_bare')}x){'; ' + h['handler_skipped'] if 'handler_skipped' in h else ''}")
    if res.get("errors"):
        print("errors:", [e["stage"] + ": " + e["error"][:120] for e in res["errors"]])


if __name__ == "__main__":
    main()
