r"""Two-stage queries against an index: sketch candidates with a margin (stage 1), exact rescoring (stage 2).

    stage 1:  index shards ─ ScanCandidatesFn(queries) ─ merge ─ MarginCandidates (per query and kind: the rows
              whose optimistic score reaches the k-th best pessimistic one)
    stage 2:  (shard, candidate ids) ─ ReadBackFn ─ ProjectChunks([U; query gradients]) ─ ScoreChunkFn(exact)
              ─ merge ─ TopK (exact lists)

Stage 1 (``core.candidates.MarginCandidates``, margins from ``core.rerank``: the sketch's own variance) keys each
row by its index part and position in it (an int64 code, ``part << 32 | row``; the launcher resolves the
candidates' ids from the index's id column), so that stage 2 reads back just the candidate training records
from their source chunk — the index's manifest keeps each part's source file, record offset, record count and
a digest of the records as read (``formats.chunk_digest``). A source file that is missing, or whose chunk no
longer hashes to the digest, is reported by name (``SourceChangedError``), never rescored from other data.
Stage 2 recomputes the candidates' gradients and scores them against the query gradients exactly
(``⟨∇ℓ_z, ∇ℓ_q⟩``, the fused job's arithmetic).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Mapping, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from beam_influence import formats
from beam_influence.beam import progress
from beam_influence.beam.complement_term import ComplementTerm
from beam_influence.beam.project import NAMESPACE, projection_matrix, sketch_storage
from beam_influence.beam.ranking import BundleState, QuerySet, ScoreChunkFn, train_operands
from beam_influence.core import rerank
from beam_influence.core.sketch import residual_sketch
from beam_influence.core.candidates import CandidateLists, CandidateScores, MarginCandidates

MISMATCH = "mismatch"


class SourceChangedError(ValueError):
    """A training source file changed, moved or vanished between indexing and the exact rerank."""


@dataclasses.dataclass(frozen=True)
class SketchGeometry:
    """What the margin needs of the index's sketch: d, its storage dtype and whether it is the identity."""

    dim: int
    dtype: str
    exact: bool

    @classmethod
    def of(cls, sketch: Mapping[str, Any]) -> "SketchGeometry":
        if sketch.get("method") not in ("count", "exact"):
            raise ValueError(f"the exact rerank's margin is derived for the CountSketch; this index's sketch is "
                             f"{sketch.get('method')!r}: rebuild it with --sketch_method count, or use "
                             "--exact_rerank off")
        return cls(int(sketch["dim"]), str(sketch.get("dtype", "float32")), sketch.get("method") == "exact")


def sketched_norms(sq: np.ndarray, proj: np.ndarray, term: ComplementTerm) -> np.ndarray:
    """``[n]`` the norms of the vectors the sketch is of, from the column ``term.residual_column`` (``sq``):
    ‖v̄‖ (K-FAC sketch, ``kfac_self``) or ‖(I − UUᵀ)∇ℓ‖ (``grad_sq_norm`` and the projections)."""
    return rerank.whitened_norms(sq) if term.kfac_sketch else rerank.residual_norms(sq, proj)


def query_margins(queries: QuerySet, term: ComplementTerm, geometry: SketchGeometry, z: float) -> np.ndarray:
    """``[Q, 2]`` the queries' margin factors (``core.rerank.query_factors``)."""
    sq = getattr(queries, term.residual_column)  # QuerySet keeps both columns under their names
    if sq is None or queries.sketch is None:
        raise ValueError(f"the exact rerank needs the queries' sketches and {term.residual_column}: project them with "
                         "the index's sketch")
    resid = residual_sketch(queries.sketch, queries.proj, term.basis_sketch)
    return rerank.query_factors(sketched_norms(sq, queries.proj, term), resid, dim=geometry.dim, rho=term.rho, z=z,
                                exact_sketch=geometry.exact)


ROW_BITS = 32  # a candidate's code: part << ROW_BITS | its row in the index part


