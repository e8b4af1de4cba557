"""``ReadChunks``: files → ``formats.Chunk``s (Arrow RecordBatches with a stable ``id`` column).

    paths ─ Create ─ Reshuffle ─ SplitFiles ─ Reshuffle ─ ReadSplits ─ Chunk (batch of good records + errors)

Files are matched on the launcher (``formats.match_data_files``: a pattern that matches nothing is an error
naming it; marker files beside the shards — ``_SUCCESS``, ``.crc``, other names starting with ``_`` or
``.`` — are skipped, counted in ``ReadChunks.skipped`` and logged; a pattern whose files have different
name prefixes, e.g. ``train-*`` and ``test-*``, is warned about). A large Parquet file becomes several
splits (runs of row groups), so it is read by more than one bundle and worker; other formats are one
split per file. Beam's own ``ReadFromParquetBatched`` splits by byte offset and does not report a row group's record offset, which the stable derived ids
(``shard:offset``) need; so the split is ours and the reading is pyarrow's.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_influence import formats
from beam_influence.beam import progress

NAMESPACE = "beam_influence"
BATCH_ROWS = 16384  # records per chunk (and the most rows an index part holds), by default


class _SplitFileFn(beam.DoFn):
    def __init__(self, format: str | None, rows_per_split: int):
        super().__init__()
        self.format, self.rows_per_split = format, rows_per_split
        self.files = Metrics.counter(NAMESPACE, "files")
        self.splits = Metrics.counter(NAMESPACE, "splits")

    def process(self, path: str) -> Iterator[formats.Split]:
        out = formats.splits(path, self.format, rows_per_split=self.rows_per_split)
        self.files.inc()
        self.splits.inc(len(out))
        yield from out


class _ReadSplitFn(beam.DoFn):
    def __init__(self, batch_rows: int, count_progress: bool = True):
        super().__init__()
        self.batch_rows, self.count_progress = batch_rows, count_progress
        self.records = Metrics.counter(NAMESPACE, "records_read")
        self.errors = Metrics.counter(NAMESPACE, "read_errors")
        self.chunks = Metrics.counter(NAMESPACE, "chunks")
        self.bundles = Metrics.counter(NAMESPACE, "read_bundles")  # bundles that read ≥ 1 split

    def start_bundle(self):
        self._splits = 0

    def finish_bundle(self):
        if self._splits:
            self.bundles.inc()

    def process(self, split: formats.Split) -> Iterator[formats.Chunk]:
        self._splits += 1
        for chunk in formats.read_split(split, batch_rows=self.batch_rows):
            self.records.inc(chunk.records)
            self.errors.inc(len(chunk.errors))
            self.chunks.inc()
            yield chunk
            if self.count_progress:
                progress.add(chunk.records)  # after the fused steps downstream (decode, project, write) took it


class ReadChunks(beam.PTransform):
    """Every record of the files matching ``pattern`` (or the given paths) as ``formats.Chunk``s.

    Args:
      pattern: a file pattern, or a list of exact paths.
      format: record format (default: from each file's extension).
      rows_per_split: Parquet rows per split (a unit of parallel work).
      batch_rows: records per chunk (bounds a worker's memory).
      count_progress: count the records read in the job's progress line (off for a side input, e.g. the
        queries of a job whose progress counts index rows).
    """

    def __init__(self, pattern: str | Sequence[str], format: str | None = None, *, rows_per_split: int = BATCH_ROWS,
                 batch_rows: int = BATCH_ROWS, count_progress: bool = True):
        super().__init__()
        if batch_rows < 1 or rows_per_split < 1:
            raise ValueError(f"batch_rows ({batch_rows}) and rows_per_split ({rows_per_split}) must be ≥ 1")
        self.skipped: list[str] = []  # marker files the pattern matched (not read)
        if isinstance(pattern, str):
            self.paths, self.skipped = formats.match_data_files(pattern)
            formats.report_matches(pattern, self.paths, self.skipped)
        else:
            self.paths = list(pattern)
        if not self.paths:
            raise FileNotFoundError(f"no input files given ({pattern!r})")
        self.format, self.rows_per_split, self.batch_rows = format, rows_per_split, batch_rows
        self.count_progress = count_progress

    def expand(self, pbegin):
        return (pbegin
                | "Files" >> beam.Create(self.paths)
                | "SpreadFiles" >> beam.Reshuffle()
                | "SplitFiles" >> beam.ParDo(_SplitFileFn(self.format, self.rows_per_split))
                | "SpreadSplits" >> beam.Reshuffle()
                | "ReadSplits" >> beam.ParDo(_ReadSplitFn(self.batch_rows, self.count_progress)))
