"""Result writers: small results as one sorted JSONL + Parquet file each; dead letters as JSONL."""
from __future__ import annotations

import json
from typing import Callable

import apache_beam as beam
import pyarrow as pa


class WriteSortedRows(beam.PTransform):
    """Write a *small* PCollection of flat dict rows, sorted by ``sort_key``, to ``<path>.jsonl`` and
    ``<path>.parquet`` (one file each, deterministic content whatever the runner)."""

    def __init__(self, path: str, schema: pa.Schema, sort_key: Callable[[dict], tuple]):
        super().__init__()
        self.path, self.schema, self.sort_key = path, schema, sort_key

    def expand(self, rows):
        ordered = (rows | "Gather" >> beam.combiners.ToList()
                   | "Sort" >> beam.FlatMap(lambda rs: sorted(rs, key=self.sort_key)))
        (ordered | "ToJson" >> beam.Map(lambda r: json.dumps(r, sort_keys=True))
         | "WriteJsonl" >> beam.io.WriteToText(self.path, file_name_suffix=".jsonl", num_shards=1,
                                               shard_name_template=""))
        return ordered | "WriteParquet" >> beam.io.WriteToParquet(
            self.path, self.schema, file_name_suffix=".parquet", num_shards=1, shard_name_template="")


class WriteDeadLetters(beam.PTransform):
    """Dead-letter rows {id, stage, reason, raw} → ``<path>.jsonl`` (always written, possibly empty)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, rows):
        return (rows | "ToJson" >> beam.Map(lambda r: json.dumps(r, sort_keys=True))
                | "WriteDeadLetters" >> beam.io.WriteToText(self.path, file_name_suffix=".jsonl", num_shards=1,
                                                             shard_name_template=""))


TOPK_SCHEMA = pa.schema([("query_id", pa.string()), ("kind", pa.string()), ("rank", pa.int64()),
                         ("train_id", pa.string()), ("score", pa.float64())])
SELF_SCHEMA = pa.schema([("rank", pa.int64()), ("id", pa.string()), ("self_influence", pa.float64())])


def read_jsonl(path: str) -> list[dict]:
    """Read a JSONL result file (through Beam's FileSystems)."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
