"""Top-k proponents/opponents per query and top-n self-influence, without N×Q records.

Train data are the main input (index shards, or projected chunks in the fused job), the Q query
projections a side input. Each element (a shard or a chunk: thousands of rows) is scored against all
queries by one float32 matrix product, the candidates that can enter the top-k are re-scored exactly
in float64, and folded into ``core.topk.TopK``: the one accumulator (one ordering rule: larger score
first for proponents, smaller for opponents, ties by id ascending), used by the in-memory API, per
element here, and as the accumulator of ``TopKCombineFn`` (so the runner's partial combining merges
them before any shuffle). Only O(Q·k) state per element ever leaves a worker.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from beam_influence.beam.project import NAMESPACE, ProjectedChunk, projection_matrix, projections
from beam_influence.core.topk import TopK

SELF = "self"


class QuerySet:
    """The Q query projections (the side input): ids [Q] (sorted) and projections [Q, k] float64."""

    def __init__(self, chunks: Sequence[ProjectedChunk]):
        ids, proj = projections(chunks)
        order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
        self.ids = [ids[i] for i in order]
        dup = sorted({a for a, b in zip(self.ids, self.ids[1:]) if a == b})
        if dup:
            raise ValueError(f"{len(dup)} query ids occur more than once (first: {dup[:3]}); query ids must be unique")
        self.proj = proj[order].astype(np.float64) if len(ids) else np.zeros((0, 0))


def _state_for(queries: QuerySet, k: int) -> TopK:
    return TopK(queries.ids, k)


class ScoreShardFn(beam.DoFn):
    """An index shard (manifest entry, verified on read) → its ``TopK`` against the queries."""

    def __init__(self, eigvals: np.ndarray, *, k: int, normalization: str = "none", batch_rows: int = 65536):
        super().__init__()
        self.eigvals = np.asarray(eigvals, np.float64)
        self.k, self.normalization, self.batch_rows = k, normalization, batch_rows
        self.scored = Metrics.counter(NAMESPACE, "rows_scored")

    def process(self, shard: dict, queries: QuerySet) -> Iterator[TopK]:
        from beam_influence.beam.index import read_shard

        if not queries.ids:
            return
        state = _state_for(queries, self.k)
        for rb in read_shard(shard, ["id", "projection"], batch_rows=self.batch_rows):
            state.add_projections(queries.proj, projection_matrix(rb), rb.column(0).to_numpy(zero_copy_only=False),
                                  self.eigvals, normalization=self.normalization)
            self.scored.inc(rb.num_rows)
        yield state


class ScoreChunkFn(beam.DoFn):
    """A projected chunk (fused job) → its ``TopK`` against the queries."""

    def __init__(self, eigvals: np.ndarray, *, k: int, normalization: str = "none"):
        super().__init__()
        self.eigvals = np.asarray(eigvals, np.float64)
        self.k, self.normalization = k, normalization
        self.scored = Metrics.counter(NAMESPACE, "rows_scored")

    def process(self, chunk: ProjectedChunk, queries: QuerySet) -> Iterator[TopK]:
        t = chunk.table
        if not queries.ids or t.num_rows == 0:
            return
        state = _state_for(queries, self.k)
        state.add_projections(queries.proj, projection_matrix(t), t.column("id").to_numpy(), self.eigvals,
                              normalization=self.normalization)
        self.scored.inc(t.num_rows)
        yield state


def _self_state(n: int, table_or_batch) -> TopK:
    state = TopK([SELF], n, directions=("proponents",))
    scores = np.asarray(table_or_batch.column("self_influence").to_numpy(), np.float64)[:, None]
    state.add(scores, table_or_batch.column("id").to_numpy(zero_copy_only=False))
    return state


class SelfTopShardFn(beam.DoFn):
    """An index shard → its top-n by self-influence (a one-query ``TopK``)."""

    def __init__(self, n: int, batch_rows: int = 65536):
        super().__init__()
        self.n, self.batch_rows = n, batch_rows

    def process(self, shard: dict) -> Iterator[TopK]:
        from beam_influence.beam.index import read_shard

        state = None
        for rb in read_shard(shard, ["id", "self_influence"], batch_rows=self.batch_rows):
            s = _self_state(self.n, rb)
            state = s if state is None else state.merge(s)
        if state is not None:
            yield state


class TopKCombineFn(beam.CombineFn):
    """Merge ``TopK`` states (associative, commutative: the runner may pre-combine per bundle)."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, state: TopK):
        return state if acc is None else acc.merge(state)

    def merge_accumulators(self, accs):
        out = None
        for acc in accs:
            if acc is not None:
                out = acc if out is None else out.merge(acc)
        return out

    def extract_output(self, acc):
        return acc


