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
                                 TopSelfInfluence, WriteDeadLetters, WriteResult, complement_term, preflight, read_jsonl,
                                 self_rows, topk_rows, write_rows)
from beam_influence.beam.cleanup import staged
from beam_influence.core.complement import resolve_rho
from beam_influence.options import FusedOptions
from pipelines._job import main as job_main
from pipelines._job import another_pipeline, count_lines, execute, expect_rows, parse, pipeline_options, write_json
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
        summary = _run_staged(opts, options, test_pipeline, ref, ctx, out_dir, beam_args)
    # an empty result is complete (its dead letters say why): published, then reported as an error
    expect_rows("fused", summary["topk_rows"], f"{final}/topk.jsonl", summary["query_dead_letters"],
                train_dead=summary["dead_letters"])
    route = summary.get("exact_scoring") or {}
    how = (f"{summary['complement']['mode']}" if route.get("route") != "rerank" else
           f"{summary['exact_scoring'].get('mode', 'exact')} through an index (sketch candidates rescored "
           f"exactly; {route['certified_lists']} of {route['lists']} lists certified)")
    print(f"fused: {summary['topk_rows']} top-k rows, {summary['dead_letters']} dead letters, complement {how}, "
          f"{summary['seconds']:.1f}s → {final}")
    return summary


def _run_staged(opts: FusedOptions, options, test_pipeline, ref, ctx, out_dir: str, beam_args=()) -> dict:
    """The fused Beam job(s) and the summary, written into ``out_dir`` (the staging folder). With the exact
    complement the query gradients are held beside U in blocks the memory plan sizes: one pass over the
    training data per block (self-influence and dead letters in the first), or, when that takes several
    passes, an index and the two-stage query (``--exact_scoring``, ``_run_via_index``)."""
    from pipelines import _exact

    term, ref, ctx, blocks, route = fused_complement(opts, ref, ctx, out_dir)
    if isinstance(blocks, Rerank):
        return _run_via_index(opts, beam_args, test_pipeline, out_dir, term, blocks)
    read_train = ReadChunks(opts.train_data, opts.data_format, batch_rows=opts.batch_rows)
    self_term = (complement_term.ComplementTerm("exact", term.rho) if term.mode in ("exact", "sketch")
                 else term)  # ‖∇ℓ‖² is always exact; kfac: the worker's kfac_self column
    from beam_influence.beam.progress import parquet_rows

    passes = blocks or [None]
    counts, seconds, parts = {}, 0.0, []
    for block in passes:
        first = block is None or block.index == 0
        block_ref, block_term = (ref, term) if block is None else (block.ref, block.term)
        topk_path = f"{out_dir}/topk" if len(passes) == 1 else f"{out_dir}/_topk_{block.index}"
        parts.append(topk_path)
        only = None if block is None else list(block.term.query_ids)

        def build(p, block_ref=block_ref, block_term=block_term, topk_path=topk_path, first=first, only=only):
            queries = project_queries(p, block_ref, opts, out_dir)
            read = read_train if first else ReadChunks(read_train.paths, opts.data_format, batch_rows=opts.batch_rows)
            train = (p | "ReadTrain" >> read
                     | "ProjectTrain" >> ProjectChunks(block_ref, batch_size=opts.projection_batch_size))
            (train["projected"]
             | "TopK" >> TopKInfluence(queries, ctx.eigvals, k=opts.top_k, normalization=opts.normalization,
                                       source="chunks", complement=block_term, only=only)
             | "WriteTopK" >> WriteResult(topk_path, TOPK_SCHEMA, topk_rows))
            if first:
                (train["projected"]
                 | "TopSelfInfluence" >> TopSelfInfluence(opts.self_influence_top, source="chunks",
                                                          eigvals=ctx.eigvals, complement=self_term)
                 | "WriteSelf" >> WriteResult(f"{out_dir}/self_influence_top", SELF_SCHEMA, self_rows))
                train["dead_letter"] | "WriteDeadLetters" >> WriteDeadLetters(f"{out_dir}/dead_letter")

        label = "run: training records" + (f" (query block {block.index + 1}/{len(passes)})" if blocks and
                                           len(passes) > 1 else "")
        c, sec = execute(options, build, test_pipeline if first else another_pipeline(test_pipeline),
                         progress=(label, parquet_rows(read_train.paths)))
        counts = counts or c
        seconds += sec
    if len(passes) > 1:  # the blocks' lists, one file (each block holds different queries)
        rows = [r for path in parts for r in read_jsonl(path + ".jsonl")]
        rows.sort(key=lambda r: (r["query_id"], r["kind"], r["rank"]))
        write_rows(f"{out_dir}/topk", rows, TOPK_SCHEMA)
        _exact.remove([x for path in parts for x in (path + ".jsonl", path + ".parquet")])
    if blocks:
        _exact.remove([b.ref.query_gradients for b in blocks])
    summary = {"job": "fused", "eigensystem_id": ctx.eigensystem.id, "top_k": opts.top_k,
               "complement": term.describe(), "seconds": seconds,
               "query_blocks": len(blocks), "passes": len(passes), "exact_scoring": route,
               "topk_rows": count_lines(f"{out_dir}/topk.jsonl"),
               "self_influence_rows": count_lines(f"{out_dir}/self_influence_top.jsonl"),
               "dead_letters": count_lines(f"{out_dir}/dead_letter.jsonl"),
               "query_dead_letters": count_lines(f"{out_dir}/query_dead_letter.jsonl"), "counters": counts}
    write_json(f"{out_dir}/summary.json", summary)
    return summary


