"""Start-up of a second job on the same model and shapes: the persistent compilation cache, measured.

    python -m benchmarks.startup [--quick] [--model cnn|translation]

For the model: data, a trained checkpoint and an eigensystem are made once (untimed); then each command below
runs as a fresh ``beam-influence`` process three times against a new, empty cache directory:
``--no_compilation_cache`` (the floor: what every job paid before), a first job that fills the cache, and a
second job that reads it. Wall and CPU seconds per run (CPU of the child process), and the time until the job's
first progress output ("running the Beam job"), go to ``benchmarks/results/startup_<model>.json``.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks.common import REPO, loadavg, log, machine_info, write_result

MODELS = {"cnn": ("beam_influence.models.digits:cnn", []),
          "translation": ("beam_influence.models.sequence:translation", [])}


def _cli(args: list[str], env: dict) -> dict:
    """Run ``beam-influence <args>``; wall, CPU (children) and when the Beam job started (from its output)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "beam_influence.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_job_line = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if first_job_line is None and "running the Beam job" in line:
            first_job_line = time.perf_counter() - t0
    rc = proc.wait()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise RuntimeError(f"beam-influence {' '.join(args)} failed ({rc}):\n{''.join(lines[-20:])}")
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "until_beam_job_s": first_job_line}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer training steps (the timings do not depend on them)")
    ap.add_argument("--model", default="cnn", choices=sorted(MODELS))
    a = ap.parse_args(argv)
    spec, spec_args = MODELS[a.model]
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    work = tempfile.mkdtemp(prefix="bench-startup-")
    common_cache = ["--compilation_cache_dir", os.path.join(work, "setup-cache")]
    model = ["--spec", spec, *spec_args]
    if a.model == "cnn":
        _cli(["digits-data", "--output", os.path.join(work, "data")], env)
        train, test = os.path.join(work, "data/parquet/train-*"), os.path.join(work, "data/parquet/test-00000-*")
    else:
        from beam_influence.formats import write_records
        from beam_influence.models import sequence as S

        gen = S.translation_data(n_train=600, n_test=20, noise=0.1, seed=0)
        write_records(gen.train, os.path.join(work, "data", "train"), "parquet", 2)
        write_records(gen.test, os.path.join(work, "data", "test"), "parquet", 1)
        train, test = os.path.join(work, "data/train-*"), os.path.join(work, "data/test-*")
    ckpt, eig = os.path.join(work, "ckpt.msgpack"), os.path.join(work, "eig.safetensors")
    _cli(["train", *model, "--train_data", train, "--output", ckpt, "--steps", "20" if a.quick else "100",
          *common_cache], env)
    _cli(["eigensystem", *model, "--checkpoint", ckpt, "--train_data", train, "--output", eig, "--num_iters", "12",
          "--num_eigenpairs", "8", "--sample_size", "256", "--no_residuals", *common_cache], env)
    jobs = {
        "eigensystem": lambda cache, tag: ["eigensystem", *model, "--checkpoint", ckpt, "--train_data", train,
                                           "--output", os.path.join(work, f"eig-{tag}.safetensors"),
                                           "--num_iters", "12", "--num_eigenpairs", "8", "--sample_size", "256",
                                           "--no_residuals", *cache],
        "index": lambda cache, tag: ["index", *model, "--checkpoint", ckpt, "--eigensystem", eig, "--train_data",
                                     train, "--index_dir", os.path.join(work, f"index-{tag}"), *cache],
        "query": lambda cache, tag: ["query", *model, "--checkpoint", ckpt, "--eigensystem", eig, "--test_data", test,
                                     "--index_dir", os.path.join(work, "index-first"),
                                     "--output", os.path.join(work, f"query-{tag}"), *cache],
    }
    result = {"benchmark": "startup", "model": a.model, "spec": spec, "machine": machine_info(),
              "loadavg_before": loadavg(), "jobs": {}}
    for name, cmd in jobs.items():
        cache_dir = os.path.join(work, f"cache-{name}")
        runs = {}
        runs["no_cache"] = _cli(cmd(["--no_compilation_cache"], "nocache"), env)
        runs["first"] = _cli(cmd(["--compilation_cache_dir", cache_dir], "first"), env)
        runs["second"] = _cli(cmd(["--compilation_cache_dir", cache_dir], "second"), env)
        runs["second_over_first_wall"] = runs["second"]["wall_s"] / runs["first"]["wall_s"]
        runs["cache_files"] = sum(len(f) for _, _, f in os.walk(cache_dir))
        result["jobs"][name] = runs
        log(f"{a.model} {name}: no cache {runs['no_cache']['wall_s']:.1f}s, first {runs['first']['wall_s']:.1f}s, "
            f"second {runs['second']['wall_s']:.1f}s wall ({runs['second']['cpu_s']:.1f}s CPU; "
            f"{runs['cache_files']} cache files)")
    result["loadavg_after"] = loadavg()
    write_result(f"startup_{a.model}", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
