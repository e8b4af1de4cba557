"""Top-k proponents and opponents per query without ever materialising N×Q records.

Train rows are the main input (many), the Q query projections a side input (few). Each worker scores
a batch of B train rows against all queries (a B×Q matrix), folds it into a per-bundle top-k state
(``BundleTopK``, O(Q·k) memory), and emits only k candidates per query per bundle; a CombineFn
merges them into the global top-k. Sign convention (``beam_influence.core.scoring``): larger influence =
more helpful = proponent; opponents are the smallest scores. Ties are broken by id ascending.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from beam_influence.core import scoring
from beam_influence.beam.project import NAMESPACE

Pairs = list[tuple[float, str]]


class BundleTopK:
    """Running top-k (largest and smallest) per query over batches of scores, O(Q·k) state.

    ``update(scores [B, Q], ids [B])`` then ``result() -> (proponents, opponents)``: per query a
    list of ``(score, id)`` pairs in rank order, identical to ``scoring.top_k`` on all rows seen.

    Each direction keeps ``keys [Q, k]`` (−score for proponents, score for opponents; +inf = empty
    slot) and ``ids [Q, k]``. A batch only touches the entries that beat a query's current k-th key
    (after the first batches, few do), so the cost per row is a [Q] comparison, not a sort.
    """

    def __init__(self, num_queries: int, k: int):
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        self.q, self.k = num_queries, k
        self.state = {largest: (np.full((num_queries, k), np.inf), np.full((num_queries, k), None, dtype=object))
                      for largest in (True, False)}

    def update(self, scores: np.ndarray, ids: Sequence[str]) -> None:
        scores = np.asarray(scores, np.float64)
        if scores.ndim != 2 or scores.shape[1] != self.q or scores.shape[0] != len(ids):
            raise ValueError(f"scores {scores.shape} must be [B, Q={self.q}] with B = len(ids) = {len(ids)}")
        if np.isnan(scores).any():
            raise ValueError("scores contain NaN")
        id_arr = np.asarray(list(ids), dtype=object)
        for largest in (True, False):
            keys, kept = self.state[largest]
            new = (-scores if largest else scores).T  # [Q, B]
            cand = new <= keys.max(axis=1, keepdims=True)  # can enter (ties included)
            rows, cols = np.nonzero(cand)
            if rows.size == 0:
                continue
            counts = np.bincount(rows, minlength=self.q)
            m = int(counts.max())
            pos = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
            ck = np.full((self.q, m), np.inf)
            ci = np.full((self.q, m), None, dtype=object)
            ck[rows, pos] = new[rows, cols]
            ci[rows, pos] = id_arr[cols]
            all_k = np.concatenate([keys, ck], axis=1)
            all_i = np.concatenate([kept, ci], axis=1)
            sel = self._select(all_k, all_i)
            r = np.arange(self.q)[:, None]
            self.state[largest] = (all_k[r, sel], all_i[r, sel])

    def _select(self, key: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """[Q, k] column indices of each row's k smallest keys (unordered); ties at the k-th by id."""
        k = self.k
        kth = np.partition(key, k - 1, axis=1)[:, k - 1 : k]
        within = key <= kth
        out = np.empty((self.q, k), dtype=np.int64)
        fast = within.sum(axis=1) == k  # no tie overflows the k-th place: vectorised
        if fast.any():
            out[fast] = np.nonzero(within[fast])[1].reshape(-1, k)
        for r in np.flatnonzero(~fast):  # exact path: ties at the k-th key, resolved by id ascending
            strict = np.flatnonzero(key[r] < kth[r, 0])
            ties = np.flatnonzero(key[r] == kth[r, 0])
            names = np.array(["\U0010ffff" if i is None else str(i) for i in ids[r, ties]])
            ties = ties[np.argsort(names, kind="stable")[: k - strict.size]]
            out[r, : strict.size] = strict
            out[r, strict.size :] = ties
        return out

    def result(self) -> tuple[list[Pairs], list[Pairs]]:
        """Per query: proponents (largest first) and opponents (smallest first) as (score, id) pairs."""
        out = {}
        for largest, (keys, ids) in self.state.items():
            lists = []
            for r in range(self.q):
                filled = np.array([i is not None for i in ids[r]], bool)
                scores = -keys[r, filled] if largest else keys[r, filled]
                lists.append(scoring.top_k_pairs(scores, ids[r, filled].astype(str), self.k, largest=largest))
            out[largest] = lists
        return out[True], out[False]


class QuerySet:
    """The Q query projections (the side input): ids [Q] and projections [Q, k]."""

    def __init__(self, rows: list[dict]):
        rows = sorted(rows, key=lambda r: r["id"])
        self.ids = [r["id"] for r in rows]
        self.proj = (np.stack([np.asarray(r["projection"], np.float64) for r in rows]) if rows
                     else np.zeros((0, 0)))


