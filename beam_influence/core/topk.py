r"""The one top-k accumulator: proponents and opponents of Q queries over batches, shards and bundles.

``TopK`` keeps, per query, the k largest scores (proponents) and the k smallest (opponents) of every
row it has seen, under the rule ``beam_influence.core.scoring.top_k`` defines: by score, ties by id
ascending (string order). It is exact: whatever the batching and however states are merged, the
result equals ``scoring.influence_scores`` on all rows followed by ``scoring.top_k`` per query, ids
and scores bit for bit. State is O(Q·k) (numpy arrays), so it serves as a Beam CombineFn accumulator.

The hot path, ``add_projections``, scores a batch with ONE float32 matrix product (BLAS), bounds the
float32 error of every entry rigorously, and rescores in float64 (the arithmetic of
``influence_scores``) only the (row, query) pairs whose error interval can reach the current top k.

Error bound (``_bound_factors``). Let :math:`a_b = \mathrm{fl}(P(z^{train}_b) \odot \lambda^{-1})`
(float64, the left factor of ``influence_scores``), :math:`t_q = P(z^{test}_q)`, and
:math:`r_b, r_q` the reciprocal normalisation factors (1 for ``"none"``; :math:`1/n_b` for
``"train_norm"``; :math:`1/n_b, 1/m_q` for ``"cosine"``; 0 where a norm is 0), :math:`a'_b = a_b r_b`,
:math:`t'_q = t_q r_q`. The candidate is :math:`s^{32}_{bq} = \mathrm{fl}_{32}(\mathrm{fl}_{32}(a'_b)
\cdot \mathrm{fl}_{32}(t'_q))` with any BLAS summation order (FMA or not). With :math:`u = 2^{-24}` and
:math:`S = \sum_i |a'_{bi} t'_{qi}| \le \lVert a'_b\rVert_2 \lVert t'_q\rVert_2`, the two casts cost
:math:`(2u + u^2) S`, the n-term float32 dot product :math:`\gamma_n (1+u)^2 S` with
:math:`\gamma_n = nu/(1-nu) \le 1.07\,nu` for :math:`n \le 2^{20}` (Higham, Accuracy and Stability,
§3.1), the float64 reference itself (its dot product, the normalisation, the float64 scaling of
:math:`a', t'`) at most :math:`(n + 8)\,2^{-53} S`, and float32 underflow at most :math:`2^{-150}` absolute
per cast and per product. Hence :math:`|s^{32}_{bq} - s^{64}_{bq}| \le 1.1\,(n + 3)\,u\,\lVert a'_b\rVert
\lVert t'_q\rVert + 2^{-148}(n + \lVert a'_b\rVert_1 + \lVert t'_q\rVert_1)`, which

.. math::  D_{bq} = 4\,(n + 4)\,2^{-24}\,(\lVert a'_b\rVert_2 + \tau)(\lVert t'_q\rVert_2 + \tau), \quad \tau = 2^{-60}

covers with a factor > 3 to spare (the :math:`\tau` cross terms dominate the underflow terms, as
:math:`\lVert v\rVert_1 \le \sqrt{n}\lVert v\rVert_2`; the spare factor also absorbs the float64 roundings of
D itself, of :math:`s^{32} \pm D` and of the thresholds). Batches
outside the range this derivation assumes (non-finite values, :math:`|a'|, |t'| > 2^{50}`, norms
outside :math:`[2^{-500}, 2^{500}]`, :math:`n > 2^{20}`) are scored exactly instead.

Filter. In key space (key = −score for proponents, +score for opponents; smaller key = better),
every pair has :math:`lo = key^{32} - D \le key^{64} \le hi = key^{32} + D`. Let T be the k-th
smallest value of the multiset {exact keys held in the state} ∪ {hi of this batch's pairs} (or of any
sub-multiset: the state alone, a sample of rows, the entries seen so far): it is >= the final k-th
key, so a pair with :math:`lo > T` has k entries strictly better than it and can be dropped. Only the
survivors are rescored exactly and folded in by the exact rule, so the filter changes speed, never
the result.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from beam_influence.core import scoring

DIRECTIONS = ("proponents", "opponents")
_SIGN = {"proponents": -1.0, "opponents": 1.0}  # key = sign * score: smaller key ranks first

_U32 = 2.0 ** -24  # float32 unit roundoff
_BOUND_C = 4.0  # safety factor on the (n + 3) u bound (derived >= 1 is enough)
_TAU = 2.0 ** -60  # absorbs float32 underflow (absolute error terms)
_MAX_OPERAND = 2.0 ** 50  # fast path: |entries| of the scaled float32 operands
_MAX_RAW = 2.0 ** 500  # fast path: |entries| of the float64 operands (no float64 overflow)
_NORM_RANGE = (2.0 ** -500, 2.0 ** 500)  # fast path: positive normalisation factors
_MAX_EIG = 1 << 20
_CHUNK_ELEMENTS = 1 << 20  # rows per float32 product chunk: ~4 MiB of scores (cache-sized)

Ranked = list[list[tuple[str, float]]]


class TopK:
    """The one top-k accumulator (one ordering rule) for Q queries.

    Per query the k largest scores (proponents) and the k smallest (opponents), ranked by score,
    ties by id ascending (string order, as ``scoring.top_k``); NaN never enters (``add`` raises
    ``ValueError`` on NaN scores). State: per direction ``scores [Q, m]`` float64 and ``ids [Q, m]``
    (numpy str), rows in rank order, ``m = min(k, seen)``; pickles in O(Q·k) bytes (ids as a table of
    distinct strings plus int32 codes), independent of the rows seen.

    Attributes:
      query_ids: the Q query ids (column q of every score matrix is ``query_ids[q]``).
      k: how many to keep per query and direction.
      directions: the tracked directions, a subset of ``("proponents", "opponents")``.
      seen: rows seen (summed by ``merge``).
      rescored: (row, query) pairs scored exactly in float64 by ``add_projections`` (``add`` takes exact
        scores and counts nothing); summed by ``merge``.
    """

    _chunk_rows: int | None = None  # rows per float32 product chunk (None: ~4 MiB of scores); tests set it

    def __init__(self, query_ids: Sequence[str], k: int, *, directions: tuple[str, ...] = DIRECTIONS):
        if isinstance(query_ids, str):
            raise TypeError("query_ids must be a sequence of ids, not one string")
        if int(k) != k or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k}")
        directions = tuple(directions)
        if not directions or len(set(directions)) != len(directions) or not set(directions) <= set(DIRECTIONS):
            raise ValueError(f"directions must be distinct names out of {DIRECTIONS}, got {directions}")
        self.query_ids = [str(q) for q in query_ids]
        self.k = int(k)
        self.directions = tuple(d for d in DIRECTIONS if d in directions)  # canonical order
        self.seen = 0
        self.rescored = 0
        q = len(self.query_ids)
        self._scores = {d: np.zeros((q, 0), np.float64) for d in directions}
        self._ids = {d: np.zeros((q, 0), dtype="<U1") for d in directions}

    @property
    def num_queries(self) -> int:
        return len(self.query_ids)

    # ---- folding exact scores ------------------------------------------------------------------
    def add(self, scores: np.ndarray, ids: Sequence[str]) -> "TopK":
        """Fold a batch of exact scores ``[B, Q]`` (float64) of rows ``ids [B]`` (compared as strings,
        converted as ``scoring.top_k`` does); returns self."""
        scores = np.asarray(scores, dtype=np.float64)
        q = self.num_queries
        if scores.ndim != 2 or scores.shape[1] != q:
            raise ValueError(f"scores {scores.shape} must be [B, Q={q}]")
        id_arr = _id_array(ids, scores.shape[0])
        if np.isnan(scores).any():
            raise ValueError("scores contain NaN")
        b, k = scores.shape[0], self.k
        if b and k and q:
            for d in self.directions:
                t = self._kth_key(d)  # key = sign·score ≤ t, compared on the scores (no [B, Q] key array)
                mask = scores >= -t if _SIGN[d] < 0 else scores <= t
                if b > k and np.count_nonzero(mask) > 4 * k * q:  # the held k-th lets many through: tighten it
                    t = np.minimum(t, np.partition(_SIGN[d] * scores, k - 1, axis=0)[k - 1])  # the batch's k-th
                    mask = scores >= -t if _SIGN[d] < 0 else scores <= t
                rows, cols = np.nonzero(mask)
                self._fold(d, cols, scores[rows, cols], id_arr[rows], b)
        self.seen += b
        return self

    def merge(self, other: "TopK") -> "TopK":
        """Fold another state (same queries, k and directions) into this one; returns self.

        Associative and commutative: the result is the exact top-k of the union of the rows seen.
        """
        if not isinstance(other, TopK):
            raise TypeError(f"can only merge a TopK, got {type(other).__name__}")
        if other.k != self.k:
            raise ValueError(f"cannot merge TopK states with different k ({self.k} vs {other.k})")
        if other.query_ids != self.query_ids:
            raise ValueError(f"cannot merge TopK states over different queries "
                             f"({self.num_queries} vs {other.num_queries} query ids, or another order)")
        if other.directions != self.directions:
            raise ValueError(f"cannot merge TopK states with different directions "
                             f"({self.directions} vs {other.directions})")
        if other is self:
            other = _copy(other)
        q = self.num_queries
        for d in self.directions:
            s, i = other._scores[d], other._ids[d]
            if s.shape[1]:
                self._fold(d, np.repeat(np.arange(q), s.shape[1]), s.ravel(), i.ravel(), s.shape[1])
        self.seen += other.seen
        self.rescored += other.rescored
        return self

    # ---- the hot path: float32 BLAS candidates, exact float64 rescoring ---------------------
    def add_projections(self, test_proj: np.ndarray, train_proj: np.ndarray, ids: Sequence[str],
                        eigvals: np.ndarray, *, normalization: str = "none") -> "TopK":
        """Fold the influence of train rows ``train_proj [B, k_eig]`` (ids ``[B]``) on the Q queries
        ``test_proj [Q, k_eig]`` (row q = ``query_ids[q]``); returns self.

        Same result as ``add(scoring.influence_scores(test_proj, train_proj, eigvals,
        normalization=normalization), ids)``, bit for bit, at the cost of one float32 matrix product
        plus an exact float64 rescoring of the few pairs that can enter the top k (``rescored``).
        """
        if normalization not in scoring.NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; choose one of {scoring.NORMALIZATIONS}")
        test, train, lam = scoring._check(test_proj=test_proj, train_proj=train_proj, eigvals=eigvals)
        q, (b, n) = self.num_queries, train.shape
        if test.shape[0] != q:
            raise ValueError(f"test projections {test.shape} must be [Q={q}, k]")
        id_arr = _id_array(ids, b)
        if b == 0 or q == 0 or self.k == 0:
            self.seen += b
            return self
        aw = scoring._weighted(train, lam)
        n_train, n_test = scoring._norms(train, test, lam, normalization)
        factors = _bound_factors(aw, test, n_train, n_test)
        if factors is None:  # outside the range the bound is derived for: score everything exactly
            self.add(scoring.influence_scores(test, train, lam, normalization=normalization), id_arr)
            self.rescored += b * q
            return self
        a32, t32, ra, rt = factors
        cn = _BOUND_C * (n + 4) * _U32

        cands = {d: _Candidates(self._state_keys(d), self.k) for d in self.directions}
        step = int(min(max(256, _CHUNK_ELEMENTS // q), 16384)) if self._chunk_rows is None else self._chunk_rows
        for s in range(0, b, step):
            chunk = a32[s:s + step] @ t32  # [rows, Q] float32: the one BLAS product
            ra_c = ra[s:s + step]
            dmax = cn * ra_c.max() * rt  # [Q] bound on D over the chunk's rows
            for d in self.directions:
                c, sign = cands[d], _SIGN[d]
                if s == 0 and self.seen < 4 * step and chunk.shape[0] > self.k:
                    # few rows seen, so the state's k-th key is weak: also bound it by the k-th hi over
                    # the first chunk (valid: k distinct entries of this batch have keys <= that hi)
                    hi = sign * chunk.astype(np.float64) + cn * ra_c[:, None] * rt[None, :]
                    c.t = np.minimum(c.t, np.partition(hi, self.k - 1, axis=0)[self.k - 1])
                # coarse pass in float32 (a superset of lo <= t, since D <= dmax): key32 - dmax <= t
                with np.errstate(over="ignore", invalid="ignore"):
                    if sign < 0:
                        mask = chunk >= _f32_down(-c.t - dmax)
                    else:
                        mask = chunk <= _f32_up(c.t + dmax)
                flat = np.flatnonzero(mask)
                rows, cols = np.divmod(flat, q)
                key = sign * chunk.reshape(-1)[flat].astype(np.float64)
                dev = cn * ra_c[rows] * rt[cols]
                lo, hi = key - dev, key + dev
                keep = ~(lo > c.t[cols])
                c.add(rows[keep] + s, cols[keep], lo[keep], hi[keep])

        # exact float64 rescoring of the union of the candidates, same arithmetic as influence_scores
        codes = {d: c.codes(q) for d, c in cands.items()}
        pairs = np.sort(np.concatenate(list(codes.values())))
        pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])] if pairs.size else pairs
        exact = scoring._pair_scores(aw, test, n_train, n_test, pairs // q, pairs % q, normalization)
        if np.isnan(exact).any():
            raise ValueError("scores contain NaN")
        for d in self.directions:
            self._fold(d, codes[d] % q, exact[np.searchsorted(pairs, codes[d])], id_arr[codes[d] // q], b)
        self.rescored += int(pairs.size)
        self.seen += b
        return self

    # ---- reading -------------------------------------------------------------------------------
    def result(self) -> tuple[Ranked | None, Ranked | None]:
        """``(proponents, opponents)``: per query, ``(id, score)`` in rank order (proponents largest
        first, opponents smallest first, ties by id ascending); ``None`` for an untracked direction."""
        out = []
        for d in DIRECTIONS:
            if d not in self.directions:
                out.append(None)
                continue
            s, i = self._scores[d], self._ids[d]
            out.append([list(zip(map(str, i[r]), map(float, s[r]))) for r in range(self.num_queries)])
        return out[0], out[1]

    def threshold(self, direction: str = "proponents") -> np.ndarray:
        """``[Q]`` the k-th best score held per query: a row must score >= it (proponents) or <= it
        (opponents) to enter; −inf (proponents) / +inf (opponents) while fewer than k rows were seen."""
        if direction not in self.directions:
            raise ValueError(f"direction {direction!r} is not tracked (tracked: {self.directions})")
        return _SIGN[direction] * self._kth_key(direction)

    def __repr__(self) -> str:
        return (f"TopK(queries={self.num_queries}, k={self.k}, directions={self.directions}, "
                f"seen={self.seen}, rescored={self.rescored})")

    # ---- pickling: O(Q·k) ----------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = {"query_ids": self.query_ids, "k": self.k, "directions": self.directions,
                 "seen": self.seen, "rescored": self.rescored}
        for d in self.directions:
            import pyarrow as pa  # a C++ hash table: much faster than np.unique's sort on Q·k strings

            flat = self._ids[d].ravel()
            enc = pa.array(flat, pa.string()).dictionary_encode() if flat.size else None
            names = enc.dictionary.to_pylist() if enc is not None else []
            codes = (enc.indices.to_numpy(zero_copy_only=False).astype(np.int32) if enc is not None
                     else np.zeros(0, np.int32))
            state[d] = (self._scores[d], names, codes.reshape(self._ids[d].shape))
        return state

    def __setstate__(self, state: dict) -> None:
        self.query_ids, self.k, self.directions = state["query_ids"], state["k"], tuple(state["directions"])
        self.seen, self.rescored = state["seen"], state["rescored"]
        self._scores, self._ids = {}, {}
        for d in self.directions:
            scores, names, codes = state[d]
            self._scores[d] = np.asarray(scores, np.float64)
            table = np.asarray(names, dtype=str) if names else np.zeros(0, dtype="<U1")
            self._ids[d] = table[codes] if codes.size else np.zeros(codes.shape, dtype="<U1")

    # ---- internals -----------------------------------------------------------------------------
    def _state_keys(self, d: str) -> np.ndarray:
        return _SIGN[d] * self._scores[d]

    def _kth_key(self, d: str) -> np.ndarray:
        """``[Q]`` key of the k-th entry held (+inf while fewer than k): entries with a larger key lose."""
        s = self._scores[d]
        if self.k == 0 or s.shape[1] < self.k:
            return np.full(self.num_queries, np.inf)
        return _SIGN[d] * s[:, self.k - 1]

    def _fold(self, d: str, cols: np.ndarray, scores: np.ndarray, ids: np.ndarray, n_rows: int) -> None:
        """Merge candidate entries (query ``cols``, exact ``scores``, ``ids``) out of ``n_rows`` new rows
        into direction d by the rule of ``scoring.top_k``: by key (``sign * score``), then id ascending.

        The candidates must include every entry of the new rows that can be in the top k (the filters
        guarantee it), so each query has at least ``min(k, m + n_rows)`` entries.
        """
        q, k = self.num_queries, self.k
        held_s, held_i = self._scores[d], self._ids[d]
        m = held_s.shape[1]
        m_new = min(k, m + n_rows)
        if q == 0 or m_new == 0:
            return
        q_all = np.concatenate([np.repeat(np.arange(q), m), np.asarray(cols, np.int64)])
        s_all = np.concatenate([held_s.ravel(), np.asarray(scores, np.float64)])
        i_all = np.concatenate([held_i.ravel(), np.asarray(ids).astype(str)])
        key = _SIGN[d] * s_all
        counts = np.bincount(q_all, minlength=q)
        if np.any(counts < m_new):
            raise RuntimeError("TopK internal error: a query has fewer candidates than its top-k needs")
        take = None
        if q * int(counts.max()) <= 4 * key.size + 4096:
            take = _select_padded(q_all, key, counts, m_new)
        if take is None:  # ties (or a skewed grouping): the general exact path
            take = _select_sorted(q_all, key, i_all, m_new, q)
        self._scores[d] = s_all[take].reshape(q, m_new)
        self._ids[d] = i_all[take].reshape(q, m_new)


def top_k_per_query(scores: np.ndarray, ids: Sequence[str], k: int) -> tuple[Ranked, Ranked]:
    """Proponents and opponents of every query from a ``[B, Q]`` score matrix.

    Returns ``(proponents, opponents)``, each a list over the Q queries of lists of
    ``(id, score)`` in rank order: proponents largest score first, opponents smallest first;
    ties by id ascending (see ``scoring.top_k``). Built on ``TopK`` (the same accumulator the Beam
    jobs use); a matrix with NaN scores (which ``TopK`` refuses) is ranked column by column with
    ``scoring.top_k`` itself, NaN last.

    Args:
      scores: ``[B, Q]`` influence of training example b on query q (``scoring.influence_scores``).
      ids: ``[B]`` training example ids.
      k: how many of each to keep per query (>= 0).
    """
    scores = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(ids).astype(str)
    if scores.ndim != 2 or ids.shape != scores.shape[:1]:
        raise ValueError(f"scores {scores.shape} must be [B, Q] and ids {ids.shape} must be [B]")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if np.isnan(scores).any():
        pro, opp = [], []
        for q in range(scores.shape[1]):
            col = scores[:, q]
            pro.append([(str(ids[i]), float(col[i])) for i in scoring.top_k(col, ids, k, largest=True)])
            opp.append([(str(ids[i]), float(col[i])) for i in scoring.top_k(col, ids, k, largest=False)])
        return pro, opp
    return TopK([str(q) for q in range(scores.shape[1])], k).add(scores, ids).result()


def _group(q_idx: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, position within its group) of entries grouped by query, stable."""
    small = q_idx.astype(np.int16 if counts.size < (1 << 15) else np.int64)
    order = np.argsort(small, kind="stable")
    starts = np.cumsum(counts) - counts
    pos = np.arange(q_idx.size) - np.repeat(starts, counts)
    return order, pos


