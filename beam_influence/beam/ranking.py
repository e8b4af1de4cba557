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

from beam_influence.beam import progress
from beam_influence.beam.complement_term import ComplementTerm
from beam_influence.beam.project import NAMESPACE, ProjectedChunk, projection_matrix, projections, sketch_matrix
from beam_influence.core.complement import augment, complement_scores, complement_self_influence
from beam_influence.core.scoring import influence_scores
from beam_influence.core.sketch import residual_sketch
from beam_influence.core.topk import TopK

NONE = ComplementTerm()

SELF = "self"


class QuerySet:
    """The Q query projections (the side input): ids [Q] (sorted), projections [Q, k] float64 and, when
    the queries were projected with a gradient sketch, their sketches [Q, d] float64 (else None)."""

    def __init__(self, chunks: Sequence[ProjectedChunk]):
        chunks = list(chunks)
        ids, proj = projections(chunks)
        order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
        self.ids = [ids[i] for i in order]
        dup = sorted({a for a, b in zip(self.ids, self.ids[1:]) if a == b})
        if dup:
            raise ValueError(f"{len(dup)} query ids occur more than once (first: {dup[:3]}); query ids must be unique")
        self.proj = proj[order].astype(np.float64) if len(ids) else np.zeros((0, 0))
        with_sketch = [c for c in chunks if "sketch" in c.table.column_names]
        self.sketch = None
        if ids and len(with_sketch) == len(chunks):
            self.sketch = np.concatenate([sketch_matrix(c.table) for c in chunks])[order].astype(np.float64)
        # [Q] ‖∇ℓ‖² and, projected under a K-FAC sketch, the K-FAC self-terms ‖v̄‖² (the exact rerank's margin)
        self.grad_sq_norm, self.kfac_self = (
            np.concatenate([np.asarray(c.table.column(col).to_numpy(), np.float64) for c in chunks])[order]
            if ids and all(col in c.table.column_names for c in chunks) else None
            for col in ("grad_sq_norm", "kfac_self"))

    def subset(self, ids) -> "QuerySet":
        """The queries ``ids`` (a subset, kept in this set's order)."""
        want = set(ids)
        pos = [i for i, q in enumerate(self.ids) if q in want]
        out = QuerySet([])
        out.ids = [self.ids[i] for i in pos]
        out.proj = self.proj[pos] if len(self.ids) else self.proj
        out.sketch = None if self.sketch is None else self.sketch[pos]
        out.grad_sq_norm = None if self.grad_sq_norm is None else self.grad_sq_norm[pos]
        out.kfac_self = None if self.kfac_self is None else self.kfac_self[pos]
        return out

    def scoring_operands(self, eigvals: np.ndarray, term: ComplementTerm) -> tuple[np.ndarray, np.ndarray]:
        """(query vectors, eigenvalues) for ``TopK.add_projections``: the projections, augmented by the
        sketched residuals for ``term.mode == "sketch"`` (``core.complement.augment``)."""
        if term.mode != "sketch":
            return self.proj, np.asarray(eigvals, np.float64)
        if self.sketch is None:
            raise ValueError("the complement term needs the queries' gradient sketches: project the queries with the "
                             "index's sketch_dim/sketch_seed")
        return augment(self.proj, residual_sketch(self.sketch, self.proj, term.basis_sketch), eigvals, term.rho)


def train_operands(table, eigvals: np.ndarray, term: ComplementTerm) -> tuple[np.ndarray, np.ndarray]:
    """(train vectors, eigenvalues) of an index batch/table, augmented like ``QuerySet.scoring_operands`` (the
    sketch decoded from its stored dtype: ``project.sketch_matrix``)."""
    proj = projection_matrix(table)
    if term.mode != "sketch":
        return proj, np.asarray(eigvals, np.float64)
    return augment(proj, residual_sketch(sketch_matrix(table), proj, term.basis_sketch),
                   eigvals, term.rho)


def _state_for(queries: QuerySet, k: int) -> TopK:
    return TopK(queries.ids, k)


class BundleState:
    """A DoFn mixin: one mergeable accumulator per bundle instead of one per element, emitted by
    ``finish_bundle``. Its bounds (the held k-th scores) keep filtering the bundle's next elements, and one state
    is pickled and merged, not one per element. ``_bundle_state(queries, make)`` returns the bundle's state for
    these queries (a new one from ``make()`` when the query set differs)."""

    _state = None

    def start_bundle(self):
        self._state = None

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        if self._state is not None and self._state.seen:
            yield WindowedValue(self._state, GlobalWindow().max_timestamp(), [GlobalWindow()])
        self._state = None

    def _bundle_state(self, queries, make):
        if self._state is None or self._state.query_ids != queries.ids:
            if self._state is not None and self._state.seen:  # a new query set inside a bundle: not expected
                raise ValueError("one bundle saw two query sets; the queries are one side input")
            self._state = make()
        return self._state


