"""``ProjectChunks``: ``formats.Chunk``s → ``ProjectedChunk``s of index rows, through RunInference.

    Chunk ─ DecodeChunks ─┬─ DecodedChunk ─ RunInference(ProjectionModelHandler) ─ SplitDeadRows ─┬─ ProjectedChunk
                          └─ dead letter (read errors, rejected rows)          failed batches ─┴─ dead letter

The element is a batch (one chunk of up to ``batch_rows`` records), never a record: decoding is
column-wise (``ModelSpec.decode_batch``), the handler projects a chunk in fixed batches of B (the last
one padded, so one compiled shape per worker; token sequences per bucket, one shape per bucket, results
scattered back to row order by ``core.buckets``) with the model, checkpoint and eigensystem loaded once
per process by RunInference, and emits an Arrow table of index rows::

    id: string, projection: fixed_size_list<float32>[k], loss: float64, self_influence: float64,
    label: int64 (null when the spec has none), then every other record field as it came (Arrow columns)

Rows with a non-finite loss or gradient, rejected rows and whole failed batches (an exception in the
handler, through ``with_exception_handling``) become dead-letter rows ``{id, stage, reason, raw}``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from beam_influence import formats
from beam_influence.core.buckets import BUCKET_KEY
from beam_influence.beam.resources import InfluenceContext, ModelRef

NAMESPACE = "beam_influence"
DEAD_LETTER = "dead_letter"
RESERVED = ("id", "projection", "loss", "self_influence", "label", "grad_sq_norm", "sketch", "sketch_scale",
            "query_dots", "kfac_self")
SKETCH_DTYPE_KEY = b"beam_influence.sketch_dtype"  # Arrow field metadata of a 16-bit sketch column
SKETCH_SCALING_KEY = b"beam_influence.sketch_scaling"
MAX_RAW = 100_000


def _json_safe(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def dead_letter(record_id: Any, stage: str, reason: str, raw: Any) -> dict:
    """A dead-letter row: which record, at which stage, why, and the raw record (JSON text)."""
    if isinstance(raw, (bytes, bytearray)):
        text = bytes(raw[:MAX_RAW]).decode("latin-1")
    elif isinstance(raw, str):
        text = raw[:MAX_RAW]
    else:
        text = json.dumps(_json_safe(raw), sort_keys=True, default=repr)[:MAX_RAW]
    return {"id": None if record_id is None else str(record_id), "stage": stage, "reason": reason, "raw": text}


@dataclasses.dataclass
class DecodedChunk:
    """The good rows of one chunk: features as arrays, the other fields as an Arrow table."""

    source: str
    offset: int
    records: int  # records the source chunk covered (good + bad)
    ids: np.ndarray
    arrays: dict[str, np.ndarray]
    passthrough: pa.Table  # the non-feature fields of the good rows (no id)
    digest: str = ""  # formats.chunk_digest of the chunk as read (kept by the index for read-back)


@dataclasses.dataclass
class ProjectedChunk:
    """Index rows of one chunk (schema in the module docstring) and its non-finite rows."""

    source: str
    offset: int
    records: int
    table: pa.Table
    dead: list[dict] = dataclasses.field(default_factory=list)
    digest: str = ""  # formats.chunk_digest of the source chunk


class DecodeChunkFn(beam.DoFn):
    """Chunk → DecodedChunk (main) + dead letters (read errors, rows the spec rejects)."""

    def __init__(self, ref: ModelRef):
        super().__init__()
        self.ref = ref
        self.good = Metrics.counter(NAMESPACE, "records_decoded")
        self.bad = Metrics.counter(NAMESPACE, "records_dead_lettered")

    def setup(self):
        from beam_influence.core.model_spec import load_spec

        self.spec = load_spec(self.ref.spec, **self.ref.spec_kwargs())

    def process(self, chunk: formats.Chunk) -> Iterator[Any]:
        for err in chunk.errors:
            self.bad.inc()
            yield pvalue.TaggedOutput(DEAD_LETTER, dead_letter(err.id, "read", err.reason, err.raw))
        batch = chunk.batch
        if batch.num_rows == 0:
            if chunk.records:
                yield DecodedChunk(chunk.source, chunk.offset, chunk.records, np.zeros(0, str), {}, pa.table({}),
                                   formats.chunk_digest(chunk))
            return
        dec = self.spec.decode_batch(batch)
        for pos, rid, reason in dec.rejected:  # error path: one row at a time
            self.bad.inc()
            yield pvalue.TaggedOutput(DEAD_LETTER, dead_letter(rid, "decode", reason, batch.slice(pos, 1).to_pylist()[0]))
        keep = [c for c in batch.schema.names if c != "id" and c not in self.spec.features]
        rest = pa.Table.from_batches([batch.select(keep)]) if keep else pa.table({})
        if dec.n != batch.num_rows and keep:
            rest = rest.take(pa.array(dec.rows))
        if BUCKET_KEY in dec.arrays:  # token sequences: the bucket of each example becomes an index column
            if BUCKET_KEY in rest.column_names:
                rest = rest.rename_columns([f"record_{c}" if c == BUCKET_KEY else c for c in rest.column_names])
            rest = rest.append_column(BUCKET_KEY, pa.array(dec.arrays[BUCKET_KEY].astype(np.int32))) \
                if rest.num_columns else pa.table({BUCKET_KEY: pa.array(dec.arrays[BUCKET_KEY].astype(np.int32))})
        self.good.inc(dec.n)
        yield DecodedChunk(chunk.source, chunk.offset, chunk.records, dec.ids, dec.arrays, rest,
                           formats.chunk_digest(chunk))


def _fixed_list(values: np.ndarray) -> pa.Array:
    n, k = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values, np.float32).reshape(-1)), k)


class ProjectionModelHandler(ModelHandler):
    """RunInference handler: DecodedChunk → ProjectedChunk.

    ``load_model`` loads spec, checkpoint and eigensystem (``ModelRef.load``: fingerprints checked) and
    jits the projector; ``run_inference`` projects each chunk in fixed batches of ``batch_size``."""

    def __init__(self, ref: ModelRef, batch_size: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.ref, self.batch_size = ref, batch_size

    def load_model(self) -> InfluenceContext:
        return self.ref.load()

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": 1}  # an element already is a batch

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def run_inference(self, batch: Sequence[DecodedChunk], model: InfluenceContext,
                      inference_args=None) -> Iterable[ProjectedChunk]:
        return [self.project(chunk, model) for chunk in batch]

    def project(self, chunk: DecodedChunk, ctx: InfluenceContext) -> ProjectedChunk:
        import jax

        n, B = len(chunk.ids), ctx.device_batch_size(self.batch_size)  # a multiple of the plan's micro-batch
        k = int(ctx.eigvals.shape[0])
        if n == 0:
            return ProjectedChunk(chunk.source, chunk.offset, chunk.records, empty_index_table(
                k, ctx.sketch.dim if ctx.sketch is not None else 0, len(ctx.query_ids), ctx.kfac is not None),
                digest=chunk.digest)
        from beam_influence.core import buckets

        # per bucket (token sequences cut to their bucket's length; one group without sequences), fixed
        # batches of B padded with copies of a real row: dispatch every batch first (asynchronous), then
        # fetch the results once and scatter them back to row order
        outs, kfac_parts = [], []
        fused_kfac = ctx.kfac is not None and ctx.projector.extra is not None  # K-FAC terms in the projector's output
        for rows, part in buckets.fixed_batches(chunk.arrays, ctx.spec.features, B):
            if ctx.kfac is not None and not fused_kfac:  # the K-FAC self-term per example, and the sketch of its
                # whitened residual when the index sketches that, by the Complement's own step (core.kfac.whitened)
                q, sk = ctx.kfac.whitened(ctx.spec.loss, ctx.params, part, micro_batch=B, sketch=ctx.kfac_sketch)
                kfac_parts.append((rows, {"kfac_self": q} if sk is None else {"kfac_self": q, "sketch": sk}))
            shape = tuple(sorted((key, np.shape(v)) for key, v in part.items()))
            if shape not in ctx.compiled_shapes:  # a new batch shape: XLA compiles now; say so, and time it
                ctx.compiled_shapes.add(shape)
                what = ", ".join(f"{key} {list(dims)}" for key, dims in shape)
                print(f"… compiling the projector for {what} (batch shape {len(ctx.compiled_shapes)}; k={k}, "
                      f"p={ctx.memory_plan['p'] if ctx.memory_plan else '?'}, {ctx.plan.method}, "
                      f"micro-batch {ctx.plan.micro_batch})", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                out = jax.block_until_ready(ctx.projector(ctx.params, part))
                print(f"  compiled and ran the first batch in {time.perf_counter() - t0:.1f}s", file=sys.stderr,
                      flush=True)
            else:
                out = ctx.projector(ctx.params, part)
            outs.append((rows, out))
        got = jax.device_get([o for _, o in outs])
        res = buckets.scatter([(rows, o) for (rows, _), o in zip(outs, got)], n)  # ProjectionOutput field → [n, ...]
        proj = res["projections"].astype(np.float32)
        losses = res["losses"].astype(np.float64)
        finite = res["finite"].astype(bool)
        from beam_influence.core.scoring import self_influence

        proj, dots = proj[:, :k], proj[:, k:]  # [U; ∇ℓ(z_test)] projected: P(z) and ⟨∇ℓ(z), ∇ℓ(z_test)⟩
        self_inf = self_influence(proj, ctx.eigvals)
        label_key = ctx.spec.label_key
        labels = (pa.array(np.asarray(chunk.arrays[label_key]).reshape(n).astype(np.int64))
                  if label_key and label_key in chunk.arrays else pa.nulls(n, pa.int64()))
        cols = {"id": pa.array(chunk.ids.astype(str).tolist() if chunk.ids.dtype == object else chunk.ids, pa.string()),
                "projection": _fixed_list(proj), "loss": pa.array(losses), "self_influence": pa.array(self_inf),
                "label": labels, "grad_sq_norm": pa.array(res["grad_sq_norms"].astype(np.float64))}
        kf = buckets.scatter(kfac_parts, n) if kfac_parts else {}
        if fused_kfac:  # extra = [q, Sv̄] per row (core.kfac.WhitenedTerms)
            ex = res["extra"]
            kf = {"kfac_self": ex[:, 0]} if ctx.kfac_sketch is None else {"kfac_self": ex[:, 0], "sketch": ex[:, 1:]}
        if ctx.sketch is not None:
            cols["sketch"] = _fixed_list(kf["sketch"] if ctx.kfac_sketch is not None else res["sketches"])
        if ctx.query_ids:
            cols["query_dots"] = _fixed_list(dots)
        if kf:
            cols["kfac_self"] = pa.array(kf["kfac_self"].astype(np.float64))
        for name in chunk.passthrough.column_names:
            cols[name if name not in RESERVED else f"record_{name}"] = chunk.passthrough.column(name)
        table = pa.table(cols)
        dead = []
        if not finite.all():
            bad = np.flatnonzero(~finite)
            for i in bad:  # error path
                raw = {key: v[i] for key, v in chunk.arrays.items()}
                dead.append(dead_letter(chunk.ids[i], "project", f"non-finite loss or gradient (loss={losses[i]})", raw))
            table = table.filter(pa.array(finite))
        return ProjectedChunk(chunk.source, chunk.offset, chunk.records, table, dead, chunk.digest)


def empty_index_table(k: int, sketch_dim: int = 0, num_queries: int = 0, kfac_self: bool = False) -> pa.Table:
    cols = {"id": pa.array([], pa.string()),
            "projection": pa.FixedSizeListArray.from_arrays(pa.array([], pa.float32()), k),
            "loss": pa.array([], pa.float64()), "self_influence": pa.array([], pa.float64()),
            "label": pa.array([], pa.int64()), "grad_sq_norm": pa.array([], pa.float64())}
    if sketch_dim:
        cols["sketch"] = pa.FixedSizeListArray.from_arrays(pa.array([], pa.float32()), sketch_dim)
    if num_queries:
        cols["query_dots"] = pa.FixedSizeListArray.from_arrays(pa.array([], pa.float32()), num_queries)
    if kfac_self:
        cols["kfac_self"] = pa.array([], pa.float64())
    return pa.table(cols)


class _SplitDeadRowsFn(beam.DoFn):
    def __init__(self):
        super().__init__()
        self.projected = Metrics.counter(NAMESPACE, "examples_projected")
        self.bad = Metrics.counter(NAMESPACE, "records_dead_lettered")

    def process(self, result) -> Iterator[Any]:
        out: ProjectedChunk = result.inference if hasattr(result, "inference") else result
        for row in out.dead:
            self.bad.inc()
            yield pvalue.TaggedOutput(DEAD_LETTER, row)
        self.projected.inc(out.table.num_rows)
        yield ProjectedChunk(out.source, out.offset, out.records, out.table, digest=out.digest)


def _failed_rows(item) -> Iterator[dict]:
    """A batch that raised in the handler: every row of it becomes a dead letter with the exception."""
    batch, exc = item
    chunks = batch if isinstance(batch, (list, tuple)) else [batch]
    for chunk in chunks:
        for rid in getattr(chunk, "ids", []):
            yield dead_letter(rid, "project", f"projection failed: {type(exc).__name__}: {exc}", {"source": chunk.source})


class ProjectChunks(beam.PTransform):
    """Chunks → ``{"projected": ProjectedChunk, "dead_letter": dead-letter rows}``.

    Args:
      ref: the model, checkpoint and eigensystem (paths; loaded once per worker process).
      batch_size: the fixed projection batch B.
    """

    def __init__(self, ref: ModelRef, *, batch_size: int = 64):
        super().__init__()
        self.handler = ProjectionModelHandler(ref, batch_size)
        self.ref = ref

    def expand(self, chunks):
        decoded = chunks | "Decode" >> beam.ParDo(DecodeChunkFn(self.ref)).with_outputs(DEAD_LETTER, main="good")
        main, other = (decoded.good | "Project" >> RunInference(self.handler).with_exception_handling())
        split = main | "SplitDeadRows" >> beam.ParDo(_SplitDeadRowsFn()).with_outputs(DEAD_LETTER, main="rows")
        failed = other.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_rows)
        dead = (decoded[DEAD_LETTER], split[DEAD_LETTER], failed) | "MergeDeadLetters" >> beam.Flatten()
        return {"projected": split.rows, "dead_letter": dead}


def projections(chunks: Iterable[ProjectedChunk]) -> tuple[list[str], np.ndarray]:
    """(ids, projections [n, k] float32) of projected chunks (e.g. the queries)."""
    ids: list[str] = []
    parts = []
    for c in chunks:
        ids.extend(c.table.column("id").to_pylist())
        parts.append(projection_matrix(c.table))
    return ids, (np.concatenate(parts) if parts else np.zeros((0, 0), np.float32))


def encode_sketch_column(table: pa.Table, dtype: str) -> pa.Table:
    """``table`` with its float32 ``sketch`` column stored in ``dtype`` (``core.sketch.STORAGE_DTYPES``).

    float32: unchanged (``fixed_size_list<float32>[d]``, what every index before the option held).
    float16 / bfloat16: ``sketch`` becomes ``fixed_size_binary[2d]`` (the row's codes, little-endian; its field
    metadata names the dtype and the scaling) and ``sketch_scale`` (float32, the row's max |value|) follows it
    (``core.sketch.encode_rows``). ``sketch_matrix`` decodes either form."""
    from beam_influence.core.sketch import ROW_SCALING, check_storage_dtype, encode_rows

    if check_storage_dtype(dtype) == "float32" or "sketch" not in table.column_names:
        return table
    dense = projection_matrix(table, "sketch")
    d = int(table.schema.field("sketch").type.list_size)
    codes, scales = encode_rows(dense.reshape(table.num_rows, d), dtype)
    raw = np.ascontiguousarray(codes).view(np.uint16).astype("<u2", copy=False)
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * d), table.num_rows, [None, pa.py_buffer(raw.tobytes())])
    field = pa.field("sketch", col.type, nullable=False,
                     metadata={SKETCH_DTYPE_KEY: dtype.encode(), SKETCH_SCALING_KEY: ROW_SCALING.encode()})
    i = table.schema.get_field_index("sketch")
    table = table.set_column(i, field, col)
    return table.add_column(i + 1, pa.field("sketch_scale", pa.float32(), nullable=False), pa.array(scales, pa.float32()))


def sketch_storage(schema: pa.Schema) -> str | None:
    """The storage dtype of a table's ``sketch`` column (None without one): float32 for a float list (every
    index written before 16-bit storage), else what its field metadata says."""
    if "sketch" not in schema.names:
        return None
    field = schema.field("sketch")
    if pa.types.is_fixed_size_list(field.type) or pa.types.is_list(field.type):
        return "float32"
    dtype = (field.metadata or {}).get(SKETCH_DTYPE_KEY)
    if not pa.types.is_fixed_size_binary(field.type) or dtype not in (b"float16", b"bfloat16"):
        raise ValueError(f"the index's sketch column has type {field.type} and metadata {field.metadata}, which this "
                         "version cannot decode; rebuild the index")
    return dtype.decode()


def sketch_matrix(table) -> np.ndarray:
    """The ``sketch`` column of an index table/batch (or projected chunk) as ``[n, d]`` float32, decoded from
    its stored dtype (``encode_sketch_column``; a 16-bit column needs its ``sketch_scale`` beside it)."""
    from beam_influence.core.sketch import _numpy_dtype, decode_rows

    dtype = sketch_storage(table.schema)
    if dtype is None:
        raise KeyError("the table has no 'sketch' column")
    if dtype == "float32":
        return projection_matrix(table, "sketch")
    if "sketch_scale" not in table.schema.names:
        raise ValueError(f"a {dtype} sketch column needs its 'sketch_scale' column (read both)")
    col = table.column("sketch")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n, width = len(col), col.type.byte_width
    if n == 0:
        return np.zeros((0, width // 2), np.float32)
    if col.null_count:
        raise ValueError("the index's sketch column has null rows; rebuild the index")
    buf = col.buffers()[1]
    raw = np.frombuffer(buf, dtype="<u2", count=(col.offset + n) * width // 2)[col.offset * width // 2:]
    codes = raw.reshape(n, width // 2).view(_numpy_dtype(dtype))
    scales = table.column("sketch_scale")
    scales = np.asarray((scales.combine_chunks() if isinstance(scales, pa.ChunkedArray) else scales)
                        .to_numpy(zero_copy_only=False), np.float32)
    return decode_rows(codes, scales)


def projection_matrix(table, column: str = "projection") -> np.ndarray:
    """A fixed-size-list column (default ``projection``) of an index table/batch as ``[n, k]`` float32 (no per-row work)."""
    col = table.column(column)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    values = col.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, np.float32).reshape(n, -1) if n else np.zeros((0, 0), np.float32)