def topk_rows(state: TopK | None) -> list[dict]:
    """One row per (query, kind, rank): ``{query_id, kind, rank, train_id, score}``, sorted."""
    if state is None:
        return []
    pro, opp = state.result()
    rows = []
    for qid, p, o in zip(state.query_ids, pro, opp):
        for kind, pairs in (("opponent", o), ("proponent", p)):
            rows.extend({"query_id": qid, "kind": kind, "rank": r, "train_id": tid, "score": float(s)}
                        for r, (tid, s) in enumerate(pairs, start=1))
    rows.sort(key=lambda r: (r["query_id"], r["kind"], r["rank"]))
    return rows


def self_rows(state: TopK | None) -> list[dict]:
    """``{rank, id, self_influence}`` rows of a one-query self-influence ``TopK``."""
    if state is None:
        return []
    pro = state.result()[0][0]
    return [{"rank": r, "id": tid, "self_influence": float(s)} for r, (tid, s) in enumerate(pro, start=1)]


class TopKInfluence(beam.PTransform):
    """Train data × queries (side input) → one merged ``TopK`` (a single element).

    ``train`` elements are index shard entries (``source="index"``) or ``ProjectedChunk``s (``"chunks"``).
    """

    def __init__(self, queries, eigvals: np.ndarray, *, k: int = 10, normalization: str = "none",
                 source: str = "index"):
        super().__init__()
        from beam_influence.core import scoring

        if normalization not in scoring.NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {scoring.NORMALIZATIONS}, got {normalization!r}")
        if k < 1:
            raise ValueError(f"top_k must be ≥ 1, got {k}")
        if source not in ("index", "chunks"):
            raise ValueError(f"source must be 'index' or 'chunks', got {source!r}")
        self.queries, self.eigvals, self.k, self.normalization, self.source = queries, eigvals, k, normalization, source

    def expand(self, train):
        query_set = self.queries | "GatherQueries" >> beam.combiners.ToList() | "AsQuerySet" >> beam.Map(QuerySet)
        fn = (ScoreShardFn(self.eigvals, k=self.k, normalization=self.normalization) if self.source == "index"
              else ScoreChunkFn(self.eigvals, k=self.k, normalization=self.normalization))
        return (train
                | "Score" >> beam.ParDo(fn, queries=beam.pvalue.AsSingleton(query_set))
                | "MergeTopK" >> beam.CombineGlobally(TopKCombineFn()))


class TopSelfInfluence(beam.PTransform):
    """Index shards (``source="index"``) or projected chunks → one merged self-influence ``TopK``."""

    def __init__(self, n: int, *, source: str = "index"):
        super().__init__()
        if n < 1:
            raise ValueError(f"self_influence_top must be ≥ 1, got {n}")
        self.n, self.source = n, source

    def expand(self, train):
        if self.source == "index":
            states = train | "SelfTopShards" >> beam.ParDo(SelfTopShardFn(self.n))
        else:
            n = self.n
            states = (train | "SelfTopChunks" >> beam.FlatMap(
                lambda c: [_self_state(n, c.table)] if c.table.num_rows else []))
        return states | "MergeSelfTop" >> beam.CombineGlobally(TopKCombineFn())
