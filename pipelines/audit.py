"""Recurring data audit: index only the new training shards, refresh suspects and standing queries,
report and diff against the previous run; exit 3 when a configured threshold is crossed.

    python -m pipelines.audit --config audit.json [--run_id ID] [Beam flags, e.g. --runner=DataflowRunner ...]
    beam-influence audit --config audit.json

Per run (see ``beam_influence.audit``):
  1. match the training shards; those not yet indexed under the current eigensystem (or changed) are
     indexed, ``shards_per_job`` input shards per Beam job, each into its own index directory
     ``<audit_root>/indexes/<eigensystem id>/shards/<key>/``; a shard is recorded as done only after its
     output is complete, so an interrupted run resumes where it stopped;
  2. one Beam job over the union of all indexed shards: the top-N self-influence suspects and the top-k
     proponents/opponents of every standing query (skipped when neither the index nor the queries nor
     the arguments changed since the previous run: its results are copied);
  3. ``<audit_root>/runs/<run id>/report.{json,md}`` with the diff against the previous run.

A failed run removes what it wrote (a shard's unpublished index, its own ``runs/<run id>/``), never a
published shard index or an earlier run; a full disk exits 2 with one line naming the path.
Reruns with nothing new run no Beam job and report that nothing changed. A different eigensystem
indexes everything again into a new directory (the old one is left for you to delete).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Mapping, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_influence.audit import faults
from beam_influence.audit.config import (AuditConfig, AuditConfigError, AuditInputError, AuditUsageError, check_run_id,
                                         load_config)
from beam_influence.audit.diff import diff_suspects, diff_topk
from beam_influence.audit.lock import AuditLock, AuditLockedError
from beam_influence.audit.losses import records_lost, records_per_byte
from beam_influence.audit.report import ALERT_EXIT_CODE, evaluate_thresholds, write_report
from beam_influence.audit.state import (IndexState, fingerprint, input_checksum, input_fingerprint, join,
                                        match_input_shards, new_run_id, read_json, read_losses, read_state, remove_tree,
                                        shard_key, state_of_run, write_state)
from beam_influence.beam import (SELF_SCHEMA, TOPK_SCHEMA, IndexRecords, TopKInfluence, TopSelfInfluence,
                                 WriteResult, model_ref, new_data_dir, publish, read_jsonl, self_rows, shard_refs,
                                 topk_rows)
from beam_influence.beam.cleanup import DiskFullError, removed_on_failure
from beam_influence.beam.index import kept_on_failure
from beam_influence.options import AuditOptions
from pipelines._job import count_lines, execute, parse, pipeline_options
from pipelines.index import manifest_args

RESULT_FILES = ("self_influence_top.jsonl", "self_influence_top.parquet", "topk.jsonl", "topk.parquet",
                "query_dead_letter.jsonl")
USAGE_EXIT_CODE = 2  # the run could not start (bad config or run id, inputs gone, another run holds the lock),
# or the disk was full (what the run wrote is removed)
USAGE_ERRORS = (AuditConfigError, AuditUsageError, AuditInputError, AuditLockedError, DiskFullError)


def _suspect_rank(row: dict) -> int:
    return row["rank"]


def index_job(options, opts, ref, ctx, state: IndexState, shards: Sequence[str]) -> dict:
    """One Beam job: each input shard → its own index directory (the composition of ``pipelines.index``)."""
    dirs = {path: state.shard_dir(path) for path in shards}
    data_dirs = {path: new_data_dir(dirs[path]) for path in shards}

    def build(p):
        for path in shards:
            key = shard_key(path)
            p | f"Index[{key}]" >> IndexRecords(ref, [path], data_dirs[path], format=opts.data_format,
                                                batch_size=opts.projection_batch_size, batch_rows=opts.batch_rows,
                                                sketch_dtype=opts.sketch_dtype)

    counts, seconds = execute(options, build)
    entries = {}
    for path in shards:
        d = dirs[path]
        faults.point("before_publish")
        manifest = publish(d, data_dirs[path], ctx.eigensystem, manifest_args(ref, opts, path),
                           extra={"seconds": seconds, "job_shards": len(shards)}, require_rows=False)
        faults.point("after_publish")
        entries[path] = {"key": shard_key(path), "index_dir": d, "rows": manifest["rows"],
                         "dead_letters": manifest["dead_letters"], "records": manifest["records"],
                         "parts": shard_refs(d, manifest), "manifest_written_at": manifest["written_at"],
                         "losses": read_losses(d, manifest),
                         "grad_sq_norm": bool(manifest["args"].get("grad_sq_norm")),
                         "sketch": manifest["args"].get("sketch")}
    return {"seconds": seconds, "counters": counts, "entries": entries}


def _fault_in_job(element, name: str):
    faults.point(name)
    return element


def complement_terms(opts, ctx, entries: Sequence[Mapping]) -> tuple:
    """(self-influence term, query term) over the shard indexes: the complement where every shard index has
    what it needs (shard indexes built by an older version have no grad_sq_norm / sketch)."""
    from beam_influence.beam import complement_term as complement

    # the map must be the same in every shard index; how each stores it (dtype) may differ: decoded per batch
    sketches = [{k: v for k, v in e["sketch"].items() if k not in complement.STORAGE_KEYS} if e.get("sketch")
                else None for e in entries]
    common = {"args": {"grad_sq_norm": bool(entries) and all(e.get("grad_sq_norm") for e in entries),
                       "sketch": sketches[0] if sketches and all(s == sketches[0] for s in sketches) else None}}
    mode = opts.complement
    self_term = complement.for_self_influence("auto" if mode == "sketch" else mode, common, ctx, opts.rho)
    query_term = complement.for_index_queries("auto" if mode == "exact" else mode, opts.normalization, common,
                                              ctx, opts.rho)
    return self_term, query_term


def refresh_job(options, opts, ref, ctx, cfg: AuditConfig, parts: list[dict], run_dir: str, index_root: str,
                terms: tuple = (None, None)) -> float:
    """One Beam job over the union of the shard indexes: suspects, and the standing queries' top-k."""
    from beam_influence.beam import ComplementTerm

    self_term, query_term = (t if t is not None else ComplementTerm() for t in terms)
    if not parts:  # nothing indexed (no rows anywhere): empty results, no job
        if "://" not in run_dir:
            os.makedirs(run_dir, exist_ok=True)
        for name in ("self_influence_top.jsonl", "topk.jsonl"):
            with FileSystems.create(f"{run_dir}/{name}"):
                pass
        return 0.0

    from pipelines.query import project_queries

    def build(p):
        rows = p | "Shards" >> beam.Create(parts) | "SpreadShards" >> beam.Reshuffle()
        if faults.armed("during_refresh"):  # crash tests only: a step that kills the job mid-way
            rows = rows | "TestFault" >> beam.Map(_fault_in_job, "during_refresh")
        (rows | "TopSelfInfluence" >> TopSelfInfluence(cfg.self_influence_top, eigvals=ctx.eigvals,
                                                        complement=self_term)
         | "WriteSelf" >> WriteResult(f"{run_dir}/self_influence_top", SELF_SCHEMA, self_rows))
        if cfg.standing_queries:
            queries = project_queries(p, ref, cfg, run_dir, test_data=cfg.standing_queries)
            (rows
             | "TopK" >> TopKInfluence(queries, ctx.eigvals, k=cfg.top_k, normalization=cfg.normalization,
                                       complement=query_term)
             | "WriteTopK" >> WriteResult(f"{run_dir}/topk", TOPK_SCHEMA, topk_rows))

    _, seconds = execute(options, build)
    return seconds


