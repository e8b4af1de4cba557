"""ModelSpec: the one contract between a user's model and beam-influence.

A spec says how to build parameters, the per-example loss ``loss(params, example) -> scalar``
(``example`` is a dict of *unbatched* arrays), how a raw record (a dict read from Parquet, JSONL,
npz or tf.Example) decodes into such an example, and which features it needs (for validation).

Users point at their own spec by import path: ``my_pkg.my_module:make_spec`` (a factory function
called with keyword arguments) or ``my_pkg.my_module:SPEC`` (an instance). Importing the module runs its
code (a spec path is trusted like the code it names); a path naming anything but a ModelSpec or a factory
function of the user's own module (``os:system``, a class, a builtin) is refused before it is called.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import re
import sys
import types
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from beam_influence.core.types import Example, Params, Record


class RecordError(ValueError):
    """A record cannot be decoded into an example (missing field, wrong shape or dtype)."""


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One decoded feature: its shape (per example) and dtype.

    A fixed-shape feature has ``shape`` of ints. A variable-length token sequence has ``shape=(None,)``
    and ``buckets``: the few lengths it is padded to (``pad_id`` fills the tail). Decoding then adds a
    boolean ``<name>_mask`` (True on real tokens) and an int32 ``bucket`` (the bucket index of the example:
    the smallest i with every sequence feature's length ≤ its ``buckets[i]``; all sequence features of a
    spec have the same number of buckets). A sequence longer than the largest bucket is rejected, or cut
    to it with ``truncate=True``; one shorter than ``min_length`` is rejected (a dead letter with the reason:
    an empty target has a loss and gradient of exactly 0, so it could never surface as a suspect). See
    ``beam_influence.core.buckets``::

        FeatureSpec(shape=(None,), dtype="int32", buckets=(16, 32, 64), pad_id=0, min=0, max=vocab - 1,
                    min_length=1)
    """

    shape: tuple[int | None, ...]
    dtype: str
    min: float | None = None  # inclusive bounds checked on decode (e.g. class labels, token ids)
    max: float | None = None
    buckets: tuple[int, ...] | None = None  # sequence features only: increasing pad lengths
    pad_id: int = 0  # sequence features only: the value padding positions hold
    truncate: bool = False  # sequence features only: cut a too-long sequence instead of rejecting it
    min_length: int = 0  # sequence features only: a shorter sequence is rejected (e.g. 1 for a target)

    def __post_init__(self):
        ml = self.min_length
        if isinstance(ml, bool) or not isinstance(ml, (int, np.integer)) or ml < 0:
            raise ValueError(f"FeatureSpec min_length must be an int ≥ 0, got {ml!r}")
        if self.buckets is None:
            if isinstance(self.shape, tuple) and None in self.shape:
                raise ValueError(f"FeatureSpec with shape {self.shape}: a variable-length (None) axis needs "
                                 "buckets=(...) (the lengths it is padded to), e.g. buckets=(16, 32, 64)")
            if ml:
                raise ValueError(f"FeatureSpec min_length={ml} applies to sequence features only (shape (None,) "
                                 f"with buckets); this one has shape {self.shape}")
            return
        b = tuple(self.buckets)
        if tuple(self.shape) != (None,):
            raise ValueError(f"FeatureSpec with buckets {b} must have shape (None,) (a 1-D token sequence), "
                             f"got {self.shape}")
        if not b or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1 for x in b) \
                or list(b) != sorted(set(b)):
            raise ValueError(f"FeatureSpec buckets must be strictly increasing ints ≥ 1, got {self.buckets!r}")
        if np.dtype(self.dtype).kind not in "iu":
            raise ValueError(f"FeatureSpec with buckets: dtype must be an integer type (token ids), got {self.dtype}")
        if ml > b[-1]:
            raise ValueError(f"FeatureSpec min_length {ml} exceeds its largest bucket {b[-1]}: no sequence could fit")
        object.__setattr__(self, "buckets", tuple(int(x) for x in b))
        object.__setattr__(self, "min_length", int(ml))

    @property
    def is_sequence(self) -> bool:
        """True for a variable-length token sequence (``shape=(None,)`` with ``buckets``)."""
        return self.buckets is not None


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
      render: optional ``render(fields) -> {caption: text}``: an example as text for reports, from a record's
        fields or a decoded example (e.g. token ids detokenized; ``<name>_mask`` applied when present).
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
    render: Callable[[Mapping[str, Any]], Mapping[str, str]] | None = None

    # ---- records -> arrays -------------------------------------------------------------------
    def decode(self, record: Record) -> Example:
        """Decode one raw record into an example of numpy arrays; raise RecordError if it does not fit.

        The same checks and reasons as ``decode_batch`` (it decodes a one-row batch)."""
        from beam_influence.core.decode import record_batch

        try:
            batch = record_batch(record, [k for k in self.features if k in record])
        except ValueError as e:
            raise RecordError(str(e)) from None
        if batch.num_rows == 0 or not batch.schema.names:
            missing = next(iter(self.features))
            raise RecordError(f"record is missing feature {missing!r} (has {sorted(record)})")
        dec = self.decode_batch(batch)
        if dec.rejected:
            reason = dec.rejected[0][2]
            if "is missing feature" in reason:
                reason = reason.split(" (has ")[0] + f" (has {sorted(record)})"
            raise RecordError(reason)
        return {k: v[0] for k, v in dec.arrays.items()}

    def decode_batch(self, batch) -> "DecodedBatch":
        """Decode an Arrow ``RecordBatch``/``Table`` of raw records column-wise (numpy checks per column).

        Returns a ``DecodedBatch``: the good rows as arrays ``{feature: [n, *shape]}``, their ids and
        positions, and every rejected row with its reason (shape, dtype, range, finiteness, missing)."""
        from beam_influence.core.decode import decode_columns

        return decode_columns(self.features, batch)

    def stack(self, examples: list[Example]) -> Example:
        """Stack decoded examples into a batch: each feature (and mask/bucket array) gets a leading batch axis."""
        from beam_influence.core.buckets import decoded_keys

        return {k: np.stack([e[k] for e in examples]) for k in decoded_keys(self.features)}

    # ---- objective --------------------------------------------------------------------------
    def batch_loss(self, params: Params, batch: Example) -> jax.Array:
        """Training objective on a batch: mean ℓ(z, θ) + l2/2 ‖θ‖²."""
        losses = jax.vmap(self.loss, in_axes=(None, 0))(params, batch)
        return jnp.mean(losses) + 0.5 * self.l2 * l2_norm_sq(params)

    # ---- checkpoints ------------------------------------------------------------------------
    def save_params(self, path: str, params: Params, *, form: str | None = None) -> str:
        """Write params (no pickle): msgpack by default, safetensors for ``*.safetensors``, an orbax
        directory for ``form="orbax"`` or a path ending in ``/``; see ``core.checkpoints.save_checkpoint``."""
        from beam_influence.core.checkpoints import save_checkpoint

        return save_checkpoint(path, params, form=form)

    def load_params(self, path: str, *, params_key: str | None = None, form: str | None = None) -> Params:
        """Read params from an orbax directory, a safetensors file, or msgpack of params, ``{"params": …}``
        or a TrainState; validate structure, shapes, dtypes and finiteness against ``init``.

        ``params_key`` (or a ``path#key/path`` suffix) selects the params subtree, found automatically
        when unset. Any problem with the content is a ValueError (``CheckpointError``) naming the file,
        the form and what was expected; a file that cannot be read is a FileNotFoundError naming it.
        See ``beam_influence.core.checkpoints``."""
        from beam_influence.core.checkpoints import load_checkpoint

        template = jax.eval_shape(lambda: self.init(0))
        return load_checkpoint(path, template, params_key=params_key, form=form, spec_name=self.name)


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