class ScanCandidatesFn(BundleState, beam.DoFn):
    """Index shards (each with ``part``: its place in the manifest) → one ``MarginCandidates`` per bundle, each
    row keyed by the int64 code ``part << 32 | row in the part`` (so stage 2 knows where to read it back). One
    state across a bundle's shards: its bounds (τ, the cap's limit) keep tightening from shard to shard instead
    of starting over, so fewer entries need selecting."""

    def __init__(self, eigvals: np.ndarray, *, top_k: int, term: ComplementTerm, geometry: SketchGeometry,
                 z: float, cap: int | None = None, rows: int = 0, batch_rows: int = 65536):
        super().__init__()
        if term.mode != "sketch":
            raise ValueError("stage 1 of the exact rerank scans the sketched complement (complement mode 'sketch')")
        self.eigvals = np.asarray(eigvals, np.float64)
        self.k, self.term, self.geometry, self.z, self.batch_rows = top_k, term, geometry, z, batch_rows
        self.cap, self.rows = cap, rows  # rerank.candidate_cap once the queries are known
        self.scored = Metrics.counter(NAMESPACE, "rows_scored")
        self._margins = None

    def process(self, shard: dict, queries: QuerySet) -> Iterator[MarginCandidates]:
        from beam_influence.beam.index import read_shard

        if not queries.ids:
            return
        if self._margins is None or self._margins[0] is not queries:
            self._margins = (queries, query_margins(queries, self.term, self.geometry, self.z),
                             queries.scoring_operands(self.eigvals, self.term))
        _, b, (test, lam) = self._margins
        cap = rerank.candidate_cap(self.cap, self.k, len(queries.ids), self.rows)
        state = self._bundle_state(queries, lambda: MarginCandidates(queries.ids, self.k, cap))
        row = 0
        col = self.term.residual_column
        for rb in read_shard(shard, ["projection", col, "sketch"], batch_rows=self.batch_rows):
            n = rb.num_rows
            proj = projection_matrix(rb)
            scales = (np.asarray(rb.column("sketch_scale").to_numpy(zero_copy_only=False))
                      if "sketch_scale" in rb.schema.names else None)
            resid = sketched_norms(rb.column(col).to_numpy(zero_copy_only=False), proj, self.term)
            a = rerank.train_factors(resid, scales, self.geometry.dim, sketch_storage(rb.schema) or "float32")
            train, _ = train_operands(rb, self.eigvals, self.term)
            codes = (np.int64(shard["part"]) << ROW_BITS) + np.arange(row, row + n, dtype=np.int64)
            state.add_projections(test, train, codes, lam, (a, b))
            row += n
            self.scored.inc(n)
            progress.add(n)
        return iter(())  # the bundle's state is emitted by finish_bundle


class ScanCandidates(beam.PTransform):
    """Index shards × queries (side input) → one merged ``MarginCandidates``."""

    def __init__(self, query_set, eigvals, *, top_k: int, term: ComplementTerm, geometry: SketchGeometry, z: float,
                 cap: int | None = None, rows: int = 0):
        super().__init__()
        self.query_set = query_set
        self.fn = ScanCandidatesFn(eigvals, top_k=top_k, term=term, geometry=geometry, z=z, cap=cap, rows=rows)

    def expand(self, shards):
        from beam_influence.beam.ranking import TopKCombineFn

        return (shards | "Scan" >> beam.ParDo(self.fn, queries=beam.pvalue.AsSingleton(self.query_set))
                | "MergeCandidates" >> beam.CombineGlobally(TopKCombineFn()))


