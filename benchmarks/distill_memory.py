"""Peak host memory of ``arnoldi.distill`` at a mid size (default p = 2M, n = 150, k = 50), in a subprocess each.

``one_shot``: what distill did before it worked in blocks (``y.T @ q`` with y float64 and the basis float32:
numpy upcasts the whole n·p basis); ``blocked``: ``distill`` now ([k, p] float64 out, slabs of 64 MB);
``in_place``: ``distill(overwrite_basis=True)`` (the eigensystem job: the Ritz vectors overwrite the first k
basis rows). Peak RSS (``ru_maxrss``) and tracemalloc's peak of the distill call alone, minus the basis.
Writes ``benchmarks/results/distill_memory.json``.

    python -m benchmarks.distill_memory [--p 2000000] [--n 150] [--k 50]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import log, machine_info, write_result


def _child(mode: str, p: int, n: int, k: int) -> dict:
    import tracemalloc

    from beam_influence.core import arnoldi as arn

    rng = np.random.default_rng(0)
    basis = np.empty((n + 1, p), np.float32)
    for i in range(n + 1):
        basis[i] = rng.standard_normal(p, dtype=np.float32)
    h = np.zeros((n + 1, n))
    h[:n, :n] = np.diag(np.linspace(1, 2, n))
    res = arn.ArnoldiResult(basis, h, n, False, "host")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    t = time.perf_counter()
    if mode == "one_shot":
        m = res.num_steps
        vals, vecs = np.linalg.eigh(h[:n, :n])
        y = vecs[:, np.argsort(-np.abs(vals))[:k]]
        u = np.asarray(y.T @ basis[:m], np.float64)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
    else:
        _, u = arn.distill(res, top_k=k, overwrite_basis=(mode == "in_place"))
    secs = time.perf_counter() - t
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"mode": mode, "p": p, "n": n, "k": k, "seconds": secs, "basis_bytes": basis.nbytes,
            "traced_peak_bytes": traced, "rss_before_bytes": base_rss,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=int, default=2_000_000)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--child", default=None)
    ap.add_argument("--output_dir", default=None)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.p, a.n, a.k)))
        return {}
    rows = []
    for mode in ("one_shot", "blocked", "in_place"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.distill_memory", "--child", mode, "--p", str(a.p),
                              "--n", str(a.n), "--k", str(a.k)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["extra_over_basis_gib"] = (row["peak_rss_bytes"] - row["rss_before_bytes"]) / 2**30
        log(f"{mode:9s} p={a.p:,} n={a.n} k={a.k}: basis {row['basis_bytes'] / 2**30:.2f} GiB, distill traced peak "
            f"{row['traced_peak_bytes'] / 2**30:.3f} GiB, RSS {row['rss_before_bytes'] / 2**30:.2f} -> "
            f"{row['peak_rss_bytes'] / 2**30:.2f} GiB, {row['seconds']:.1f} s")
        rows.append(row)
    result = {"benchmark": "distill_memory", "machine": machine_info(), "rows": rows}
    write_result("distill_memory", result, a.output_dir)
    return result


if __name__ == "__main__":
    main()