class ScoreShardFn(BundleState, beam.DoFn):
    """Index shards (manifest entries, verified on read) → one ``TopK`` per bundle against the queries."""

    def __init__(self, eigvals: np.ndarray, *, k: int, normalization: str = "none", batch_rows: int = 65536,
                 complement: ComplementTerm = NONE):
        super().__init__()
        if complement.mode in ("exact", "kfac"):
            raise ValueError("an index has no training gradients: the exact complement needs the fused job")
        self.eigvals = np.asarray(eigvals, np.float64)
        self.k, self.normalization, self.batch_rows, self.term = k, normalization, batch_rows, complement
        self.scored = Metrics.counter(NAMESPACE, "rows_scored")

    def process(self, shard: dict, queries: QuerySet) -> Iterator[TopK]:
        from beam_influence.beam.index import read_shard

        if not queries.ids:
            return
        state = self._bundle_state(queries, lambda: _state_for(queries, self.k))
        test, lam = queries.scoring_operands(self.eigvals, self.term)
        cols = ["id", "projection"] + (["sketch"] if self.term.mode == "sketch" else [])
        for rb in read_shard(shard, cols, batch_rows=self.batch_rows):
            train, _ = train_operands(rb, self.eigvals, self.term)
            state.add_projections(test, train, rb.column(0).to_numpy(zero_copy_only=False), lam,
                                  normalization=self.normalization)
            self.scored.inc(rb.num_rows)
            progress.add(rb.num_rows)
        return iter(())  # the bundle's state is emitted by finish_bundle


class ScoreChunkFn(BundleState, beam.DoFn):
    """Projected chunks (fused job, rerank stage 2) → one ``TopK`` per bundle against the queries (one state
    across the bundle's chunks: its k-th scores filter the next chunk, and one state is pickled, not one per
    chunk)."""

    def __init__(self, eigvals: np.ndarray, *, k: int, normalization: str = "none",
                 complement: ComplementTerm = NONE):
        super().__init__()
        self.eigvals = np.asarray(eigvals, np.float64)
        self.k, self.normalization, self.term = k, normalization, complement
        self.scored = Metrics.counter(NAMESPACE, "rows_scored")
        self._columns = None

    def _dot_columns(self, queries: QuerySet) -> np.ndarray:
        """Column of ``query_dots`` for each query of the QuerySet (its ids are sorted; the launcher's are not)."""
        if self._columns is None:
            pos = {q: i for i, q in enumerate(self.term.query_ids)}
            missing = [q for q in queries.ids if q not in pos]
            if missing:
                raise ValueError(f"{len(missing)} queries have no test gradient for the exact complement "
                                 f"(first: {missing[:3]}); the launcher's test data differ from the pipeline's")
            self._columns = np.asarray([pos[q] for q in queries.ids], np.int64)
        return self._columns

    def process(self, chunk: ProjectedChunk, queries: QuerySet) -> Iterator[TopK]:
        t = chunk.table
        if not queries.ids or t.num_rows == 0:
            return
        state = self._bundle_state(queries, lambda: _state_for(queries, self.k))
        ids = t.column("id").to_numpy()
        if self.term.mode in ("exact", "kfac"):  # ⟨∇ℓ(z), v_q⟩ projected on the worker: exact float64 scores
            dots = projection_matrix(t, "query_dots")[:, self._dot_columns(queries)]
            train = projection_matrix(t)
            for s in range(0, len(ids), 4096):  # bounded [rows, Q] float64 temporaries
                if self.term.mode == "exact":  # v_q = ∇ℓ(z_q): the scalar complement
                    scores = complement_scores(queries.proj, train[s:s + 4096], self.eigvals, dots[s:s + 4096],
                                               rho=self.term.rho)
                else:  # v_q = w_q, the K-FAC complement vector: the dot is the complement term itself
                    scores = influence_scores(queries.proj, train[s:s + 4096], self.eigvals) \
                        + np.asarray(dots[s:s + 4096], np.float64)
                state.add(scores, ids[s:s + 4096])
        else:
            test, lam = queries.scoring_operands(self.eigvals, self.term)
            train, _ = train_operands(t, self.eigvals, self.term)
            state.add_projections(test, train, ids, lam, normalization=self.normalization)
        self.scored.inc(t.num_rows)
        return iter(())  # the bundle's state is emitted by finish_bundle


def self_scores(table_or_batch, eigvals: np.ndarray | None = None, term: ComplementTerm = NONE) -> np.ndarray:
    """``[n]`` float64 self-influence of index rows: the stored truncated ``self_influence``, or with the exact
    complement :math:`+(\lVert\nabla\ell\rVert^2 - \lVert P\rVert^2)/\rho` from ``grad_sq_norm``."""
    if not term.on:
        return np.asarray(table_or_batch.column("self_influence").to_numpy(), np.float64)
    if term.mode == "kfac":  # the worker's per-example K-FAC complement term (core.kfac.Complement.self_terms)
        return (np.asarray(table_or_batch.column("self_influence").to_numpy(), np.float64)
                + np.asarray(table_or_batch.column("kfac_self").to_numpy(zero_copy_only=False), np.float64))
    sq = np.asarray(table_or_batch.column("grad_sq_norm").to_numpy(zero_copy_only=False), np.float64)
    return complement_self_influence(projection_matrix(table_or_batch), eigvals, sq, rho=term.rho)


