"""Projection cost of the built-in sequence models against a training step, per bucket (JSON result).

    python -m benchmarks.sequence [--quick] [--output_dir DIR]

For ``beam_influence.models.sequence:translation`` (encoder-decoder) and ``:lm`` (decoder-only), on a
batch of B generated examples in each bucket (cut to the bucket's length by ``core.buckets``):

* ``train``: fwd+bwd of the mean loss over the batch (``jit(value_and_grad)``), the floor;
* ``projection``: the leaf-by-leaf projector (``make_projector``, k eigenvectors), timed interleaved with
  the training step so the ratio sees the same machine load;
* ``unbucketed``: the same projection of the same examples padded to the largest bucket, to show what
  bucketing saves (``saving`` = unbucketed / bucketed seconds; 1 for the largest bucket itself).

The FLOP floor of projection is ``1 + k/(3T)`` times a training step (DESIGN.md; T the tokens each weight
sees per example, here the bucket's source + target length — an approximation for the encoder-decoder,
whose encoder weights see only the source). Results: ``benchmarks/results/sequence.json``.
"""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import log, machine_info, time_interleaved, write_result

B = 64


def _models():
    from beam_influence.models import sequence as S

    return {"translation": (S.translation(), S.translation_data(n_train=1500, n_test=1, seed=0).train),
            "lm": (S.lm(), S.lm_data(n_train=1500, n_test=1, seed=0).train)}


def _random_eigvecs(params, k: int, seed: int = 0):
    from beam_influence.core.curvature import num_params
    from beam_influence.core.projection import unflatten_eigvecs

    u = np.random.default_rng(seed).standard_normal((k, num_params(params))).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return unflatten_eigvecs(u, params)


def bench(name: str, spec, records: list[dict], *, ks, reps: int, budget: float) -> dict:
    import jax
    import jax.numpy as jnp
    import pyarrow as pa

    from beam_influence.core import buckets
    from beam_influence.core.curvature import num_params
    from beam_influence.core.projection import make_projector

    arrays = spec.decode_batch(pa.RecordBatch.from_pylist(records)).arrays
    params = spec.init(0)
    p = num_params(params)
    seq = buckets.sequence_features(spec.features)
    out = {"params": p, "batch": B, "config": dict(spec.config), "rows": []}

    def mean_loss(q, b):
        return jnp.mean(jax.vmap(spec.loss, in_axes=(None, 0))(q, b))

    train = jax.jit(jax.value_and_grad(mean_loss))
    for b in range(buckets.num_buckets(spec.features)):
        rows = np.flatnonzero(arrays[buckets.BUCKET_KEY] == b)[:B]
        if len(rows) < B:
            log(f"[{name}] bucket {b}: only {len(rows)} examples, skipped")
            continue
        part = {k: v[rows] for k, v in arrays.items()}
        short = jax.tree.map(jnp.asarray, buckets.trim(part, spec.features, b))
        padded = jax.tree.map(jnp.asarray, part)  # every sequence at its largest bucket
        T = int(sum(fs.buckets[b] for fs in seq.values()))
        real = float(np.mean(sum(part[buckets.mask_key(k)].sum(1) for k in seq)))
        for k in ks:
            proj = make_projector(spec.loss, _random_eigvecs(params, k))
            fns = {"train": lambda: train(params, short), "proj": lambda: proj(params, short)}
            last = b == buckets.num_buckets(spec.features) - 1
            if not last:  # the largest bucket is its own padded shape
                fns["unbucketed"] = lambda: proj(params, padded)
            tr = time_interleaved(fns, reps=reps, budget_s=budget)
            t_train, t_proj = tr["train"]["median_s"], tr["proj"]["median_s"]
            t_pad = t_proj if last else tr["unbucketed"]["median_s"]
            row = {"bucket": b, "lengths": {n: fs.buckets[b] for n, fs in seq.items()}, "T": T,
                   "real_tokens_per_example": real, "padding_fraction": 1 - real / T, "k": k,
                   "train_s_per_ex": t_train / B, "proj_s_per_ex": t_proj / B, "ratio": t_proj / t_train,
                   "floor_formula": 1 + k / (3 * T), "gap_to_floor": t_proj / t_train / (1 + k / (3 * T)),
                   "unbucketed_s_per_ex": t_pad / B, "saving": t_pad / t_proj, "timings": tr}
            out["rows"].append(row)
            log(f"[{name}] bucket {b} (T={T}) k={k}: train {row['train_s_per_ex'] * 1e6:.0f} us/ex, projection "
                f"{row['proj_s_per_ex'] * 1e6:.0f} us/ex = {row['ratio']:.2f}x (floor {row['floor_formula']:.2f}); "
                f"padded to the largest bucket {row['saving']:.2f}x slower")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="k = 8 only, 3 timed rounds")
    ap.add_argument("--output_dir", default=None)
    a = ap.parse_args(argv)
    ks = (8,) if a.quick else (8, 32)
    reps, budget = (3, 10.0) if a.quick else (5, 30.0)
    res = {"benchmark": "sequence", "machine": machine_info(), "settings": {"quick": a.quick, "ks": list(ks),
                                                                            "reps": reps, "batch": B}, "models": {}}
    for name, (spec, records) in _models().items():
        res["models"][name] = bench(name, spec, records, ks=ks, reps=reps, budget=budget)
        res["models"][name]["loadavg_after"] = machine_info()["loadavg"]
        path = write_result("sequence" + ("_quick" if a.quick else ""), res, a.output_dir)
    log(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
