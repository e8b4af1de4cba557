"""What changed between two audit runs: self-influence suspects and standing-query top-k (pure functions).

Rows are the jobs' result rows: suspects ``{"rank", "id", "self_influence"}`` and top-k
``{"query_id", "kind", "rank", "train_id", "score"}`` (larger score = more helpful = proponent).
"""
from __future__ import annotations

from typing import Sequence


def diff_suspects(previous: Sequence[dict] | None, current: Sequence[dict]) -> dict:
    """New (in ``current`` only) and dropped (in ``previous`` only) suspect ids, in rank order.

    ``previous=None`` (no earlier run) is a baseline: nothing is new or dropped.
    """
    cur = sorted(current, key=lambda r: r["rank"])
    if previous is None:
        return {"baseline": True, "new": [], "dropped": [], "num_new": 0, "num_dropped": 0, "changed": False}
    prev = sorted(previous, key=lambda r: r["rank"])
    prev_ids, cur_ids = {r["id"] for r in prev}, {r["id"] for r in cur}
    new = [{"id": r["id"], "rank": r["rank"], "self_influence": r["self_influence"]} for r in cur if r["id"] not in prev_ids]
    dropped = [{"id": r["id"], "previous_rank": r["rank"], "self_influence": r["self_influence"]}
               for r in prev if r["id"] not in cur_ids]
    reordered = [r["id"] for r in prev] != [r["id"] for r in cur]
    return {"baseline": False, "new": new, "dropped": dropped, "num_new": len(new), "num_dropped": len(dropped),
            "changed": bool(new or dropped or reordered)}


def _lists(rows: Sequence[dict]) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    for r in sorted(rows, key=lambda r: (r["query_id"], r["kind"], r["rank"])):
        out.setdefault(r["query_id"], {"proponent": [], "opponent": []})[r["kind"]].append(r["train_id"])
    return out


def diff_topk(previous: Sequence[dict] | None, current: Sequence[dict]) -> dict:
    """Per standing query: whether its top-k proponent/opponent id lists changed, and which ids entered/left."""
    cur = _lists(current)
    if previous is None:
        return {"baseline": True, "changed_queries": {}, "num_changed": 0, "new_queries": [], "removed_queries": [],
                "changed": False}
    prev = _lists(previous)
    changed = {}
    for qid in sorted(set(cur) & set(prev)):
        entry = {}
        for kind in ("proponent", "opponent"):
            a, b = prev[qid][kind], cur[qid][kind]
            if a != b:
                entry[kind] = {"entered": [i for i in b if i not in a], "left": [i for i in a if i not in b],
                               "previous": a, "current": b}
        if entry:
            changed[qid] = entry
    new_q, removed_q = sorted(set(cur) - set(prev)), sorted(set(prev) - set(cur))
    return {"baseline": False, "changed_queries": changed, "num_changed": len(changed), "new_queries": new_q,
            "removed_queries": removed_q, "changed": bool(changed or new_q or removed_q)}
