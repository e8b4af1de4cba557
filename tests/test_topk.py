"""TopK, the one top-k accumulator, equals brute force (influence_scores on all rows + scoring.top_k per
query), ids and scores bit for bit, for any batching, merging and pickling; its float32 filter is tight."""
import math
import pickle

import numpy as np
import pytest

from beam_influence.core import scoring
from beam_influence.core.topk import TopK, top_k_per_query


def _exact(ranked):
    """Lists of (id, score) with each score as its exact bits (float.hex tells -0.0 from 0.0)."""
    return [[(i, float(s).hex()) for i, s in col] for col in ranked]


def _brute_from_scores(scores, ids, k):
    """The definition: scoring.top_k on each query's column (ties by id ascending)."""
    ids = np.asarray(ids).astype(str)
    pro, opp = [], []
    for q in range(scores.shape[1]):
        col = scores[:, q]
        pro.append([(str(ids[i]), float(col[i])) for i in scoring.top_k(col, ids, k, largest=True)])
        opp.append([(str(ids[i]), float(col[i])) for i in scoring.top_k(col, ids, k, largest=False)])
    return _exact(pro), _exact(opp)


def _brute(test, train, ids, eigvals, k, normalization="none"):
    return _brute_from_scores(scoring.influence_scores(test, train, eigvals, normalization=normalization), ids, k)


def _result(state):
    pro, opp = state.result()
    return _exact(pro), _exact(opp)


def _cuts(rng, n, max_step):
    pos = 0
    while pos < n:
        step = int(rng.integers(1, max_step + 1))
        yield pos, min(n, pos + step)
        pos += step


def _ids(rng, n):
    return np.array([f"tr-{int(i)}" for i in rng.permutation(10 * n + 10)[:n]])  # not in row order