def _select_padded(q_all, key, counts, m_new):
    """Flat indices of each query's m_new smallest keys in rank order, or None if a tie needs the ids."""
    q = counts.size
    order, pos = _group(q_all, counts)
    width = int(counts.max())
    pk = np.full((q, width), np.inf)
    pi = np.full((q, width), -1, np.int64)
    lin = q_all[order] * width + pos
    pk.reshape(-1)[lin] = key[order]
    pi.reshape(-1)[lin] = order
    if width > m_new:
        part = np.argpartition(pk, m_new - 1, axis=1)
        kth = np.take_along_axis(pk, part[:, m_new - 1:m_new], axis=1)
        if np.any(np.sum((pk <= kth) & (pi >= 0), axis=1) != m_new):
            return None  # a tie at the m_new-th key: decided by id
        sel = part[:, :m_new]
        pk, pi = np.take_along_axis(pk, sel, axis=1), np.take_along_axis(pi, sel, axis=1)
        if np.any(pi < 0):
            return None  # +inf keys tied with the padding
    o = np.argsort(pk, axis=1, kind="stable")
    pk, pi = np.take_along_axis(pk, o, axis=1), np.take_along_axis(pi, o, axis=1)
    if np.any(pk[:, 1:] == pk[:, :-1]):
        return None  # equal keys within the top: ranked by id
    return pi.ravel()


