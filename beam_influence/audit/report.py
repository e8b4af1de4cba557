"""The audit run's report: thresholds → alerts, ``report.json`` and a short ``report.md``."""
from __future__ import annotations

import json
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_influence.audit.config import Thresholds

ALERT_EXIT_CODE = 3  # a configured threshold was crossed (the run itself succeeded)


def evaluate_thresholds(thresholds: Thresholds, *, new_suspects: int | None, dead_letter_fraction: float,
                        changed_queries: int | None) -> list[dict]:
    """One entry per configured threshold: {name, value, limit, crossed}. ``None`` values (no baseline)
    are not evaluated."""
    values = {"max_new_suspects": new_suspects, "max_dead_letter_fraction": dead_letter_fraction,
              "max_changed_queries": changed_queries}
    out = []
    for name, value in values.items():
        limit = getattr(thresholds, name)
        if limit is None:
            continue
        out.append({"name": name, "value": value, "limit": limit,
                    "crossed": value is not None and value > limit})
    return out


def _write(path: str, text: str) -> None:
    with FileSystems.create(path) as f:
        f.write(text.encode())


def write_report(run_dir: str, report: dict[str, Any], *, max_rows: int = 20) -> None:
    """``report.json`` (everything) and ``report.md`` (a human summary) into ``run_dir``."""
    _write(f"{run_dir}/report.json", json.dumps(report, indent=2, sort_keys=True, default=str))
    _write(f"{run_dir}/report.md", render_markdown(report, max_rows=max_rows))


def render_markdown(r: dict[str, Any], *, max_rows: int = 20) -> str:
    sh, diff, alerts = r["shards"], r["diff"], [t for t in r["thresholds"] if t["crossed"]]
    lines = [
        f"# Influence audit {r['run_id']}",
        "",
        f"- status: **{'ALERT' if alerts else 'ok'}** (exit code {r['exit_code']})",
        f"- eigensystem `{r['eigensystem_id']}`"
        + (" (changed since the previous run: everything re-indexed)" if r.get("eigensystem_changed") else ""),
        f"- previous run: {r.get('previous_run_id') or 'none (baseline)'}",
        f"- input shards: {sh['total']} ({len(sh['indexed_this_run'])} indexed in this run, "
        f"{sh['total'] - len(sh['indexed_this_run']) - len(sh['adopted'])} already indexed, "
        f"{len(sh['adopted'])} recovered from an interrupted run, {len(sh['changed'])} changed, "
        f"{len(sh['removed'])} no longer present)",
        f"- indexed rows: {r['rows']}; dead letters in this run: {r['dead_letters_this_run']} "
        f"(fraction {r['dead_letter_fraction_this_run']:.4g}); total dead letters: {r['dead_letters_total']}",
        f"- {'nothing changed since the previous run' if not r['changed'] else 'results changed since the previous run'}",
        "",
        "Sign convention: influence = Σ_i P_i(test) P_i(train) / λ_i; larger = more helpful (proponent). "
        "Self-influence = Σ_i P_i(z)² / λ_i; high = hard to fit from the rest (mislabelled, atypical).",
        "",
    ]
    if r["thresholds"]:
        lines += ["## Thresholds", "", "| threshold | value | limit | crossed |", "| --- | --- | --- | --- |"]
        lines += [f"| {t['name']} | {t['value']} | {t['limit']} | {'**yes**' if t['crossed'] else 'no'} |"
                  for t in r["thresholds"]]
        lines.append("")
    sd = diff["suspects"]
    lines += ["## Self-influence suspects", ""]
    if sd["baseline"]:
        lines.append("Baseline run: no previous suspects to compare with.")
    else:
        lines.append(f"{sd['num_new']} new, {sd['num_dropped']} dropped since the previous run.")
        if sd["new"]:
            lines.append("New: " + ", ".join(f"`{s['id']}` (#{s['rank']})" for s in sd["new"][:max_rows]))
        if sd["dropped"]:
            lines.append("Dropped: " + ", ".join(f"`{s['id']}`" for s in sd["dropped"][:max_rows]))
    lines += ["", "| rank | id | self-influence |", "| --- | --- | --- |"]
    lines += [f"| {s['rank']} | `{s['id']}` | {s['self_influence']:.6g} |" for s in r["suspects"][:max_rows]]
    if len(r["suspects"]) > max_rows:
        lines.append(f"\n… {len(r['suspects']) - max_rows} more in self_influence_top.jsonl")
    lines.append("")
    td = diff["standing_queries"]
    if r["standing_queries"]:
        lines += ["## Standing queries", "", f"{r['standing_queries']['num_queries']} queries, top-{r['top_k']} each "
                  f"(topk.jsonl)."]
        if td["baseline"]:
            lines.append("Baseline run: no previous top-k to compare with.")
        else:
            lines.append(f"{td['num_changed']} queries changed; new queries: {len(td['new_queries'])}, "
                         f"removed: {len(td['removed_queries'])}.")
            for qid, entry in list(td["changed_queries"].items())[:max_rows]:
                parts = [f"{kind}: +{len(e['entered'])} −{len(e['left'])}" for kind, e in entry.items()]
                lines.append(f"- `{qid}`: " + "; ".join(parts))
        lines.append("")
    return "\n".join(lines) + "\n"