def check_spec(spec: ModelSpec, params: Params, example: Example) -> None:
    """Check a spec up front, on its params and one decoded example, before any expensive work.

    Raises ValueError (naming the spec and what is wrong) unless: every FeatureSpec is sane (shape a
    tuple of non-negative ints, dtype a numeric numpy dtype, bounds numbers with min ≤ max); the example
    has every feature in its declared shape; ``spec.loss(params, example)`` returns a per-example
    *scalar* float (checked abstractly with ``jax.eval_shape`` first, so a per-token loss is refused
    without running the model) that is finite on this example; and ``jax.grad`` of the loss has the
    params' structure and leaf shapes, with finite values. Pure JAX; compiles the loss once.
    """
    who = f"model spec {spec.name!r}"
    # ---- features
    if not isinstance(spec.features, Mapping) or not spec.features:
        raise ValueError(f"{who}: features must be a non-empty mapping of name -> FeatureSpec, "
                         f"got {spec.features!r}")
    for key, fs in spec.features.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{who}: feature names must be non-empty strings, got {key!r}")
        if not isinstance(fs, FeatureSpec):
            raise ValueError(f"{who}: feature {key!r} must be a FeatureSpec, got {type(fs).__name__}")
        if fs.is_sequence:
            pass  # (None,) with buckets: validated by FeatureSpec itself
        elif not isinstance(fs.shape, tuple) or not all(
                isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in fs.shape):
            raise ValueError(f"{who}: feature {key!r} has shape {fs.shape!r}; it must be a tuple of "
                             "non-negative ints (e.g. (), (64,), (8, 8, 1))")
        try:
            dt = np.dtype(fs.dtype)
        except TypeError as e:
            raise ValueError(f"{who}: feature {key!r} has dtype {fs.dtype!r}, not a numpy dtype ({e})") from None
        if dt.kind not in "biuf":
            raise ValueError(f"{who}: feature {key!r} has dtype {dt}; it must be a numeric (bool, int, "
                             "float) numpy dtype")
        for bound in ("min", "max"):
            b = getattr(fs, bound)
            if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float, np.number))
                                  or not np.isfinite(b)):
                raise ValueError(f"{who}: feature {key!r} has {bound}={b!r}; it must be None or a finite number")
        if fs.min is not None and fs.max is not None and fs.min > fs.max:
            raise ValueError(f"{who}: feature {key!r} has min {fs.min} > max {fs.max}")
    from beam_influence.core.buckets import check_sequence_features, decoded_keys

    try:
        check_sequence_features(spec.features)
    except ValueError as e:
        raise ValueError(f"{who}: {e}") from None
    keys = decoded_keys(spec.features)
    missing = [k for k in keys if k not in example]
    if missing:
        raise ValueError(f"{who}: the example has no feature(s) {missing} (has {sorted(example)})")
    for key, fs in spec.features.items():
        got = tuple(np.shape(example[key]))
        ok = (len(got) == 1 and got[0] in fs.buckets) if fs.is_sequence else got == fs.shape
        if not ok:
            want = f"(L,) with L one of its buckets {fs.buckets}" if fs.is_sequence else f"{fs.shape}"
            raise ValueError(f"{who}: feature {key!r} of the example has shape {got}, "
                             f"the spec declares {want} (pass one decoded, unbatched example)")
    example = {k: example[k] for k in keys}

    # ---- the loss, abstractly: a per-example scalar float
    try:
        out = jax.eval_shape(spec.loss, params, example)
    except Exception as e:  # noqa: BLE001 - any tracing failure is the spec's
        raise ValueError(f"{who}: loss(params, example) fails on one example ({type(e).__name__}: {e})") from None
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ValueError(f"{who}: loss(params, example) must return a per-example scalar (one array of shape "
                         f"()), it returned a {type(out).__name__}: {jax.tree.map(lambda a: a.shape, out)}")
    if out.shape != ():
        raise ValueError(f"{who}: loss(params, example) must return a per-example scalar (shape ()), it "
                         f"returned shape {tuple(out.shape)} {out.dtype} (a per-token or per-class loss?); "
                         "reduce it inside the loss, e.g. with jnp.sum or jnp.mean over tokens")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"{who}: loss(params, example) must return a float scalar, it returned dtype {out.dtype}")

    # ---- the gradient, abstractly: shaped like params
    try:
        grad_shape = jax.eval_shape(jax.grad(spec.loss), params, example)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{who}: jax.grad of the loss fails ({type(e).__name__}: {e}); the loss must be "
                         "differentiable in every (float) parameter") from None
    if jax.tree.structure(grad_shape) != jax.tree.structure(params):
        raise ValueError(f"{who}: jax.grad of the loss has structure {jax.tree.structure(grad_shape)}, "
                         f"the params have {jax.tree.structure(params)}")
    for (kp, g), p in zip(jax.tree_util.tree_leaves_with_path(grad_shape), jax.tree.leaves(params)):
        if tuple(g.shape) != tuple(np.shape(p)):
            raise ValueError(f"{who}: the gradient of parameter {jax.tree_util.keystr(kp)} has shape "
                             f"{tuple(g.shape)}, the parameter has {tuple(np.shape(p))}")

    # ---- concretely, on this example: finite loss and gradient
    try:
        value, grad = jax.jit(jax.value_and_grad(spec.loss))(params, example)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{who}: evaluating the loss and its gradient on one example fails "
                         f"({type(e).__name__}: {e})") from None
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{who}: loss(params, example) is {value} on the first example; it must be finite "
                         "(check the loss for log(0), 0/0 or overflow, and the params for NaN/inf)")
    for kp, g in jax.tree_util.tree_leaves_with_path(grad):
        if not bool(jnp.all(jnp.isfinite(g))):
            raise ValueError(f"{who}: the gradient of the loss on the first example is not finite in parameter "
                             f"{jax.tree_util.keystr(kp)} (the loss value {value:.6g} is)")


