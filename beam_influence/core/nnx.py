"""Flax NNX modules as ModelSpecs.

An NNX module is split once into its graph definition, its ``nnx.Param`` state and the rest
(batch-norm statistics, RNG counters, …): ``graphdef, params, rest = nnx.split(module, nnx.Param, ...)``.
The spec's params are the ``nnx.Param`` state as a *pure dict* (``State.to_pure_dict``, integer keys of
layer lists written as strings), so they save and load through ``core.checkpoints`` like linen params
(orbax, safetensors, msgpack). The loss re-merges: ``loss(θ, z) = loss_fn(nnx.merge(graphdef, θ, rest), z)``;
only θ is differentiated, ``rest`` is held fixed (the model in inference mode).

Example::

    def make_spec():
        return nnx_spec(lambda rngs: MyModel(rngs=rngs), name="my_model", features=FEATURES,
                        loss_fn=lambda model, z: optax.softmax_cross_entropy_with_integer_labels(model(z["x"]), z["y"]))
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
from flax import nnx

from beam_influence.core.model_spec import FeatureSpec, ModelSpec
from beam_influence.core.types import Example, Params


def _str_keys(tree: Any) -> Any:
    """A pure dict with every key a string (msgpack, orbax and safetensors names need strings)."""
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _like_keys(tree: Any, like: Any) -> Any:
    """``tree`` (string keys) with the keys of ``like`` (e.g. the ints of an ``nnx.List``)."""
    if isinstance(like, Mapping):
        return {k: _like_keys(tree[str(k)], v) for k, v in like.items()}
    return tree


def nnx_params(module: nnx.Module) -> Params:
    """The ``nnx.Param`` state of ``module`` as the pure dict a spec from ``nnx_spec`` uses (save it with
    ``spec.save_params`` or orbax)."""
    _, params, _ = nnx.split(module, nnx.Param, ...)
    return _str_keys(params.to_pure_dict())


def nnx_spec(
    model: nnx.Module | Callable[[nnx.Rngs], nnx.Module],
    *,
    name: str,
    features: Mapping[str, FeatureSpec],
    loss_fn: Callable[[nnx.Module, Example], jax.Array],
    output_fn: Callable[[nnx.Module, Example], jax.Array] | None = None,
    output_loss: Callable[[jax.Array, Example], jax.Array] | None = None,
    l2: float = 0.0,
    label_key: str | None = "y",
    config: Mapping[str, Any] | None = None,
) -> ModelSpec:
    """A ModelSpec for an NNX module.

    Args:
      model: a factory ``rngs -> module`` (``init(seed)`` builds ``model(nnx.Rngs(seed))``), or a module
        instance (``init`` then returns its own current params, whatever the seed).
      name, features, l2, label_key, config: as in ``ModelSpec``.
      loss_fn: per-example loss ``loss_fn(module, example) -> scalar`` (``example`` unbatched).
      output_fn, output_loss: optional ``output_fn(module, example) -> output`` and
        ``output_loss(output, example)`` with ``loss_fn(m, z) == output_loss(output_fn(m, z), z)``
        (for Gauss-Newton curvature).
    """
    module = model if isinstance(model, nnx.Module) else model(nnx.Rngs(0))
    graphdef, param_state, rest = nnx.split(module, nnx.Param, ...)
    like = param_state.to_pure_dict()

    def init(seed: int) -> Params:
        if isinstance(model, nnx.Module):
            return nnx_params(model)
        return nnx_params(model(nnx.Rngs(seed)))

    def merged(params: Params) -> nnx.Module:
        return nnx.merge(graphdef, _like_keys(params, like), rest)

    def loss(params: Params, example: Example) -> jax.Array:
        return loss_fn(merged(params), example)

    apply = None if output_fn is None else (lambda params, example: output_fn(merged(params), example))
    return ModelSpec(name=name, init=init, loss=loss, features=features, apply=apply,
                     output_loss=output_loss if output_fn is not None else None, l2=l2, label_key=label_key,
                     config=dict(config or {}))


__all__ = ["nnx_params", "nnx_spec"]
