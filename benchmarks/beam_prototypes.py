"""A prototype of the batched index pipeline that docs/benchmarks.md recommends (not used by the jobs).

The shipped ``ProjectGradients`` + ``WriteIndex`` move one Python dict per record through five Beam
transforms (parse → decode → BatchElements → project → to_index_row → WriteToParquet). This prototype moves
one *chunk* of rows per element instead: a Parquet row group becomes a dict of numpy columns, is validated
column-wise (the same checks as ``ModelSpec.decode``: shape, dtype, finite, range), projected in fixed
batches of B with the same projector, and written as a ``pyarrow.Table`` by ``WriteToParquetBatched``.
Per-record Python work is gone; per-element Beam overhead is paid once per ~1000 rows.

    records ─ MatchFiles ─ ReadMatches ─ Reshuffle ─ ReadChunksFn ─ ProjectChunkFn ─ WriteToParquetBatched

Used by ``benchmarks.beam_overhead`` (runs ``prototype_fnapi`` / ``prototype_multiprocess``) to measure what
the recommendation buys on the same data and machine.

The query side (``run_batched_query``, used by ``benchmarks.scaling --jobs ...,query_prototype``): the main input
is the list of index shard paths; ``ScoreShardFn`` streams each shard in Arrow record batches and scores them
against the queries (side input), so no training row becomes a Beam element and nothing is materialised
between stages; the Q·2·top-k result rows are written in one step instead of one Beam element each.
"""
from __future__ import annotations

import json
from typing import Any, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio

from beam_influence.beam.index import SHARD_PREFIX, index_schema
from beam_influence.beam.resources import ModelRef, shared_context


def decode_columns(spec, table) -> tuple[dict, np.ndarray, list[str]]:
    """Column-wise ``ModelSpec.decode``: (features {name: [n, *shape]}, ok [n] bool, reasons for the bad rows)."""
    n = table.num_rows
    ok = np.ones(n, bool)
    reasons: list[str] = []
    out = {}
    for key, fs in spec.features.items():
        if key not in table.column_names:
            return {}, np.zeros(n, bool), [f"missing feature {key!r}"] * n
        col = table.column(key).combine_chunks()
        size = int(np.prod(fs.shape)) if fs.shape else 1
        if fs.shape:  # list column: every row must hold exactly prod(shape) values
            lens = np.diff(np.asarray(col.offsets))
            bad_len = (lens != size) | np.asarray(col.is_null())
            if bad_len.any():
                ok &= ~bad_len
                reasons.append(f"feature {key!r} has the wrong length in {int(bad_len.sum())} rows")
            vals = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
            if bad_len.any():  # rebuild with placeholders for the bad rows
                arr = np.zeros((n, size), vals.dtype)
                starts = np.asarray(col.offsets)[:-1]
                for i in np.flatnonzero(~bad_len):
                    arr[i] = vals[starts[i]: starts[i] + size]
            else:
                arr = vals.reshape(n, size)
            arr = arr.reshape((n,) + tuple(fs.shape))
        else:
            arr = np.asarray(col.to_numpy(zero_copy_only=False))
        arr = arr.astype(fs.dtype)
        flat = arr.reshape(n, -1)
        if np.issubdtype(arr.dtype, np.floating):
            bad = ~np.isfinite(flat).all(axis=1)
            ok &= ~bad
        if fs.min is not None:
            ok &= (flat >= fs.min).all(axis=1)
        if fs.max is not None:
            ok &= (flat <= fs.max).all(axis=1)
        out[key] = arr
    return out, ok, reasons


class ReadChunksFn(beam.DoFn):
    """A Parquet file → one element per row group: {"ids", "features", "labels", "metadata", "n"}."""

    def __init__(self, ref: ModelRef):
        super().__init__()
        self.ref = ref

    def setup(self):
        from beam_influence.core.model_spec import load_spec

        self.spec = load_spec(self.ref.spec, **self.ref.spec_kwargs())

    def process(self, readable_file: fileio.ReadableFile) -> Iterator[dict]:
        import pyarrow.parquet as pq

        import io

        with readable_file.open(mime_type="application/octet-stream") as f:
            pf = pq.ParquetFile(f if f.seekable() else io.BytesIO(f.read()))
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g)
                feats, ok, _ = decode_columns(self.spec, table)
                ids = np.asarray(table.column("id").to_pylist(), dtype=object)
                meta_cols = [c for c in table.column_names if c != "id" and c not in self.spec.features]
                metas = [json.dumps(dict(zip(meta_cols, vals)), sort_keys=True)
                         for vals in zip(*(table.column(c).to_pylist() for c in meta_cols))] if meta_cols \
                    else ["{}"] * table.num_rows
                keep = np.flatnonzero(ok)
                label_key = self.spec.label_key
                yield {"ids": ids[keep], "features": {k: v[keep] for k, v in feats.items()},
                       "labels": feats[label_key][keep].astype(np.int64) if label_key else None,
                       "metadata": [metas[i] for i in keep], "n": len(keep)}


