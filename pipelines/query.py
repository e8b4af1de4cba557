"""Query job: test records → projections (side input) × influence index → top-k proponents/opponents.

    python -m pipelines.query --spec ... --checkpoint ... --eigensystem ... --index_dir out/index \
        --test_data 'data/test-*.parquet' --output out/query --top_k 10

Writes ``<output>/topk.jsonl`` and ``topk.parquet`` (query_id, kind, rank, train_id, score; larger score
= more helpful = proponent), ``<output>/query_dead_letter.jsonl`` and ``<output>/summary.json``.
"""
from __future__ import annotations

import sys

from beam_influence.beam import (TOPK_SCHEMA, ProjectGradients, ReadExamples, ReadIndex, TopKInfluence,
                                 WriteDeadLetters, WriteSortedRows, check_index, preflight)
from pipelines._job import count_lines, execute, parse, write_json


def topk_sort_key(row: dict) -> tuple:
    return (row["query_id"], row["kind"], row["rank"])


def run(argv=None, test_pipeline=None) -> dict:
    options, opts = parse(argv, __doc__)
    ref, ctx = preflight(opts, "test_data", "index_dir", "output")
    manifest = check_index(opts.index_dir, ctx.eigensystem)
    out_dir = opts.output.rstrip("/")

    def build(p):
        queries = (p | "ReadQueries" >> ReadExamples(opts.test_data, opts.data_format)
                   | "ProjectQueries" >> ProjectGradients(ref, batch_size=opts.batch_size))
        train = p | "ReadIndex" >> ReadIndex(opts.index_dir, shards=[s["path"] for s in manifest["shards"]])
        (train
         | "TopK" >> TopKInfluence(queries["projected"], ctx.eigvals, k=opts.top_k,
                                   batch_size=opts.score_batch_size, normalization=opts.normalization)
         | "WriteTopK" >> WriteSortedRows(f"{out_dir}/topk", TOPK_SCHEMA, topk_sort_key))
        queries["dead_letter"] | "WriteDeadLetters" >> WriteDeadLetters(f"{out_dir}/query_dead_letter")

    counts, seconds = execute(options, build, test_pipeline)
    summary = {"job": "query", "index_rows": manifest["rows"], "eigensystem_id": ctx.eigensystem.id,
               "top_k": opts.top_k, "normalization": opts.normalization, "seconds": seconds,
               "topk_rows": count_lines(f"{out_dir}/topk.jsonl"),
               "query_dead_letters": count_lines(f"{out_dir}/query_dead_letter.jsonl"), "counters": counts}
    write_json(f"{out_dir}/summary.json", summary)
    print(f"query: {summary['topk_rows']} top-k rows against {manifest['rows']} indexed examples, "
          f"{summary['query_dead_letters']} bad queries, {seconds:.1f}s → {out_dir}/topk.jsonl")
    return summary


if __name__ == "__main__":
    run(sys.argv[1:])