def _problem(rng, *, b, q, n, negative=False, ties=False):
    test = rng.normal(size=(q, n))
    if ties:  # a few distinct rows, repeated: exact ties in float64 (and in float32)
        base = rng.normal(size=(max(1, b // 8), n)).astype(np.float32)
        train = base[rng.integers(0, base.shape[0], b)]
        train[rng.random(b) < 0.1] = 0.0  # zero rows: score 0 (and normalised scores 0)
    else:
        train = rng.normal(size=(b, n)).astype(np.float32)
    eig = rng.uniform(0.05, 3.0, n)
    if negative:
        eig *= rng.choice([-1.0, 1.0], n)
    return test, train, eig


# ---- add: exact scores ----------------------------------------------------------------------------
def test_add_equals_top_k_with_ties_duplicates_and_small_batches():
    rng = np.random.default_rng(0)
    for trial in range(60):
        b, q, k = int(rng.integers(1, 80)), int(rng.integers(1, 5)), int(rng.integers(1, 12))
        scores = rng.integers(-3, 4, (b, q)).astype(np.float64)  # many ties, within and across batches
        if trial % 4 == 0:
            scores[rng.random((b, q)) < 0.2] = 0.0
            scores[rng.random((b, q)) < 0.2] = -0.0  # ties with 0.0; the score keeps its sign bit
            scores[rng.random((b, q)) < 0.05] = np.inf
            scores[rng.random((b, q)) < 0.05] = -np.inf
        ids = _ids(rng, b)
        state = TopK([f"q{j}" for j in range(q)], k)
        for lo, hi in _cuts(rng, b, 9):
            state.add(scores[lo:hi], list(ids[lo:hi]))
        assert _result(state) == _brute_from_scores(scores, ids, k), trial
        assert state.seen == b and state.rescored == 0
        assert _exact(top_k_per_query(scores, ids, k)[0]) == _brute_from_scores(scores, ids, k)[0]


def test_k_larger_than_rows_seen_and_k_zero():
    rng = np.random.default_rng(1)
    test, train, eig = _problem(rng, b=5, q=3, n=4)
    ids = _ids(rng, 5)
    state = TopK(["a", "b", "c"], 50).add_projections(test, train[:2], ids[:2], eig)
    state.add_projections(test, train[2:], ids[2:], eig)
    assert _result(state) == _brute(test, train, ids, eig, 50)
    assert all(len(col) == 5 for col in state.result()[0])
    assert np.all(state.threshold("proponents") == -np.inf) and np.all(state.threshold("opponents") == np.inf)
    empty = TopK(["a", "b", "c"], 0).add_projections(test, train, ids, eig)
    assert empty.result() == ([[], [], []], [[], [], []])


def test_single_direction():
    rng = np.random.default_rng(2)
    test, train, eig = _problem(rng, b=300, q=2, n=6)
    ids = _ids(rng, 300)
    state = TopK(["x", "y"], 7, directions=("proponents",)).add_projections(test, train, ids, eig)
    pro, opp = state.result()
    assert opp is None and _exact(pro) == _brute(test, train, ids, eig, 7)[0]
    assert np.array_equal(state.threshold("proponents"), [p[-1][1] for p in pro])
    with pytest.raises(ValueError, match="not tracked"):
        state.threshold("opponents")


# ---- add_projections: float32 candidates + exact rescoring --------------------------------------
@pytest.mark.parametrize("normalization", scoring.NORMALIZATIONS)
def test_add_projections_equals_brute_force(normalization):
    rng = np.random.default_rng(3)
    for trial in range(24):
        b, q, n = int(rng.integers(1, 700)), int(rng.choice([1, 2, 7])), int(rng.integers(1, 40))
        k = int(rng.choice([1, 3, 10, 40]))
        test, train, eig = _problem(rng, b=b, q=q, n=n, negative=trial % 2 == 1, ties=trial % 3 == 0)
        if trial % 5 == 0:
            test[0] = 0.0  # a zero query (cosine: norm 0, all scores 0)
        ids = _ids(rng, b)
        state = TopK([f"q{j}" for j in range(q)], k)
        state._chunk_rows = int(rng.choice([16, 64, 1000]))  # several chunks per call: the running bound
        for lo, hi in _cuts(rng, b, 300):
            state.add_projections(test, train[lo:hi], ids[lo:hi], eig, normalization=normalization)
        assert _result(state) == _brute(test, train, ids, eig, k, normalization), (trial, normalization)
        assert state.seen == b


def test_rescoring_is_rare_on_random_data():
    """The filter works: B=4096, Q=100, k=10, 32 eigen-directions rescores far fewer than B·Q pairs."""
    rng = np.random.default_rng(4)
    test, train, eig = _problem(rng, b=4096, q=100, n=32)
    ids = _ids(rng, 4096)
    for normalization in scoring.NORMALIZATIONS:
        state = TopK([str(j) for j in range(100)], 10).add_projections(test, train, ids, eig,
                                                                        normalization=normalization)
        assert state.rescored < 0.05 * 4096 * 100, (normalization, state.rescored)
        assert state.rescored >= 2 * 100 * 10  # every member of the result was rescored exactly
        assert _result(state) == _brute(test, train, ids, eig, 10, normalization)


def test_adversarial_near_ties_equal_brute_force():
    """Train rows a few float32 ulps apart (scores within ~1e-7 relative): the float32 products cannot rank
    them, so the bound lets them all through and the exact rescoring decides."""
    rng = np.random.default_rng(5)
    n, q, b = 24, 3, 600
    base = rng.normal(size=n).astype(np.float32)
    ulps = rng.integers(-3, 4, (b, n)).astype(np.float32)
    train = (base + ulps * np.spacing(np.abs(base))).astype(np.float32)
    train[::7] = base  # and exact ties (distinct ids, identical rows)
    test = np.stack([base.astype(np.float64), -base.astype(np.float64), rng.normal(size=n)])
    eig = rng.uniform(0.5, 2.0, n)
    scores = scoring.influence_scores(test, train, eig)
    assert np.ptp(scores[:, 0]) / np.abs(scores[:, 0]).max() < 1e-5  # near-ties indeed
    ids = _ids(rng, b)
    for normalization in scoring.NORMALIZATIONS:
        state = TopK(["p", "m", "r"], 15)
        state._chunk_rows = 128
        for lo, hi in _cuts(rng, b, 250):
            state.add_projections(test, train[lo:hi], ids[lo:hi], eig, normalization=normalization)
        assert _result(state) == _brute(test, train, ids, eig, 15, normalization), normalization
        assert state.rescored > 2 * b  # the near-tied queries were (rightly) rescored wholesale


def test_scores_of_rescored_pairs_are_those_of_influence_scores():
    """_pair_scores (the rescoring) is bit-identical to influence_scores, for any subset of pairs."""
    rng = np.random.default_rng(6)
    test, train, eig = _problem(rng, b=257, q=9, n=33, negative=True)
    lam = np.asarray(eig)
    for normalization in scoring.NORMALIZATIONS:
        full = scoring.influence_scores(test, train, eig, normalization=normalization)
        rows, cols = rng.integers(0, 257, 500), rng.integers(0, 9, 500)
        t64, tr64 = test.astype(np.float64), train.astype(np.float64)
        n_tr, n_te = scoring._norms(tr64, t64, lam, normalization)
        got = scoring._pair_scores(scoring._weighted(tr64, lam), t64, n_tr, n_te, rows, cols, normalization)
        np.testing.assert_array_equal(got, full[rows, cols])
        for r in (0, 5, 256):  # and one row at a time
            np.testing.assert_array_equal(scoring.influence_scores(test, train[r:r + 1], eig,
                                                                   normalization=normalization), full[r:r + 1])


# ---- top_k_per_query (built on TopK) and the one merge ---------------------------------------------
def _sorted(scores, ids, k, largest):
    """Sort by (score descending or ascending, id ascending), NaN last."""
    def key(i):
        s = scores[i]
        return (1, 0.0, ids[i]) if math.isnan(s) else (0, -s if largest else s, ids[i])
    return sorted(range(len(scores)), key=key)[:k]


def test_top_k_per_query():
    scores = np.array([[1.0, -2.0], [3.0, 0.0], [1.0, -2.0], [0.0, 5.0]])
    ids = ["d", "c", "a", "b"]
    pro, opp = top_k_per_query(scores, ids, 2)
    assert pro == [[("c", 3.0), ("a", 1.0)], [("b", 5.0), ("c", 0.0)]]
    assert opp == [[("b", 0.0), ("a", 1.0)], [("a", -2.0), ("d", -2.0)]]
    with pytest.raises(ValueError, match=r"scores \(4, 2\).*ids \(3,\)"):
        top_k_per_query(scores, ids[:3], 2)


def test_top_k_per_query_is_top_k_per_column():
    """top_k_per_query (built on TopK) applies scoring.top_k's rule to every column, ties and NaN included."""
    rng = np.random.default_rng(4)
    for trial in range(30):
        b, q = int(rng.integers(1, 50)), int(rng.integers(1, 4))
        scores = rng.integers(-2, 3, (b, q)).astype(np.float64)
        if trial % 3 == 0:  # NaN ranks last (the 1-D rule; TopK itself refuses NaN)
            scores[rng.random((b, q)) < 0.2] = np.nan
        ids = [f"id-{int(i)}" for i in rng.permutation(1000)[:b]]
        for k in (0, 1, 4, b + 2):
            pro, opp = top_k_per_query(scores, ids, k)
            for j in range(q):
                col = scores[:, j]
                for got, largest in ((pro[j], True), (opp[j], False)):
                    want = [ids[i] for i in _sorted(col, ids, k, largest)]
                    assert [i for i, _ in got] == want, (trial, k, j, largest)
                    np.testing.assert_array_equal([s for _, s in got], [col[ids.index(i)] for i in want])
    with pytest.raises(ValueError, match="k must be"):
        top_k_per_query(np.zeros((2, 1)), ["a", "b"], -1)


@pytest.mark.parametrize("largest", [True, False])
def test_merge_of_shard_states_equals_global_top_k(largest):
    """TopK.merge (the one merge; the CombineFn's) of the shards' states, in any order, is the 1-D
    ``scoring.top_k`` of all rows: ties by id, k = 0 and empty shards included."""
    direction = "proponents" if largest else "opponents"
    rng = np.random.default_rng(2)
    for trial in range(20):
        n = int(rng.integers(1, 60))
        scores = rng.integers(-4, 5, n).astype(np.float64)
        ids = [f"train-{int(i):05d}" for i in rng.permutation(10_000)[:n]]
        k = int(rng.integers(0, 12))
        want = [(ids[j], float(scores[j])) for j in scoring.top_k(scores, ids, k, largest=largest)]
        assert [i for i, _ in want] == [ids[j] for j in _sorted(scores, ids, k, largest)]
        cuts = np.sort(rng.integers(0, n + 1, int(rng.integers(0, 5))))
        shards = [TopK(["q"], k, directions=(direction,)).add(scores[a:b, None], ids[a:b])
                  for a, b in zip([0, *cuts], [*cuts, n])]
        acc = TopK(["q"], k, directions=(direction,))
        for j in rng.permutation(len(shards)):
            acc = acc.merge(shards[j])
        got = acc.result()[0 if largest else 1][0]
        assert got == want, (trial, k)
        assert acc.seen == n


# ---- merge and pickling ---------------------------------------------------------------------------
def test_merge_of_any_partition_and_grouping_equals_one_state():
    rng = np.random.default_rng(7)
    for trial in range(12):
        b, q, n, k = int(rng.integers(20, 400)), int(rng.integers(1, 5)), 8, int(rng.integers(1, 15))
        test, train, eig = _problem(rng, b=b, q=q, n=n, ties=trial % 2 == 0)
        ids = _ids(rng, b)
        qids = [f"q{j}" for j in range(q)]
        whole = TopK(qids, k).add_projections(test, train, ids, eig)
        groups = rng.integers(0, int(rng.integers(1, 7)), b)  # a random partition of the rows
        states = []
        for g in np.unique(groups):
            part = np.flatnonzero(groups == g)
            st = TopK(qids, k)
            for lo, hi in _cuts(rng, part.size, 40):
                rows = part[lo:hi]
                if rng.random() < 0.5:
                    st.add_projections(test, train[rows], ids[rows], eig)
                else:
                    st.add(scoring.influence_scores(test, train[rows], eig), ids[rows])
            states.append(pickle.loads(pickle.dumps(st)))  # accumulators cross processes
        states.append(TopK(qids, k))  # an empty accumulator is the identity
        while len(states) > 1:  # merge in random order and grouping
            i, j = rng.choice(len(states), 2, replace=False)
            merged = states[i].merge(states[j])
            states = [s for t, s in enumerate(states) if t not in (i, j)] + [merged]
        assert _result(states[0]) == _result(whole) == _brute(test, train, ids, eig, k), trial
        assert states[0].seen == b


def test_pickle_round_trip_and_size_is_independent_of_rows_seen():
    rng = np.random.default_rng(8)
    q, k, n = 20, 10, 16
    test = rng.normal(size=(q, n))
    eig = rng.uniform(0.5, 2.0, n)
    state, sizes = TopK([f"query-{j}" for j in range(q)], k), []
    for step in range(6):
        train = rng.normal(size=(2000, n)).astype(np.float32)
        state.add_projections(test, train, [f"train-{step:02d}-{i:05d}" for i in range(2000)], eig)
        blob = pickle.dumps(state)
        back = pickle.loads(blob)
        assert back.result() == state.result() and back.seen == state.seen and back.rescored == state.rescored
        assert back.query_ids == state.query_ids and back.k == k
        sizes.append(len(blob))
    assert max(sizes) < 1.05 * min(sizes)  # 2000 rows or 12000: the same O(Q·k) state
    assert max(sizes) < 2 * q * k * (8 + 4 + 20) + 2000  # scores, codes, distinct ids, header


# ---- refusals ---------------------------------------------------------------------------------------
def test_nan_and_mismatches_are_refused():
    state = TopK(["a", "b"], 3)
    with pytest.raises(ValueError, match="NaN"):
        state.add(np.array([[np.nan, 1.0]]), ["r"])
    with pytest.raises(ValueError, match="NaN"):
        state.add_projections(np.ones((2, 2)), np.array([[np.nan, 1.0]], np.float32), ["r"], np.ones(2))
    with pytest.raises(ValueError, match=r"Q=2"):
        state.add(np.zeros((1, 3)), ["r"])
    with pytest.raises(ValueError, match=r"ids \(2,\)"):
        state.add(np.zeros((1, 2)), ["r", "s"])
    with pytest.raises(ValueError, match=r"Q=2"):
        state.add_projections(np.ones((3, 2)), np.ones((1, 2), np.float32), ["r"], np.ones(2))
    with pytest.raises(ValueError, match="different k"):
        state.merge(TopK(["a", "b"], 4))
    with pytest.raises(ValueError, match="different queries"):
        state.merge(TopK(["a", "c"], 3))
    with pytest.raises(ValueError, match="different queries"):
        state.merge(TopK(["b", "a"], 3))
    with pytest.raises(ValueError, match="different directions"):
        state.merge(TopK(["a", "b"], 3, directions=("opponents",)))
    with pytest.raises(ValueError, match="directions"):
        TopK(["a"], 3, directions=("best",))
    with pytest.raises(ValueError, match="k must be"):
        TopK(["a"], -1)
    assert state.seen == 0 and state.result() == ([[], []], [[], []])  # refusals leave the state alone


def test_batches_outside_the_bound_range_are_scored_exactly():
    """Outside the range the bound is derived for (float32 overflow, norms near float64 underflow, no
    eigen-directions) the batch is scored exactly in float64; the result is the same."""
    rng = np.random.default_rng(9)
    test, train, eig = _problem(rng, b=50, q=2, n=5)
    ids = _ids(rng, 50)
    huge = train.copy()
    huge[3] = np.float32(3e38)  # (1/lambda)·train overflows float32
    tiny_eig = np.full(5, 1e308)  # cosine norms ~1e-154: below the 2^-500 the derivation assumes
    cases = [(test, huge, eig, "none"), (test, train, tiny_eig, "cosine"),
             (np.zeros((2, 0)), np.zeros((50, 0), np.float32), np.zeros(0), "none")]
    for te, tr, ev, normalization in cases:
        state = TopK(["a", "b"], 4).add_projections(te, tr, ids, ev, normalization=normalization)
        assert _result(state) == _brute(te, tr, ids, ev, 4, normalization), normalization
        assert state.rescored == 50 * 2


def test_merging_a_state_with_itself_counts_its_rows_twice():
    rng = np.random.default_rng(10)
    test, train, eig = _problem(rng, b=40, q=2, n=3)
    ids = _ids(rng, 40)
    state = TopK(["a", "b"], 6).add_projections(test, train, ids, eig)
    state.merge(state)
    both = np.concatenate([train, train])
    assert _result(state) == _brute(test, both, np.concatenate([ids, ids]), eig, 6) and state.seen == 80
