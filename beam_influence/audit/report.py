"""The audit run's report: thresholds → alerts, ``report.json`` and a short ``report.md``.

Everything in ``report.md`` that comes from the data or the user (record ids, query ids, file paths,
reasons, run and eigensystem ids) goes through ``md_text``: Markdown and HTML have no effect, a value
never leaves its table cell or line, and control characters show as escapes.
"""
from __future__ import annotations

import unicodedata
from typing import Any

from beam_influence.audit.config import Thresholds
from beam_influence.util import write_json, write_text

ALERT_EXIT_CODE = 3  # a configured threshold was crossed (the run itself succeeded)
UNREADABLE_SHARDS = "unreadable_shards"  # the alert that is always on: an input shard (or part of one) is lost

_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def md_text(value: Any, max_len: int = 200) -> str:
    """``value`` as inert Markdown text: HTML special characters as entities, every other ASCII
    punctuation character backslash-escaped (pipes, backticks, brackets, ``*_#!~``...), control and
    line-separator characters shown as escapes (``\\n``, ``\\u2028``), cut to ``max_len`` characters."""
    text = str(value)
    if len(text) > max_len:
        text = text[:max_len] + "…"
    out = []
    for c in text:
        if c in _CONTROL:
            c = _CONTROL[c]
        elif unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp"):
            c = f"\\u{ord(c):04x}"
        for ch in c:
            if ch in _ENTITIES:
                out.append(_ENTITIES[ch])
            elif ch.isascii() and not ch.isalnum() and not ch.isspace():
                out.append("\\" + ch)
            else:
                out.append(ch)
    return "".join(out)


def evaluate_thresholds(thresholds: Thresholds, *, new_suspects: int | None, dead_letter_fraction: float,
                        changed_queries: int | None, unreadable_shards: int = 0) -> list[dict]:
    """One entry per configured threshold: {name, value, limit, crossed}. ``None`` values (no baseline)
    are not evaluated. ``unreadable_shards`` (input shards of which a file or a range could not be read)
    is always evaluated with limit 0: losing input is always an alert."""
    values = {"max_new_suspects": new_suspects, "max_dead_letter_fraction": dead_letter_fraction,
              "max_changed_queries": changed_queries}
    out = [{"name": UNREADABLE_SHARDS, "value": unreadable_shards, "limit": 0, "crossed": unreadable_shards > 0}]
    for name, value in values.items():
        limit = getattr(thresholds, name)
        if limit is None:
            continue
        out.append({"name": name, "value": value, "limit": limit,
                    "crossed": value is not None and value > limit})
    return out


def write_report(run_dir: str, report: dict[str, Any], *, max_rows: int = 20) -> None:
    """``report.json`` (everything) and ``report.md`` (a human summary) into ``run_dir``."""
    write_json(f"{run_dir}/report.json", report)
    write_text(f"{run_dir}/report.md", render_markdown(report, max_rows=max_rows))


def _qualified(n: int, how: str) -> str:
    return {"exact": f"{n}", "estimated": f"about {n} (estimated from the file size)",
            "lower bound": f"at least {n} (how many more cannot be known)"}.get(how, f"{n}")


def render_markdown(r: dict[str, Any], *, max_rows: int = 20) -> str:
    sh, diff, alerts = r["shards"], r["diff"], [t for t in r["thresholds"] if t["crossed"]]
    unreadable = r.get("unreadable_shards") or []
    lines = [
        f"# Influence audit {md_text(r['run_id'])}",
        "",
        f"- status: **{'ALERT' if alerts else 'ok'}** (exit code {r['exit_code']})"
        + (": " + ", ".join(md_text(t["name"]) for t in alerts) if alerts else ""),
        f"- eigensystem {md_text(r['eigensystem_id'])}"
        + (" (changed since the previous run: everything re-indexed)" if r.get("eigensystem_changed") else ""),
        f"- previous run: {md_text(r['previous_run_id']) if r.get('previous_run_id') else 'none (baseline)'}",
        f"- input shards: {sh['total']} ({len(sh['indexed_this_run'])} indexed in this run, "
        f"{sh['total'] - len(sh['indexed_this_run']) - len(sh['adopted'])} already indexed, "
        f"{len(sh['adopted'])} recovered from an interrupted run, {len(sh['changed'])} changed, "
        f"{len(sh.get('repaired', []))} repaired, {len(sh['removed'])} no longer present)",
        f"- indexed rows: {r['rows']}; dead letters in this run: {r['dead_letters_this_run']} "
        f"(fraction of records not indexed {r['dead_letter_fraction_this_run']:.4g}); "
        f"total dead letters: {r['dead_letters_total']}",
        f"- {'nothing changed since the previous run' if not r['changed'] else 'results changed since the previous run'}",
        "",
        "Sign convention: influence = Σ_i P_i(test) P_i(train) / λ_i; larger = more helpful (proponent). "
        "Self-influence = Σ_i P_i(z)² / λ_i; high = hard to fit from the rest (mislabelled, atypical).",
        "",
    ]
    if unreadable:
        lines += ["## Unreadable input shards", "",
                  f"{len(unreadable)} input shard(s) could not be read completely; their lost records are "
                  "missing from every result below. Replace or remove the files.", "",
                  "| shard | records lost | first reason |", "| --- | --- | --- |"]
        for u in unreadable[:max_rows]:
            reason = u["losses"][0]["reason"] if u.get("losses") else ""
            lines.append(f"| {md_text(u['path'])} | {_qualified(u['records_lost'], u['records_lost_is'])} "
                         f"| {md_text(reason)} |")
        if len(unreadable) > max_rows:
            lines.append(f"\n… {len(unreadable) - max_rows} more in report.json")
        lines.append("")
    if r["thresholds"]:
        lines += ["## Thresholds", "", "| threshold | value | limit | crossed |", "| --- | --- | --- | --- |"]
        lines += [f"| {md_text(t['name'])} | {md_text(t['value'])} | {md_text(t['limit'])} | "
                  f"{'**yes**' if t['crossed'] else 'no'} |" for t in r["thresholds"]]
        lines.append("")
    sd = diff["suspects"]
    lines += ["## Self-influence suspects", ""]
    if sd["baseline"]:
        lines.append("Baseline run: no previous suspects to compare with.")
    else:
        lines.append(f"{sd['num_new']} new, {sd['num_dropped']} dropped since the previous run.")
        if sd["new"]:
            lines.append("New: " + ", ".join(f"{md_text(s['id'])} (#{s['rank']})" for s in sd["new"][:max_rows]))
        if sd["dropped"]:
            lines.append("Dropped: " + ", ".join(md_text(s["id"]) for s in sd["dropped"][:max_rows]))
    lines += ["", "| rank | id | self-influence |", "| --- | --- | --- |"]
    lines += [f"| {s['rank']} | {md_text(s['id'])} | {s['self_influence']:.6g} |" for s in r["suspects"][:max_rows]]
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
                parts = [f"{md_text(kind)}: +{len(e['entered'])} −{len(e['left'])}" for kind, e in entry.items()]
                lines.append(f"- {md_text(qid)}: " + "; ".join(parts))
        lines.append("")
    return "\n".join(lines) + "\n"
