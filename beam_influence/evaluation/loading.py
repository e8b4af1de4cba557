"""Import-path loading for ``evaluate``: a dataset factory and a training function given as ``pkg.module:name``.

Contracts (the digits defaults show them):

* dataset (``--data``, default ``beam_influence.models.digits:load_digits``): a callable
  ``load(*, test_fraction, label_noise, seed)`` returning an object with ``train`` and ``test`` (lists of
  records the spec decodes, each with a unique ``"id"``) and ``flipped_ids`` (ids of the training
  records whose label was flipped by ``label_noise``);
* training (``--train-fn``, default ``beam_influence.train:train``): a callable
  ``train(spec, batch, *, steps, learning_rate, batch_size, seed) -> params`` that is deterministic for
  a seed (the LDS retrains with it on every subset, from the same initialisation).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

DEFAULT_DATA = "beam_influence.models.digits:load_digits"
DEFAULT_TRAIN_FN = "beam_influence.train:train"


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


def load_callable(path: str, *, what: str) -> Callable:
    obj = load_object(path, what=what)
    if not callable(obj):
        raise TypeError(f"{what} {path!r} is a {type(obj).__name__}, expected a callable")
    return obj


__all__ = ["DEFAULT_DATA", "DEFAULT_TRAIN_FN", "load_object", "load_callable"]
