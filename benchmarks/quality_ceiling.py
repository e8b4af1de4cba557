"""How far up can influence go on the digits CNN? Exact influence (every eigenpair of a dense curvature) as the
ceiling of the library's approximations, on ``evaluate``'s LDS task.

The CNN (``digits:cnn``, p = 9 802, non-convex) is where issue 22 asks for LDS ≥ 0.41 with the defaults. This
measures, on the same base model, queries and 50 retrainings (``--retrain_cache``):

* ``exact/hessian/<neg>/d<δ>``: τ = gᵀ(H̃ + δI)⁻¹g′ with H = the dense Hessian of the training objective (p HVPs)
  and H̃ its eigenvalues treated by ``neg`` (``abs`` |λ|, ``clip`` max(λ, 0), ``keep`` λ);
* ``exact/ggn/d<δ>``: the same with the dense Gauss-Newton matrix G = (1/n) Σ_z J_zᵀ H_out,z J_z + l₂I (positive
  semi-definite; formed from per-example output Jacobians, not p products);
* the library's approximations on the same task: ``scalar`` (k = 50 + the scalar complement, the jobs' default
  without factors), ``kfac/<curvature>/d<x>`` (top k of that curvature + the K-FAC complement at δ = x·λ_min),
  ``ekfac`` (k = 0).

    python -m benchmarks.quality_ceiling [--curvatures hessian,ggn] [--retrain_cache .cache/lds]

The dense eigendecompositions are cached under ``.cache/ceiling`` (the Hessian takes ~10 min of p HVPs on two
cores). Writes ``benchmarks/results/quality_ceiling_cnn.json``.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from benchmarks.common import LDS_TASKS, REPO, log, machine_info, write_result

DAMPINGS = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
HYBRID_DAMPINGS = (0.1, 0.3, 1.0)


def dense_ggn(spec, params, train, *, batch: int = 64) -> np.ndarray:
    """``[p, p]`` float64 G = (1/n) Σ_z (L_z J_z)ᵀ(L_z J_z) + l₂I with L_zᵀL_z = H_out,z (the output loss's Hessian
    in the model output, factored by its eigendecomposition) and J_z the output Jacobian of example z."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    flat0, unravel = ravel_pytree(params)

    def rows(example):
        f = lambda flat: spec.apply(unravel(flat), example)  # noqa: E731
        out = f(flat0)
        jac = jax.jacrev(f)(flat0).reshape(out.size, -1)  # [C, p]
        h = jax.hessian(lambda o: spec.output_loss(o.reshape(out.shape), example))(out.ravel())
        e, v = jnp.linalg.eigh(0.5 * (h + h.T))
        return (jnp.sqrt(jnp.maximum(e, 0.0))[:, None] * v.T) @ jac  # [C, p]: L J

    fn = jax.jit(jax.vmap(rows))
    n = len(next(iter(train.values())))
    p = flat0.size
    g = np.zeros((p, p))
    for s in range(0, n, batch):
        a = np.asarray(fn({k: jnp.asarray(v[s:s + batch]) for k, v in train.items()}), np.float64).reshape(-1, p)
        g += a.T @ a
    g /= n
    g[np.diag_indices(p)] += spec.l2
    return g


def _eig(name: str, build, cache_dir: str) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """(eigenvalues, eigenvectors, seconds to form and decompose, read from the cache)."""
    path = os.path.join(cache_dir, f"{name}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return z["vals"], z["vecs"], float(z["seconds"]), True
    t = time.perf_counter()
    vals, vecs = np.linalg.eigh(build())
    secs = time.perf_counter() - t
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path, vals=vals, vecs=vecs, seconds=secs)
    return vals, vecs, secs, False


def measure(curvatures: list[str], retrain_cache: str, cache_dir: str) -> dict:
    from beam_influence.evaluation import lds as lds_mod
    from beam_influence.evaluation.gradients import gradient_dots
    from beam_influence.evaluation.methods import make_method
    from beam_influence.evaluation.run import EvalArgs, lds_setup

    load = [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    a = EvalArgs(spec="beam_influence.models.digits:cnn", **LDS_TASKS["cnn"])
    spec, task, info, masks, targets, _ = lds_setup(a, retrain_cache=retrain_cache, progress=False, log=log)
    score = lambda s: round(float(lds_mod.lds(s, masks, targets).score), 4)  # noqa: E731
    out: dict = {"model": "digits:cnn", "p": task.num_params, "lds_task": info, "exact": {}, "approximations": {},
                 "eig_seconds": {}}
    key = f"{a.spec}-{a.steps}-{a.learning_rate}-{a.train_batch_size}-{a.seed}".replace(":", "_").replace("/", "_")
    g_test = task.test_grads.astype(np.float64)
    for curv in curvatures:
        build = (lambda: task.dense_hessian(0)) if curv == "hessian" else (lambda: dense_ggn(spec, task.params,
                                                                                             task.train))
        vals, vecs, secs, cached = _eig(f"{curv}-{key}", build, cache_dir)
        out["eig_seconds"][curv] = {"seconds": round(secs, 1), "cached": cached}
        out[f"{curv}_spectrum"] = {"negative": int(np.sum(vals < 0)), "min": float(vals.min()), "max": float(vals.max())}
        gq = g_test @ vecs
        for neg in (("abs", "clip", "keep") if curv == "hessian" else ("keep",)):
            for d in DAMPINGS:
                lam = (np.abs(vals) if neg == "abs" else np.maximum(vals, 0.0) if neg == "clip" else vals) + d
                if np.any(lam <= 0) and neg != "keep" or np.any(lam == 0):
                    continue
                x = ((gq / lam) @ vecs.T).astype(np.float32)
                name = f"exact/{curv}/{neg}/d{d:g}" if curv == "hessian" else f"exact/ggn/d{d:g}"
                out["exact"][name] = score(gradient_dots(spec.loss, task.params, task.train, x,
                                                         batch_size=task.batch_size))
                log(f"{name}: LDS {out['exact'][name]}")
        del vecs
    approx = {"scalar": ("arnoldi_complement", {}), "ekfac": ("ekfac", dict(relative_damping=True, damping=0.1))}
    for curv in ("hessian", "ggn"):
        for d in HYBRID_DAMPINGS:
            approx[f"kfac/{curv}/d{d:g}"] = ("arnoldi_kfac", dict(curvature=curv, kfac_damping=d))
    for name, (method, kw) in approx.items():
        out["approximations"][name] = score(make_method(method, **kw).fit(task).scores())
        log(f"{name}: LDS {out['approximations'][name]}")
    best = max(out["exact"].items(), key=lambda kv: kv[1])
    out["best_exact"] = {"method": best[0], "lds": best[1]}
    out["machine"], out["load_before"] = machine_info(), load
    out["load_after"] = [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--curvatures", default="hessian,ggn")
    ap.add_argument("--retrain_cache", default=os.path.join(REPO, ".cache", "lds"))
    ap.add_argument("--cache_dir", default=os.path.join(REPO, ".cache", "ceiling"))
    ap.add_argument("--name", default="quality_ceiling_cnn")
    args = ap.parse_args(argv)
    res = measure([c for c in args.curvatures.split(",") if c], args.retrain_cache, args.cache_dir)
    write_result(args.name, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
