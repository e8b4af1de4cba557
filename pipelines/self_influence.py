"""Self-influence audit: the top-N training examples by self-influence Σ_i P_i(z)²/λ_i, from the index.

    python -m pipelines.self_influence --spec ... --checkpoint ... --eigensystem ... \
        --index_dir out/index --output out/audit --self_influence_top 100

High self-influence = the example is hard to fit from the rest of the data: mislabelled, atypical
or duplicated-with-conflict examples rank first. Writes ``<output>/self_influence_top.{jsonl,parquet}`` and
``self_influence_summary.json``, replacing the previous run's only when the job has finished (a failed run
removes what it wrote: ``beam_influence.beam.cleanup.staged``).
"""
from __future__ import annotations

import sys

import apache_beam as beam

from beam_influence.beam import (SELF_SCHEMA, TopSelfInfluence, WriteResult, check_index, complement_term, preflight,
                                 self_rows, shard_refs)
from beam_influence.beam.cleanup import staged
from beam_influence.options import SelfInfluenceOptions
from pipelines._job import main as job_main
from pipelines._job import EmptyResultError, count_lines, execute, parse, pipeline_options, write_json


def run(argv=None, test_pipeline=None) -> dict:
    """``python -m pipelines.self_influence``: parse the flags (``SelfInfluenceOptions``) and run."""
    opts, beam_args = parse(SelfInfluenceOptions, argv, __doc__, prog="python -m pipelines.self_influence")
    return run_options(opts, beam_args, test_pipeline)


def run_options(opts: SelfInfluenceOptions, beam_args=(), test_pipeline=None) -> dict:
    """Rank the index that ``opts`` name by self-influence; returns the summary."""
    options = pipeline_options(opts, beam_args)
    final = opts.output.rstrip("/")
    with staged(final) as out_dir:  # the results replace the previous ones only when complete
        _, ctx = preflight(opts, "output")
        manifest = check_index(opts.index_dir, ctx.eigensystem)
        term = complement_term.for_self_influence(opts.complement, manifest, ctx, opts.rho)

        def build(p):
            (p | "Shards" >> beam.Create(shard_refs(opts.index_dir, manifest)) | "SpreadShards" >> beam.Reshuffle()
             | "TopSelfInfluence" >> TopSelfInfluence(opts.self_influence_top, eigvals=ctx.eigvals, complement=term)
             | "Write" >> WriteResult(f"{out_dir}/self_influence_top", SELF_SCHEMA, self_rows))

        counts, seconds = execute(options, build, test_pipeline)
        summary = {"job": "self-influence", "index_rows": manifest["rows"], "top": opts.self_influence_top,
                   "complement": term.describe(),
                   "rows_written": count_lines(f"{out_dir}/self_influence_top.jsonl"), "seconds": seconds,
                   "counters": counts}
        want = min(opts.self_influence_top, manifest["rows"])
        if summary["rows_written"] != want:  # a short result is never published
            raise EmptyResultError(f"self-influence wrote {summary['rows_written']} rows, expected {want} "
                                   f"(index of {manifest['rows']} rows); {final} was left as it was")
        write_json(f"{out_dir}/self_influence_summary.json", summary)
    print(f"self-influence: top {summary['rows_written']} of {manifest['rows']} examples, complement "
          f"{term.describe()['mode']}, {seconds:.1f}s "
          f"→ {final}/self_influence_top.jsonl")
    return summary


if __name__ == "__main__":
    sys.exit(job_main(run, sys.argv[1:]))
