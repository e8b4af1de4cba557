"""The influence index: projected training rows as Parquet shards plus a manifest.

    <index dir>/part-SSSSS-of-NNNNN.parquet   rows: id, projection (list<float32>, k), loss,
                                             self_influence, label, metadata (JSON string)
    <index dir>/manifest.json                eigensystem id + model fingerprint, arguments,
                                             shard list with row counts, totals

An index is only usable with the eigensystem it was built under (``check_index``).
"""
from __future__ import annotations

import json
import time
from typing import Any, Mapping

import apache_beam as beam
import numpy as np
import pyarrow as pa

from beam_influence.core.eigensystem import Eigensystem, EigensystemMismatchError

MANIFEST = "manifest.json"
SHARD_PREFIX = "part"


def index_schema() -> pa.Schema:
    return pa.schema([
        ("id", pa.string()),
        ("projection", pa.list_(pa.float32())),
        ("loss", pa.float64()),
        ("self_influence", pa.float64()),
        ("label", pa.int64()),
        ("metadata", pa.string()),
    ])


def to_index_row(row: Mapping[str, Any]) -> dict:
    return {"id": row["id"], "projection": np.asarray(row["projection"], np.float32).tolist(),
            "loss": float(row["loss"]), "self_influence": float(row["self_influence"]),
            "label": row.get("label"), "metadata": row.get("metadata", "{}")}


def from_index_row(row: Mapping[str, Any]) -> dict:
    out = dict(row)
    out["projection"] = np.asarray(row["projection"], np.float32)
    return out


class WriteIndex(beam.PTransform):
    """Projected rows → Parquet shards ``<index_dir>/part-*.parquet`` (the manifest is written by the job)."""

    def __init__(self, index_dir: str, *, num_shards: int = 0):
        super().__init__()
        self.index_dir, self.num_shards = index_dir.rstrip("/"), num_shards

    def expand(self, rows):
        return (
            rows
            | "ToIndexRow" >> beam.Map(to_index_row)
            | "WriteParquet" >> beam.io.WriteToParquet(
                f"{self.index_dir}/{SHARD_PREFIX}", index_schema(), file_name_suffix=".parquet",
                num_shards=self.num_shards)
        )


class IndexRecords(beam.PTransform):
    """Records → ``ProjectGradients`` → index shards in ``index_dir``, dead letters beside them
    (``<index_dir>/dead_letter.jsonl``). Returns ProjectGradients' outputs."""

    def __init__(self, ref, index_dir: str, *, batch_size: int = 64, num_shards: int = 0):
        super().__init__()
        self.ref, self.index_dir = ref, index_dir.rstrip("/")
        self.batch_size, self.num_shards = batch_size, num_shards

    def expand(self, records):
        from beam_influence.beam.outputs import WriteDeadLetters
        from beam_influence.beam.project import ProjectGradients

        out = records | "ProjectGradients" >> ProjectGradients(self.ref, batch_size=self.batch_size)
        out["projected"] | "WriteIndex" >> WriteIndex(self.index_dir, num_shards=self.num_shards)
        out["dead_letter"] | "WriteDeadLetters" >> WriteDeadLetters(f"{self.index_dir}/dead_letter")
        return out


class ReadIndex(beam.PTransform):
    """Parquet shards of an index → rows with ``projection`` as float32 arrays."""

    def __init__(self, index_dir: str, shards: list[str] | None = None):
        super().__init__()
        self.index_dir, self.shards = index_dir.rstrip("/"), shards

    def expand(self, pbegin):
        if self.shards is not None:
            return (pbegin | "Shards" >> beam.Create(self.shards)
                    | "ReadShards" >> beam.io.ReadAllFromParquet() | "Decode" >> beam.Map(from_index_row))
        return (pbegin | "ReadParquet" >> beam.io.ReadFromParquet(f"{self.index_dir}/{SHARD_PREFIX}-*.parquet")
                | "Decode" >> beam.Map(from_index_row))


def list_shards(index_dir: str) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    pattern = f"{index_dir.rstrip('/')}/{SHARD_PREFIX}-*.parquet"
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def shard_row_count(path: str) -> int:
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def write_manifest(index_dir: str, eigensystem: Eigensystem, args: Mapping[str, Any],
                   extra: Mapping[str, Any] | None = None) -> dict:
    """Write ``manifest.json`` describing the shards now in ``index_dir``; returns it."""
    from apache_beam.io.filesystems import FileSystems

    shards = [{"path": p, "rows": shard_row_count(p)} for p in list_shards(index_dir)]
    manifest = {
        "eigensystem_id": eigensystem.id, "model_fingerprint": eigensystem.fingerprint,
        "spec_name": eigensystem.spec_name, "k": eigensystem.k, "args": dict(args),
        "shards": shards, "rows": sum(s["rows"] for s in shards), "written_at": time.time(),
        **(extra or {}),
    }
    with FileSystems.create(f"{index_dir.rstrip('/')}/{MANIFEST}") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def read_manifest(index_dir: str) -> dict:
    from apache_beam.io.filesystems import FileSystems

    path = f"{index_dir.rstrip('/')}/{MANIFEST}"
    try:
        with FileSystems.open(path) as f:
            return json.loads(f.read())
    except Exception as e:  # noqa: BLE001
        raise FileNotFoundError(f"no readable index manifest at {path!r} ({e}); build the index with "
                                "`beam-influence index` first") from None


def check_index(index_dir: str, eigensystem: Eigensystem) -> dict:
    """The manifest of ``index_dir`` if it was built under ``eigensystem``; else a clear error."""
    manifest = read_manifest(index_dir)
    if manifest.get("eigensystem_id") != eigensystem.id:
        raise EigensystemMismatchError(
            f"the index {index_dir!r} was built under eigensystem {manifest.get('eigensystem_id')} "
            f"(model {manifest.get('model_fingerprint')}), but this query uses eigensystem {eigensystem.id} "
            f"(model {eigensystem.fingerprint}). Rebuild the index with `beam-influence index` using this "
            "eigensystem, or query with the eigensystem the index was built with.")
    return manifest
