"""Choose the eigensystem defaults (k, n, ρ, sample size, fixed vs fresh operator) by measurement.

For one digits model (the LDS task of ``beam-influence evaluate``: same base model, queries and cached
retraining targets) this fits the library's eigensystem under a grid of settings and reports, per
setting: the LDS of truncated influence and of the complement term, the LDS of the *ideal*
complement at the same k (the top-k eigenvectors of the whole training set's Hessian: dense where
it fits, else a converged reference Arnoldi), the Ritz-value error and subspace overlap against
those ideal eigenpairs, negative Ritz values, the largest relative residual, and the fit time.

    python -m benchmarks.quality_defaults --model logreg --out benchmarks/results/quality_defaults_logreg.json

The JSON feeds docs/quality.md (``python -m benchmarks.quality_defaults --table <json>...`` prints its tables). Retraining targets come from ``--retrain-cache`` (run
``beam-influence evaluate`` for the model once to fill it, or let this run them).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

MODELS = {  # the evaluate arguments of each model (docs/fidelity.md)
    "logreg": dict(spec="beam_influence.models.digits:logreg"),
    "mlp": dict(spec="beam_influence.models.digits:mlp"),
    "cnn": dict(spec="beam_influence.models.digits:cnn", steps=1500, learning_rate=3e-3, batch_size=128),
}


def grid(model: str, n_train: int) -> list[dict]:
    """The settings measured: the operator/sample size, k (n = 3k), n/k, at the k = 50 default."""
    full = n_train
    if model == "cnn":  # the CNN's products are ~20x the logistic regression's: a smaller grid
        ops = [dict(fresh_batches=True, batch_size=512), dict(sample_size=512), dict(sample_size=full)]
        ks = [(20, 60)]
        ns = [(50, 100)]
    else:
        ops = [dict(fresh_batches=True, batch_size=512), dict(sample_size=256), dict(sample_size=512),
               dict(sample_size=1024), dict(sample_size=full)]
        ks = [(10, 30), (20, 60), (100, 300)]
        ns = [(50, 75), (50, 100), (50, 200)]
    out = [dict(group="operator", top_k=50, num_iters=150, **o) for o in ops]
    out += [dict(group="k", top_k=k, num_iters=n, sample_size=full) for k, n in ks]
    out += [dict(group="n", top_k=k, num_iters=n, sample_size=full) for k, n in ns]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--num-subsets", type=int, default=50)
    p.add_argument("--retrain-cache", default=".cache/lds")
    p.add_argument("--rho-factors", default="2,1,0.5,0.25", help="ρ = factor × smallest kept λ (k = 50 default)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import jax

    from beam_influence.core.diagnostics import diagnose
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
    from beam_influence.core.scoring import influence_scores
    from beam_influence.evaluation.cli import EvalArgs, lds_setup
    from beam_influence.core.complement import complement_scores
    from beam_influence.evaluation.gradients import gradient_dots
    from beam_influence.evaluation.lds import lds
    from beam_influence.util import machine_info, write_json

    log = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731
    ea = EvalArgs(methods=("arnoldi",), num_subsets=a.num_subsets, label_noise=0.0, **MODELS[a.model], spec_args={})
    spec, task, info, masks, targets, rt = lds_setup(ea, retrain_cache=a.retrain_cache or None, progress=False, log=log)
    loss, params = spec.loss, task.params
    g_test = task.test_grads.astype(np.float64)  # [Q, p]
    dots = gradient_dots(loss, params, task.train, task.test_grads, batch_size=task.batch_size)  # [N, Q]

    # the ideal eigenpairs of the whole training set's Hessian
    t0 = time.perf_counter()
    kmax = max(s["top_k"] for s in grid(a.model, task.n_train))
    if task.num_params <= 12_000 and a.model != "cnn":
        vals, vecs = np.linalg.eigh(task.dense_hessian())
        order = np.argsort(-np.abs(vals))[:kmax]
        ref_lam, ref_u = vals[order], vecs[:, order].T  # [K], [K, p]
        ref_kind = "dense Hessian"
    else:
        n_ref = min(task.num_params, 3 * kmax + 100)
        es = compute_eigensystem(spec, params, task.train, EigensystemArgs(
            num_iters=n_ref, top_k=kmax, sample_size=task.n_train, basis_dtype="float64", mass_sample=0,
            drop_unresolved_negative=False))
        ref_lam, ref_u = np.asarray(es.ritz_values), es.flat_eigvecs(params).astype(np.float64)
        ref_kind = f"reference Arnoldi (n = {n_ref}, max relative residual {diagnose(es).rel_residual_max:.2g})"
    ref_seconds = time.perf_counter() - t0
    log(f"ideal eigenpairs: {ref_kind} in {ref_seconds:.0f}s")

    def scores_for(lam, u_flat, rho=None):
        tree = jax.tree.map(np.asarray, _unflatten(u_flat, params))
        p_train = gradient_dots(loss, params, task.train, tree, batch_size=task.batch_size)
        p_test = g_test @ u_flat.T
        trunc = influence_scores(p_test, p_train, lam)
        comp = complement_scores(p_test, p_train, lam, dots, rho=rho)
        return trunc, comp

    ideal_cache: dict[int, float] = {}

    def ideal_lds(k: int) -> float:
        if k not in ideal_cache:
            lam = np.abs(ref_lam[:k])
            ideal_cache[k] = lds(scores_for(lam, ref_u[:k])[1], masks, targets).score
        return ideal_cache[k]

    rows = []
    for setting in grid(a.model, task.n_train):
        kw = {k: v for k, v in setting.items() if k != "group"}
        args = EigensystemArgs(mass_sample=0, **kw)
        t0 = time.perf_counter()
        es = compute_eigensystem(spec, params, task.train, args)
        fit_seconds = time.perf_counter() - t0
        d = diagnose(es, convex=a.model == "logreg")
        u = es.flat_eigvecs(params).astype(np.float64)
        lam = np.asarray(es.eigvals)
        k = es.k
        kk = min(k, len(ref_lam))
        ritz_err = np.abs(np.abs(es.ritz_values[:kk]) - np.abs(ref_lam[:kk])) / np.abs(ref_lam[:kk])
        overlap = float(np.sum((ref_u[:k] @ u.T) ** 2) / k)
        trunc, comp = scores_for(lam, u)
        row = dict(setting, k=k, fit_seconds=fit_seconds, lds_truncated=lds(trunc, masks, targets).score,
                   lds_complement=lds(comp, masks, targets).score, lds_ideal_complement=ideal_lds(args.top_k),
                   ritz_rel_error_median=float(np.median(ritz_err)), ritz_rel_error_max=float(ritz_err.max()),
                   subspace_overlap=overlap, krylov_negative=d.krylov_negative, negative_treated=d.negative_treated,
                   negative_unresolved_dropped=d.negative_unresolved_dropped, rel_residual_max=d.rel_residual_max,
                   warnings=list(d.warnings), sample_size_used=es.args["sample_size_used"],
                   batch_size_used=es.args["batch_size_used"])
        row["gap_vs_ideal"] = row["lds_complement"] - row["lds_ideal_complement"]
        if setting["group"] == "operator" and not setting.get("fresh_batches") and \
                setting["sample_size"] == task.n_train:
            row["rho"] = []
            for f in (float(x) for x in a.rho_factors.split(",")):
                rho = f * float(np.min(np.abs(lam)))
                row["rho"].append(dict(factor=f, rho=rho,
                                       lds_complement=lds(scores_for(lam, u, rho)[1], masks, targets).score))
        rows.append(row)
        log(f"{setting}: k={k} LDS trunc {row['lds_truncated']:.3f} comp {row['lds_complement']:.3f} "
            f"(ideal {row['lds_ideal_complement']:.3f}), Ritz err median {row['ritz_rel_error_median']:.2g}, "
            f"overlap {overlap:.3f}, negatives {d.krylov_negative}, {fit_seconds:.0f}s")
    exact = None
    if ref_kind == "dense Hessian":
        vals, vecs = np.linalg.eigh(task.dense_hessian())
        keep = np.abs(vals) > 0
        x = (g_test @ vecs[:, keep] / np.abs(vals[keep])) @ vecs[:, keep].T
        exact = lds(gradient_dots(loss, params, task.train, x.astype(np.float32), batch_size=task.batch_size),
                    masks, targets).score
    write_json(a.out, dict(model=a.model, spec=ea.spec, lds_task=info, retraining=rt, ideal=ref_kind,
                           ideal_seconds=ref_seconds, exact_abs_lds=exact, rows=rows, machine=machine_info(),
                           command="python -m benchmarks.quality_defaults " + " ".join(sys.argv[1:])),
               sort_keys=False, default=float)
    log(f"→ {a.out}")
    return 0


def table(paths) -> str:
    """Markdown tables of result JSONs (one per model): the grid that chose the defaults."""
    import json

    out = []
    for path in paths:
        d = json.load(open(path))
        out += [f"#### {d['model']} (p = {d['lds_task']['num_params']:,}; ideal: {d['ideal']}"
                + (f"; exact |H|⁻¹ LDS {d['exact_abs_lds']:.3f}" if d.get("exact_abs_lds") is not None else "")
                + ")", "",
                "| setting | k | n | operator | LDS truncated | LDS complement | ideal complement | gap | "
                "Ritz error (median) | overlap | negative Ritz | fit (s) |",
                "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in d["rows"]:
            op = (f"fresh batches of {r['batch_size_used']}" if r.get("fresh_batches")
                  else f"fixed sample of {r['sample_size_used']}")
            out.append(f"| {r['group']} | {r['k']} | {r['num_iters']} | {op} | {r['lds_truncated']:.3f} | "
                       f"{r['lds_complement']:.3f} | {r['lds_ideal_complement']:.3f} | {r['gap_vs_ideal']:+.3f} | "
                       f"{r['ritz_rel_error_median']:.1e} | {r['subspace_overlap']:.3f} | {r['krylov_negative']} | "
                       f"{r['fit_seconds']:.0f} |")
        for r in d["rows"]:
            if "rho" in r:
                out += ["", "ρ = factor × smallest kept λ (k = 50, n = 150, whole sample): "
                        + ", ".join(f"{x['factor']:g} → {x['lds_complement']:.3f}" for x in r["rho"])]
        out.append("")
    return "\n".join(out)


def _unflatten(u_flat, params):
    from beam_influence.core.projection import unflatten_eigvecs

    return unflatten_eigvecs(np.asarray(u_flat, np.float32), params)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print(table(sys.argv[2:]))
        sys.exit(0)
    sys.exit(main())
