"""Query job: test records → projections (side input) × influence index → top-k proponents/opponents.

    python -m pipelines.query --spec ... --checkpoint ... --eigensystem ... --index_dir out/index \
        --test_data 'data/test-*.parquet' --output out/query --top_k 10

Writes ``<output>/topk.jsonl`` and ``topk.parquet`` (query_id, kind, rank, train_id, score; larger score
= more helpful = proponent), ``<output>/query_dead_letter.jsonl`` and ``<output>/summary.json``.

With ``--train_data`` (the index's training files) and a sketched complement the lists are exact: two stages
(``beam_influence.beam.rerank``): the index scan keeps each list's candidates (sketch estimate ± margin), their
records are read back by position and scored exactly; ``summary.json`` → ``exact_rerank`` says how many lists
are certified. Otherwise the lists rank the sketch's estimate and ``sketch_error`` records its size.
Every index shard is verified against the manifest (rows, checksum) as it is read. The files replace the
previous run's only when the job has finished (``beam_influence.beam.cleanup.staged``): a failed run (a full
disk: exit 2, one line naming the path) removes what it wrote and leaves the previous results untouched.
"""
from __future__ import annotations

import operator
import sys

import apache_beam as beam
import numpy as np

from beam_influence.beam import (TOPK_SCHEMA, ProjectChunks, ReadChunks, TopKInfluence, WriteDeadLetters,
                                 WriteJsonLines, WriteResult, check_index, complement_term, preflight, read_jsonl,
                                 shard_refs, topk_rows, write_rows)
from beam_influence.beam.cleanup import staged
from beam_influence.beam.resources import with_index_sketch
from beam_influence.options import QueryOptions
from beam_influence.util import read_json
from pipelines._job import main as job_main
from pipelines._job import another_pipeline, count_lines, execute, expect_rows, parse, pipeline_options, write_json


