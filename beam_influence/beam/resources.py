"""What a worker needs, referenced by path and loaded once per worker process.

``ModelRef`` is the small, picklable description that travels inside the pipeline (paths and
arguments, never arrays); ``InfluenceContext`` is the loaded thing (spec, params, eigensystem,
jitted projector), built once per process through ``apache_beam.utils.shared.Shared``.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any, Mapping

import numpy as np

from beam_influence.core.checkpoints import checkpoint_state
from beam_influence.core.eigensystem import Eigensystem
from beam_influence.core.model_spec import ModelSpec, fingerprint, load_spec


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """Where the model and its eigensystem live (paths readable through Beam's FileSystems)."""

    spec: str  # import path 'pkg.module:factory'
    checkpoint: str
    eigensystem: str
    spec_args: str = "{}"  # JSON object of factory keyword arguments
    method: str = "leafwise"  # projection method
    micro_batch: int | None = None

    def spec_kwargs(self) -> Mapping[str, Any]:
        return json.loads(self.spec_args)

    def load(self) -> "InfluenceContext":
        """Load spec, params and eigensystem; refuse an eigensystem computed for another model.

        Loaded once per process and file state: the launcher's pre-flight load is reused by an in-process
        runner's workers (same jitted projector, no second compile); a changed file is loaded again."""
        key = (self, checkpoint_state(self.checkpoint), _file_state(self.eigensystem))  # a file or an orbax dir
        with _CACHE_LOCK:
            ctx = _CACHE.get(key)
        if ctx is None:
            ctx = self._load()
            with _CACHE_LOCK:
                _CACHE.clear()  # one model per process: drop contexts of other refs / older files
                _CACHE[key] = ctx
        return ctx

    def _load(self) -> "InfluenceContext":
        spec = load_spec(self.spec, **self.spec_kwargs())
        try:
            params = spec.load_params(self.checkpoint)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"model checkpoint {self.checkpoint!r} not found: {e}") from None
        es = Eigensystem.load(self.eigensystem)
        es.check_model(fingerprint(spec, params), what=f"checkpoint {self.checkpoint!r}")
        return InfluenceContext(self, spec, params, es)


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def _file_state(path: str):
    """(size, mtime) of a local file, None for remote paths (cached by path only)."""
    import os

    if "://" in path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


class InfluenceContext:
    """Loaded model + eigensystem + a jitted projector (weak-referenceable, for ``Shared``)."""

    def __init__(self, ref: ModelRef, spec: ModelSpec, params, eigensystem: Eigensystem):
        from beam_influence.core.projection import make_projector

        self.ref, self.spec, self.params, self.eigensystem = ref, spec, params, eigensystem
        self.eigvals = np.asarray(eigensystem.eigvals, np.float64)
        self.projector = make_projector(spec.loss, eigensystem.eigvecs_tree(params), method=ref.method,
                                        micro_batch=ref.micro_batch)
        self.lock = threading.Lock()  # one batch at a time through the device per process


_SHARED = None
_SHARED_LOCK = threading.Lock()


def shared_context(ref: ModelRef) -> InfluenceContext:
    """The process-wide ``InfluenceContext`` for ``ref``: loaded on first use, then reused."""
    from apache_beam.utils.shared import Shared

    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = Shared()
    return _SHARED.acquire(ref.load, tag=repr(ref))
