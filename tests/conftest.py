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


LOGREG_SPEC = "beam_influence.models.digits:logreg"
_EIGENSYSTEMS: dict = {}  # (model fingerprint, data digest, EigensystemArgs) -> Eigensystem, computed once per session


def write_model_files(root, spec, params, batch, args, *, spec_path: str | None = LOGREG_SPEC):
    """A workspace's model files: the checkpoint ``root/ckpt.msgpack`` and the eigensystem of ``params`` on ``batch``
    (``EigensystemArgs`` ``args``) at ``root/eig.safetensors``. Returns ``(eigensystem, model flags)``, the flags
    every job takes (``--spec spec_path --checkpoint … --eigensystem …``; no ``--spec`` when ``spec_path`` is None).

    The eigensystem is deterministic in (params, data, args), so one computed for the same three is reused."""
    import hashlib

    from beam_influence.core.estimate import compute_eigensystem
    from beam_influence.core.model_spec import fingerprint

    digest = hashlib.sha256()
    for key in sorted(batch):
        digest.update(key.encode() + np.ascontiguousarray(batch[key]).tobytes())
    key = (fingerprint(spec, params), digest.hexdigest(), repr(args))
    if key not in _EIGENSYSTEMS:
        _EIGENSYSTEMS[key] = compute_eigensystem(spec, params, batch, args)
    es = _EIGENSYSTEMS[key]
    ckpt, eig = os.path.join(str(root), "ckpt.msgpack"), os.path.join(str(root), "eig.safetensors")
    spec.save_params(ckpt, params)
    es.save(eig)
    flags = ["--checkpoint", ckpt, "--eigensystem", eig]
    return es, (["--spec", spec_path] + flags if spec_path else flags)


@pytest.fixture(scope="session")
def model_files():
    """``write_model_files`` (checkpoint + eigensystem of any model in a workspace directory)."""
    return write_model_files


@pytest.fixture(scope="session")
def logreg_files(logreg_trained):
    """``write(root, eigensystem_args) -> (eigensystem, model flags)``: the trained digits logistic regression's
    checkpoint and its eigensystem on the training set, in a workspace ``root`` (``write_model_files``)."""
    t = logreg_trained
    return lambda root, args: write_model_files(root, t.spec, t.params, t.train_batch, args)


def flip_labels_auc(scores, flipped):
    """ROC-AUC of ranking by ``scores`` (higher = more suspicious) for the boolean ``flipped``."""
    from scipy.stats import rankdata

    flipped = np.asarray(flipped, bool)
    r = rankdata(scores)
    n1, n0 = flipped.sum(), (~flipped).sum()
    return (r[flipped].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


# One Flink cluster (+ worker pool) and one Prism binary per test session, shared by all runner tests.
from tools.flink.pytest_fixtures import flink_env, prism_env  # noqa: E402,F401


def expected_lists(scores, train_ids, test_ids, k: int) -> dict:
    """``{(query id, kind, rank): (train id, score)}``: the top-k lists a job should write for ``scores [N, Q]``
    (``core.topk.top_k_per_query``, the jobs' ranking rule)."""
    from beam_influence.core.topk import top_k_per_query

    pro, opp = top_k_per_query(scores, train_ids, k)
    out = {}
    for q, p, o in zip(test_ids, pro, opp):
        for kind, pairs in (("proponent", p), ("opponent", o)):
            for rank, (tid, s) in enumerate(pairs, 1):
                out[(q, kind, rank)] = (tid, s)
    return out