def fused_complement(opts, ref, ctx, out_dir: str):
    """(ComplementTerm, ref, ctx, blocks, route) of the fused job: ``exact`` holds the test gradients beside U on
    the workers, in blocks of queries the memory plan sizes (``pipelines._exact``; written by the launcher to
    ``<output>/_query_gradients_<b>.npz``), or takes the index route (``blocks`` is then a ``Rerank``; ``route``:
    the summary's ``exact_scoring``); ``sketch`` projects with a sketch; ``none`` neither."""
    from beam_influence.data import load_examples
    from pipelines import _exact

    complement_term.check_mode(opts.complement, opts.normalization)
    mode = opts.complement
    if mode == "auto":
        has_kfac = bool(getattr(ctx.eigensystem, "kfac", None))
        mode = "none" if opts.normalization != "none" else "kfac" if has_kfac else "exact"
    if opts.exact_scoring == "rerank" and mode in ("none", "sketch"):
        raise ValueError(f"--exact_scoring rerank chooses how the exact or K-FAC complement is scored; the "
                         f"complement here is {mode!r} (one pass): drop --exact_scoring, or use --complement auto")
    if mode == "none":
        return complement_term.ComplementTerm(), ref, ctx, [], None
    rho, transform, desc = 0.0, None, ()
    if mode == "kfac":  # K-FAC complement vectors w_q beside U, and each row's K-FAC self-term
        ref = dataclasses.replace(ref, sketch_dim=0, kfac_self=True)
        ctx = ref.load()
        transform, desc = ctx.kfac.vectors, tuple(sorted(complement_term.kfac_description(ctx.kfac).items()))
        what = f"K-FAC complement ({ctx.kfac.kind}, {ctx.kfac.compose}, δ={ctx.kfac.damping:.3g})"
    else:
        rho = resolve_rho(ctx.eigvals, opts.rho)
        if mode == "sketch":
            if not ref.sketch_dim:
                raise ValueError("--complement sketch needs --sketch_dim > 0")
            ctx = ref.load()
            return complement_term.ComplementTerm("sketch", rho, ctx.basis_sketch), ref, ctx, [], None
        ref = dataclasses.replace(ref, sketch_dim=0)
        what = "exact complement"
    queries = load_examples(ctx.spec, opts.test_data, format=opts.data_format, batch_rows=opts.batch_rows)
    size, why = _exact.block_size(ctx, queries.n, opts.query_block)
    n = -(-queries.n // size)
    route, because = exact_route(opts.exact_scoring, n, given_block=opts.query_block is not None,
                                 sketch_dim=opts.sketch_dim)
    if route == "rerank":
        print(f"fused: {what}, {queries.n} queries: {because}; {n} block(s) of ≤ {size} ({why}) would take {n} "
              "passes over the training data", flush=True)
        return complement_term.ComplementTerm(mode, rho, kfac=desc), ref, ctx, Rerank(n, size, because), None
    print(f"fused: {what}, {queries.n} queries in {n} block(s) of ≤ {size} ({why}): {n} pass(es) over the training "
          f"data ({because})", flush=True)
    blocks = list(_exact.blocks(ctx, ref, queries, queries.ids, size, rho, out_dir, transform=transform, mode=mode,
                                kfac=desc))
    return (complement_term.ComplementTerm(mode, rho, kfac=desc), ref, ctx, blocks,
            {"route": "passes", "why": because, "blocks": len(blocks)})


@dataclasses.dataclass(frozen=True)
class Rerank:
    """The fused job's exact scoring through an index and the two-stage query (``--exact_scoring``): the query
    blocks it avoids and why."""

    blocks: int
    block_size: int
    why: str


def exact_route(requested: str, n_blocks: int, *, given_block: bool, sketch_dim: int) -> tuple[str, str]:
    """(``passes`` or ``rerank``, why): ``--exact_scoring``; auto takes the passes when the memory plan holds every
    query in one block (one pass) or ``--query_block`` asks for blocks, else the index + two-stage query (one
    indexing pass, then a scan of the index and the candidates' rescoring, instead of ``n_blocks`` passes)."""
    if requested == "passes":
        return "passes", "--exact_scoring passes"
    if requested == "rerank" or (requested == "auto" and n_blocks > 1 and not given_block):
        if sketch_dim <= 0:
            if requested == "rerank":
                raise ValueError("--exact_scoring rerank indexes the training data with a sketch: give "
                                 "--sketch_dim > 0")
            return "passes", f"{n_blocks} blocks, but --sketch_dim 0 leaves no index route"
        return "rerank", ("--exact_scoring rerank" if requested == "rerank" else
                          f"the query gradients need {n_blocks} blocks: indexing once and reranking instead "
                          "(--exact_scoring auto)")
    return "passes", "one block holds every query" if n_blocks == 1 else "--query_block given"


def _sub_options(cls, opts, **changes):
    """``cls`` (another job's options) from the fields it shares with ``opts``, with ``changes``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name in names}, **changes})


def _run_via_index(opts: FusedOptions, beam_args, test_pipeline, out_dir: str, term, rerank: Rerank) -> dict:
    """The fused job's results through ``index`` (into ``<staging>/_index``, with the sketch the complement
    needs), ``query --exact_rerank on`` and ``self-influence`` on it; the lists, self-influence and dead
    letters moved into ``out_dir`` under the fused job's names."""
    from apache_beam.io.filesystems import FileSystems

    from beam_influence.options import IndexOptions, QueryOptions, SelfInfluenceOptions
    from pipelines import _exact, index, query, self_influence

    scalar = term.mode == "exact"
    idx, q_out, s_out = f"{out_dir}/_index", f"{out_dir}/_query", f"{out_dir}/_self"
    manifest = index.run_options(_sub_options(IndexOptions, opts, index_dir=idx,
                                              sketch_space="gradient" if scalar else "kfac"), beam_args, test_pipeline)
    q = query.run_options(_sub_options(QueryOptions, opts, index_dir=idx, output=q_out, exact_rerank="on",
                                       complement="sketch" if scalar else "kfac"),
                          beam_args, another_pipeline(test_pipeline))
    s = self_influence.run_options(_sub_options(SelfInfluenceOptions, opts, index_dir=idx, output=s_out,
                                                complement=term.mode), beam_args, another_pipeline(test_pipeline))
    moves = [(f"{q_out}/{name}", f"{out_dir}/{name}") for name in ("topk.jsonl", "topk.parquet",
                                                                     "query_dead_letter.jsonl")]
    moves += [(f"{s_out}/{name}", f"{out_dir}/{name}") for name in ("self_influence_top.jsonl",
                                                                      "self_influence_top.parquet")]
    moves.append((f"{idx}/{manifest['dead_letter_file']}", f"{out_dir}/dead_letter.jsonl"))
    FileSystems.rename([a for a, _ in moves], [b for _, b in moves])
    info = q["exact_rerank"]
    summary = {"job": "fused", "eigensystem_id": manifest["eigensystem_id"], "top_k": opts.top_k,
               "complement": q["complement"],  # what the lists are: the sketch's candidates, rescored exactly
               "seconds": manifest.get("seconds", 0.0) + q["seconds"] + s["seconds"],
               "query_blocks": rerank.blocks, "passes": 1,
               "exact_scoring": {"route": "rerank", "mode": term.mode, "why": rerank.why,
                                 "blocks_avoided": rerank.blocks,
                                 "lists": info.get("lists"), "certified_lists": info.get("certified_lists"),
                                 "rows_rescored": info.get("rows_rescored"), "index_rows": manifest["rows"]},
               "exact_rerank": info, "topk_rows": count_lines(f"{out_dir}/topk.jsonl"),
               "self_influence_rows": count_lines(f"{out_dir}/self_influence_top.jsonl"),
               "dead_letters": count_lines(f"{out_dir}/dead_letter.jsonl"),
               "query_dead_letters": count_lines(f"{out_dir}/query_dead_letter.jsonl"), "counters": q["counters"]}
    _exact.remove([idx, q_out, s_out])
    write_json(f"{out_dir}/summary.json", summary)
    return summary


if __name__ == "__main__":
    sys.exit(job_main(run, sys.argv[1:]))
