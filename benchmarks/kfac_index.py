"""What the K-FAC complement costs the index job: ``beam-influence index`` under an eigensystem with and without
K-FAC factors (``eigensystem --kfac``), same data, same process, interleaved repetitions.

Digits MLP (p = 4 810, the library's default eigensystem k = 50, index d = 1024 float16), N training records =
the digits training set replicated with pixel noise (as ``benchmarks.rerank --mode scale``). With factors every
row also gets its K-FAC self-term ``kfac_self`` and the sketch of its whitened residual (``--sketch_space auto``
→ kfac), computed inside the projector from the gradients it already forms (``core.kfac.WhitenedTerms``).

    python -m benchmarks.kfac_index [--rows 200000] [--reps 2]

Writes ``benchmarks/results/kfac_index.json``: wall and CPU seconds per run (after one untimed warm-up run of
each), and the ratio of the medians.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks.common import cpu_seconds, log, machine_info, write_result


def measure(rows: int, reps: int) -> dict:
    from benchmarks.rerank_scale import _write_noisy
    from benchmarks.sketch_quality import TRAINING
    from beam_influence.api import fit_eigensystem_kfac
    from beam_influence.core import kfac
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
    from beam_influence.models import digits
    from beam_influence.train import train
    from pipelines import index

    root = tempfile.mkdtemp(prefix="kfac-index-")
    spec = digits.mlp()
    data = digits.load_digits(test_fraction=0.2, label_noise=0.0, seed=0)
    tr = spec.stack([spec.decode(r) for r in data.train])
    params = train(spec, tr, seed=0, **TRAINING["mlp"])
    args = EigensystemArgs()
    es = compute_eigensystem(spec, params, tr, args)
    t = time.perf_counter()
    es_kfac = fit_eigensystem_kfac(spec, params, kfac.fixed_sample(tr, args.sample_size, args.seed), es)
    fit_s = time.perf_counter() - t
    ckpt = f"{root}/ckpt.msgpack"
    spec.save_params(ckpt, params)
    eig = {"plain": f"{root}/eig.safetensors", "kfac": f"{root}/eig_kfac.safetensors"}
    es.save(eig["plain"])
    es_kfac.save(eig["kfac"])
    _write_noisy(f"{root}/train", np.asarray(tr["x"]), np.asarray(tr["y"]), rows, 8, "z", 1)
    runs: dict = {"plain": [], "kfac": []}
    try:
        for rep in range(-1, reps):  # rep -1: one untimed warm-up of each (imports, runner start, compilation)
            for name in ("plain", "kfac"):
                idx = f"{root}/index_{name}"
                shutil.rmtree(idx, ignore_errors=True)
                w, c = time.perf_counter(), cpu_seconds()
                index.run(["--spec", "beam_influence.models.digits:mlp", "--checkpoint", ckpt, "--eigensystem",
                           eig[name], "--train_data", f"{root}/train-*", "--index_dir", idx, "--runner=FnApiRunner"])
                run = {"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(cpu_seconds() - c, 2),
                       "load": os.getloadavg()[0]}
                log(f"kfac_index: {name} rep {rep}: {run}" + (" (warm-up, not counted)" if rep < 0 else ""))
                if rep >= 0:
                    runs[name].append(run)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {n: float(np.median([r["wall_s"] for r in v])) for n, v in runs.items()}
    cpu = {n: float(np.median([r["cpu_s"] for r in v])) for n, v in runs.items()}
    return {"model": "digits mlp", "p": 4810, "k": int(es.k), "rows": rows, "kfac_fit_s": round(fit_s, 2),
            "runs": runs, "median_wall_s": med, "median_cpu_s": cpu,
            "kfac_over_plain_wall": round(med["kfac"] / med["plain"], 2),
            "kfac_over_plain_cpu": round(cpu["kfac"] / cpu["plain"], 2), "machine": machine_info()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2·10⁴ rows, one repetition")
    a = ap.parse_args(argv)
    res = measure(20_000 if a.quick else a.rows, 1 if a.quick else a.reps)
    write_result("kfac_index" + ("_quick" if a.quick else ""), res)
    log(f"kfac_index: K-FAC index / plain index: {res['kfac_over_plain_wall']}× wall, {res['kfac_over_plain_cpu']}× CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
