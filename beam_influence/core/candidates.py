r"""Stage 1 of an exact rerank: every row that can be in the exact top k of scores known only within a margin.

For an estimate :math:`\hat s` with :math:`|\hat s - s| \le m` (``margin = (a, b)``, :math:`m_{iq} = a_i\cdot b_q`,
``core.rerank``) work in *key* space, key = ∓ score (smaller ranks first; ``core.topk``): a row's optimistic key
is ≥ lo = keŷ − m and its pessimistic key ≤ hi = keŷ + m. Per query and direction:

* τ = the k-th smallest hi over all rows: k rows are surely at least that good, so a row can be in the exact top
  k only if lo ≤ τ (the *candidates*);
* the state keeps the k smallest hi (``pool``; τ is its largest) and the ``cap + 1`` smallest lo with their ids
  (``best``); rows with lo above the running τ are never needed (τ only falls) and are dropped on the way.

At the end the candidates are the entries of ``best`` with lo ≤ τ, and the list is *complete* when there are at
most ``cap`` of them (the (cap+1)-th slot proves whether the cap cut one that could matter): exactly the rule
"every row with lo ≤ τ, unless more than cap". Both parts are order statistics, kept by one ``partition`` per
block of rows and one per merge: O(Q·rows) selection work beside the product, no per-pair lists, whatever the
data (near-duplicates make every pair pass the margin, and cost no more). ``merge`` is associative and
commutative (two states hold distinct rows), so the result does not depend on batching or runner.

The float32 product's rigorous error D (``topk._bound_factors``: D = c·‖a_i‖‖t_q‖) is folded into both bounds,
so no float64 rescoring is needed: stage 2 rescores the candidates exactly from their gradients, and the
scores ``result`` gives are optimistic bounds. Memory O(Q·(cap + k)) per direction, plus one block of
``_BLOCK_ELEMENTS`` float64 scores.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from beam_influence.core import scoring
from beam_influence.core.topk import _BOUND_C, _SIGN, _U32, DIRECTIONS, TopK, _bound_factors, _id_array

_BLOCK_ELEMENTS = 1 << 22  # scores per block of rows (Q × rows, float64: 32 MiB)


class MarginCandidates:
    """The candidates of Q queries' top-k lists (proponents and opponents) under a margin; see the module doc.

    ``cap``: at most that many candidates per query and direction (the best optimistic ones); None keeps every
    candidate (memory O(Q × candidates): for small sets and tests)."""

    def __init__(self, query_ids: Sequence[str], k: int, cap: int | None = None):
        if int(k) != k or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k}")
        if cap is not None and cap < k:
            raise ValueError(f"cap ({cap}) must be at least k ({k})")
        self.query_ids = [str(q) for q in query_ids]
        self.k, self.cap = int(k), None if cap is None else int(cap)
        q = len(self.query_ids)
        self.seen = 0
        self.pool = {d: np.full((q, self.k), np.inf) for d in DIRECTIONS}  # k smallest hi per query
        self.best = {d: (np.full((q, 0), np.inf), None) for d in DIRECTIONS}  # (lo [Q, w], ids [Q, w] or None)
        # a bound on the (cap+1)-th smallest lo (from the last trim; +inf before): larger lo never enters
        self.limit = {d: np.full(q, np.inf) for d in DIRECTIONS}
        self._trimmed = {d: 0 for d in DIRECTIONS}  # the width of best[d] after its last trim

    @property
    def num_queries(self) -> int:
        return len(self.query_ids)

    def tau(self, direction: str) -> np.ndarray:
        """``[Q]`` τ in key space: the k-th smallest pessimistic bound seen (+inf until k rows were seen)."""
        return np.max(self.pool[direction], axis=1) if self.num_queries else np.zeros(0)

    def add_projections(self, test_proj: np.ndarray, train_proj: np.ndarray, ids: Sequence[str], eigvals: np.ndarray,
                        margin: tuple[np.ndarray, np.ndarray]) -> "MarginCandidates":
        """Fold train rows ``train_proj [B, n]`` (ids ``[B]``: any dtype, e.g. int64 row codes) against the
        queries ``test_proj [Q, n]`` with the margin factors ``(a [B, r], b [Q, r])`` (≥ 0); returns self."""
        test, train, lam = scoring._check(test_proj=test_proj, train_proj=train_proj, eigvals=eigvals)
        q, b = self.num_queries, train.shape[0]
        if test.shape[0] != q:
            raise ValueError(f"test projections {test.shape} must be [Q={q}, n]")
        id_arr = _id_array(ids, b)
        ma, mb = (np.asarray(x, np.float64) for x in margin)
        if ma.ndim != 2 or mb.ndim != 2 or ma.shape != (b, mb.shape[1]) or mb.shape[0] != q \
                or not (np.all(ma >= 0) and np.all(mb >= 0)):
            raise ValueError(f"margin factors {ma.shape}, {mb.shape} must be [B={b}, r] and [Q={q}, r], ≥ 0")
        if b == 0 or q == 0:
            self.seen += b
            return self
        aw = scoring._weighted(train, lam)
        factors = _bound_factors(aw, test, None, None)
        if factors is not None:  # float32 product, its rigorous error folded into the bounds
            a32, t32, ra, rt = factors
            t32 = np.ascontiguousarray(t32.T)  # [Q, n]
            cn = _BOUND_C * (train.shape[1] + 4) * _U32
        step = int(min(max(256, _BLOCK_ELEMENTS // q), 1 << 16))
        for s in range(0, b, step):
            e = min(b, s + step)
            if factors is not None:
                est = (t32 @ a32[s:e].T).astype(np.float64)  # [Q, rows]
                width = mb @ ma[s:e].T + (cn * rt)[:, None] * ra[None, s:e]
            else:  # outside the float32 bound's range: float64 scores, the margin alone
                est = test @ aw[s:e].T
                width = mb @ ma[s:e].T
            for d in DIRECTIONS:
                key = est if _SIGN[d] > 0 else -est
                self._fold(d, key - width, key + width, id_arr[s:e])
        self.seen += b
        return self

    def _fold(self, d: str, lo: np.ndarray, hi: np.ndarray, ids: np.ndarray) -> None:
        """One block's bounds ``[Q, r]`` into the pool (k smallest hi) and the best (cap + 1 smallest lo ≤ τ).
        Only entries that can enter are gathered: hi below τ, lo below min(τ, the best's (cap+1)-th)."""
        k = self.k
        new_hi, _ = _below(hi, self.tau(d), k)
        if new_hi.shape[1]:
            self.pool[d] = np.partition(np.concatenate([self.pool[d], new_hi], axis=1), k - 1, axis=1)[:, :k]
        tau = self.tau(d)
        m = None if self.cap is None else self.cap + 1
        new_lo, col = _below(lo, np.minimum(tau, self.limit[d]), m)
        if new_lo.shape[1]:
            if new_lo.shape[1] == m:  # m real rows at most this far: the (cap+1)-th smallest is no larger
                self.limit[d] = np.minimum(self.limit[d], np.max(new_lo, axis=1))
            self._keep(d, new_lo, ids[col], tau)

    def _keep(self, d: str, lo: np.ndarray, ids: np.ndarray, tau: np.ndarray, trim: bool = False) -> None:
        """``best[d]`` ∪ (lo, ids). Trimmed lazily (``trim``, or once it has doubled since the last trim): cut to
        lo ≤ τ and, with a cap, the cap + 1 smallest per query; the (cap+1)-th becomes the new ``limit``. Until
        then it holds a superset of those, which ``candidates`` and ``complete`` read the same way."""
        old_lo, old_ids = self.best[d]
        if ids is None:  # nothing new (a merge with an empty state): just trim
            lo, ids = old_lo, old_ids
            if ids is None:
                return
        elif old_ids is not None:
            lo, ids = np.concatenate([old_lo, lo], axis=1), np.concatenate([old_ids, ids], axis=1)
        m = None if self.cap is None else self.cap + 1
        if trim or lo.shape[1] > 2 * max(self._trimmed[d], m or 1):
            lo = np.where(lo <= tau[:, None], lo, np.inf)  # beyond τ: never a candidate (τ only falls)
            if m is not None and lo.shape[1] > m:
                idx = np.argpartition(lo, m - 1, axis=1)[:, :m]
                lo, ids = np.take_along_axis(lo, idx, axis=1), np.take_along_axis(ids, idx, axis=1)
                self.limit[d] = np.max(lo, axis=1)  # the (cap+1)-th smallest (inf where fewer were held)
            live = int(np.isfinite(lo).sum(axis=1).max(initial=0))  # drop columns no query needs (+inf everywhere)
            if live < lo.shape[1]:
                order = np.argsort(lo, axis=1, kind="stable")[:, :live]
                lo, ids = np.take_along_axis(lo, order, axis=1), np.take_along_axis(ids, order, axis=1)
            self._trimmed[d] = lo.shape[1]
        self.best[d] = (lo, np.ascontiguousarray(ids))

    def merge(self, other: "MarginCandidates") -> "MarginCandidates":
        """Fold another state (same queries, k and cap; distinct rows) into this one; returns self."""
        if other.query_ids != self.query_ids or other.k != self.k or other.cap != self.cap:
            raise ValueError("cannot merge MarginCandidates over different queries, k or cap")
        for d in DIRECTIONS:
            self.pool[d] = np.partition(np.concatenate([self.pool[d], other.pool[d]], axis=1), self.k - 1,
                                        axis=1)[:, :self.k]
            lo, ids = other.best[d]
            self._keep(d, lo, ids, self.tau(d), trim=True)
        self.seen += other.seen
        return self

    def complete(self, direction: str) -> np.ndarray:
        """``[Q]``: True where the cap cut no candidate (every row with lo ≤ τ is held)."""
        lo, _ = self.best[direction]
        if self.cap is None:
            return np.ones(self.num_queries, bool)
        return np.sum(lo <= self.tau(direction)[:, None], axis=1) <= self.cap

    def candidates(self, direction: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(query index [C], row id [C], optimistic key [C])``: the candidates (lo ≤ τ; at most cap per query,
        the best), grouped by query, best first; keys are ∓ score as in ``core.topk``."""
        lo, ids = self.best[direction]
        if ids is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        order = np.argsort(lo, axis=1, kind="stable")
        lo, ids = np.take_along_axis(lo, order, axis=1), np.take_along_axis(ids, order, axis=1)
        keep = lo <= self.tau(direction)[:, None]
        if self.cap is not None:
            keep[:, self.cap:] = False
        cols = np.nonzero(keep)[0]
        return cols, ids[keep], lo[keep]

    def result(self) -> dict:
        """``{direction: (per query: [(id, optimistic score)] best first, tau [Q] as a score)}``."""
        out = {}
        for d in DIRECTIONS:
            cols, ids, keys = self.candidates(d)
            lists: list[list[tuple[str, float]]] = [[] for _ in self.query_ids]
            for c, i, key in zip(cols.tolist(), ids.tolist(), keys.tolist()):
                lists[c].append((str(i), _SIGN[d] * key))
            out[d] = (lists, _SIGN[d] * self.tau(d))
        return out


def _below(vals: np.ndarray, thr: np.ndarray, m: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(v [Q, w], col [Q, w])``: per row of ``vals [Q, r]`` its entries ≤ ``thr`` (at most its m smallest), +inf
    padded (their ``col`` 0), w ≤ min(r, m). Sparse entries are gathered (one ``nonzero``); a row with more than
    m costs one ``argpartition``."""
    mask = vals <= thr[:, None]
    counts = mask.sum(axis=1)
    w = int(counts.max(initial=0))
    q = vals.shape[0]
    if w == 0:
        return np.zeros((q, 0)), np.zeros((q, 0), np.int64)
    if m is not None and w > m:
        col = np.argpartition(vals, m - 1, axis=1)[:, :m]
        v = np.take_along_axis(vals, col, axis=1)
        return np.where(v <= thr[:, None], v, np.inf), col
    qi, ri = np.nonzero(mask)  # grouped by row (C order)
    pos = np.arange(qi.size) - (np.cumsum(counts) - counts)[qi]
    v, col = np.full((q, w), np.inf), np.zeros((q, w), np.int64)
    v[qi, pos], col[qi, pos] = vals[qi, ri], ri
    return v, col


class CandidateLists:
    """Stage 2's pairs: for each candidate row (by training id) the queries whose list, per direction, holds it.

    ``ids [n]``: the candidate rows' ids, sorted; per direction a CSR over them: row i is a candidate of the
    queries ``cols[d][indptr[d][i]:indptr[d][i + 1]]`` (positions in ``query_ids``). Its size is the number of
    candidate pairs (bounded by ``core.rerank`` 's candidate budget), not rows × queries."""

    def __init__(self, query_ids: Sequence[str], ids: Sequence[str], pairs: dict):
        """``pairs[direction] = (rows [C], cols [C])``: row ``rows[c]`` (a position in ``ids``) is a candidate of
        query ``cols[c]``; ``ids`` distinct."""
        self.query_ids = [str(q) for q in query_ids]
        ids = np.asarray(ids).astype(str)
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        if np.any(self.ids[1:] == self.ids[:-1]):
            raise ValueError("candidate row ids must be distinct")
        rank = np.empty(len(ids), np.int64)
        rank[order] = np.arange(len(ids))
        self.indptr, self.cols = {}, {}
        for d in DIRECTIONS:
            rows, cols = (np.asarray(x, np.int64) for x in pairs.get(d, (np.zeros(0), np.zeros(0))))
            r = rank[rows]
            by_row = np.argsort(r, kind="stable")
            self.cols[d] = cols[by_row].astype(np.int32)
            self.indptr[d] = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=len(ids)))]).astype(np.int64)

    @property
    def num_pairs(self) -> int:
        return sum(len(c) for c in self.cols.values())

    def pairs(self, row_ids: Sequence[str]) -> dict:
        """``{direction: (row [P], query col [P], csr position [P])}`` of rows ``row_ids [B]`` (positions in it):
        every candidate pair of these rows. A row that is no candidate is an error (stage 2 reads back only
        candidates)."""
        row_ids = np.asarray(row_ids).astype(str)
        at = np.searchsorted(self.ids, row_ids)
        found = at < len(self.ids)
        found[found] = self.ids[at[found]] == row_ids[found]
        if not np.all(found):
            raise ValueError(f"{int((~found).sum())} rows scored in stage 2 are no candidates (first: "
                             f"{row_ids[~found][0]!r}): the read-back returned other records")
        out = {}
        for d in DIRECTIONS:
            lo, hi = self.indptr[d][at], self.indptr[d][at + 1]
            n = hi - lo
            row = np.repeat(np.arange(len(row_ids)), n)
            pos = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
            out[d] = (row, self.cols[d][pos].astype(np.int64), pos)
        return out


