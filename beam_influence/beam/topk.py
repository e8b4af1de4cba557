"""Top-k proponents and opponents per query without ever materialising N×Q records.

Train rows are the main input (many), the Q query projections a side input (few). Each worker scores
a batch of B train rows against all queries (a B×Q matrix), folds it into a per-bundle top-k state
(``BundleTopK``, O(Q·k) memory), and emits only k candidates per query per bundle; a CombineFn
merges them into the global top-k. Sign convention (``beam_influence.scoring``): larger influence =
more helpful = proponent; opponents are the smallest scores. Ties are broken by id ascending.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from beam_influence import scoring
from beam_influence.beam.project import NAMESPACE

Pairs = list[tuple[float, str]]


class BundleTopK:
    """Running top-k (largest and smallest) per query over batches of scores, O(Q·k) state.

    ``update(scores [B, Q], ids [B])`` then ``result() -> (proponents, opponents)``: per query a
    list of ``(score, id)`` pairs in rank order, identical to ``scoring.top_k`` on all rows seen.
    """

    def __init__(self, num_queries: int, k: int):
        self.q, self.k = num_queries, k
        empty = (np.zeros((num_queries, 0)), np.zeros((num_queries, 0), dtype=object))
        self.state = {True: empty, False: empty}  # largest -> (scores [Q, ≤k], ids [Q, ≤k])

    def update(self, scores: np.ndarray, ids: Sequence[str]) -> None:
        scores = np.asarray(scores, np.float64).T  # [Q, B]
        if scores.shape[0] != self.q:
            raise ValueError(f"scores have {scores.shape[0]} queries, expected {self.q}")
        ids = np.broadcast_to(np.asarray(list(ids), dtype=object), scores.shape)
        rows = np.arange(self.q)[:, None]
        for largest, (old_s, old_i) in self.state.items():
            all_s = np.concatenate([old_s, scores], axis=1)
            all_i = np.concatenate([old_i, ids], axis=1)
            cols = self._select(all_s, all_i, largest=largest)
            self.state[largest] = (all_s[rows, cols], all_i[rows, cols])

    def _select(self, s: np.ndarray, ids: np.ndarray, *, largest: bool) -> np.ndarray:
        """[Q, min(k, n)] column indices of each row's top-k (unordered), ties resolved by id."""
        n = s.shape[1]
        k = min(self.k, n)
        if k == n:
            return np.broadcast_to(np.arange(n), (self.q, n))
        key = -s if largest else s
        kth = np.partition(key, k - 1, axis=1)[:, k - 1 : k]
        below = key < kth
        tied = key == kth
        out = np.empty((self.q, k), dtype=np.int64)
        # exact rows: the ones strictly better than the k-th plus ties, resolved by id (rarely > k)
        for r in range(self.q):
            strict = np.flatnonzero(below[r])
            need = k - strict.size
            ties = np.flatnonzero(tied[r])
            if ties.size > need:
                ties = ties[np.argsort(ids[r, ties].astype(str), kind="stable")[:need]]
            out[r, : strict.size] = strict
            out[r, strict.size :] = ties[:need]
        return out

    def result(self) -> tuple[list[Pairs], list[Pairs]]:
        """Per query: proponents (largest first) and opponents (smallest first) as (score, id) pairs."""
        out = {}
        for largest, (s, i) in self.state.items():
            out[largest] = [scoring.top_k_pairs(s[r], i[r].astype(str), self.k, largest=largest) for r in range(self.q)]
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
