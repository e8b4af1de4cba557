"""Workspaces of the pipeline benchmarks: a trained checkpoint, an eigensystem and Parquet training shards,
built once and cached under ``benchmarks/.work/`` (or ``--work-dir``), keyed by what they were built from."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from benchmarks.common import REPO, log

DEFAULT_WORK = os.path.join(REPO, "benchmarks", ".work")


def work_dir(arg: str | None, name: str) -> str:
    d = os.path.join(arg or os.environ.get("BENCH_WORK_DIR") or DEFAULT_WORK, name)
    os.makedirs(d, exist_ok=True)
    return d


def _stamp_ok(path: str, key: dict) -> bool:
    try:
        with open(path) as f:
            return json.load(f) == key
    except (OSError, ValueError):
        return False


def _write_stamp(path: str, key: dict) -> None:
    with open(path, "w") as f:
        json.dump(key, f)


def model_files(root: str, spec_path: str, spec, data: dict, *, k: int, num_iters: int, train_steps: int,
                seed: int = 0) -> tuple[str, str, dict]:
    """(checkpoint path, eigensystem path, timings) for ``spec`` trained on ``data`` (decoded batch);
    reused when a previous run built them from the same arguments."""
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
    from beam_influence.train import train

    ckpt, eig = os.path.join(root, "ckpt.msgpack"), os.path.join(root, "eig.safetensors")
    n = int(len(next(iter(data.values()))))
    key = {"spec": spec_path, "k": k, "num_iters": num_iters, "train_steps": train_steps, "seed": seed, "n": n}
    stamp = os.path.join(root, "model.stamp.json")
    if os.path.exists(ckpt) and os.path.exists(eig) and _stamp_ok(stamp, key):
        return ckpt, eig, {"cached": True}
    t = time.perf_counter()
    params = train(spec, data, steps=train_steps, learning_rate=1e-2, batch_size=min(256, n), seed=seed)
    t_train = time.perf_counter() - t
    spec.save_params(ckpt, params)
    t = time.perf_counter()
    es = compute_eigensystem(spec, params, data, EigensystemArgs(num_iters=num_iters, top_k=k,
                                                                 batch_size=min(1024, n), residuals=False,
                                                                 seed=seed))
    t_eig = time.perf_counter() - t
    es.save(eig)
    _write_stamp(stamp, key)
    log(f"model: trained {train_steps} steps in {t_train:.1f}s, eigensystem (n={num_iters}, k={es.k}) in {t_eig:.1f}s")
    return ckpt, eig, {"cached": False, "train_s": t_train, "eigensystem_s": t_eig, "k": es.k}


def digits_records(n: int) -> list[dict]:
    """The digits training records repeated to ``n`` records with unique ids (``train-00012-r003``)."""
    from beam_influence.models import digits

    base = digits.load_digits(label_noise=0.1, seed=0).train
    out = []
    r = 0
    while len(out) < n:
        for rec in base:
            if len(out) >= n:
                break
            out.append({**rec, "id": f"{rec['id']}-r{r:03d}"})
        r += 1
    return out


def write_digits_shards(root: str, n: int, num_shards: int) -> tuple[str, dict]:
    """Write ``n`` repeated digits records as Parquet shards with ``beam_influence.formats.write_records``;
    returns (file pattern, info). Reused when present with the same n and shard count."""
    from beam_influence.formats import write_records

    d = os.path.join(root, f"digits_n{n}_s{num_shards}")
    pattern = os.path.join(d, "train-*.parquet")
    stamp = os.path.join(d, "stamp.json")
    key = {"n": n, "num_shards": num_shards}
    if _stamp_ok(stamp, key):
        return pattern, {"cached": True, "bytes": _bytes(d)}
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    t = time.perf_counter()
    write_records(digits_records(n), os.path.join(d, "train"), "parquet", num_shards=num_shards)
    _write_stamp(stamp, key)
    info = {"cached": False, "write_s": time.perf_counter() - t, "bytes": _bytes(d)}
    log(f"wrote {n} digits records in {num_shards} Parquet shards ({info['bytes'] / 2**20:.1f} MiB, "
        f"{info['write_s']:.1f}s)")
    return pattern, info


def _bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".parquet"))


def decoded_digits(spec) -> dict:
    """The digits training set, decoded (for training and the eigensystem)."""
    from beam_influence.models import digits

    recs = digits.load_digits(label_noise=0.1, seed=0).train
    return spec.stack([spec.decode(r) for r in recs])


def np_seed_everything(seed: int = 0) -> None:
    np.random.seed(seed)
