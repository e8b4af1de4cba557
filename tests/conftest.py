"""Shared fixtures: the digits data and trained models (trained once per test session)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from beam_influence.models import digits  # noqa: E402
from beam_influence.train import train  # noqa: E402


class Trained:
    """A spec, its trained params and the decoded train/test data."""

    def __init__(self, spec, data, steps, lr, batch_size=None):
        self.spec, self.data = spec, data
        self.train_batch = spec.stack([spec.decode(r) for r in data.train])
        self.test_batch = spec.stack([spec.decode(r) for r in data.test])
        self.train_ids = [r["id"] for r in data.train]
        self.test_ids = [r["id"] for r in data.test]
        self.params = train(spec, self.train_batch, steps=steps, learning_rate=lr, batch_size=batch_size, seed=0)


@pytest.fixture(scope="session")
def digits_noisy():
    return digits.load_digits(label_noise=0.1, seed=0)


@pytest.fixture(scope="session")
def logreg_trained(digits_noisy):
    return Trained(digits.logreg(), digits_noisy, steps=1500, lr=1e-2)


@pytest.fixture(scope="session")
def cnn_trained(digits_noisy):
    return Trained(digits.cnn(), digits_noisy, steps=1500, lr=3e-3, batch_size=128)


def flip_labels_auc(scores, flipped):
    """ROC-AUC of ranking by ``scores`` (higher = more suspicious) for the boolean ``flipped``."""
    from scipy.stats import rankdata

    flipped = np.asarray(flipped, bool)
    r = rankdata(scores)
    n1, n0 = flipped.sum(), (~flipped).sum()
    return (r[flipped].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


# One Flink cluster (+ worker pool) and one Prism binary per test session, shared by all runner tests.
from tools.flink.pytest_fixtures import flink_env, prism_env  # noqa: E402,F401