def run(argv=None, *, after_index_job: Callable[[list[str]], None] | None = None) -> dict:
    """``python -m pipelines.audit``: parse ``--config``/``--run_id`` (``AuditOptions``; the rest go to Beam)."""
    known, beam_rest = parse(AuditOptions, argv, __doc__.splitlines()[0], prog="python -m pipelines.audit")
    return run_options(known, beam_rest, after_index_job=after_index_job)


def run_options(known: AuditOptions, beam_rest=(), *,
                after_index_job: Callable[[list[str]], None] | None = None) -> dict:
    """Run one audit; returns the report (its ``exit_code`` is 0, or ``ALERT_EXIT_CODE`` when a
    threshold was crossed). ``after_index_job(shards)`` is called after each index job has been
    recorded (a test hook: raise in it to simulate a crash).

    Raises ``AuditConfigError`` / ``AuditUsageError`` / ``AuditInputError`` / ``AuditLockedError`` (what
    ``main`` turns into exit status 2) before any work, and writes nothing then."""
    t_start = time.time()
    faults.reset()
    if known.run_id is not None:
        check_run_id(known.run_id)
    cfg = load_config(known.config)
    root = cfg.audit_root.rstrip("/")
    # Pre-flight, before any work: every input pattern must match (vanished data is an error, not "ok").
    inputs = match_input_shards(cfg.train_data)
    query_files = match_input_shards([cfg.standing_queries], "standing_queries") if cfg.standing_queries else []
    options = pipeline_options(cfg, list(cfg.beam_args) + list(beam_rest))
    # A full disk anywhere is one line naming the path (DiskFullError, exit 2); what a failed run wrote is
    # removed (a shard's partial index, this run's folder), never a published shard index or earlier run.
    with removed_on_failure(), AuditLock(root) as lock, contextlib.ExitStack() as on_failure:
        return _run_locked(known, cfg, root, inputs, query_files, options, cfg, lock, t_start, after_index_job,
                           on_failure)


