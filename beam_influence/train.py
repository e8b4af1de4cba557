"""Training with optax: full-batch or minibatch Adam on the spec's objective (mean ℓ + l2/2 ‖θ‖²)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from beam_influence.core.model_spec import ModelSpec
from beam_influence.core.types import Example, Params


def train(
    spec: ModelSpec,
    data: Example,
    *,
    steps: int = 500,
    learning_rate: float = 1e-2,
    batch_size: int | None = None,
    seed: int = 0,
    params: Params | None = None,
) -> Params:
    """Minimise ``spec.batch_loss`` with Adam; deterministic for a seed.

    ``data`` is a batch of decoded examples (leading axis N). With ``batch_size=None`` every step
    sees the whole set (deterministic, converges tightly on small convex problems).
    """
    params = spec.init(seed) if params is None else params
    opt = optax.adam(learning_rate)
    n = len(next(iter(data.values())))
    data = {k: jnp.asarray(v) for k, v in data.items()}

    @jax.jit
    def step(state, idx):
        p, s = state
        batch = data if idx is None else jax.tree.map(lambda x: x[idx], data)
        loss, g = jax.value_and_grad(spec.batch_loss)(p, batch)
        updates, s = opt.update(g, s, p)
        return (optax.apply_updates(p, updates), s), loss

    state = (params, opt.init(params))
    if batch_size is None or batch_size >= n:
        def body(state, _):
            return step(state, None)
        state, _ = jax.lax.scan(body, state, None, length=steps)
    else:
        rng = np.random.default_rng(seed)
        idx = np.stack([rng.choice(n, batch_size, replace=False) for _ in range(steps)])
        state, _ = jax.lax.scan(step, state, jnp.asarray(idx))
    return jax.device_get(state[0])
