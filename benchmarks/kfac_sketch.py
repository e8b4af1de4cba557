"""Queries against an index without the training data: LDS of the sketched scalar complement against the sketched
K-FAC complement (and both exact), on ``evaluate``'s digits LDS tasks.

An index stores one CountSketch per row: of the gradient's residual (scalar complement, ``--sketch_space
gradient``) or of the whitened residual v̄ (K-FAC, ``--sketch_space kfac``). A query without ``--train_data`` ranks
the truncated term plus the sketch's estimate of the complement; this measures what that does to LDS (the quality
against retraining), not only to the agreement with each complement's own exact lists (``benchmarks.rerank
--kfac``). Rows per model (library defaults: k = 50, ``KFACOptions()``), the sketch rows a mean over 3 seeds:

* ``scalar_exact`` / ``kfac_exact``: the fused job's scores;
* ``scalar_sketch_d<d>`` / ``kfac_sketch_d<d>``: P-term + ρ⁻¹⟨S r, S r′⟩ / P-term + ⟨S v̄, S v̄′⟩.

    python -m benchmarks.kfac_sketch [--models logreg,mlp,cnn] [--dims 256,1024]

Writes ``benchmarks/results/kfac_sketch.json``.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from benchmarks.common import LDS_TASKS, REPO, log, machine_info, write_result

def measure(model: str, dims, seeds: int, retrain_cache: str) -> dict:
    import jax
    from jax.flatten_util import ravel_pytree

    from beam_influence.core.projection import flatten_eigvecs
    from beam_influence.core.scoring import influence_scores
    from beam_influence.core.sketch import GradientSketch, residual_sketch
    from beam_influence.evaluation import lds as lds_mod
    from beam_influence.evaluation.gradients import flat_grads
    from beam_influence.evaluation.methods import make_method
    from beam_influence.evaluation.run import EvalArgs, lds_setup

    a = EvalArgs(spec=f"beam_influence.models.digits:{model}", **LDS_TASKS[model])
    spec, task, _, masks, targets, _ = lds_setup(a, retrain_cache=retrain_cache, progress=False, log=log)
    score = lambda s: round(float(lds_mod.lds(s, masks, targets).score), 4)  # noqa: E731
    kf = make_method("arnoldi_kfac").fit(task)
    out = {"model": model, "p": task.num_params, "k": int(len(kf.eigvals)),
           "scalar_exact": score(make_method("arnoldi_complement").fit(task).scores()),
           "kfac_exact": score(kf.scores())}
    unravel = ravel_pytree(task.params)[1]
    tree = lambda g: jax.vmap(unravel)(np.asarray(g, np.float32))  # noqa: E731 - [n, p] → a batched params tree
    g_tr, g_te = flat_grads(spec.loss, task.params, task.train), task.test_grads
    u = flatten_eigvecs(kf.tree)
    rho = float(np.min(np.abs(kf.eigvals)))  # the scalar complement's default ρ
    top = influence_scores(kf.test_proj, kf.train_proj, kf.eigvals)
    for d in dims:
        got = {"scalar": [], "kfac": []}
        for seed in range(seeds):
            sk = GradientSketch(task.params, d, seed)
            su = sk.sketch_vectors(tree(u))
            r_tr = residual_sketch(np.asarray(sk.sketch_vectors(tree(g_tr)), np.float64), kf.train_proj, su)
            r_te = residual_sketch(np.asarray(sk.sketch_vectors(tree(g_te)), np.float64), kf.test_proj, su)
            got["scalar"].append(score(top + r_tr @ r_te.T / rho))
            v_tr = kf.comp.whitened(spec.loss, task.params, task.train, sketch=sk)[1].astype(np.float64)
            v_te = kf.comp.whitened(spec.loss, task.params, task.test, sketch=sk)[1].astype(np.float64)
            got["kfac"].append(score(top + v_tr @ v_te.T))
        for name, vals in got.items():
            out[f"{name}_sketch_d{d}"] = round(float(np.mean(vals)), 4)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="logreg,mlp,cnn")
    ap.add_argument("--dims", default="256,1024")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--retrain_cache", default=os.path.join(REPO, ".cache", "lds"))
    ap.add_argument("--quick", action="store_true", help="LR only, d = 256, one seed")
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.dims, a.seeds = "logreg", "256", 1
    res = {"benchmark": "kfac_sketch", "machine": machine_info(), "rows": []}
    for m in a.models.split(","):
        res["rows"].append(measure(m, [int(d) for d in a.dims.split(",")], a.seeds, a.retrain_cache))
        log(str(res["rows"][-1]))
        write_result("kfac_sketch" + ("_quick" if a.quick else ""), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
