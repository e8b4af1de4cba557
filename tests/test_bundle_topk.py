"""The per-bundle top-k state equals a brute-force sort over everything it saw, ties included."""
import numpy as np
import pytest

from beam_influence.core import scoring
from beam_influence.beam.topk import BundleTopK, TopKCombineFn


@pytest.mark.parametrize("ties", [True, False])
def test_bundle_topk_equals_brute_force(ties):
    rng = np.random.default_rng(1 if ties else 2)
    for _ in range(100):
        n, q, k = rng.integers(1, 60), rng.integers(1, 5), rng.integers(1, 8)
        s = rng.integers(-3, 4, (n, q)).astype(float) if ties else rng.standard_normal((n, q))
        ids = [f"id{rng.integers(0, 10**6):07d}-{i}" for i in range(n)]
        state, pos = BundleTopK(q, k), 0
        while pos < n:
            step = rng.integers(1, 10)
            state.update(s[pos:pos + step], ids[pos:pos + step])
            pos += step
        pro, opp = state.result()
        for j in range(q):
            assert pro[j] == scoring.top_k_pairs(s[:, j], ids, k, largest=True)
            assert opp[j] == scoring.top_k_pairs(s[:, j], ids, k, largest=False)


def test_combiner_of_bundles_equals_global():
    rng = np.random.default_rng(3)
    s = rng.integers(0, 5, (300, 2)).astype(float)
    ids = [f"r{i:03d}" for i in rng.permutation(300)]
    fn = TopKCombineFn(6)
    accs = []
    for part in np.array_split(np.arange(300), 7):
        b = BundleTopK(2, 6)
        b.update(s[part], [ids[i] for i in part])
        pro, opp = b.result()
        accs.append(fn.add_input(fn.create_accumulator(), (pro[0], opp[0])))
    pro, opp = fn.extract_output(fn.merge_accumulators(accs))
    assert pro == scoring.top_k_pairs(s[:, 0], ids, 6, largest=True)
    assert opp == scoring.top_k_pairs(s[:, 0], ids, 6, largest=False)


def test_bad_scores_are_refused():
    b = BundleTopK(2, 3)
    with pytest.raises(ValueError, match="NaN"):
        b.update(np.array([[np.nan, 1.0]]), ["a"])
    with pytest.raises(ValueError, match="Q=2"):
        b.update(np.zeros((1, 3)), ["a"])