def _select_sorted(q_all, key, i_all, m_new, q):
    """Flat indices of each query's m_new best entries by (key, id), in rank order (exact rule)."""
    order = np.lexsort((key, q_all))
    qs, ks = q_all[order], key[order]
    counts = np.bincount(qs, minlength=q)
    starts = np.cumsum(counts) - counts
    kth = ks[starts + m_new - 1]
    sel = ks <= kth[qs]  # the first m_new per query and every tie of the m_new-th key
    order, qs, ks = order[sel], qs[sel], ks[sel]
    order = order[np.lexsort((i_all[order], ks, qs))]
    counts = np.bincount(qs, minlength=q)
    starts = np.cumsum(counts) - counts
    return order[(starts[:, None] + np.arange(m_new)[None, :]).ravel()]


class _Candidates:
    """One direction's candidate pairs within an ``add_projections`` call, with the running bound t.

    ``bound [Q, k]`` holds the k smallest values (+inf padded) of a sub-multiset of {exact keys held in
    the state} ∪ {hi of this batch's entries} (each entry at most once), so its k-th ``t`` is >= the
    final k-th key; every candidate kept has ``lo <= t``.
    """

    def __init__(self, state_keys: np.ndarray, k: int):
        q, m = state_keys.shape
        self.k = k
        self.bound = np.full((q, k), np.inf)
        self.bound[:, :m] = state_keys
        self.t = np.max(self.bound, axis=1) if k else np.full(q, np.inf)
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.size = 0
        self.pruned = 0
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []  # (cols, hi) not yet in the bound
        self.n_pending = 0
        self.tightened = False

    def add(self, rows, cols, lo, hi) -> None:
        if not rows.size:
            return
        self.parts.append((rows, cols, lo))
        self.size += rows.size
        below = hi < self.t[cols]  # only these can lower the bound
        if below.any():
            self.pending.append((cols[below], hi[below]))
            self.n_pending += int(below.sum())
        # a tightening costs O(Q·k): do it at once the first time, then once enough is pending
        if self.n_pending and (not self.tightened or self.n_pending >= self.bound.size):
            self._flush()
        if self.size > 4 * max(self.pruned, self.bound.size):
            self._prune()

    def _flush(self) -> None:
        if self.n_pending:
            self._tighten(np.concatenate([c for c, _ in self.pending]), np.concatenate([h for _, h in self.pending]))
        self.pending, self.n_pending, self.tightened = [], 0, True

    def _tighten(self, cols, hi) -> None:
        k, q = self.k, self.bound.shape[0]
        keep = hi < self.t[cols]
        cols, hi = cols[keep], hi[keep]
        if not cols.size:
            return
        counts = np.bincount(cols, minlength=q)
        if counts.max() > 4 * k:  # keep each query's k smallest new values only
            order = np.lexsort((hi, cols))
            starts = np.cumsum(counts) - counts
            first = (np.arange(cols.size) - np.repeat(starts, counts)) < k
            cols, hi = cols[order[first]], hi[order[first]]
            counts = np.bincount(cols, minlength=q)
        touched = np.flatnonzero(counts)
        order, pos = _group(cols, counts)
        local = np.full(q, -1, np.int64)
        local[touched] = np.arange(touched.size)
        width = k + int(counts.max())
        pad = np.full((touched.size, width), np.inf)
        pad[:, :k] = self.bound[touched]
        pad.reshape(-1)[local[cols[order]] * width + (k + pos)] = hi[order]
        best = np.partition(pad, k - 1, axis=1)[:, :k]
        self.bound[touched] = best
        self.t[touched] = np.minimum(self.t[touched], best.max(axis=1))

    def _prune(self) -> None:
        rows, cols, lo = self._concat()
        keep = ~(lo > self.t[cols])
        self.parts = [(rows[keep], cols[keep], lo[keep])]
        self.size = self.pruned = int(keep.sum())

    def _concat(self):
        if not self.parts:
            e = np.zeros(0, np.int64)
            return e, e, np.zeros(0)
        if len(self.parts) > 1:
            self.parts = [tuple(np.concatenate(x) for x in zip(*self.parts))]
        return self.parts[0]

    def codes(self, q: int) -> np.ndarray:
        """The final candidates (``lo <= t``) as ``row * Q + query`` codes."""
        self._flush()
        self._prune()
        rows, cols, _ = self._concat()
        return rows.astype(np.int64) * q + cols


