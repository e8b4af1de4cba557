"""Import-path loading for ``evaluate``: a dataset factory and a training function given as ``pkg.module:name``.

Contracts (the digits defaults show them):

* dataset (``--data``, default ``beam_influence.models.digits:load_digits``): a callable
  ``load(*, test_fraction, label_noise, seed)`` returning an object with ``train`` and ``test`` (lists of
  records the spec decodes, each with a unique ``"id"``) and ``flipped_ids`` (ids of the training
  records whose label was flipped by ``label_noise``);
* training (``--train_fn``, default ``beam_influence.train:train``): a callable
  ``train(spec, batch, *, steps, learning_rate, batch_size, seed) -> params`` that is deterministic for
  a seed (the LDS retrains with it on every subset, from the same initialisation).
"""
from __future__ import annotations

from typing import Callable

from beam_influence.core.model_spec import load_object

DEFAULT_DATA = "beam_influence.models.digits:load_digits"
DEFAULT_TRAIN_FN = "beam_influence.train:train"


def load_callable(path: str, *, what: str) -> Callable:
    obj = load_object(path, what=what)
    if not callable(obj):
        raise TypeError(f"{what} {path!r} is a {type(obj).__name__}, expected a callable")
    return obj


__all__ = ["DEFAULT_DATA", "DEFAULT_TRAIN_FN", "load_object", "load_callable"]
