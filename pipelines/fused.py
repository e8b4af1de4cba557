"""Fused job: training records → projections → top-k per query and self-influence, in one pass,
without writing an index (for one-off questions). The results replace the previous run's in ``--output``
only when the job has finished; a failed run removes what it wrote (``beam_influence.beam.cleanup.staged``).

    python -m pipelines.fused --spec ... --checkpoint ... --eigensystem ... \
        --train_data 'data/train-*' --test_data 'data/test-*' --output out/fused
"""
from __future__ import annotations

import sys

import dataclasses

from beam_influence.beam import (SELF_SCHEMA, TOPK_SCHEMA, ProjectChunks, ReadChunks, TopKInfluence,
                                 TopSelfInfluence, WriteDeadLetters, WriteResult, complement_term, preflight, self_rows,
                                 topk_rows)
from beam_influence.beam.cleanup import staged
from beam_influence.core.complement import resolve_rho
from beam_influence.core.curvature import num_params
from beam_influence.options import FusedOptions
from pipelines._job import main as job_main
from pipelines._job import count_lines, execute, expect_rows, parse, pipeline_options, write_json
from pipelines.query import project_queries


def run(argv=None, test_pipeline=None) -> dict:
    """``python -m pipelines.fused``: parse the flags (``FusedOptions``; the rest go to Beam) and run."""
    opts, beam_args = parse(FusedOptions, argv, __doc__, prog="python -m pipelines.fused")
    return run_options(opts, beam_args, test_pipeline)


def run_options(opts: FusedOptions, beam_args=(), test_pipeline=None) -> dict:
    """The fused job that ``opts`` describe; returns the summary."""
    options = pipeline_options(opts, beam_args)
    final = opts.output.rstrip("/")
    with staged(final) as out_dir:  # the results replace the previous ones only when complete
        ref, ctx = preflight(opts, "output")
        summary = _run_staged(opts, options, test_pipeline, ref, ctx, out_dir)
    # an empty result is complete (its dead letters say why): published, then reported as an error
    expect_rows("fused", summary["topk_rows"], f"{final}/topk.jsonl", summary["query_dead_letters"],
                train_dead=summary["dead_letters"])
    print(f"fused: {summary['topk_rows']} top-k rows, {summary['dead_letters']} dead letters, complement "
          f"{summary['complement']['mode']}, {summary['seconds']:.1f}s → {final}")
    return summary


def _run_staged(opts: FusedOptions, options, test_pipeline, ref, ctx, out_dir: str) -> dict:
    """The fused Beam job and its summary, written into ``out_dir`` (the staging folder)."""
    term, ref, ctx = fused_complement(opts, ref, ctx, out_dir)
    read_train = ReadChunks(opts.train_data, opts.data_format, batch_rows=opts.batch_rows)

    self_term = complement_term.ComplementTerm("exact", term.rho) if term.on else term  # ‖∇ℓ‖² is always exact

    def build(p):
        queries = project_queries(p, ref, opts, out_dir)
        train = (p | "ReadTrain" >> read_train | "ProjectTrain" >> ProjectChunks(ref, batch_size=opts.projection_batch_size))
        (train["projected"]
         | "TopK" >> TopKInfluence(queries, ctx.eigvals, k=opts.top_k, normalization=opts.normalization,
                                   source="chunks", complement=term)
         | "WriteTopK" >> WriteResult(f"{out_dir}/topk", TOPK_SCHEMA, topk_rows))
        (train["projected"] | "TopSelfInfluence" >> TopSelfInfluence(opts.self_influence_top, source="chunks", eigvals=ctx.eigvals,
                                                          complement=self_term)
         | "WriteSelf" >> WriteResult(f"{out_dir}/self_influence_top", SELF_SCHEMA, self_rows))
        train["dead_letter"] | "WriteDeadLetters" >> WriteDeadLetters(f"{out_dir}/dead_letter")

    from beam_influence.beam.progress import parquet_rows

    counts, seconds = execute(options, build, test_pipeline,
                              progress=("run: training records", parquet_rows(read_train.paths)))
    summary = {"job": "fused", "eigensystem_id": ctx.eigensystem.id, "top_k": opts.top_k,
               "complement": term.describe(), "seconds": seconds,
               "topk_rows": count_lines(f"{out_dir}/topk.jsonl"),
               "self_influence_rows": count_lines(f"{out_dir}/self_influence_top.jsonl"),
               "dead_letters": count_lines(f"{out_dir}/dead_letter.jsonl"),
               "query_dead_letters": count_lines(f"{out_dir}/query_dead_letter.jsonl"), "counters": counts}
    write_json(f"{out_dir}/summary.json", summary)
    return summary


def fused_complement(opts, ref, ctx, out_dir: str):
    """(ComplementTerm, ref, ctx) of the fused job: ``exact`` holds the test gradients beside U on the workers
    (written once by the launcher to ``<output>/query_gradients.npz``), ``sketch`` projects with a sketch."""
    from beam_influence.data import load_examples

    complement_term.check_mode(opts.complement, opts.normalization)
    queries = None
    if opts.complement in ("auto", "exact") and opts.normalization == "none":  # queries are few: read them here
        queries = load_examples(ctx.spec, opts.test_data, format=opts.data_format, batch_rows=opts.batch_rows)
    mode = complement_term.fused_mode(opts.complement, opts.normalization, queries.n if queries else 0,
                                 num_params(ctx.params))
    if mode == "none":
        return complement_term.ComplementTerm(), ref, ctx
    rho = resolve_rho(ctx.eigvals, opts.rho)
    if mode == "sketch":
        if not ref.sketch_dim:
            raise ValueError("--complement sketch needs --sketch_dim > 0")
        ctx = ref.load()
        return complement_term.ComplementTerm("sketch", rho, ctx.basis_sketch), ref, ctx
    path = f"{out_dir}/query_gradients.npz"
    complement_term.write_query_gradients(path, ctx.spec, ctx.params, queries)
    ref = dataclasses.replace(ref, sketch_dim=0, query_gradients=path)
    ctx = ref.load()
    return complement_term.ComplementTerm("exact", rho, query_ids=tuple(ctx.query_ids)), ref, ctx


if __name__ == "__main__":
    sys.exit(job_main(run, sys.argv[1:]))
