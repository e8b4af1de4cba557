"""Result writers: a merged top-k state as one sorted JSONL + Parquet pair; dead letters and entries as JSONL."""
from __future__ import annotations

import io
import json
from typing import Callable

import apache_beam as beam
import pyarrow as pa

from beam_influence.util import read_jsonl  # noqa: F401 - re-exported (beam_influence.beam.read_jsonl)

TOPK_SCHEMA = pa.schema([("query_id", pa.string()), ("kind", pa.string()), ("rank", pa.int64()),
                         ("train_id", pa.string()), ("score", pa.float64())])
SELF_SCHEMA = pa.schema([("rank", pa.int64()), ("id", pa.string()), ("self_influence", pa.float64())])


def write_rows(path: str, rows: list[dict], schema: pa.Schema) -> int:
    """``<path>.jsonl`` and ``<path>.parquet`` holding ``rows`` (in the given order); returns len(rows)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path + ".jsonl") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    with FileSystems.create(path + ".parquet") as f:
        f.write(buf.getvalue())
    return len(rows)


class WriteResult(beam.PTransform):
    """A single merged state → rows (``to_rows(state)``) → ``<path>.{jsonl,parquet}`` in one step
    (the Q·2·k rows never become Beam elements). Deterministic content on every runner."""

    def __init__(self, path: str, schema: pa.Schema, to_rows: Callable):
        super().__init__()
        self.path, self.schema, self.to_rows = path, schema, to_rows

    def expand(self, state):
        path, schema, to_rows = self.path, self.schema, self.to_rows
        return state | "WriteFiles" >> beam.Map(lambda s: write_rows(path, to_rows(s), schema))


class WriteJsonLines(beam.PTransform):
    """Dict rows → ``<path>.jsonl`` (one file, always written, possibly empty)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, rows):
        return (rows | "ToJson" >> beam.Map(lambda r: json.dumps(r, sort_keys=True))
                | "Write" >> beam.io.WriteToText(self.path, file_name_suffix=".jsonl", num_shards=1,
                                                 shard_name_template=""))


WriteDeadLetters = WriteJsonLines  # dead-letter rows {id, stage, reason, raw}