def _bound_factors(aw, test, n_train, n_test):
    """``(a32 [B, n], t32 [n, Q], ra [B], rt [Q])`` for the float32 product and D = c·ra_b·rt_q, or
    None when the batch is outside the range the bound is derived for (then it is scored exactly)."""
    n = aw.shape[1]
    if n == 0 or n > _MAX_EIG:
        return None
    if not (np.all(np.abs(aw) <= _MAX_RAW) and np.all(np.abs(test) <= _MAX_RAW)):  # also False on NaN
        return None
    r_train = _reciprocal(n_train, aw.shape[0])
    r_test = _reciprocal(n_test, test.shape[0])
    if r_train is None or r_test is None:
        return None
    a1, t1 = aw * r_train[:, None], test * r_test[:, None]
    if not (np.all(np.abs(a1) <= _MAX_OPERAND) and np.all(np.abs(t1) <= _MAX_OPERAND)):
        return None
    ra = np.sqrt(np.einsum("ij,ij->i", a1, a1)) + _TAU
    rt = np.sqrt(np.einsum("ij,ij->i", t1, t1)) + _TAU
    return a1.astype(np.float32), np.ascontiguousarray(t1.T.astype(np.float32)), ra, rt


def _reciprocal(norms, size):
    """1 / norm (0 where the norm is 0, as ``scoring._safe_divide``); None if a norm is out of range."""
    if norms is None:
        return np.ones(size)
    pos = norms > 0
    if not np.all((norms[pos] >= _NORM_RANGE[0]) & (norms[pos] <= _NORM_RANGE[1])):
        return None
    out = np.zeros(size)
    out[pos] = 1.0 / norms[pos]
    return out


def _f32_down(x: np.ndarray) -> np.ndarray:
    """Largest float32 <= x (elementwise; NaN -> -inf, i.e. keep everything)."""
    y = np.where(np.isnan(x), -np.inf, x)
    f = y.astype(np.float32)
    up = f.astype(np.float64) > y
    f[up] = np.nextafter(f[up], np.float32(-np.inf))
    return f


def _f32_up(x: np.ndarray) -> np.ndarray:
    """Smallest float32 >= x (elementwise; NaN -> +inf)."""
    return -_f32_down(-x)


def _id_array(ids, size: int) -> np.ndarray:
    arr = ids if isinstance(ids, np.ndarray) else np.asarray(list(ids))
    if arr.shape != (size,):
        raise ValueError(f"ids {arr.shape} must be [B={size}]")
    return arr


def _copy(state: TopK) -> TopK:
    out = TopK.__new__(TopK)
    out.__setstate__(state.__getstate__())
    return out
