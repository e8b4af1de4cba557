"""The K-FAC complement's options by LDS: fisher × kind × damping × composition, on the digits LR and MLP.

On the task of ``beam-influence evaluate`` with its defaults (the same base model, queries and retraining targets,
read from ``--retrain_cache``), with the library's default eigensystem (``EigensystemArgs()``: k = 50), the LDS of

* ``scalar``: the scalar complement (the current default);
* ``<fisher>/<kind>/<compose>/d<x>``: the top-k term + ``core.kfac.Complement`` with damping δ = x × the smallest
  kept |λ| (``KFACOptions.relative_damping``);
* ``<fisher>/<kind>/k0/d<x>``: the factored curvature alone (k = 0), δ = x × its mean eigenvalue;
* ``homogeneous/...``: the same with every dense layer's bias folded into its kernel as an extra input row
  (``[x; 1] δᵀ``, the homogeneous coordinate of kronfluence / Grosse et al.) instead of a diagonal leaf — the
  curvature fitted on a re-parametrised spec whose parameters are a permutation of the original ones.

    python -m benchmarks.kfac_sweep [--models logreg,mlp] [--retrain_cache .cache/lds]

Writes ``benchmarks/results/kfac_sweep.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import log, machine_info, write_result

DAMPINGS = (0.0, 0.03, 0.1, 0.3, 1.0)


def _fold(tree, batched=False):
    """``{layer: {kernel [.., in, out], bias [.., out]}} -> {layer: {wb [.., in + 1, out]}}`` (dense layers)."""
    out = {}
    for name, d in tree.items():
        if set(d) == {"kernel", "bias"} and d["kernel"].ndim == 2 + batched:
            out[name] = {"wb": jnp.concatenate([d["kernel"], d["bias"][..., None, :]], axis=-2)}
        else:
            out[name] = d
    return out


def _unfold(tree):
    return {n: ({"kernel": d["wb"][:-1], "bias": d["wb"][-1]} if set(d) == {"wb"} else d) for n, d in tree.items()}


def sweep(model: str, retrain_cache: str) -> dict:
    from beam_influence.core import kfac
    from beam_influence.core.projection import flatten_eigvecs
    from beam_influence.core.scoring import influence_scores
    from beam_influence.evaluation import lds as lds_mod
    from beam_influence.evaluation.gradients import flat_grads, gradient_dots
    from beam_influence.evaluation.methods import make_method
    from beam_influence.evaluation.run import EvalArgs, lds_setup

    load = [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    spec, task, info, masks, targets, rt = lds_setup(EvalArgs(spec=f"beam_influence.models.digits:{model}"),
                                                     retrain_cache=retrain_cache, progress=False, log=log)
    score = lambda s: float(lds_mod.lds(s, masks, targets).score)  # noqa: E731
    ar = make_method("arnoldi_complement").fit(task)
    res = {"scalar": score(ar.scores())}
    top = influence_scores(ar.test_proj, ar.train_proj, ar.eigvals)
    lmin = float(np.min(np.abs(ar.eigvals)))
    sample = kfac.fixed_sample(task.train, ar.sample_size, ar.seed)
    seconds = {"eigensystem": ar.info["eigensystem_seconds"]}

    def rows(prefix, sp, params, u, test_grads, curv, kinds, composes, dampings):
        lams = curv.eigenvalues("ekfac")
        mean = float(sum(np.sum(x) for x in lams) / sum(np.size(x) for x in lams))
        for kind in kinds:
            for d in dampings:
                for compose in composes:
                    k0 = compose == "k0"
                    c = kfac.Complement(curv, np.zeros((0, curv.num_params)) if k0 else u,
                                        damping=d * (mean if k0 else lmin), kind=kind,
                                        compose="residual" if k0 else compose)
                    w = c.vectors(test_grads).astype(np.float32)
                    s = gradient_dots(sp.loss, params, task.train, w, batch_size=task.batch_size)
                    key = f"{prefix}/{kind}/{compose}/d{d:g}"
                    res[key] = score(s if k0 else s + top)
                    log(f"  {model} {key}: LDS {res[key]:.4f}")

    u = flatten_eigvecs(ar.tree).astype(np.float64)
    for fisher in ("ggn", "empirical"):
        t0 = time.perf_counter()
        curv = kfac.fit(spec, task.params, sample, fisher=fisher)
        seconds[f"fit_{fisher}"] = time.perf_counter() - t0
        rows(fisher, spec, task.params, u, task.test_grads, curv, ("ekfac", "kfac"), ("schur", "residual", "k0"),
             DAMPINGS if fisher == "ggn" else (0.0, 0.1, 0.3))
    # the bias as the homogeneous coordinate of its kernel (a permutation of the parameters)
    wspec = dataclasses.replace(spec, loss=lambda p, z: spec.loss(_unfold(p), z),
                                apply=lambda p, z: spec.apply(_unfold(p), z))
    wparams = _fold(task.params)
    wu = np.concatenate([np.asarray(x, np.float64).reshape(len(u), -1)
                         for x in jax.tree.leaves(_fold(ar.tree, batched=True))], axis=1)
    curv = kfac.fit(wspec, wparams, sample, fisher="ggn")
    rows("homogeneous_ggn", wspec, wparams, wu, flat_grads(wspec.loss, wparams, task.test), curv, ("ekfac",),
         ("schur", "residual", "k0"), (0.0, 0.1))
    load_end = [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    return dict(lds=res, seconds=seconds, lds_task=info, retraining=rt, lambda_min=lmin, l2=spec.l2,
                loadavg_start=load, loadavg_end=load_end)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="logreg,mlp")
    ap.add_argument("--retrain_cache", default=".cache/lds")
    a = ap.parse_args(argv)
    out = {"machine": machine_info(), "models": {m: sweep(m, a.retrain_cache) for m in a.models.split(",")}}
    log(f"-> {write_result('kfac_sweep', out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