class CandidateScores:
    """The exact scores of candidate pairs (``CandidateLists`` positions), gathered as stage 2 scores them.
    ``merge`` is the union of disjoint sets of pairs (each row is read back once); ``topk`` ranks every list
    once all are in. Size: 16 bytes per pair scored, whatever the number of queries."""

    def __init__(self, query_ids: Sequence[str]):
        self.query_ids = [str(q) for q in query_ids]
        self.seen = 0  # rows scored
        self._pos = {d: [] for d in DIRECTIONS}
        self._scores = {d: [] for d in DIRECTIONS}

    def add(self, direction: str, pos: np.ndarray, scores: np.ndarray) -> None:
        """Exact ``scores [P]`` of the pairs at CSR positions ``pos [P]`` (``CandidateLists.pairs``)."""
        scores = np.asarray(scores, np.float64)
        if np.isnan(scores).any():
            raise ValueError("scores contain NaN")
        self._pos[direction].append(np.asarray(pos, np.int64))
        self._scores[direction].append(scores)

    def merge(self, other: "CandidateScores") -> "CandidateScores":
        if other.query_ids != self.query_ids:
            raise ValueError("cannot merge candidate scores of different query sets")
        for d in DIRECTIONS:
            self._pos[d] += other._pos[d]
            self._scores[d] += other._scores[d]
        self.seen += other.seen
        return self

    def topk(self, lists: CandidateLists, k: int) -> TopK:
        """The exact top k of every list among its candidates (``core.topk.TopK``'s ordering). Every pair of
        ``lists`` must have been scored exactly once (else ``RuntimeError``: a candidate was lost or doubled)."""
        if lists.query_ids != self.query_ids:
            raise ValueError("the candidate lists are of another query set")
        state = TopK(self.query_ids, k)
        q = len(self.query_ids)
        for d in DIRECTIONS:
            nnz = len(lists.cols[d])
            pos = np.concatenate([np.zeros(0, np.int64)] + self._pos[d])
            scores = np.concatenate([np.zeros(0)] + self._scores[d])
            hits = np.bincount(pos, minlength=nnz)
            if pos.size != nnz or np.any(hits != 1):
                raise RuntimeError(f"stage 2 scored {pos.size} of {nnz} candidate pairs ({d}; "
                                   f"{int(np.sum(hits == 0))} never, {int(np.sum(hits > 1))} more than once)")
            dense = np.empty(nnz)
            dense[pos] = scores
            counts = np.bincount(lists.cols[d], minlength=q)
            if q and k and nnz:
                if counts.min() < min(k, counts.max()):
                    raise RuntimeError(f"a {d} list has {int(counts.min())} candidates, fewer than k = {k}")
                row_of = np.repeat(np.arange(len(lists.ids)), np.diff(lists.indptr[d]))
                state._fold(d, lists.cols[d], dense, lists.ids[row_of], int(counts.min()))
        state.seen = self.seen
        return state


__all__ = ["CandidateLists", "CandidateScores", "MarginCandidates"]
