"""Beam PTransforms over the record formats of ``beam_influence.io.formats`` (same parser, same ids)."""
from __future__ import annotations

from typing import Any, Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from beam_influence.io.formats import FORMATS, _compression, _check_format, is_error_record, parse_shard

METRICS_NAMESPACE = "beam_influence.io"


class _ParseShardFn(beam.DoFn):
    """Parse one matched shard file into records (error records included), counting them."""

    def __init__(self, format: str | None):
        super().__init__()
        self._format = format
        self._files = Metrics.counter(METRICS_NAMESPACE, "files")
        self._records = Metrics.counter(METRICS_NAMESPACE, "records")
        self._bad = Metrics.counter(METRICS_NAMESPACE, "bad_records")

    def process(self, readable_file: fileio.ReadableFile) -> Iterator[dict[str, Any]]:
        path = readable_file.metadata.path
        fmt = _check_format(self._format, path)
        with readable_file.open(mime_type="application/octet-stream", compression_type=_compression(path)) as f:
            for record in parse_shard(f, path, fmt):
                if is_error_record(record):
                    self._bad.inc()
                else:
                    self._records.inc()
                yield record
        self._files.inc()


class ReadExamples(beam.PTransform):
    """Read all records of the files matching ``file_pattern``: a PCollection of record dicts.

    Yields exactly the records (and ids) that ``read_records(file_pattern, format)`` returns, in no
    particular order, error records (``is_error_record``) included, so callers can route them to a
    dead-letter output. ``format`` defaults to each file's extension. Counters in namespace
    ``beam_influence.io``: ``files``, ``records``, ``bad_records``. Like ``MatchFiles``, a pattern without
    ``*`` that matches nothing fails the pipeline.
    """

    def __init__(self, file_pattern: str, format: str | None = None):
        super().__init__()
        if format is not None and format not in FORMATS:
            raise ValueError(f"unknown record format {format!r}; expected one of {FORMATS}")
        self._file_pattern = file_pattern
        self._format = format

    def expand(self, pbegin):
        return (
            pbegin
            | "MatchFiles" >> fileio.MatchFiles(self._file_pattern)
            | "ReadMatches" >> fileio.ReadMatches()
            | "SpreadShards" >> beam.Reshuffle()
            | "ParseShards" >> beam.ParDo(_ParseShardFn(self._format))
        )