SELF_COLUMNS = {"none": ["id", "self_influence"], "exact": ["id", "projection", "grad_sq_norm"],
                "kfac": ["id", "self_influence", "kfac_self"]}


def _self_state(n: int, table_or_batch, eigvals=None, term: ComplementTerm = NONE) -> TopK:
    state = TopK([SELF], n, directions=("proponents",))
    scores = self_scores(table_or_batch, eigvals, term)[:, None]
    state.add(scores, table_or_batch.column("id").to_numpy(zero_copy_only=False))
    return state


class SelfTopShardFn(beam.DoFn):
    """An index shard → its top-n by self-influence (a one-query ``TopK``)."""

    def __init__(self, n: int, batch_rows: int = 65536, *, eigvals: np.ndarray | None = None,
                 complement: ComplementTerm = NONE):
        super().__init__()
        self.n, self.batch_rows = n, batch_rows
        self.eigvals, self.term = (None if eigvals is None else np.asarray(eigvals, np.float64)), complement

    def process(self, shard: dict) -> Iterator[TopK]:
        from beam_influence.beam.index import read_shard

        state = None
        for rb in read_shard(shard, SELF_COLUMNS[self.term.mode], batch_rows=self.batch_rows):
            s = _self_state(self.n, rb, self.eigvals, self.term)
            state = s if state is None else state.merge(s)
        if state is not None:
            yield state


class TopKCombineFn(beam.CombineFn):
    """Merge mergeable states — ``TopK``, ``MarginCandidates``, ``CandidateScores`` (associative, commutative: the
    runner may pre-combine per bundle)."""

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

    ``train`` elements are index shard entries (``source="index"``) or ``ProjectedChunk``s (``"chunks"``);
    ``only``: score just these query ids (a block of the fused job's exact complement).
    """

    def __init__(self, queries, eigvals: np.ndarray, *, k: int = 10, normalization: str = "none",
                 source: str = "index", complement: ComplementTerm = NONE, only: Sequence[str] | None = None):
        super().__init__()
        from beam_influence.core import scoring

        if normalization not in scoring.NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {scoring.NORMALIZATIONS}, got {normalization!r}")
        if k < 1:
            raise ValueError(f"top_k must be ≥ 1, got {k}")
        if source not in ("index", "chunks"):
            raise ValueError(f"source must be 'index' or 'chunks', got {source!r}")
        if complement.on and normalization != "none":
            raise ValueError(f"the complement term needs normalization 'none', got {normalization!r}")
        self.queries, self.eigvals, self.k, self.normalization, self.source = queries, eigvals, k, normalization, source
        self.complement, self.only = complement, (None if only is None else list(only))

    def expand(self, train):
        only = self.only

        def query_set(chunks):
            qs = QuerySet(chunks)
            return qs if only is None else qs.subset(only)

        query_set = self.queries | "GatherQueries" >> beam.combiners.ToList() | "AsQuerySet" >> beam.Map(query_set)
        kw = dict(k=self.k, normalization=self.normalization, complement=self.complement)
        fn = (ScoreShardFn(self.eigvals, **kw) if self.source == "index" else ScoreChunkFn(self.eigvals, **kw))
        return (train
                | "Score" >> beam.ParDo(fn, queries=beam.pvalue.AsSingleton(query_set))
                | "MergeTopK" >> beam.CombineGlobally(TopKCombineFn()))


class TopSelfInfluence(beam.PTransform):
    """Index shards (``source="index"``) or projected chunks → one merged self-influence ``TopK``."""

    def __init__(self, n: int, *, source: str = "index", eigvals: np.ndarray | None = None,
                 complement: ComplementTerm = NONE):
        super().__init__()
        if n < 1:
            raise ValueError(f"self_influence_top must be ≥ 1, got {n}")
        if complement.on and eigvals is None:
            raise ValueError("self-influence with the complement term needs the eigenvalues")
        self.n, self.source, self.eigvals, self.complement = n, source, eigvals, complement

    def expand(self, train):
        if self.source == "index":
            states = train | "SelfTopShards" >> beam.ParDo(
                SelfTopShardFn(self.n, eigvals=self.eigvals, complement=self.complement))
        else:
            n, lam, term = self.n, self.eigvals, self.complement
            states = (train | "SelfTopChunks" >> beam.FlatMap(
                lambda c: [_self_state(n, c.table, lam, term)] if c.table.num_rows else []))
        return states | "MergeSelfTop" >> beam.CombineGlobally(TopKCombineFn())