class ProjectChunkFn(beam.DoFn):
    """A chunk → a pyarrow.Table of index rows (fixed batches of B, the last one padded)."""

    def __init__(self, ref: ModelRef, batch_size: int):
        super().__init__()
        self.ref, self.batch_size = ref, batch_size

    def setup(self):
        self.ctx = shared_context(self.ref)

    def process(self, chunk: dict) -> Iterator[Any]:
        import jax
        import pyarrow as pa

        n, B = chunk["n"], self.batch_size
        if n == 0:
            return
        feats = chunk["features"]
        projs, losses = [], []
        for s in range(0, n, B):
            batch = {k: v[s:s + B] for k, v in feats.items()}
            m = len(next(iter(batch.values())))
            if m < B:
                batch = {k: np.concatenate([v, np.repeat(v[:1], B - m, 0)]) for k, v in batch.items()}
            with self.ctx.lock:
                out = jax.device_get(self.ctx.projector(self.ctx.params, batch))
            projs.append(np.asarray(out.projections[:m], np.float32))
            losses.append(np.asarray(out.losses[:m], np.float64))
        proj = np.concatenate(projs)
        k = proj.shape[1]
        self_inf = (proj.astype(np.float64) ** 2 / self.ctx.eigvals).sum(axis=1)
        offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
        yield pa.table({
            "id": pa.array(chunk["ids"].tolist(), pa.string()),
            "projection": pa.ListArray.from_arrays(offsets, pa.array(proj.ravel())),
            "loss": pa.array(np.concatenate(losses)),
            "self_influence": pa.array(self_inf),
            "label": pa.array(chunk["labels"], pa.int64()),
            "metadata": pa.array(chunk["metadata"], pa.string()),
        }, schema=index_schema())


def batched_index_pipeline(p: beam.Pipeline, ref: ModelRef, pattern: str, index_dir: str, batch_size: int) -> None:
    (p
     | "Match" >> fileio.MatchFiles(pattern)
     | "ReadMatches" >> fileio.ReadMatches()
     | "Spread" >> beam.Reshuffle()
     | "ReadChunks" >> beam.ParDo(ReadChunksFn(ref))
     | "Project" >> beam.ParDo(ProjectChunkFn(ref, batch_size))
     | "Write" >> beam.io.WriteToParquetBatched(f"{index_dir.rstrip('/')}/{SHARD_PREFIX}", index_schema(),
                                                file_name_suffix=".parquet"))


def run_batched_index(ref: ModelRef, runner_args: list[str], pattern: str, index_dir: str, batch_size: int) -> dict:
    """Build and run the prototype (model loaded once on the launcher too, as ``preflight`` does)."""
    import time

    from apache_beam.options.pipeline_options import PipelineOptions

    t = time.perf_counter()
    ref.load()  # the launcher's pre-flight check, as in pipelines.index
    p = beam.Pipeline(options=PipelineOptions(runner_args))
    batched_index_pipeline(p, ref, pattern, index_dir, batch_size)
    p.run().wait_until_finish()
    return {"pipeline_seconds": time.perf_counter() - t}


# ---- the query side: score whole index shards against the queries, no per-row elements ----------------
class ScoreShardFn(beam.DoFn):
    """An index shard path → (query id, (proponents, opponents)) candidates of that shard.

    Streams the shard in Arrow record batches of ``batch_rows`` (bounded memory whatever the shard size),
    scores each batch against all queries with ``scoring.influence_scores`` and folds it into the library's
    exact ``BundleTopK``; the queries are a side input, but the main input is only shard paths, so no
    training row is ever a Beam element (nothing to materialise between stages).
    """

    def __init__(self, eigvals: np.ndarray, *, k: int, normalization: str = "none", batch_rows: int = 8192):
        super().__init__()
        self.eigvals = np.asarray(eigvals, np.float64)
        self.k, self.normalization, self.batch_rows = k, normalization, batch_rows

    def process(self, path: str, queries) -> Iterator[Any]:
        import pyarrow.parquet as pq
        from apache_beam.io.filesystems import FileSystems

        from beam_influence.core import scoring
        from beam_influence.beam.topk import BundleTopK

        if not queries.ids:
            return
        state = BundleTopK(len(queries.ids), self.k)
        with FileSystems.open(path) as f:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size=self.batch_rows, columns=["id", "projection"]):
                n = rb.num_rows
                col = rb.column(1)
                proj = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float64).reshape(n, -1)
                scores = scoring.influence_scores(queries.proj, proj, self.eigvals, normalization=self.normalization)
                state.update(scores, rb.column(0).to_pylist())
        pro, opp = state.result()
        for key, p, o in zip(queries.ids, pro, opp):
            yield key, (p, o)


