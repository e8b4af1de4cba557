"""Query job: test records → projections (side input) × influence index → top-k proponents/opponents.

    python -m pipelines.query --spec ... --checkpoint ... --eigensystem ... --index_dir out/index \
        --test_data 'data/test-*.parquet' --output out/query --top_k 10

Writes ``<output>/topk.jsonl`` and ``topk.parquet`` (query_id, kind, rank, train_id, score; larger score
= more helpful = proponent), ``<output>/query_dead_letter.jsonl`` and ``<output>/summary.json``.
Every index shard is verified against the manifest (rows, checksum) as it is read. The files replace the
previous run's only when the job has finished (``beam_influence.beam.cleanup.staged``): a failed run (a full
disk: exit 2, one line naming the path) removes what it wrote and leaves the previous results untouched.
"""
from __future__ import annotations

import sys

import apache_beam as beam

from beam_influence.beam import (TOPK_SCHEMA, ProjectChunks, ReadChunks, TopKInfluence, WriteDeadLetters,
                                 WriteResult, check_index, complement_term, preflight, shard_refs, topk_rows)
from beam_influence.beam.cleanup import staged
from beam_influence.beam.resources import with_index_sketch
from beam_influence.options import QueryOptions
from pipelines._job import main as job_main
from pipelines._job import count_lines, execute, expect_rows, parse, pipeline_options, write_json


def project_queries(p, ref, opts, out_dir: str, label: str = "Queries", test_data: str | None = None):
    """Read + project the test queries (``test_data``, default ``opts.test_data``); their dead letters go to
    ``<out_dir>/query_dead_letter.jsonl``."""
    queries = (p | f"Read{label}" >> ReadChunks(test_data or opts.test_data, opts.data_format,
                                                batch_rows=opts.batch_rows)
               | f"Project{label}" >> ProjectChunks(ref, batch_size=opts.projection_batch_size))
    queries["dead_letter"] | f"Write{label}DeadLetters" >> WriteDeadLetters(f"{out_dir}/query_dead_letter")
    return queries["projected"]


def run(argv=None, test_pipeline=None) -> dict:
    """``python -m pipelines.query``: parse the flags (``QueryOptions``; the rest go to Beam) and run."""
    opts, beam_args = parse(QueryOptions, argv, __doc__, prog="python -m pipelines.query")
    return run_options(opts, beam_args, test_pipeline)


def run_options(opts: QueryOptions, beam_args=(), test_pipeline=None) -> dict:
    """Answer the queries that ``opts`` describe; returns the summary."""
    options = pipeline_options(opts, beam_args)
    with staged(opts.output) as out_dir:  # the results replace the previous ones only when complete
        ref, ctx = preflight(opts, "output")
        manifest = check_index(opts.index_dir, ctx.eigensystem)
        ref = with_index_sketch(ref, manifest)  # the queries are sketched with the index's map
        ctx = ref.load()
        term = complement_term.for_index_queries(opts.complement, opts.normalization, manifest, ctx, opts.rho)
        summary = _answer(opts, options, test_pipeline, ref, ctx, term, manifest, out_dir)
    final = opts.output.rstrip("/")
    # an empty result is complete (its dead letters say why): published, then reported as an error
    expect_rows("query", summary["topk_rows"], f"{final}/topk.jsonl", summary["query_dead_letters"])
    print(f"query: {summary['topk_rows']} top-k rows against {manifest['rows']} indexed examples, "
          f"{summary['query_dead_letters']} bad queries, complement {_mode(term)}, {summary['seconds']:.1f}s "
          f"→ {final}/topk.jsonl")
    return summary


def _answer(opts, options, test_pipeline, ref, ctx, term, manifest, out_dir: str) -> dict:
    """The Beam job and its summary, written into ``out_dir`` (the staging folder)."""
    shards = shard_refs(opts.index_dir, manifest)

    def build(p):
        queries = project_queries(p, ref, opts, out_dir)
        (p | "Shards" >> beam.Create(shards) | "SpreadShards" >> beam.Reshuffle()
         | "TopK" >> TopKInfluence(queries, ctx.eigvals, k=opts.top_k, normalization=opts.normalization,
                                   complement=term)
         | "WriteTopK" >> WriteResult(f"{out_dir}/topk", TOPK_SCHEMA, topk_rows))

    counts, seconds = execute(options, build, test_pipeline)
    summary = {"job": "query", "index_rows": manifest["rows"], "eigensystem_id": ctx.eigensystem.id,
               "top_k": opts.top_k, "normalization": opts.normalization, "complement": term.describe(),
               "index_sketch": complement_term.index_sketch(manifest),
               "seconds": seconds,
               "topk_rows": count_lines(f"{out_dir}/topk.jsonl"),
               "query_dead_letters": count_lines(f"{out_dir}/query_dead_letter.jsonl"), "counters": counts}
    write_json(f"{out_dir}/summary.json", summary)
    return summary


def _mode(term) -> str:
    d = term.describe()
    return d["mode"] + (f" (d={d['sketch_dim']}, ρ={d['rho']:.3g})" if "sketch_dim" in d else
                        f" (ρ={d['rho']:.3g})" if "rho" in d else " (truncated scores)")


if __name__ == "__main__":
    sys.exit(job_main(run, sys.argv[1:]))