def project_queries(p, ref, opts, out_dir: str, label: str = "Queries", test_data: str | None = None):
    """Read + project the test queries (``test_data``, default ``opts.test_data``); their dead letters go to
    ``<out_dir>/query_dead_letter.jsonl``."""
    queries = (p | f"Read{label}" >> ReadChunks(test_data or opts.test_data, opts.data_format,
                                                batch_rows=opts.batch_rows, count_progress=False)
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
        rerank, why = rerank_mode(opts, term, manifest)
        print(f"query: exact rerank {rerank} ({why})", flush=True)
        if rerank == "on":
            summary = _answer_two_stage(opts, options, test_pipeline, ref, ctx, term, manifest, out_dir)
        else:
            summary = _answer(opts, options, test_pipeline, ref, ctx, term, manifest, out_dir)
        summary["exact_rerank"] = {"mode": rerank, "why": why, **summary.get("exact_rerank", {})}
        write_json(f"{out_dir}/summary.json", summary)
    final = opts.output.rstrip("/")
    # an empty result is complete (its dead letters say why): published, then reported as an error
    expect_rows("query", summary["topk_rows"], f"{final}/topk.jsonl", summary["query_dead_letters"])
    print(f"query: {summary['topk_rows']} top-k rows against {manifest['rows']} indexed examples, "
          f"{summary['query_dead_letters']} bad queries, complement {_mode(term)}, {summary['seconds']:.1f}s "
          f"→ {final}/topk.jsonl")
    return summary


def rerank_mode(opts: QueryOptions, term, manifest) -> tuple[str, str]:
    """("on" | "off", why): ``--exact_rerank auto`` is on when the complement is sketched, the index keeps its
    sources' digests and ``--train_data`` names them."""
    shards = manifest["shards"]
    readable = all(s.get("digest") and "records" in s for s in shards)
    if opts.exact_rerank == "off":
        return "off", "--exact_rerank off: lists ranked by the sketched complement"
    if term.mode != "sketch":
        if opts.exact_rerank == "on":
            raise ValueError("--exact_rerank on reranks the sketched complement's candidates, but this query scores "
                             f"with complement {term.mode!r}; use --complement sketch (or auto)")
        return "off", f"complement {term.mode}: the scores are exact in what they compute"
    if not readable:
        if opts.exact_rerank == "on":
            raise ValueError("--exact_rerank on: this index does not keep its sources' positions and digests (built "
                             "by an older version); rebuild it, or use --exact_rerank off")
        return "off", "the index predates read-back (no source digests): rebuild it for exact lists"
    method = (complement_term.index_sketch(manifest) or {}).get("method")
    if method not in ("count", "exact"):
        if opts.exact_rerank == "on":
            raise ValueError(f"--exact_rerank on: the margin is derived for the CountSketch; this index's sketch is "
                             f"{method!r}: rebuild it with --sketch_method count, or use --exact_rerank off")
        return "off", f"the index's {method} sketch has no margin derived for it (the CountSketch has)"
    if not opts.train_data:
        return "off", "no --train_data to read the candidates back from: the lists rank the sketch's estimate"
    return "on", "sketch candidates, then exact scores of their recomputed gradients"


def _answer(opts, options, test_pipeline, ref, ctx, term, manifest, out_dir: str) -> dict:
    """The Beam job and its summary, written into ``out_dir`` (the staging folder)."""
    shards = shard_refs(opts.index_dir, manifest)

    error_path = f"{out_dir}/_sketch_error.json"
    sketched = term.mode == "sketch" and (complement_term.index_sketch(manifest) or {}).get("method") in ("count", "exact")
    residual_rms = _residual_rms(shards[0], term) if sketched else None

    def build(p):
        queries = project_queries(p, ref, opts, out_dir)
        (p | "Shards" >> beam.Create(shards) | "SpreadShards" >> beam.Reshuffle()
         | "TopK" >> TopKInfluence(queries, ctx.eigvals, k=opts.top_k, normalization=opts.normalization,
                                   complement=term)
         | "WriteTopK" >> WriteResult(f"{out_dir}/topk", TOPK_SCHEMA, topk_rows))
        if residual_rms is not None:  # the sketch's estimated error per query, for the summary
            from beam_influence.beam.ranking import QuerySet

            (queries | "GatherForError" >> beam.combiners.ToList()
             | "SketchError" >> beam.Map(lambda c: write_json(error_path, _sketch_sigmas(QuerySet(c), term, manifest,
                                                                                       residual_rms))))

    counts, seconds = execute(options, build, test_pipeline, progress=("query: index rows", manifest["rows"]))
    summary = {"job": "query", "index_rows": manifest["rows"], "eigensystem_id": ctx.eigensystem.id,
               "top_k": opts.top_k, "normalization": opts.normalization, "complement": term.describe(),
               "index_sketch": complement_term.index_sketch(manifest),
               "seconds": seconds,
               "topk_rows": count_lines(f"{out_dir}/topk.jsonl"),
               "query_dead_letters": count_lines(f"{out_dir}/query_dead_letter.jsonl"), "counters": counts}
    if residual_rms is not None:
        from pipelines import _exact

        sigmas = read_json(error_path, {})
        _exact.remove([error_path])
        if sigmas:
            top = [abs(r["score"]) for r in read_jsonl(f"{out_dir}/topk.jsonl") if r["rank"] == 1]
            median = float(np.median(list(sigmas.values())))
            summary["sketch_error"] = {
                "sigma_per_query": sigmas, "sigma_median": median,
                "median_abs_rank1_score": float(np.median(top)) if top else None,
                "what": "standard deviation of a score's sketched complement, sqrt(2/d)·‖r_q‖·rms‖r_z‖/ρ "
                        "(rms over a sample of the index)"}
            print(f"query: the lists rank the sketch's estimate of the complement: each score is off by about "
                  f"{median:.3g} (one standard deviation, median over queries; median |rank-1 score| "
                  f"{summary['sketch_error']['median_abs_rank1_score'] or float('nan'):.3g}); "
                  "--exact_rerank on with --train_data gives exact lists", flush=True)
    return summary


def _residual_rms(shard, term) -> float:
    """rms of the sketched vectors' norms (‖(I − UUᵀ)∇ℓ‖, or ‖v̄‖ for a K-FAC sketch) over the rows of one index
    shard (a sample of the index)."""
    from beam_influence.beam.index import read_shard
    from beam_influence.beam.project import projection_matrix
    from beam_influence.beam.rerank import sketched_norms

    norms = []
    for rb in read_shard(shard, ["projection", term.residual_column]):
        sq = rb.column(term.residual_column).to_numpy(zero_copy_only=False)
        if not np.all(np.isfinite(sq)):
            return float("nan")
        norms.append(sketched_norms(sq, projection_matrix(rb), term))
    return float(np.sqrt(np.mean(np.concatenate(norms) ** 2))) if norms else float("nan")


def _sketch_sigmas(queries, term, manifest, residual_rms: float) -> dict:
    """{query id: σ_q = √(2/d)·‖r_q‖·rms‖r_z‖/ρ}, the standard deviation of a score's sketched complement."""
    from beam_influence.beam.rerank import SketchGeometry, query_margins

    if not queries.ids or getattr(queries, term.residual_column) is None or not np.isfinite(residual_rms):
        return {}
    geometry = SketchGeometry.of(complement_term.index_sketch(manifest))
    b = query_margins(queries, term, geometry, 1.0)
    return {q: float(b[i, 0] * residual_rms) for i, q in enumerate(queries.ids)}


def _answer_two_stage(opts, options, test_pipeline, ref, ctx, term, manifest, out_dir: str) -> dict:
    """Stage 1 (the candidates of every list: sketch estimate ± margin) and stage 2 (their records read back,
    gradients recomputed, exact scores), as ``beam_influence.beam.rerank`` describes; the summary records the
    margin, the candidates, the rows rescored and the lists certified exact (all, unless ``--rerank_candidates``
    cut a list short)."""
    import dataclasses
    import time

    from beam_influence.beam import rerank as rr
    from beam_influence.data import load_examples
    from pipelines import _exact

    t0 = time.time()
    stage = _Stages(opts, options, test_pipeline, ref, ctx, term, manifest, out_dir)
    state, qset, counts = stage.scan()
    t1 = time.time()
    from beam_influence.core.rerank import candidate_cap

    cap = candidate_cap(opts.rerank_candidates, opts.top_k, len(qset.ids) if qset else 0, manifest["rows"])
    rows: list = []
    info: dict = {"margin_sigmas": opts.rerank_margin, "sketch_dim": stage.geometry.dim,
                  "sketch_dtype": stage.geometry.dtype, "candidate_cap": cap,
                  "stage1_seconds": round(t1 - t0, 3)}
    lists = good = rescored = 0
    if state is not None and qset.ids:
        plan = rr.plan_rerank(state, stage.shards)
        test = load_examples(ctx.spec, opts.test_data, format=opts.data_format, batch_rows=opts.batch_rows)
        size, why = _exact.block_size(ctx, len(qset.ids), opts.query_block)
        n_blocks = -(-len(qset.ids) // size)
        print(f"query stage 2: {plan.candidates} candidates in {len(qset.ids)} × 2 lists, {len(plan.rows)} distinct rows "
              f"of {manifest['rows']} to read back and score exactly, {n_blocks} block(s) of ≤ {size} queries "
              f"({why})", flush=True)
        exact = ({"transform": ctx.kfac.vectors, "mode": "kfac", "kfac": term.kfac} if term.kfac_sketch else {})
        plain = dataclasses.replace(ref, kfac_self=False, sketch_space="gradient")  # stage 2 scores, no self-terms
        for block in _exact.blocks(ctx, plain, test, qset.ids, size, term.rho, out_dir, **exact):
            items = rr.work_items(plan, stage.shards, block.ids)
            rescored += sum(len(ids) for _, ids in items)
            qs_block = qset.subset(block.ids)
            qs_block.sketch = None  # exact scoring needs the projections only (and it goes to a hand-over file)
            rows.extend(topk_rows(stage.rescore(block, qs_block, plan, items, n_blocks)))
        lists, good = len(plan.complete), sum(plan.complete.values())
        info.update(candidates=plan.candidates, candidate_rows=len(plan.rows), rows_rescored=rescored,
                    query_blocks=n_blocks, query_block=size, block_reason=why)
    rows.sort(key=lambda r: (r["query_id"], r["kind"], r["rank"]))
    write_rows(f"{out_dir}/topk", rows, TOPK_SCHEMA)
    _exact.remove(stage.internal)
    info.update(lists=lists, certified_lists=good, stage2_seconds=round(time.time() - t1, 3))
    if lists and good < lists:
        print(f"query: WARNING {lists - good} of {lists} lists had more candidates than the cap ({cap}, "
              "--rerank_candidates): they rank the best candidates by exact scores, but are not certified exact; "
              "a larger cap, --sketch_dim or --rerank_margin trades memory and time for certainty", flush=True)
    elif lists:
        print(f"query: all {lists} lists exact ({rescored} candidate rows rescored of {manifest['rows']} indexed)",
              flush=True)
    return {"job": "query", "index_rows": manifest["rows"], "eigensystem_id": ctx.eigensystem.id,
            "top_k": opts.top_k, "normalization": opts.normalization, "complement": term.describe(),
            "index_sketch": complement_term.index_sketch(manifest),
            "query_dead_letters": count_lines(f"{out_dir}/query_dead_letter.jsonl"), "counters": counts,
            "seconds": time.time() - t0, "topk_rows": len(rows), "exact_rerank": info}


class _Stages:
    """The two Beam jobs of a two-stage query (``_answer_two_stage``), and the internal files they leave."""

    def __init__(self, opts, options, test_pipeline, ref, ctx, term, manifest, out_dir: str):
        from beam_influence.beam import rerank as rr

        self.opts, self.options, self.test_pipeline = opts, options, test_pipeline
        self.ref, self.ctx, self.term, self.manifest, self.out_dir = ref, ctx, term, manifest, out_dir
        self.shards = [dict(s, part=i) for i, s in enumerate(shard_refs(opts.index_dir, manifest))]
        self.geometry = rr.SketchGeometry.of(complement_term.index_sketch(manifest))
        self.sources = rr.source_table(opts.train_data)
        args = manifest.get("args") or {}
        self.fmt, self.batch_rows = args.get("data_format"), int(args.get("batch_rows") or opts.batch_rows)
        self.internal: list[str] = []
        self.runs = 0
        self.cap = opts.rerank_candidates  # None: core.rerank.candidate_cap's default once the queries are known

    def _pipeline(self):
        self.runs += 1
        return self.test_pipeline if self.runs == 1 else another_pipeline(self.test_pipeline)

    def scan(self):
        """Stage 1: (``MarginCandidates`` or None when no query projected, ``QuerySet``, counters)."""
        from beam_influence.beam import rerank as rr
        from beam_influence.beam.ranking import QuerySet
        from pipelines import _exact

        opts, path = self.opts, f"{self.out_dir}/_stage1.pkl"
        self.internal.append(path)

        def build(p):
            queries = project_queries(p, self.ref, opts, self.out_dir)
            qset = queries | "GatherQueries" >> beam.combiners.ToList() | "AsQuerySet" >> beam.Map(QuerySet)
            state = (p | "Shards" >> beam.Create(self.shards) | "SpreadShards" >> beam.Reshuffle()
                     | "Candidates" >> rr.ScanCandidates(qset, self.ctx.eigvals, top_k=opts.top_k, term=self.term,
                                                         geometry=self.geometry, z=opts.rerank_margin,
                                                         cap=self.cap, rows=self.manifest["rows"]))
            state | "WriteStage1" >> beam.Map(lambda s, q: _exact.write_pickle(path, (s, q)),
                                              q=beam.pvalue.AsSingleton(qset))

        print(f"query stage 1: the candidates of every list (sketch estimate ± {opts.rerank_margin:g} σ, "
              f"d={self.geometry.dim}, {self.geometry.dtype})", flush=True)
        counts, _ = execute(self.options, build, self._pipeline(),
                            progress=("query stage 1: index rows", self.manifest["rows"]))
        from apache_beam.io.filesystems import FileSystems

        if not FileSystems.exists(path):
            return None, None, counts
        state, qset = _exact.read_pickle(path)
        return state, qset, counts

    def rescore(self, block, qs_block, plan, items, n_blocks: int):
        """Stage 2 for one block of queries: the candidates ``items`` read back, projected beside the block's
        query gradients, each scored exactly against the queries whose list holds it (``plan``) → the exact
        ``TopK`` (k = top_k) of every list. A changed source or a row that no longer projects is an error naming
        it; a candidate pair left unscored is an error too."""
        from beam_influence.beam import rerank as rr
        from beam_influence.beam.ranking import TopKCombineFn
        from beam_influence.core.candidates import CandidateScores
        from pipelines import _exact

        opts = self.opts
        lists = rr.candidate_lists(plan, qs_block.ids)
        # the queries, their candidate pairs and the work items reach the workers through a file, not pickled
        # (and compressed) into the pipeline's definition
        given_path = f"{self.out_dir}/_stage2_given_{block.index}.pkl"
        _exact.write_pickle(given_path, (qs_block, lists, items))
        state_path = f"{self.out_dir}/_stage2_{block.index}.pkl"
        mismatch = f"{self.out_dir}/_mismatch_{block.index}"
        dead = f"{self.out_dir}/_rerank_dead_{block.index}"
        self.internal += [state_path, given_path, block.ref.query_gradients, mismatch + ".jsonl", dead + ".jsonl"]

        def build(p):
            given = p | "Given" >> beam.Create([given_path]) | "ReadGiven" >> beam.Map(_exact.read_pickle)
            qs, pairs = (given | f"Take{i}" >> beam.Map(operator.itemgetter(i)) for i in (0, 1))
            read = (given | "Candidates" >> beam.FlatMap(operator.itemgetter(2))
                    | "ReadBack" >> rr.ReadBack(self.sources, self.fmt, self.batch_rows))
            read[rr.MISMATCH] | "WriteMismatch" >> WriteJsonLines(mismatch)
            proj = read["chunks"] | "Project" >> ProjectChunks(block.ref, batch_size=opts.projection_batch_size)
            proj["dead_letter"] | "WriteDead" >> WriteDeadLetters(dead)
            (proj["projected"]
             | "Score" >> beam.ParDo(rr.ScoreCandidatesFn(self.ctx.eigvals, k=opts.top_k, complement=block.term),
                                     queries=beam.pvalue.AsSingleton(qs), lists=beam.pvalue.AsSingleton(pairs))
             | "Merge" >> beam.CombineGlobally(TopKCombineFn())
             | "WriteState" >> beam.Map(lambda s: _exact.write_pickle(state_path, s)))

        execute(self.options, build, self._pipeline(), progress=(
            f"query stage 2 (block {block.index + 1}/{n_blocks}): candidates read back",
            sum(len(ids) for _, ids in items)))
        bad = read_jsonl(mismatch + ".jsonl")
        if bad:
            raise rr.SourceChangedError(f"exact rerank: {len(bad)} training source chunk(s) changed since the index "
                                        f"was built; first: {bad[0]['reason']}")
        n_dead = count_lines(dead + ".jsonl")
        if n_dead:
            raise ValueError(f"exact rerank: {n_dead} candidate rows could not be rescored (indexed before, now "
                             f"dead-lettered: {dead}.jsonl); the model or the data changed since indexing")
        state = _exact.read_pickle(state_path)  # None: no row was scored
        return (state or CandidateScores(qs_block.ids)).topk(lists, opts.top_k)


def _mode(term) -> str:
    d = term.describe()
    if term.kfac_sketch:
        return f"kfac, sketched (d={d['sketch_dim']}, {d.get('kind')}, {d.get('compose')}, δ={d.get('damping', 0):.3g})"
    return d["mode"] + (f" (d={d['sketch_dim']}, ρ={d['rho']:.3g})" if "sketch_dim" in d else
                        f" (ρ={d['rho']:.3g})" if "rho" in d else " (truncated scores)")


if __name__ == "__main__":
    sys.exit(job_main(run, sys.argv[1:]))
