"""What a worker needs, referenced by path and loaded once per worker process.

``ModelRef`` is the small, picklable description that travels inside the pipeline (paths and
arguments, never arrays); ``InfluenceContext`` is the loaded thing (spec, params, eigensystem,
jitted projector), built once per process (``ModelRef.load`` keeps a per-process cache).

On a worker with several accelerators (``ModelRef.devices``: default all local devices) the context
holds one copy of the params and eigenvectors per device, and ``ctx.projector`` sends successive
batches to the devices in turn (``DeviceProjectors``): dispatch is asynchronous, so the devices work
at once while one process feeds them. ``method="auto"`` picks method, micro-batch and compute dtype
for the device (``core.projection.choose_method``; docs/accelerators.md), and
``InfluenceContext.device_batch_size`` says how many rows a handler batch should hold on it.
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


SKETCH_SPACES = ("gradient", "kfac")  # the index's sketch of ∇ℓ (scalar complement) or of the K-FAC whitened residual


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """Where the model and its eigensystem live (paths readable through Beam's FileSystems)."""

    spec: str  # import path 'pkg.module:factory'
    checkpoint: str
    eigensystem: str
    spec_args: str = "{}"  # JSON object of factory keyword arguments
    method: str = "leafwise"  # projection method
    micro_batch: int | None = None
    compute_dtype: str | None = None  # e.g. "bfloat16" (leafwise/flat); None: float32, or the plan's with method="auto"
    devices: int = 0  # local devices that each hold a model copy (0: all)
    sketch_dim: int = 0  # d of the gradient sketch stored beside P(z) (0: none); see core.sketch
    sketch_seed: int = 0
    sketch_method: str = "count"  # core.sketch.METHODS
    query_gradients: str = ""  # .npz of test gradients projected beside U (the fused job's exact complement)
    kfac_self: bool = False  # also form each example's K-FAC complement self-term (column kfac_self)
    sketch_space: str = "gradient"  # what the sketch column holds: S∇ℓ, or "kfac": S v̄ (core.kfac.Complement.whitened)

    def __post_init__(self):
        if self.sketch_space not in SKETCH_SPACES:
            raise ValueError(f"sketch_space must be one of {SKETCH_SPACES}, got {self.sketch_space!r}")
        if self.sketch_space == "kfac" and not (self.sketch_dim and self.kfac_self):
            raise ValueError("a K-FAC sketch (sketch_space 'kfac') needs sketch_dim > 0 and kfac_self")

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


def sketch_record(ref: ModelRef, dtype: str = "float32") -> dict | None:
    """What an index manifest records of ``ref``'s gradient sketch, or None: the map (``{"dim", "requested",
    "seed", "method"}``) and how it is stored (``"dtype"``: ``core.sketch.STORAGE_DTYPES``; ``"scaling"``:
    ``"none"`` for float32, ``"row_max_abs"`` for 16-bit codes; ``"bytes_per_example"``). A manifest without
    ``dtype`` (written before 16-bit storage) holds float32 sketches."""
    from beam_influence.core.sketch import ROW_SCALING, check_storage_dtype

    if not ref.sketch_dim:
        return None
    sk = ref.load().sketch
    dtype = check_storage_dtype(dtype)
    return {**sk.describe(), "space": ref.sketch_space, "dtype": dtype,
            "scaling": "none" if dtype == "float32" else ROW_SCALING, "bytes_per_example": sk.bytes_per_example(dtype)}


def with_index_sketch(ref: ModelRef, manifest: Mapping[str, Any]) -> ModelRef:
    """``ref`` projecting with the gradient sketch the index was built with (none when it has none), in its
    space: a K-FAC index (``"space": "kfac"``) sketches each query's whitened residual too."""
    sk = (manifest.get("args") or {}).get("sketch") or {}
    dim = int(sk.get("requested", 0) or 0)
    space = str(sk.get("space", "gradient")) if dim else "gradient"
    return dataclasses.replace(ref, sketch_dim=dim, sketch_seed=int(sk.get("seed", 0) or 0),
                               sketch_method=str(sk.get("method", "count")), sketch_space=space,
                               kfac_self=space == "kfac")


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
        self.devices = worker_devices(ref.devices)
        eigensystem.id  # noqa: B018 - the content hash, while the host eigenvectors are still there
        self.sketch = self.basis_sketch = None
        eigvecs = eigensystem.eigvecs_tree(params)
        if ref.sketch_dim:
            from beam_influence.core.sketch import GradientSketch

            self.sketch = GradientSketch(params, ref.sketch_dim, ref.sketch_seed,
                                         "count" if ref.sketch_method == "exact" else ref.sketch_method)
            # (SU)ᵀ [k, d]; a K-FAC sketch is of the residual already (v̄ ⟂ U): nothing to subtract
            self.basis_sketch = (self.sketch.sketch_vectors(eigvecs) if ref.sketch_space == "gradient" else
                                 np.zeros((int(self.eigvals.shape[0]), self.sketch.dim)))
        self.query_ids: list[str] = []
        if ref.query_gradients:  # exact complement: project onto [U; ∇ℓ(z_test)] (k + Q directions)
            from beam_influence.core.complement import load_query_gradients

            self.query_ids, eigvecs = load_query_gradients(ref.query_gradients, eigvecs)
        # the memory plan (U, θ, m gradients, runtime, a K-FAC worker's buffers, against the free memory) picks
        # m, or refuses
        k, p = int(self.eigvals.shape[0]), _num_params(params)
        extra = ()
        if ref.kfac_self and getattr(eigensystem, "kfac", None):
            from beam_influence.core.memory import kfac_buffers

            extra = kfac_buffers(p=p, k=k, factor_bytes=sum(np.asarray(v).nbytes for v in eigensystem.kfac.values()),
                                 platform=self.devices[0].platform, in_projector=ref.method != "jvp")
        self.plan = projection_plan(ref, k=k, num_params=p, device=self.devices[0],
                                    query_directions=len(self.query_ids), extra_buffers=extra)
        self.memory_plan = self.plan.memory
        # the sketch the K-FAC step applies to each row's whitened residual (a K-FAC index), else None
        self.kfac_sketch = self.sketch if ref.sketch_space == "kfac" else None
        self.kfac = None  # core.kfac.Complement from the eigensystem's saved factors, when ref.kfac_self
        if ref.kfac_self:
            from beam_influence.beam.complement_term import kfac_complement

            self.kfac = kfac_complement(self)
        # the K-FAC self-term and whitened sketch from the projector's own per-example gradients (jvp forms none:
        # then the Complement's own step forms them, beam.project)
        extra = self.kfac.per_example(self.kfac_sketch) if self.kfac is not None and self.plan.method != "jvp" else None
        self._pending_u = eigvecs  # handed over without a second reference in this frame
        del eigvecs
        eigvecs = self._hold_u_once()
        self.projector = make_projector(spec.loss, eigvecs, method=self.plan.method, micro_batch=self.plan.micro_batch,
                                        compute_dtype=self.plan.compute_dtype,
                                        sketch=self.sketch if ref.sketch_space == "gradient" else None, extra=extra)
        del eigvecs
        self.lock = threading.Lock()  # one batch at a time through the device per process
        self.compiled_shapes: set = set()  # batch shapes the projector has been compiled for (progress lines)
        if len(self.devices) > 1:  # one model copy per device; batches go to the devices in turn
            self.projector = DeviceProjectors(self.projector, params, self.devices)

    def _hold_u_once(self):
        """U lives once. On a CPU device with the projector's operand U itself (float32, leafwise, one
        device, no query gradients beside it), each block is put on the device and the host block freed
        before the next (peak U + one block, not 2U); ``eigensystem.eigvecs`` then reads the device
        buffers zero-copy (``np.from_dlpack``). Returns the tree to build the projector from."""
        import jax

        eigvecs = self.__dict__.pop("_pending_u")
        if (self.query_ids or self.plan.method == "flat" or self.plan.compute_dtype is not None
                or len(self.devices) > 1 or self.devices[0].platform != "cpu"):
            return eigvecs
        paths = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(self.params)]
        blocks = dict(self.eigensystem.eigvecs)
        if set(paths) != set(blocks) or any(np.asarray(b).dtype != np.float32 for b in blocks.values()):
            return eigvecs
        treedef = jax.tree.structure(eigvecs)
        del eigvecs
        object.__setattr__(self.eigensystem, "eigvecs", blocks)  # the only reference to the host blocks now
        moved = []
        for key in paths:
            dev = jax.device_put(np.ascontiguousarray(blocks[key]), self.devices[0])
            dev.block_until_ready()
            blocks[key] = np.from_dlpack(dev)  # the host block is freed here
            moved.append(dev)
        return jax.tree.unflatten(treedef, moved)

    def device_batch_size(self, requested: int | None = None) -> int:
        """Rows per handler batch for these devices: ``requested`` rounded up to a multiple of the
        micro-batch (no padded micro-batch inside a call); default max(m, 64) rows per device call
        (``DEFAULT_ROWS_PER_DEVICE``), i.e. at least one full micro-batch m for each device in turn."""
        m = self.plan.micro_batch or DEFAULT_ROWS_PER_DEVICE
        if requested is None:
            return -(-max(m, DEFAULT_ROWS_PER_DEVICE) // m) * m
        if requested < 1:
            raise ValueError(f"batch size must be ≥ 1, got {requested}")
        return requested if requested <= m else -(-requested // m) * m


DEFAULT_ROWS_PER_DEVICE = 64


def _num_params(params) -> int:
    import jax

    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def worker_devices(devices: int = 0) -> list:
    """The local devices a worker process puts a model copy on: 0 → all, D → the first D."""
    import jax

    local = jax.local_devices()
    if isinstance(devices, bool) or not isinstance(devices, (int, np.integer)) or not 0 <= devices <= len(local):
        raise ValueError(f"devices={devices!r}: this worker process has {len(local)} local device(s) "
                         f"({local[0].platform}); use 0 (all) or 1..{len(local)}")
    return list(local[: devices or len(local)])


def projection_plan(ref: ModelRef, *, k: int, num_params: int, device=None, query_directions: int = 0,
                    extra_buffers=()):
    """The projector arguments for ``ref``: ``choose_method``'s plan when ``ref.method == "auto"``, else
    ``ref``'s own method, micro-batch and compute dtype (a ``ProjectionPlan``; micro_batch may be None:
    ``make_projector``'s default)."""
    from beam_influence.core.projection import ProjectionPlan, choose_method

    if ref.method == "auto":
        return choose_method(batch_size=max(ref.micro_batch or 0, 1 << 20), k=k, num_params=num_params,
                             device=device, micro_batch=ref.micro_batch, compute_dtype=ref.compute_dtype,
                             query_directions=query_directions, extra_buffers=extra_buffers)
    return ProjectionPlan(ref.method, ref.micro_batch, ref.compute_dtype, "as given by the ModelRef")


class DeviceProjectors:
    """A ``Projector`` per device (params and eigenvectors copied to each once), called like one.

    ``self(params, batch)`` runs the batch on the next device in turn and returns that device's
    ``ProjectionOutput`` (asynchronously: the caller fetches the results of several batches at once, and
    the devices compute them in parallel). ``params`` is the context's params (then that device's copy is
    used) or any params pytree (copied to the device for this call). One executable per device and batch
    shape: ``cache_size()`` is the number of devices after every device has seen one batch.
    """

    def __init__(self, projector, params, devices: list):
        import copy

        import jax

        self.base, self.params, self.devices = projector, params, list(devices)
        self.copies, self.replicas = [], []
        for dev in self.devices:
            c = copy.copy(projector)
            c.eigvecs = jax.device_put(projector.eigvecs, dev)
            for name in ("sketch_operands", "extra_operands"):
                if getattr(projector, name, None) is not None:
                    setattr(c, name, jax.device_put(getattr(projector, name), dev))
            self.copies.append(c)
            self.replicas.append(jax.device_put(params, dev))
        self._next = 0
        self._turn = threading.Lock()

    def __getattr__(self, name):  # method, micro_batch, k, eigvecs, jitted, ... of the base projector
        return getattr(self.base, name)

    def __call__(self, params, batch):
        import jax

        with self._turn:
            i = self._next
            self._next = (i + 1) % len(self.devices)
        dev = self.devices[i]
        p = self.replicas[i] if params is self.params else jax.device_put(params, dev)
        return self.copies[i](p, jax.device_put(batch, dev))

    def cache_size(self) -> int:
        return self.base.cache_size()

    def __repr__(self) -> str:
        return f"DeviceProjectors({self.base!r}, devices={[str(d) for d in self.devices]})"
