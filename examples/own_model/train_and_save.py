"""The user's side of the example: make data, train the Flax model briefly, save an orbax checkpoint.

    PYTHONPATH=examples/own_model python examples/own_model/train_and_save.py --output out/own_model

Writes ``<output>/data/{train,test}-*.parquet`` (records of ``my_pkg.my_module.make_data``, 10% of the training
labels flipped) and ``<output>/ckpt``: an orbax checkpoint of a ``flax.training.train_state.TrainState``
(params + Adam state + step), as a Flax training loop saves one. beam-influence finds the params inside.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

from beam_influence.formats import write_records
from my_pkg.my_module import make_data, make_spec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="out/own_model", help="directory of the data and the checkpoint")
    ap.add_argument("--n_train", type=int, default=1500)
    ap.add_argument("--n_test", type=int, default=100)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train_batch_size", type=int, default=128)
    ap.add_argument("--label_noise", type=float, default=0.1)
    a = ap.parse_args(argv)

    spec = make_spec()
    train = make_data(a.n_train, label_noise=a.label_noise, seed=0, prefix="train")
    test = make_data(a.n_test, seed=1, prefix="test")
    write_records(train, os.path.join(a.output, "data", "train"), "parquet", num_shards=2)
    write_records(test, os.path.join(a.output, "data", "test"), "parquet", num_shards=1)

    batch = jax.tree.map(jax.numpy.asarray, spec.stack([spec.decode(r) for r in train]))  # tokens [N, 16], label [N]
    state = train_state.TrainState.create(apply_fn=None, params=spec.init(0), tx=optax.adam(3e-3))

    @jax.jit
    def step(state, idx):
        grads = jax.grad(spec.batch_loss)(state.params, jax.tree.map(lambda x: x[idx], batch))
        return state.apply_gradients(grads=grads)

    rng, t0 = np.random.default_rng(0), time.time()
    for _ in range(a.steps):
        state = step(state, rng.choice(a.n_train, a.train_batch_size, replace=False))
    logits = jax.vmap(spec.apply, in_axes=(None, 0))(state.params, batch)
    acc = float(np.mean(np.argmax(logits, -1) == np.array([r["true_label"] for r in train])))
    print(f"trained {a.steps} steps in {time.time() - t0:.1f}s: objective {float(spec.batch_loss(state.params, batch)):.3f}, "
          f"accuracy vs the true labels {acc:.3f}")

    ckpt = os.path.abspath(os.path.join(a.output, "ckpt"))
    with ocp.StandardCheckpointer() as checkpointer:  # the TrainState as it is: params, opt_state, step
        checkpointer.save(ckpt, jax.device_get(state), force=True)
        checkpointer.wait_until_finished()
    print(f"orbax checkpoint → {ckpt}")


if __name__ == "__main__":
    main()