class _BundleTopKFn(beam.DoFn):
    """Buffer rows into batches of B, fold each batch's B×Q scores into a per-bundle ``BundleTopK``,
    and emit ``(query id, (proponents, opponents))`` candidates once per bundle."""

    def __init__(self, *, k: int, batch_size: int):
        super().__init__()
        self.k, self.batch_size = k, batch_size
        self.scored = Metrics.counter(NAMESPACE, "rows_scored")

    def start_bundle(self):
        self.buffer: list[dict] = []
        self.state: BundleTopK | None = None
        self.keys: list[str] | None = None

    def batch_scores(self, rows: list[dict]) -> np.ndarray:
        """[B, Q] scores of a batch of rows."""
        raise NotImplementedError

    def _add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        if self.buffer and self.keys:
            if self.state is None:
                self.state = BundleTopK(len(self.keys), self.k)
            self.state.update(self.batch_scores(self.buffer), [r["id"] for r in self.buffer])
            self.scored.inc(len(self.buffer))
        self.buffer = []

    def finish_bundle(self) -> Iterator[WindowedValue]:
        self._flush()
        if self.state is None:
            return
        pro, opp = self.state.result()
        for key, p, o in zip(self.keys, pro, opp):
            yield WindowedValue((key, (p, o)), GlobalWindow().max_timestamp(), [GlobalWindow()])
        self.state = None


class ScoreBundleFn(_BundleTopKFn):
    """Score train rows in batches of B against the queries (side input ``QuerySet``)."""

    def __init__(self, eigvals: np.ndarray, *, k: int, batch_size: int = 512, normalization: str = "none"):
        super().__init__(k=k, batch_size=batch_size)
        self.eigvals = np.asarray(eigvals, np.float64)
        self.normalization = normalization

    def process(self, row: dict, queries: QuerySet) -> None:
        self.queries, self.keys = queries, queries.ids
        self._add(row)

    def batch_scores(self, rows: list[dict]) -> np.ndarray:
        proj = np.stack([np.asarray(r["projection"], np.float64) for r in rows])
        return scoring.influence_scores(self.queries.proj, proj, self.eigvals, normalization=self.normalization)


class SelfInfluenceBundleFn(_BundleTopKFn):
    """Per-bundle top-n by the rows' ``self_influence`` (one "query": key ``"self"``)."""

    def process(self, row: dict) -> None:
        self.keys = ["self"]
        self._add(row)

    def batch_scores(self, rows: list[dict]) -> np.ndarray:
        return np.array([[r["self_influence"]] for r in rows], np.float64)


class TopKCombineFn(beam.CombineFn):
    """Merge (proponents, opponents) candidate lists into the global top-k (ties by id ascending)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def create_accumulator(self) -> tuple[Pairs, Pairs]:
        return [], []

    def add_input(self, acc, candidates):
        return (scoring.merge_top_k(acc[0], candidates[0], self.k, largest=True),
                scoring.merge_top_k(acc[1], candidates[1], self.k, largest=False))

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for acc in accs:
            out = self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return acc


def result_rows(item: tuple[str, tuple[Pairs, Pairs]]) -> Iterator[dict]:
    """(query id, (proponents, opponents)) → one flat row per (query, kind, rank)."""
    qid, (pro, opp) = item
    for kind, pairs in (("proponent", pro), ("opponent", opp)):
        for rank, (score, tid) in enumerate(pairs, start=1):
            yield {"query_id": qid, "kind": kind, "rank": rank, "train_id": tid, "score": float(score)}


class TopKInfluence(beam.PTransform):
    """Train rows (with "id", "projection") × query rows (side input) → global top-k per query.

    Output: one row per (query_id, kind ∈ {proponent, opponent}, rank) with train_id and score.
    """

    def __init__(self, queries, eigvals: np.ndarray, *, k: int = 10, batch_size: int = 512,
                 normalization: str = "none"):
        super().__init__()
        if normalization not in scoring.NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {scoring.NORMALIZATIONS}, got {normalization!r}")
        self.queries, self.eigvals = queries, eigvals
        self.k, self.batch_size, self.normalization = k, batch_size, normalization

    def expand(self, train_rows):
        query_set = self.queries | "QuerySet" >> beam.combiners.ToList() | "AsQuerySet" >> beam.Map(QuerySet)
        return (
            train_rows
            | "ScoreBundles" >> beam.ParDo(
                ScoreBundleFn(self.eigvals, k=self.k, batch_size=self.batch_size, normalization=self.normalization),
                queries=beam.pvalue.AsSingleton(query_set))
            | "MergeTopK" >> beam.CombinePerKey(TopKCombineFn(self.k))
            | "ToRows" >> beam.FlatMap(result_rows)
        )


class TopSelfInfluence(beam.PTransform):
    """Projected rows → the ``n`` rows with the largest self-influence (global, ties by id)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def expand(self, rows):
        return (
            rows
            | "SelfTopPerBundle" >> beam.ParDo(SelfInfluenceBundleFn(k=self.n, batch_size=4096))
            | "TopN" >> beam.CombinePerKey(TopKCombineFn(self.n))
            | "ToRows" >> beam.FlatMap(lambda kv: [
                {"rank": r, "id": tid, "self_influence": float(s)} for r, (s, tid) in enumerate(kv[1][0], start=1)])
        )