class _WriteTopKFiles(beam.DoFn):
    """All merged (query id, (proponents, opponents)) items (one list) → rows, sorted → ``<path>.jsonl`` and
    ``<path>.parquet`` in one go (the Q·2·top-k rows never become Beam elements)."""

    def __init__(self, path: str, schema, sort_key):
        super().__init__()
        self.path, self.schema, self.sort_key = path, schema, sort_key

    def process(self, items: list) -> Iterator[int]:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq
        from apache_beam.io.filesystems import FileSystems

        from beam_influence.beam.topk import result_rows

        rows = sorted((r for item in items for r in result_rows(item)), key=self.sort_key)
        with FileSystems.create(self.path + ".jsonl") as f:
            f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), buf)
        with FileSystems.create(self.path + ".parquet") as f:
            f.write(buf.getvalue())
        yield len(rows)


def run_batched_query(argv: list[str]) -> dict:
    """The query job with shard-level scoring (same flags and outputs as ``pipelines.query``)."""
    import time

    from beam_influence.beam import TOPK_SCHEMA, ProjectGradients, ReadExamples, TopKCombineFn, check_index, preflight
    from pipelines._job import execute, parse
    from pipelines.query import topk_sort_key

    options, opts = parse(argv)
    ref, ctx = preflight(opts, "test_data", "index_dir", "output")
    manifest = check_index(opts.index_dir, ctx.eigensystem)
    out_dir = opts.output.rstrip("/")
    shards = [s["path"] for s in manifest["shards"]]

    def build(p):
        from beam_influence.beam.topk import QuerySet

        queries = (p | "ReadQueries" >> ReadExamples(opts.test_data, opts.data_format)
                   | "ProjectQueries" >> ProjectGradients(ref, batch_size=opts.batch_size))
        query_set = queries["projected"] | "QuerySet" >> beam.combiners.ToList() | "AsQuerySet" >> beam.Map(QuerySet)
        (p | "Shards" >> beam.Create(shards) | "Spread" >> beam.Reshuffle()
         | "ScoreShards" >> beam.ParDo(ScoreShardFn(ctx.eigvals, k=opts.top_k, normalization=opts.normalization),
                                       queries=beam.pvalue.AsSingleton(query_set))
         | "MergeTopK" >> beam.CombinePerKey(TopKCombineFn(opts.top_k))
         | "Gather" >> beam.combiners.ToList()
         | "Write" >> beam.ParDo(_WriteTopKFiles(f"{out_dir}/topk", TOPK_SCHEMA, topk_sort_key)))

    t = time.perf_counter()
    counts, seconds = execute(options, build)
    return {"seconds": seconds, "wall_s": time.perf_counter() - t, "index_rows": manifest["rows"],
            "shards": len(shards)}


def run_batched_index_job(argv: list[str]) -> dict:
    """The index job with the batched prototype (same flags as ``pipelines.index``; writes Parquet shards
    ``<index_dir>/part-*.parquet`` with the index schema, no manifest). For ``benchmarks.scaling``."""
    import os
    import shutil
    import time

    from beam_influence.beam import preflight
    from pipelines._job import execute, parse

    options, opts = parse(argv)
    ref, _ = preflight(opts, "train_data", "index_dir")
    index_dir = opts.index_dir.rstrip("/")
    if os.path.exists(index_dir):
        shutil.rmtree(index_dir)
    t = time.perf_counter()
    counts, seconds = execute(options, lambda p: batched_index_pipeline(p, ref, opts.train_data, index_dir,
                                                                        opts.batch_size))
    import glob

    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(index_dir, "part-*.parquet")))
    return {"seconds": seconds, "wall_s": time.perf_counter() - t, "rows": sum(pq.ParquetFile(f).metadata.num_rows
                                                                              for f in files), "shards": len(files)}
