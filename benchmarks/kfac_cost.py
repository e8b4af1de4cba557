"""K-FAC fit cost vs the eigensystem alone (issue 22): ``beam-influence eigensystem`` with and without ``--kfac`` on the
digits LR / MLP / CNN (trained as ``benchmarks.sketch_quality``), the library's defaults, each run a fresh process
(the persistent compilation cache warm after the first), interleaved, 2 repetitions; wall and CPU seconds and the
load average per run.

    python -m benchmarks.kfac_cost        → benchmarks/results/kfac_cost.json
"""
import json, os, resource, subprocess, sys, time
import numpy as np
import tempfile
root = tempfile.mkdtemp(prefix="kfac-cost-")
from beam_influence.models import digits
from beam_influence.train import train
from beam_influence.formats import write_records
from benchmarks.sketch_quality import TRAINING
out = {"runs": []}
for model in ("logreg", "mlp", "cnn"):
    spec = getattr(digits, model)()
    data = digits.load_digits(test_fraction=0.2, label_noise=0.0, seed=0)
    tr = spec.stack([spec.decode(r) for r in data.train])
    params = train(spec, tr, seed=0, **TRAINING[model])
    ck = f"{root}/{model}.msgpack"; spec.save_params(ck, params)
    write_records(data.train, f"{root}/{model}-train", "parquet", num_shards=1)
    for rep in range(2):
        for kf in (False, True):
            cmd = [".venv/bin/beam-influence", "eigensystem", "--spec", f"beam_influence.models.digits:{model}",
                   "--checkpoint", ck, "--train_data", f"{root}/{model}-train-*", "--output", f"{root}/{model}-{kf}.safetensors"] + (["--kfac"] if kf else [])
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN); w = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = {"model": model, "kfac": kf, "rep": rep, "wall_s": round(time.perf_counter() - w, 2),
                 "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 2), "load": os.getloadavg()}
            if kf:
                from beam_influence.core.eigensystem import Eigensystem
                r["kfac_fit_s"] = Eigensystem.load(f"{root}/{model}-True.safetensors").args.get("kfac_fit_s")
            print(r, flush=True); out["runs"].append(r)
from benchmarks.common import machine_info, write_result
out["machine"] = machine_info()
write_result("kfac_cost", out)
