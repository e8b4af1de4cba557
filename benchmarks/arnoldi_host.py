"""Host-side cost of ``beam_influence.core.arnoldi.arnoldi``: Gram-Schmidt per basis element, on this CPU.

The Arnoldi iteration keeps its basis Q [n+1, p] on the host (float32) and orthogonalises each new vector
w against it twice (``coeffs = q @ w``, ``w -= coeffs @ q`` per pass). Until commit ea8dbc7 w was float64,
which makes these numpy *mixed-dtype* products that do not go to BLAS (~9× slower); since then the products
are done in the basis dtype. This benchmark runs ``arnoldi()`` itself (whatever version is installed) with a
free operator (a diagonal matrix-vector product) at p = 2M (``--p``), fits the per-step time to a + b·j, and
times the products both ways (mixed, float32 BLAS, float64 BLAS with ``q`` upcast once). It then predicts
n = 200 steps at p = 110M (the anchor Transformer), where these products dwarf the HVPs (0.034 s each on
the H200). Writes ``benchmarks/results/arnoldi_host.json``.

    python -m benchmarks.arnoldi_host [--quick] [--p 2000000] [--n 32]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import log, machine_info, time_calls, write_result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="p = 1M, n = 24")
    ap.add_argument("--p", type=int, default=None)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--predict_p", type=int, default=109_633_538)
    ap.add_argument("--predict_n", type=int, default=200)
    ap.add_argument("--output_dir", default=None)
    a = ap.parse_args(argv)
    p = a.p or (1_000_000 if a.quick else 2_000_000)
    n = a.n or (24 if a.quick else 32)
    from beam_influence.core import arnoldi as arn

    machine = machine_info()
    log(f"arnoldi host cost: p={p:,}, n={n}, load {machine['loadavg']}")
    diag = np.linspace(1.0, 2.0, p)
    steps: list[float] = []
    t_last = [0.0]

    def cb(j, beta):
        now = time.perf_counter()
        steps.append(now - t_last[0])
        t_last[0] = now

    t_last[0] = time.perf_counter()
    t0 = t_last[0]
    arn.arnoldi(lambda v: diag * v, num_iters=n, dim=p, seed=0, callback=cb, basis="host")  # the host path
    total = time.perf_counter() - t0
    js = np.arange(1, len(steps) + 1, dtype=float)
    b, a0 = np.polyfit(js[1:], np.asarray(steps[1:]), 1)
    ns_per_elem = b / p * 1e9  # seconds per step per basis row, per element
    log(f"arnoldi(): {n} steps in {total:.1f}s; {ns_per_elem:.2f} ns per basis element per step")

    rows = 16
    q = np.random.default_rng(0).standard_normal((rows, p)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal(p)
    c = np.random.default_rng(2).standard_normal(rows)
    q64 = q.astype(np.float64)
    per = lambda s: s / (rows * p) * 1e9  # noqa: E731
    gemv = {
        "mixed (float32 basis, float64 vector): q @ w": per(time_calls(lambda: q @ w, reps=3)["median_s"]),
        "mixed: coeffs @ q": per(time_calls(lambda: c @ q, reps=3)["median_s"]),
        "float32 BLAS: q @ w": per(time_calls(lambda: q @ w.astype(np.float32), reps=3)["median_s"]),
        "float32 BLAS: coeffs @ q": per(time_calls(lambda: c.astype(np.float32) @ q, reps=3)["median_s"]),
        "float64 BLAS: q @ w": per(time_calls(lambda: q64 @ w, reps=3)["median_s"]),
        "float64 BLAS: coeffs @ q": per(time_calls(lambda: c @ q64, reps=3)["median_s"]),
    }
    del q64
    for k, v in gemv.items():
        log(f"  {v:6.2f} ns/element  {k}")
    P, N = a.predict_p, a.predict_n
    sum_j = N * (N + 1) / 2
    f32 = 2 * (gemv["float32 BLAS: q @ w"] + gemv["float32 BLAS: coeffs @ q"])
    pred = {
        "arnoldi_installed_gram_schmidt_s": ns_per_elem * 1e-9 * P * sum_j,
        "float32_blas_gram_schmidt_s": f32 * 1e-9 * P * sum_j,
        "host_basis_gb": (N + 1) * P * 4 / 2**30,
        "note": "host Gram-Schmidt only, on this machine's cores; the HVPs add ~0.034 s each on an H200",
    }
    log(f"predicted n={N}, p={P:,}: installed arnoldi() {pred['arnoldi_installed_gram_schmidt_s'] / 3600:.1f} h, "
        f"float32 BLAS {pred['float32_blas_gram_schmidt_s'] / 3600:.2f} h, basis {pred['host_basis_gb']:.0f} GiB")
    res = {"benchmark": "arnoldi_host", "machine": machine, "settings": {"p": p, "n": n, "quick": a.quick},
           "arnoldi_total_s": total, "step_s": steps, "fit": {"a_s": float(a0), "b_s_per_j": float(b),
                                                              "ns_per_basis_element": float(ns_per_elem)},
           "gemv_ns_per_element": gemv, "prediction": {"p": P, "n": N, **pred}}
    path = write_result("arnoldi_host", res, a.output_dir)
    log(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
