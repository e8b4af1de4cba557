"""The K-FAC fit at large p: fit time, factor bytes (what `eigensystem --kfac` adds to the eigensystem file and a
worker loads) and peak RSS, on the decoder LMs of the large-model benchmark (``benchmarks.models.LM_SIZES``,
untrained params, random tokens), with the library's ``KFACOptions()`` (``fisher="auto"``: the empirical Fisher
for a T × vocab output; EK-FAC; a factor side above 4 096 stays diagonal). Each size in its own process.

    python -m benchmarks.kfac_fit_size [--sizes 1m,10m,50m] [--sequences 16]

Writes ``benchmarks/results/kfac_fit_size.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import REPO, log, machine_info, write_result


def one(size: str, n: int) -> dict:
    import resource
    import time

    import jax
    import numpy as np

    from benchmarks.models import decoder_lm, random_lm_tokens
    from beam_influence.api import KFACOptions, resolve_fisher
    from beam_influence.core import kfac

    spec = decoder_lm(size)
    params = spec.init(0)
    opts = KFACOptions()
    fisher = resolve_fisher(spec, opts.fisher, params)
    data = random_lm_tokens(spec, n, seed=0)
    t = time.perf_counter()
    curv = kfac.fit(spec, params, data, fisher=fisher, ekfac=opts.kind == "ekfac", micro_batch=opts.micro_batch,
                    max_factor_dim=opts.max_factor_dim)
    secs = time.perf_counter() - t
    factor_bytes = sum(v.nbytes for v in kfac.curvature_tensors(curv, params).values())
    p = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    kinds = [f.kind for f in curv.factors]
    return {"size": size, "p": p, "sequences": n, "fisher": fisher, "fit_s": round(secs, 1),
            "factor_bytes": factor_bytes, "factor_bytes_per_param": round(factor_bytes / p, 1),
            "u_bytes_k50": 50 * 4 * p, "kron_leaves": kinds.count("kron"), "diag_leaves": kinds.count("diag"),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1m,10m,50m")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one size in this process
    ap.add_argument("--quick", action="store_true", help="the 1m size only")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes = "1m"
    if a.one:
        print(json.dumps(one(a.one, a.sequences)))
        return 0
    res = {"benchmark": "kfac_fit_size", "machine": machine_info(), "rows": []}
    for size in a.sizes.split(","):
        out = subprocess.run([sys.executable, "-m", "benchmarks.kfac_fit_size", "--one", size, "--sequences",
                              str(a.sequences)], cwd=REPO, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
            {"size": size, "error": out.stderr.strip().splitlines()[-1:]}
        res["rows"].append(row)
        log(f"kfac_fit_size: {row}")
        write_result("kfac_fit_size" + ("_quick" if a.quick else ""), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
