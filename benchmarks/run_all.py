"""Run every benchmark, each in its own process; JSON results land in ``benchmarks/results/``.

    python -m benchmarks.run_all [--quick] [--only startup,large_model,projection,arnoldi_host,columnar,sequence,sketch_quality,sketch_dtype,rerank,kfac_index,kfac_fit_size,kfac_sketch,gpu_projection]

``make bench`` runs it without ``--quick`` (projection grid in full, Arnoldi host cost, the columnar engine's
jobs against their floors at N = 1e4 .. 1e6 for digits logreg, and smaller N for the digits CNN and the small
Transformer: about an hour on 2 busy cores; ``sequence``: the built-in translation and LM models' projection
per bucket against a training step). ``--quick`` keeps N ≤ 1e5 and cuts
timed calls. ``gpu_projection`` runs only where JAX sees a GPU. A summary of what ran, how long it took
and the load average goes to ``benchmarks/results/run_all.json``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchmarks.common import REPO, loadavg, log, machine_info, write_result

BENCHMARKS = ("startup", "large_model", "projection", "arnoldi_host", "columnar", "sequence", "sketch_quality", "sketch_dtype",
              "rerank", "kfac_index", "kfac_fit_size", "kfac_sketch", "gpu_projection")


def _has_gpu() -> bool:
    import jax

    try:
        return jax.default_backend() == "gpu"
    except Exception:  # noqa: BLE001
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="run every benchmark")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (N ≤ 1e5), fewer timed calls")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    ap.add_argument("--output_dir", default=None, help="results directory (default benchmarks/results)")
    a = ap.parse_args(argv)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if a.output_dir:
        env["BENCH_RESULTS_DIR"] = os.path.abspath(a.output_dir)
    summary = {"benchmark": "run_all", "quick": a.quick, "machine": machine_info(), "runs": []}
    failed = 0
    for name in a.only.split(","):
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {BENCHMARKS}")
        if name == "gpu_projection":
            if not _has_gpu():
                log("gpu_projection: skipped (JAX sees no GPU here; run `python benchmarks/gpu_projection.py` on one)")
                summary["runs"].append({"name": name, "skipped": "no GPU"})
                continue
            cmd = [sys.executable, os.path.join(REPO, "benchmarks", "gpu_projection.py")]
            if a.output_dir:
                cmd += ["--out", os.path.abspath(a.output_dir)]
        else:
            cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if a.quick else [])
        cmds = [(name, cmd)]
        if name == "columnar":  # the same table for the digits CNN and the small Transformer
            cmds += [(f"columnar_{m}", cmd + ["--model", m]) for m in ("cnn", "transformer")]
        if name == "rerank":  # and the query time at scale (10^6 rows, 1000 queries, top-100; 10^5 with --quick)
            cmds += [("rerank_kfac", cmd + ["--kfac", "--models", "mlp,cnn"]),  # the K-FAC complement's sketch
                     ("rerank_scale", [sys.executable, "-m", "benchmarks.rerank", "--mode", "scale"]
                      + (["--rows", "100000", "--queries", "200", "--no_check_exact"] if a.quick else []))]
        for label, c in cmds:
            log(f"{label}: {' '.join(c[1:])} (load {loadavg()})")
            t = time.perf_counter()
            la = loadavg()
            rc = subprocess.call(c, cwd=REPO, env=env)
            dt = time.perf_counter() - t
            failed += rc != 0
            summary["runs"].append({"name": label, "rc": rc, "seconds": dt, "loadavg_before": la,
                                    "loadavg_after": loadavg()})
            log(f"{label}: exit {rc} after {dt:.0f}s")
            write_result("run_all" + ("_quick" if a.quick else ""), summary, a.output_dir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