def load_object(path: str, *, what: str) -> Any:
    """The attribute ``name`` of module ``pkg.module`` for ``path = "pkg.module:name"``; ``what`` names it in errors."""
    if not isinstance(path, str) or ":" not in path:
        raise ValueError(f"{what} {path!r} must look like 'pkg.module:name' (module, colon, attribute)")
    module_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of {what} {path!r}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} ({what} {path!r})") from None


@functools.lru_cache(maxsize=1)
def _foreign_packages() -> frozenset[str]:
    """Top-level modules a spec factory may not come from: the standard library, and the packages
    beam-influence itself depends on (numpy, jax, apache_beam, ...: none of them defines a ModelSpec factory)."""
    names = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    try:
        from importlib import metadata

        dists = {re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0].lower().replace("_", "-")
                 for r in (metadata.requires("beam-influence") or []) if "extra ==" not in r}
        for top, owners in metadata.packages_distributions().items():
            if any(o.lower().replace("_", "-") in dists for o in owners):
                names.add(top)
    except Exception:  # noqa: BLE001 - no metadata (not installed): the standard library only
        pass
    return frozenset(names)


def check_spec_factory(obj: Any, path: str) -> None:
    """Refuse, before calling it, an object that is not a ModelSpec factory: ``--spec os:system`` must not
    run ``os.system``. A factory is a plain Python function (not a class, a builtin, a bound method or another
    callable object) defined in the very module the path names (not imported into it) and that module is not
    part of the standard library or of beam-influence's own dependencies. Raises TypeError saying how to fix.

    Importing the module of a spec runs that module's code: a spec path is trusted like the code it names
    (see the README's security notes); this check only stops a path from naming some other callable."""
    module_name, attr = path.split(":", 1)
    how = ("a spec path must name a ModelSpec, or a function defined in your own module that returns one "
           "(e.g. 'my_pkg.my_module:make_spec')")
    if not isinstance(obj, types.FunctionType):
        kind = "class" if isinstance(obj, type) else type(obj).__name__
        raise TypeError(f"model spec {path!r} is a {kind}, not a ModelSpec or a spec factory function; refusing to "
                        f"call it. {how}")
    if obj.__module__ != module_name:
        raise TypeError(f"model spec {path!r} names a function defined in module {obj.__module__!r}, not in "
                        f"{module_name!r}; refusing to call it. Name it where it is defined "
                        f"('{obj.__module__}:{obj.__qualname__}') if that is your spec factory")
    top = module_name.split(".", 1)[0]
    if top in _foreign_packages():
        raise TypeError(f"model spec {path!r} is a function of {top!r} (the standard library or a dependency of "
                        f"beam-influence), not a spec factory; refusing to call it. {how}")


def load_spec(path: str, **kwargs: Any) -> ModelSpec:
    """Load a ModelSpec by import path ``pkg.module:name``: a ModelSpec, or a factory function called with
    ``kwargs`` (checked before the call: ``check_spec_factory``)."""
    obj = load_object(path, what="model spec")
    if isinstance(obj, ModelSpec):
        spec = obj
    else:
        check_spec_factory(obj, path)
        spec = obj(**kwargs)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"{path!r} gave a {type(spec).__name__}, expected a beam_influence.ModelSpec")
    return spec


def probe_example(spec) -> dict:
    """A synthetic example of the spec's features (zeros, moved into [min, max]) for the up-front check."""
    import numpy as np

    out = {}
    for key, fs in spec.features.items():
        value = 0.0
        if fs.min is not None:
            value = max(value, fs.min)
        if fs.max is not None:
            value = min(value, fs.max)
        if getattr(fs, "buckets", None) is not None:  # a token sequence: in its smallest bucket, with mask
            from beam_influence.core.buckets import probe_sequence

            out.update(probe_sequence(key, fs, value))
            continue
        out[key] = np.full(tuple(fs.shape), value, dtype=fs.dtype)
    return out
