"""Fused job: training records → projections → top-k per query and self-influence, in one pass,
without writing an index (for one-off questions).

    python -m pipelines.fused --spec ... --checkpoint ... --eigensystem ... \
        --train_data 'data/train-*' --test_data 'data/test-*' --output out/fused
"""
from __future__ import annotations

import sys

from beam_influence.beam import (SELF_SCHEMA, TOPK_SCHEMA, ProjectGradients, ReadExamples, TopKInfluence,
                                 TopSelfInfluence, WriteDeadLetters, WriteSortedRows, preflight)
from pipelines._job import count_lines, execute, parse, write_json
from pipelines.query import topk_sort_key


def run(argv=None, test_pipeline=None) -> dict:
    options, opts = parse(argv, __doc__)
    ref, ctx = preflight(opts, "train_data", "test_data", "output")
    out_dir = opts.output.rstrip("/")

    def build(p):
        queries = (p | "ReadQueries" >> ReadExamples(opts.test_data, opts.data_format)
                   | "ProjectQueries" >> ProjectGradients(ref, batch_size=opts.batch_size))
        train = (p | "ReadTrain" >> ReadExamples(opts.train_data, opts.data_format)
                 | "ProjectTrain" >> ProjectGradients(ref, batch_size=opts.batch_size))
        (train["projected"]
         | "TopK" >> TopKInfluence(queries["projected"], ctx.eigvals, k=opts.top_k,
                                   batch_size=opts.score_batch_size, normalization=opts.normalization)
         | "WriteTopK" >> WriteSortedRows(f"{out_dir}/topk", TOPK_SCHEMA, topk_sort_key))
        (train["projected"] | "TopSelfInfluence" >> TopSelfInfluence(opts.self_influence_top)
         | "WriteSelf" >> WriteSortedRows(f"{out_dir}/self_influence_top", SELF_SCHEMA, lambda r: r["rank"]))
        train["dead_letter"] | "WriteDeadLetters" >> WriteDeadLetters(f"{out_dir}/dead_letter")
        queries["dead_letter"] | "WriteQueryDeadLetters" >> WriteDeadLetters(f"{out_dir}/query_dead_letter")

    counts, seconds = execute(options, build, test_pipeline)
    summary = {"job": "fused", "eigensystem_id": ctx.eigensystem.id, "top_k": opts.top_k, "seconds": seconds,
               "topk_rows": count_lines(f"{out_dir}/topk.jsonl"),
               "dead_letters": count_lines(f"{out_dir}/dead_letter.jsonl"),
               "query_dead_letters": count_lines(f"{out_dir}/query_dead_letter.jsonl"), "counters": counts}
    write_json(f"{out_dir}/summary.json", summary)
    print(f"fused: {summary['topk_rows']} top-k rows, {summary['dead_letters']} dead letters, {seconds:.1f}s → {out_dir}")
    return summary


if __name__ == "__main__":
    run(sys.argv[1:])
