"""ModelSpec: the one contract between a user's model and beam-influence.

A spec says how to build parameters, the per-example loss ``loss(params, example) -> scalar``
(``example`` is a dict of *unbatched* arrays), how a raw record (a dict read from Parquet, JSONL,
npz or tf.Example) decodes into such an example, and which features it needs (for validation).

Users point at their own spec by import path: ``my_pkg.my_module:make_spec`` (a factory called
with keyword arguments) or ``my_pkg.my_module:SPEC`` (an instance).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from beam_influence.core.files import read_bytes, write_bytes
from beam_influence.core.types import Example, Params, Record


class RecordError(ValueError):
    """A record cannot be decoded into an example (missing field, wrong shape or dtype)."""


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One decoded feature: its shape (per example) and dtype."""

    shape: tuple[int, ...]
    dtype: str
    min: float | None = None  # inclusive bounds checked on decode (e.g. class labels)
    max: float | None = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model contract.

    Attributes:
      name: architecture name; part of the fingerprint.
      init: ``init(seed) -> params`` (a pytree of arrays).
      loss: per-example loss ``loss(params, example) -> scalar``; ``example`` maps feature names to
        unbatched arrays shaped as in ``features``.
      features: feature name -> FeatureSpec; ``decode`` must produce exactly these.
      apply: optional ``apply(params, example) -> output`` (e.g. logits), needed for Gauss-Newton curvature.
      output_loss: optional ``output_loss(output, example) -> scalar`` with
        ``loss(p, z) == output_loss(apply(p, z), z)``; needed for Gauss-Newton curvature.
      l2: weight of the L2 term of the training objective ``L = mean ℓ + l2/2 ‖θ‖²``.
      label_key: which feature is the label (for reports); optional.
      config: JSON-serialisable arguments that built the spec; part of the fingerprint.
    """

    name: str
    init: Callable[[int], Params]
    loss: Callable[[Params, Example], jax.Array]
    features: Mapping[str, FeatureSpec]
    apply: Callable[[Params, Example], jax.Array] | None = None
    output_loss: Callable[[jax.Array, Example], jax.Array] | None = None
    l2: float = 0.0
    label_key: str | None = "y"
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    # ---- records -> arrays -------------------------------------------------------------------
    def decode(self, record: Record) -> Example:
        """Decode one raw record into an example of numpy arrays; raise RecordError if it does not fit."""
        out = {}
        for key, fs in self.features.items():
            if key not in record:
                raise RecordError(f"record is missing feature {key!r} (has {sorted(record)})")
            value = record[key]
            try:
                raw = np.asarray(value)
                if raw.dtype.kind in "OSU":
                    raise ValueError(f"holds {raw.dtype.kind!r}-kind values")
                arr = raw.astype(fs.dtype)
            except (TypeError, ValueError) as e:
                raise RecordError(f"feature {key!r} is not convertible to {fs.dtype}: {e}") from None
            if arr.shape != tuple(fs.shape):
                if arr.size == int(np.prod(fs.shape)) and arr.ndim <= 1:
                    arr = arr.reshape(fs.shape)
                else:
                    raise RecordError(f"feature {key!r} has shape {arr.shape}, expected {tuple(fs.shape)}")
            if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
                raise RecordError(f"feature {key!r} holds non-finite values")
            if (fs.min is not None and np.any(arr < fs.min)) or (fs.max is not None and np.any(arr > fs.max)):
                raise RecordError(f"feature {key!r} is out of range [{fs.min}, {fs.max}]: {arr.min()}..{arr.max()}")
            out[key] = arr
        return out

    def stack(self, examples: list[Example]) -> Example:
        """Stack decoded examples into a batch: each feature gets a leading batch axis."""
        return {k: np.stack([e[k] for e in examples]) for k in self.features}

    # ---- objective --------------------------------------------------------------------------
    def batch_loss(self, params: Params, batch: Example) -> jax.Array:
        """Training objective on a batch: mean ℓ(z, θ) + l2/2 ‖θ‖²."""
        losses = jax.vmap(self.loss, in_axes=(None, 0))(params, batch)
        return jnp.mean(losses) + 0.5 * self.l2 * l2_norm_sq(params)

    # ---- checkpoints ------------------------------------------------------------------------
    def save_params(self, path: str, params: Params) -> None:
        """Write params as msgpack (flax.serialization; no pickle)."""
        write_bytes(path, serialization.to_bytes(jax.device_get(params)))

    def load_params(self, path: str) -> Params:
        """Read params written by ``save_params``; validate structure, shapes and dtypes against ``init``."""
        template = jax.eval_shape(lambda: self.init(0))
        raw = read_bytes(path)
        try:
            state = serialization.msgpack_restore(raw)
        except Exception as e:  # noqa: BLE001 - any decoding failure is a corrupt file
            raise ValueError(f"checkpoint {path!r} is not a valid msgpack params file: {e}") from None
        params = serialization.from_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template), state)
        for (kp, want), got in zip(jax.tree_util.tree_leaves_with_path(template), jax.tree.leaves(params)):
            if tuple(np.shape(got)) != tuple(want.shape):
                raise ValueError(
                    f"checkpoint {path!r}: parameter {jax.tree_util.keystr(kp)} has shape {np.shape(got)}, "
                    f"the spec {self.name!r} expects {want.shape}"
                )
        return jax.tree.map(lambda x, s: np.asarray(x, dtype=s.dtype), params, template)


def l2_norm_sq(params: Params) -> jax.Array:
    """‖θ‖² over all leaves."""
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))


def fingerprint(spec: ModelSpec, params: Params) -> str:
    """sha256 over the architecture (name, config, leaf paths, shapes, dtypes) and the parameter bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({"name": spec.name, "config": dict(spec.config), "l2": spec.l2}, sort_keys=True).encode())
    for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(kp)}|{arr.shape}|{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:32]


def load_spec(path: str, **kwargs: Any) -> ModelSpec:
    """Load a ModelSpec by import path ``pkg.module:name``; callables are called with ``kwargs``."""
    if ":" not in path:
        raise ValueError(f"model spec {path!r} must look like 'pkg.module:factory' (module, colon, attribute)")
    module_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of model spec {path!r}: {e}") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (model spec {path!r})") from None
    spec = obj(**kwargs) if callable(obj) and not isinstance(obj, ModelSpec) else obj
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"{path!r} gave a {type(spec).__name__}, expected a beam_influence.ModelSpec")
    return spec