def _run_locked(known, cfg: AuditConfig, root: str, inputs: list[str], query_files: list[str], options, opts,
                lock: AuditLock, t_start: float, after_index_job, on_failure: contextlib.ExitStack) -> dict:
    ref = model_ref(opts)
    ctx = ref.load()  # pre-flight: model + eigensystem load and match, the memory plan, before any work
    if ctx.memory_plan:
        print(ctx.memory_plan["line"], flush=True)
    es_id = ctx.eigensystem.id

    # ---- 1. incremental index
    fingerprints = {p: input_fingerprint(p) for p in inputs}
    checksums = {p: fp[1] for p, fp in fingerprints.items()}
    sizes = {p: fp[0] for p, fp in fingerprints.items()}
    state = IndexState(root, es_id)
    todo, adopted, changed, repaired = state.pending(inputs, checksums)
    for path in repaired:
        print(f"audit: warning: the index of {path} no longer matches the audit manifest; indexing it again",
              file=sys.stderr)
    jobs = []
    for start in range(0, len(todo), cfg.shards_per_job):
        group = todo[start:start + cfg.shards_per_job]
        state.forget(group)  # an entry never outlives its directory: forget, then clear, then rebuild
        for path in group:
            state.clear_shard_dir(path)
        print(f"audit: indexing {len(group)} shard(s) ({start + len(group)}/{len(todo)}) under eigensystem {es_id}")
        keeps = [kept_on_failure(state.shard_dir(path)) for path in group]
        # a failed job removes the index data it wrote in its (just cleared) shard dirs, never what it published
        with removed_on_failure(*map(state.shard_dir, group), keep=lambda name: any(keep(name) for keep in keeps)):
            job = index_job(options, opts, ref, ctx, state, group)
            for path, entry in job["entries"].items():
                state.complete(path, {**entry, "checksum": checksums[path], "size": sizes[path]})
        jobs.append({"shards": group, "seconds": job["seconds"], "counters": job["counters"]})
        faults.point("after_index_job")
        if after_index_job is not None:
            after_index_job(group)

    # ---- 2. refresh (or reuse) the results
    st = read_state(root)
    run_id = known.run_id or new_run_id(root)
    prev_id = st.get("last_run_id")
    if prev_id is not None and prev_id == run_id:
        # The same run id again (e.g. a retried Airflow run): diff against that run's own baseline, and
        # first point state.json back at it, so that a crash while this folder is rewritten never
        # leaves state.json naming a half-written run.
        prev_id = st["previous_run_id"] if "previous_run_id" in st else \
            (read_json(join(root, "runs", run_id, "report.json")) or {}).get("previous_run_id")
        if prev_id == run_id:
            prev_id = None
        write_state(root, state_of_run(root, prev_id))
    prev_dir = join(root, "runs", prev_id) if prev_id else None
    prev = read_json(join(prev_dir, "report.json")) if prev_dir else None
    queries = {p: input_checksum(p) for p in query_files}
    results_key = fingerprint({
        "eigensystem": es_id, "shards": [[p, checksums[p], state.shards[p]["parts"]] for p in inputs],
        "queries": queries, "spec_arg": list(cfg.spec_arg), "top_k": cfg.top_k,
        "self_influence_top": cfg.self_influence_top, "normalization": cfg.normalization,
        "projection_batch_size": cfg.projection_batch_size, "projection_method": cfg.projection_method,
        "complement": cfg.complement, "rho": cfg.rho, "sketch_dim": cfg.sketch_dim})
    run_dir = join(root, "runs", run_id)
    remove_tree(run_dir)  # what an interrupted attempt under this id left (state.json does not name it)
    on_failure.enter_context(removed_on_failure(run_dir))  # state.json does not name this run yet: a failure
    # from here on removes its folder whole
    reuse = prev is not None and prev.get("results_key") == results_key and \
        all(FileSystems.exists(join(prev_dir, n)) for n in prev.get("result_files", []))
    if reuse:
        names = prev["result_files"]
        if "://" not in run_dir and not FileSystems.exists(run_dir):
            FileSystems.mkdirs(run_dir)  # local copies need the folder; object stores have none
        FileSystems.copy([join(prev_dir, n) for n in names], [join(run_dir, n) for n in names])
        refresh_seconds = 0.0
        print(f"audit: nothing new since run {prev_id}; results reused")
    else:
        terms = complement_terms(opts, ctx, [state.shards[p] for p in inputs if state.shards[p].get("rows")])
        refresh_seconds = refresh_job(options, opts, ref, ctx, cfg, state.parts(inputs), run_dir, state.root, terms)
    result_files = [n for n in RESULT_FILES if FileSystems.exists(join(run_dir, n))]
    faults.point("before_report")

    # ---- 3. report, diff, thresholds
    suspects = read_jsonl(join(run_dir, "self_influence_top.jsonl"))
    topk = read_jsonl(join(run_dir, "topk.jsonl")) if cfg.standing_queries else []
    same_es = prev is not None and prev.get("eigensystem_id") == es_id
    prev_suspects = read_jsonl(join(prev_dir, "self_influence_top.jsonl")) if prev is not None else None
    prev_topk = None
    if prev is not None and cfg.standing_queries and "topk.jsonl" in prev.get("result_files", []):
        prev_topk = read_jsonl(join(prev_dir, "topk.jsonl"))
    d_suspects, d_topk = diff_suspects(prev_suspects, suspects), diff_topk(prev_topk, topk)

    # Lost input, counted in records: an unreadable file or range is one dead letter but many records.
    for p in inputs:
        state.losses(p)
    per_byte = records_per_byte({p: state.shards[p] for p in inputs}, sizes)
    lost = {p: records_lost(state.shards[p], sizes[p], per_byte, p) for p in inputs}
    unreadable = [{"path": p, "records_lost": lost[p][0], "records_lost_is": lost[p][1],
                   "losses": state.shards[p]["losses"]} for p in inputs if state.shards[p]["losses"]]

    def not_indexed(p: str) -> int:  # records of shard p that are not in the index
        e = state.shards[p]
        return e["dead_letters"] - len(e["losses"]) + lost[p][0]

    prev_indexed = set(prev["shards"]["indexed"]) if same_es else set()
    new_since_prev = [p for p in inputs if p not in prev_indexed]
    rows_new = sum(state.shards[p]["rows"] for p in new_since_prev)
    dead_new = sum(state.shards[p]["dead_letters"] for p in new_since_prev)
    missing_new = sum(not_indexed(p) for p in new_since_prev)
    dead_fraction = missing_new / (rows_new + missing_new) if rows_new + missing_new else 0.0
    thresholds = evaluate_thresholds(
        cfg.thresholds, new_suspects=d_suspects["num_new"] if same_es else None,
        dead_letter_fraction=dead_fraction,
        changed_queries=d_topk["num_changed"] if (same_es and prev_topk is not None) else None,
        unreadable_shards=len(unreadable))
    alerts = [t["name"] for t in thresholds if t["crossed"]]
    exit_code = ALERT_EXIT_CODE if alerts else 0
    report = {
        "format_version": 1, "run_id": run_id, "run_dir": run_dir, "config_path": known.config,
        "config": cfg.to_dict(), "started_at": t_start, "eigensystem_id": es_id,
        "model_fingerprint": ctx.eigensystem.fingerprint, "index_root": state.root,
        "previous_run_id": prev_id, "eigensystem_changed": prev is not None and not same_es,
        "lock": {"path": lock.path, "recovered_from": lock.recovered},
        "shards": {"total": len(inputs), "indexed": inputs, "indexed_this_run": todo, "adopted": adopted,
                   "changed": changed, "repaired": repaired, "new_since_previous_run": new_since_prev,
                   "removed": sorted(p for p in state.shards if p not in checksums)},
        "rows": sum(state.shards[p]["rows"] for p in inputs),
        "dead_letters_total": sum(state.shards[p]["dead_letters"] for p in inputs),
        "dead_letters_this_run": dead_new, "records_not_indexed_this_run": missing_new,
        "dead_letter_fraction_this_run": dead_fraction,
        "unreadable_shards": unreadable, "records_lost_total": sum(u["records_lost"] for u in unreadable),
        "index_jobs": jobs, "refreshed": not reuse, "refresh_seconds": refresh_seconds,
        "results_key": results_key, "result_files": result_files,
        "top_k": cfg.top_k, "suspects": suspects,
        "standing_queries": ({"pattern": cfg.standing_queries, "num_queries": len({r["query_id"] for r in topk}),
                              "query_dead_letters": count_lines(join(run_dir, "query_dead_letter.jsonl"))}
                             if cfg.standing_queries else None),
        "diff": {"suspects": d_suspects, "standing_queries": d_topk},
        "changed": prev is None or results_key != prev.get("results_key") or d_suspects["changed"] or d_topk["changed"],
        "thresholds": thresholds, "alerts": alerts, "exit_code": exit_code,
    }
    report["finished_at"] = time.time()
    report["seconds"] = report["finished_at"] - t_start
    write_report(run_dir, report)
    faults.point("before_state")
    write_state(root, {"last_run_id": run_id, "previous_run_id": prev_id, "eigensystem_id": es_id,
                       "finished_at": report["finished_at"], "exit_code": exit_code})
    for u in unreadable:
        print(f"audit: ALERT: {u['path']} could not be read completely ({u['records_lost_is']}: "
              f"{u['records_lost']} records lost): {u['losses'][0]['reason']}", file=sys.stderr)
    print(f"audit {run_id}: {len(todo)} shard(s) indexed, {len(inputs)} in the index ({report['rows']} rows); "
          f"{'changed' if report['changed'] else 'nothing changed'}; "
          f"{'ALERT: ' + ', '.join(alerts) if alerts else 'no alert'} → {run_dir}/report.md")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 ok, 3 (``ALERT_EXIT_CODE``) a threshold crossed, 2 the run could not start (one
    line on stderr: bad config or run id, an input pattern matching nothing, the lock held) or the disk
    was full (one line naming the path), 1 any other failure (with its traceback)."""
    try:
        known, beam_rest = parse(AuditOptions, argv, __doc__.splitlines()[0], prog="python -m pipelines.audit")
    except ValueError as e:
        print(f"audit: error: {' '.join(str(e).split())}", file=sys.stderr)
        return USAGE_EXIT_CODE
    return main_options(known, beam_rest)


def main_options(known: AuditOptions, beam_rest=()) -> int:
    """``main`` on parsed options (the ``beam-influence audit`` subcommand)."""
    try:
        return int(run_options(known, beam_rest)["exit_code"])
    except USAGE_ERRORS as e:
        message = " ".join(str(e).split())
        print(f"audit: error: {message}", file=sys.stderr)
        return USAGE_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
