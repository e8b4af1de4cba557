"""``ProjectGradients``: raw records → per-example projections P(z) = U·∇ℓ(z), loss, self-influence.

    records ─ DecodeFn ─┬─ decoded ─ BatchElements(B, B) ─ ProjectBatchFn ─┬─ projected rows
                        └─ dead letter                                      └─ dead letter (non-finite)

Batches have a fixed size B: a short last batch is padded with copies of its first example and the
padding rows are dropped after the projection, so the jitted projector compiles once per worker.
A projected row is ``{"id", "projection": float32[k], "loss", "self_influence", "label", "metadata"}``
where metadata is a JSON string of every record field that is neither a feature nor the id.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from beam_influence.beam.resources import ModelRef, shared_context
from beam_influence.core.model_spec import RecordError

NAMESPACE = "beam_influence"
DEAD_LETTER = "dead_letter"


def json_safe(value: Any) -> Any:
    """Make a record value JSON-serialisable (arrays → lists, bytes → latin-1 text)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dead_letter(record_id: Any, stage: str, reason: str, raw: Any) -> dict:
    """A dead-letter row: which record, at which stage, why, and the raw record (JSON-safe)."""
    return {"id": None if record_id is None else str(record_id), "stage": stage, "reason": reason,
            "raw": json.dumps(json_safe(raw), sort_keys=True, default=repr)[:100_000]}


class DecodeFn(beam.DoFn):
    """Decode raw records with the ModelSpec; unreadable or ill-shaped ones go to the dead letter."""

    def __init__(self, ref: ModelRef):
        super().__init__()
        self.ref = ref
        self.good = Metrics.counter(NAMESPACE, "records_decoded")
        self.bad = Metrics.counter(NAMESPACE, "records_dead_lettered")

    def setup(self):
        from beam_influence.core.model_spec import load_spec

        self.spec = load_spec(self.ref.spec, **self.ref.spec_kwargs())

    def process(self, record: dict) -> Iterator[Any]:
        from beam_influence.io import ERROR_KEY, RAW_KEY

        rid = record.get("id")
        if ERROR_KEY in record:
            self.bad.inc()
            yield pvalue.TaggedOutput(DEAD_LETTER, dead_letter(rid, "read", record[ERROR_KEY], record.get(RAW_KEY)))
            return
        try:
            example = self.spec.decode(record)
        except RecordError as e:
            self.bad.inc()
            yield pvalue.TaggedOutput(DEAD_LETTER, dead_letter(rid, "decode", str(e), record))
            return
        label_key = self.spec.label_key
        meta = {k: json_safe(v) for k, v in record.items() if k != "id" and k not in self.spec.features}
        label = example.get(label_key) if label_key else None
        self.good.inc()
        yield {"id": str(rid), "example": example, "label": None if label is None else int(np.asarray(label)),
               "metadata": json.dumps(meta, sort_keys=True)}


class ProjectBatchFn(beam.DoFn):
    """Project a batch of decoded examples (padded to the fixed size B); non-finite rows → dead letter."""

    def __init__(self, ref: ModelRef, batch_size: int):
        super().__init__()
        self.ref, self.batch_size = ref, batch_size
        self.examples = Metrics.counter(NAMESPACE, "examples_projected")
        self.batches = Metrics.counter(NAMESPACE, "batches")
        self.padded = Metrics.counter(NAMESPACE, "padding_rows")
        self.bad = Metrics.counter(NAMESPACE, "records_dead_lettered")

    def setup(self):
        self.ctx = shared_context(self.ref)

    def process(self, rows: list[dict]) -> Iterator[Any]:
        import jax

        n = len(rows)
        if n > self.batch_size:
            raise ValueError(f"got a batch of {n} > batch_size {self.batch_size}")
        feats = self.ctx.spec.features
        pad = self.batch_size - n
        batch = {key: np.stack([r["example"][key] for r in rows] + [rows[0]["example"][key]] * pad)
                 for key in feats}
        with self.ctx.lock:
            out = jax.device_get(self.ctx.projector(self.ctx.params, batch))
        proj = np.asarray(out.projections[:n], np.float32)
        losses, finite = np.asarray(out.losses[:n]), np.asarray(out.finite[:n])
        self_inf = (proj.astype(np.float64) ** 2 / self.ctx.eigvals).sum(axis=1)
        self.batches.inc()
        self.padded.inc(pad)
        for i, row in enumerate(rows):
            if not finite[i]:
                self.bad.inc()
                yield pvalue.TaggedOutput(DEAD_LETTER, dead_letter(
                    row["id"], "project", f"non-finite loss or gradient (loss={losses[i]})",
                    {"example": row["example"], "metadata": row["metadata"]}))
                continue
            self.examples.inc()
            yield {"id": row["id"], "projection": proj[i], "loss": float(losses[i]),
                   "self_influence": float(self_inf[i]), "label": row["label"], "metadata": row["metadata"]}


class ProjectGradients(beam.PTransform):
    """Records → projected rows (main output) and dead-letter rows (``DEAD_LETTER`` output).

    Args:
      ref: the model, checkpoint and eigensystem (loaded once per worker process).
      batch_size: the fixed batch B (the last batch of each bundle is padded, nothing recompiles).

    Returns a ``DoOutputsTuple``-like dict: ``{"projected": ..., "dead_letter": ...}``.
    """

    def __init__(self, ref: ModelRef, *, batch_size: int = 64):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.ref, self.batch_size = ref, batch_size

    def expand(self, records):
        decoded = records | "Decode" >> beam.ParDo(DecodeFn(self.ref)).with_outputs(DEAD_LETTER, main="good")
        projected = (
            decoded.good
            | "Batch" >> beam.BatchElements(min_batch_size=self.batch_size, max_batch_size=self.batch_size)
            | "Project" >> beam.ParDo(ProjectBatchFn(self.ref, self.batch_size)).with_outputs(DEAD_LETTER, main="rows")
        )
        dead = (decoded[DEAD_LETTER], projected[DEAD_LETTER]) | "MergeDeadLetters" >> beam.Flatten()
        return {"projected": projected.rows, "dead_letter": dead}


def rows_to_arrays(rows: Iterable[dict]) -> tuple[list[str], np.ndarray]:
    """(ids, projections [n, k]) from projected rows."""
    rows = list(rows)
    ids = [r["id"] for r in rows]
    proj = np.stack([np.asarray(r["projection"], np.float32) for r in rows]) if rows else np.zeros((0, 0), np.float32)
    return ids, proj