# ---- launcher: which rows stage 2 rescores ---------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """Stage 2's work: per (query id, kind) the candidate row codes (``part << 32 | row``, optimistic best first),
    whether the list is complete (the cap cut nothing that can matter: its exact top k is among them), and the
    training ids of the candidate rows (``ids[code]``, from the index's id column)."""

    kept: dict
    complete: dict
    ids: dict
    rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # distinct row codes

    @property
    def candidates(self) -> int:
        return sum(len(v) for v in self.kept.values())

    @functools.cached_property
    def row_ids(self) -> list:
        """The training ids of ``rows``, in their order (formed once, for every block's candidate lists)."""
        return [self.ids[c] for c in self.rows.tolist()]


def plan_rerank(state: MarginCandidates, shards: Sequence[Mapping[str, Any]]) -> Plan:
    """The candidates of every list, whether the list is complete, and the candidate rows' ids (read from the
    ``id`` column of the index parts ``shards`` that hold candidates)."""
    from beam_influence.beam.index import read_shard

    kept, complete = {}, {}
    for d, kind in (("proponents", "proponent"), ("opponents", "opponent")):
        cols, codes, _ = state.candidates(d)
        whole = state.complete(d)
        bounds = np.searchsorted(cols, np.arange(state.num_queries + 1))
        for q, qid in enumerate(state.query_ids):
            kept[(qid, kind)] = codes[bounds[q]:bounds[q + 1]].astype(np.int64)
            complete[(qid, kind)] = bool(whole[q])
    rows = np.unique(np.concatenate([np.zeros(0, np.int64)] + list(kept.values())))
    plan = Plan(kept, complete, {}, rows)
    for part, mine in _by_part(rows):
        col = pa.concat_arrays([rb.column("id") for rb in read_shard(shards[part], ["id"])])
        pos = mine & ((1 << ROW_BITS) - 1)
        if pos.size and pos.max() >= len(col):
            raise ValueError(f"index part {part} has {len(col)} rows, a candidate names row {int(pos.max())}: the "
                             "index changed during the query")
        plan.ids.update(zip(mine.tolist(), col.take(pa.array(pos)).to_pylist()))  # only the candidates' ids
    return plan


def _by_part(rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(part, its row codes)`` of sorted distinct row codes."""
    parts = rows >> ROW_BITS
    for part in np.unique(parts).tolist():
        lo, hi = np.searchsorted(parts, [part, part + 1])
        yield part, rows[lo:hi]


def candidate_lists(plan: Plan, query_ids: Sequence[str]) -> CandidateLists:
    """The candidate pairs of the queries ``query_ids`` (in this order): stage 2 scores only these."""
    rows = plan.rows
    pairs = {}
    for d, kind in (("proponents", "proponent"), ("opponents", "opponent")):
        codes = [plan.kept[(qid, kind)] for qid in query_ids]
        pairs[d] = (np.searchsorted(rows, np.concatenate([np.zeros(0, np.int64)] + codes)),
                    np.repeat(np.arange(len(query_ids)), [len(c) for c in codes]))
    return CandidateLists(query_ids, plan.row_ids, pairs)


def work_items(plan: Plan, shards: Sequence[Mapping[str, Any]], query_ids: Sequence[str] | None = None) -> list:
    """``[(shard entry, sorted training ids)]``: the candidate rows of the given queries (all: None), by shard."""
    wanted = None if query_ids is None else set(query_ids)
    if wanted is None or all(qid in wanted for qid, _ in plan.kept):
        rows = plan.rows
    else:
        codes = [c for (qid, _), c in plan.kept.items() if qid in wanted]
        rows = np.unique(np.concatenate([np.zeros(0, np.int64)] + codes))
    return [(dict(shards[part]), sorted(plan.ids[c] for c in mine.tolist())) for part, mine in _by_part(rows)]


# ---- stage 2: exact scores of the candidate pairs ---------------------------------------------------
class ScoreCandidatesFn(ScoreChunkFn):
    """Projected read-back chunks → one ``CandidateScores`` per bundle: the exact score of each row against the
    queries whose list holds it (``CandidateLists``, a side input), not against every query. The fused job's
    arithmetic per pair (``ScoreChunkFn``): no ``[rows, Q]`` score matrix and no per-chunk top-k selection; the
    lists are ranked once, by the launcher (``CandidateScores.topk``)."""

    def process(self, chunk, queries: QuerySet, lists: CandidateLists) -> Iterator[CandidateScores]:
        from beam_influence.core.complement import complement_pair_scores
        from beam_influence.core.scoring import _pair_scores, _weighted

        t = chunk.table
        if not queries.ids or t.num_rows == 0:
            return
        if self.term.mode not in ("exact", "kfac"):
            raise ValueError("stage 2 scores exactly: complement mode 'exact' or 'kfac'")
        state = self._bundle_state(queries, lambda: CandidateScores(queries.ids))
        dots = projection_matrix(t, "query_dots")
        dot_col = self._dot_columns(queries)
        train = projection_matrix(t)
        weighted = _weighted(train, self.eigvals) if self.term.mode == "kfac" else None
        for d, (row, col, pos) in lists.pairs(t.column("id").to_numpy(zero_copy_only=False)).items():
            g = dots[row, dot_col[col]]
            if self.term.mode == "exact":  # v_q = ∇ℓ(z_q): the scalar complement
                scores = complement_pair_scores(queries.proj, train, self.eigvals, g, row, col, rho=self.term.rho)
            else:  # v_q = w_q, the K-FAC complement vector: the dot is the complement term itself
                scores = _pair_scores(weighted, queries.proj, None, None, row, col, "none") + np.asarray(g, np.float64)
            state.add(d, pos, scores)
        state.seen += t.num_rows
        self.scored.inc(t.num_rows)
        return iter(())  # the bundle's state is emitted by finish_bundle


# ---- stage 2: read the candidates back ------------------------------------------------------------
def source_table(pattern: str) -> dict[str, str]:
    """The training files named by ``pattern`` (the query's ``--train_data``), by shard basename."""
    paths, _ = formats.match_data_files(pattern)
    table: dict[str, str] = {}
    for path in paths:
        name = formats.shard_basename(path)
        if name in table and table[name] != path:
            raise ValueError(f"--train_data {pattern!r} matches two files named {name!r} ({table[name]!r}, {path!r}); "
                             "the rerank finds an index's source files by name: pass a pattern matching one of them")
        table[name] = path
    return table


def read_chunk(path: str, fmt: str | None, offset: int, records: int, batch_rows: int) -> formats.Chunk | None:
    """The chunk of ``path`` starting at record ``offset`` as indexing read it (same splits and batch rows), or
    None when the file has no chunk there."""
    for split in formats.splits(path, fmt, rows_per_split=batch_rows):
        if split.start is not None and split.num_rows is not None and split.start + split.num_rows <= offset:
            continue
        for chunk in formats.read_split(split, batch_rows=batch_rows):
            if chunk.offset == offset:
                return chunk
            if chunk.offset > offset:
                return None
    return None


class ReadBackFn(beam.DoFn):
    """(shard entry, ids) → a ``formats.Chunk`` of exactly those records, read from the shard's source chunk
    and verified against its digest; a missing or changed source → a ``MISMATCH`` output naming it."""

    def __init__(self, sources: Mapping[str, str], fmt: str | None, batch_rows: int):
        super().__init__()
        self.sources, self.fmt, self.batch_rows = dict(sources), fmt, batch_rows
        self.read = Metrics.counter(NAMESPACE, "candidates_read_back")

    def process(self, item) -> Iterator[Any]:
        shard, ids = item
        src = shard["source"]
        path = self.sources.get(formats.shard_basename(src))
        where = f"training source {src!r} (records {shard['offset']}..{shard['offset'] + shard['records'] - 1})"
        if path is None:
            yield pvalue.TaggedOutput(MISMATCH, {"source": src, "reason": f"{where} is not among the files of "
                                                 "--train_data (moved, renamed or deleted)"})
            return
        try:
            chunk = read_chunk(path, self.fmt, int(shard["offset"]), int(shard["records"]), self.batch_rows)
        except (OSError, ValueError) as e:
            yield pvalue.TaggedOutput(MISMATCH, {"source": src, "reason": f"{where} cannot be read from {path!r}: {e}"})
            return
        digest = None if chunk is None else formats.chunk_digest(chunk)
        if chunk is None or chunk.records != shard["records"] or digest != shard["digest"]:
            yield pvalue.TaggedOutput(MISMATCH, {"source": src, "reason": (
                f"{where} read from {path!r} does not match the index (digest {digest} vs {shard['digest']}): "
                "the file changed since it was indexed; rebuild the index, or restore the file")})
            return
        batch = chunk.batch
        want = set(ids)
        pos = np.asarray([i for i, rid in enumerate(batch.column(0).to_pylist()) if rid in want], np.int64)
        if len(pos) != len(ids):
            yield pvalue.TaggedOutput(MISMATCH, {"source": src, "reason": (
                f"{where}: {len(ids) - len(pos)} indexed ids are not in the chunk read from {path!r}")})
            return
        self.read.inc(len(pos))
        progress.add(len(pos))
        yield formats.Chunk(chunk.source, chunk.offset, batch.take(pos), [])


class ReadBack(beam.PTransform):
    """Work items → ``{"chunks": formats.Chunk, "mismatch": rows naming changed sources}``."""

    def __init__(self, sources: Mapping[str, str], fmt: str | None, batch_rows: int):
        super().__init__()
        self.fn = ReadBackFn(sources, fmt, batch_rows)

    def expand(self, items):
        out = (items | "Spread" >> beam.Reshuffle()
               | "Read" >> beam.ParDo(self.fn).with_outputs(MISMATCH, main="chunks"))
        return {"chunks": out.chunks, MISMATCH: out[MISMATCH]}


__all__ = ["MISMATCH", "ROW_BITS", "Plan", "ReadBack", "ReadBackFn", "ScanCandidates", "ScanCandidatesFn",
           "ScoreCandidatesFn", "candidate_lists",
           "SketchGeometry", "SourceChangedError", "plan_rerank", "query_margins", "read_chunk", "sketched_norms",
           "source_table", "work_items"]
