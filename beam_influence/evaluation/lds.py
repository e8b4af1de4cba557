r"""Linear datamodeling score (LDS): does the sum of a method's scores over a training subset predict
how well a model retrained on that subset does on each test example?

Park et al., "TRAK: Attributing Model Behavior at Scale" (arXiv 2303.14186), Sec. 2; the protocol
of the fidelity issue. Draw M random subsets :math:`S_m` (each a fraction α = 1/2 of the training
set, seeded), retrain on each (``beam_influence.train.train``, same steps / learning rate /
initialisation as the base model) and record the target

.. math::  y_{mq} = -\ell(z^{test}_q, \theta_{S_m}),

minus the test loss of the retrained model. A method's prediction for the pair is the summed score

.. math::  \hat y_{mq} = \sum_{n \in S_m} \tau(z^{train}_n, z^{test}_q),

with :math:`\tau` under the project's sign convention (larger = more helpful = lowers the test
loss, so larger :math:`\hat y` should go with larger :math:`y`). The LDS of query q is the Spearman
rank correlation of :math:`(\hat y_{mq})_m` and :math:`(y_{mq})_m`; the score is its mean over queries.

The retraining fans out through Beam (one element per subset: ``beam.Create(range(M))`` → a DoFn
that retrains and returns the test losses), so it runs on the same runners as the influence pipelines.

Example::

    masks = subset_masks(n_train=1438, num_subsets=50, seed=0)            # [50, 1438] bool
    targets = run_retraining(job, pipeline_args=["--runner=FnApiRunner"])  # [50, Q]
    result = lds(scores, masks, targets)                                  # result.score, result.per_query
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from beam_influence.core.types import Example
from beam_influence.util import read_jsonl

DEFAULT_RUNNER_ARGS = ("--runner=FnApiRunner",)  # Beam 2.77's DirectRunner may try to download Prism


class LDSResult(NamedTuple):
    """The linear datamodeling score.

    Attributes:
      score: mean over queries of the per-query Spearman correlation (NaN queries skipped).
      per_query: ``[Q]`` Spearman correlation per test example (NaN where a column is constant).
    """

    score: float
    per_query: np.ndarray


def subset_masks(n_train: int, num_subsets: int, *, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``[M, N]`` bool: M seeded random subsets, each of exactly ``round(fraction * N)`` examples."""
    if n_train < 2 or num_subsets < 1:
        raise ValueError(f"need n_train >= 2 and num_subsets >= 1, got {n_train}, {num_subsets}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    size = int(round(fraction * n_train))
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, n_train), bool)
    for m in range(num_subsets):
        masks[m, rng.choice(n_train, size, replace=False)] = True
    return masks


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``[M, Q]``: the summed scores :math:`\\hat y_{mq} = \\sum_{n \\in S_m} \\tau_{nq}`.

    Args:
      scores: ``[N, Q]`` influence of training example n on test example q.
      masks: ``[M, N]`` bool subset membership.
    """
    scores = np.asarray(scores, np.float64)
    masks = np.asarray(masks, bool)
    if scores.ndim != 2 or masks.ndim != 2 or masks.shape[1] != scores.shape[0]:
        raise ValueError(f"expected scores [N, Q] and masks [M, N]; got scores {scores.shape}, masks {masks.shape}")
    return masks.astype(np.float64) @ scores


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of every column of ``a`` with the same column of ``b``: ``[C]``.

    Average ranks for ties (as ``scipy.stats.spearmanr``); NaN where a column is constant.
    """
    from scipy.stats import rankdata

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [R, C] arrays of the same shape; got {a.shape} and {b.shape}")
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    den = np.sqrt(np.sum(ra * ra, axis=0) * np.sum(rb * rb, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, np.sum(ra * rb, axis=0) / np.where(den > 0, den, 1.0), np.nan)


def lds(scores: np.ndarray, masks: np.ndarray, targets: np.ndarray) -> LDSResult:
    r"""The linear datamodeling score of ``scores``.

    .. math::  \mathrm{LDS} = \frac1Q \sum_q \rho_{\mathrm{Spearman}}\big((\textstyle\sum_{n\in S_m}\tau_{nq})_m,\,(y_{mq})_m\big)

    Args:
      scores: ``[N_train, Q]`` a method's scores (larger = more helpful).
      masks: ``[M, N_train]`` bool, the retraining subsets.
      targets: ``[M, Q]`` minus the test loss of the model retrained on subset m.
    Returns:
      ``LDSResult(score, per_query)``; queries whose predictions or targets are constant get NaN
      and are left out of the mean.
    """
    pred = subset_predictions(scores, masks)
    targets = np.asarray(targets, np.float64)
    if targets.shape != pred.shape:
        raise ValueError(f"targets have shape {targets.shape}, expected [M, Q] = {pred.shape}")
    if pred.shape[0] < 3:
        raise ValueError(f"LDS needs at least 3 subsets, got {pred.shape[0]}")
    per_query = spearman_columns(pred, targets)
    ok = np.isfinite(per_query)
    return LDSResult(float(np.mean(per_query[ok])) if ok.any() else float("nan"), per_query)


# ---- retraining ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RetrainJob:
    """Everything one retraining needs; picklable (import path + arrays), so it travels to workers.

    Attributes:
      spec: model spec import path ``pkg.module:factory``.
      spec_args: JSON object of the factory's keyword arguments.
      train: ``[N, ...]`` decoded training examples (feature -> numpy array).
      test: ``[Q, ...]`` decoded test examples.
      masks: ``[M, N]`` bool subsets.
      steps, learning_rate, batch_size, seed: exactly those of the base model's ``train`` call
        (the retrained models start from the same initialisation, ``spec.init(seed)``).
    """

    spec: str
    spec_args: str
    train: Mapping[str, np.ndarray]
    test: Mapping[str, np.ndarray]
    masks: np.ndarray
    steps: int
    learning_rate: float
    batch_size: int | None = None
    seed: int = 0
    train_fn: str | None = None  # import path of the training function (None: beam_influence.train:train)

    def __post_init__(self):
        n = {len(v) for v in self.train.values()}
        if len(n) != 1 or self.masks.ndim != 2 or self.masks.shape[1] != n.pop():
            raise ValueError(f"masks {self.masks.shape} must be [M, N] for the N training examples")

    @property
    def num_subsets(self) -> int:
        return int(self.masks.shape[0])

    def load_spec(self):
        from beam_influence.core.model_spec import load_spec

        return load_spec(self.spec, **json.loads(self.spec_args))

    def cache_key(self) -> str:
        """sha256 over the spec, the training arguments, the data and the masks."""
        key = [self.spec, json.loads(self.spec_args), self.steps, self.learning_rate, self.batch_size, self.seed]
        if self.train_fn is not None:  # the default keeps the keys (and caches) of earlier versions
            key.append(self.train_fn)
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
        for part in (self.train, self.test):
            for k in sorted(part):
                h.update(k.encode())
                h.update(np.ascontiguousarray(part[k]).tobytes())
        h.update(f"{self.masks.shape}".encode())
        h.update(np.packbits(self.masks).tobytes())
        return h.hexdigest()[:24]


def retrain_subset(job: RetrainJob, m: int, spec=None) -> np.ndarray:
    """Retrain on subset ``m`` and return the test losses ``[Q]`` float32 (targets are their negation)."""
    import jax

    if job.train_fn is None:
        from beam_influence.train import train
    else:
        from beam_influence.evaluation.loading import load_callable

        train = load_callable(job.train_fn, what="training function")
    spec = job.load_spec() if spec is None else spec
    idx = np.flatnonzero(job.masks[m])
    sub = {k: np.asarray(v)[idx] for k, v in job.train.items()}
    params = train(spec, sub, steps=job.steps, learning_rate=job.learning_rate, batch_size=job.batch_size,
                   seed=job.seed)
    losses = jax.jit(jax.vmap(spec.loss, in_axes=(None, 0)))(params, dict(job.test))
    return np.asarray(losses, np.float32)


class RetrainDoFn(beam.DoFn):
    """``m -> (m, test losses [Q])``: retrain the model on subset m (see ``retrain_subset``).

    The spec is loaded once per worker in ``setup``; retry-safe (no side effects outside its output).
    """

    def __init__(self, job: RetrainJob, progress: bool = False):
        self.job, self.progress = job, progress
        self.retrained = beam.metrics.Metrics.counter("lds", "retrained_subsets")

    def setup(self):
        self.spec = self.job.load_spec()
        self.bar = None
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.job.num_subsets, desc="LDS retraining", unit="model")

    def process(self, m: int) -> Iterator[tuple[int, list[float]]]:
        losses = retrain_subset(self.job, int(m), self.spec)
        self.retrained.inc()
        if self.bar is not None:
            self.bar.update(1)
        yield int(m), [float(x) for x in losses]

    def teardown(self):
        if getattr(self, "bar", None) is not None:
            self.bar.close()


class RetrainSubsets(beam.PTransform):
    """``PBegin -> PCollection[(m, [Q] test losses)]``: one element per subset, fanned out by the runner.

    ``beam.Create(range(M)) | Reshuffle | ParDo(RetrainDoFn)``.
    """

    def __init__(self, job: RetrainJob, *, progress: bool = False):
        super().__init__()
        self.job, self.progress = job, progress

    def expand(self, pbegin):
        return (pbegin
                | "Subsets" >> beam.Create(list(range(self.job.num_subsets)))
                | "Reshuffle" >> beam.Reshuffle()  # let the runner spread subsets over workers
                | "Retrain" >> beam.ParDo(RetrainDoFn(self.job, self.progress)))


def cache_path(job: RetrainJob, cache_dir: str) -> str:
    """Where ``run_retraining`` caches the targets of ``job`` under ``cache_dir``."""
    return os.path.join(cache_dir, f"lds-{job.cache_key()}.npz")


def run_retraining(job: RetrainJob, *, pipeline_args: Sequence[str] | None = None, out_dir: str | None = None,
                   progress: bool = False, cache_dir: str | None = None) -> np.ndarray:
    """Run the retraining pipeline and return the LDS targets ``[M, Q]`` (minus the test losses).

    Args:
      job: what to retrain.
      pipeline_args: Beam options; default ``--runner=FnApiRunner`` (in-process). Use e.g.
        ``--direct_running_mode=multi_processing --direct_num_workers=2`` or a Flink/Dataflow runner
        to fan out.
      out_dir: where the pipeline writes its JSONL results (a temporary directory by default;
        any Beam FileSystems path for remote runners).
      progress: show a tqdm bar per worker.
      cache_dir: if given, targets are read from / written to ``<cache_dir>/lds-<job.cache_key()>.npz``.
    """
    cache = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        cache = cache_path(job, cache_dir)
        if os.path.exists(cache):
            with np.load(cache, allow_pickle=False) as f:
                targets = f["targets"]
            if targets.shape[0] == job.num_subsets:
                return targets
    args = list(pipeline_args) if pipeline_args else []
    if not any(a.startswith("--runner") for a in args):
        args = list(DEFAULT_RUNNER_ARGS) + args
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lds-")
        out_dir = tmp.name
    prefix = FileSystems.join(out_dir, "retrained")
    try:
        with beam.Pipeline(options=PipelineOptions(args)) as p:
            _ = (p
                 | "RetrainSubsets" >> RetrainSubsets(job, progress=progress)
                 | "ToJson" >> beam.MapTuple(lambda m, losses: json.dumps({"subset": m, "test_losses": losses}))
                 | "Write" >> beam.io.WriteToText(prefix, file_name_suffix=".jsonl"))
        losses = np.full((job.num_subsets, len(next(iter(job.test.values())))), np.nan, np.float64)
        seen = np.zeros(job.num_subsets, bool)
        for meta in FileSystems.match([prefix + "*.jsonl"])[0].metadata_list:
            for row in read_jsonl(meta.path):
                losses[row["subset"]] = row["test_losses"]
                seen[row["subset"]] = True
    finally:
        if tmp is not None:
            tmp.cleanup()
    if not seen.all():
        raise RuntimeError(f"retraining pipeline returned {seen.sum()} of {job.num_subsets} subsets")
    targets = -losses
    if cache:
        np.savez(cache, targets=targets, masks=job.masks)
    return targets


def retrain_job(spec_path: str, spec_args: Mapping[str, Any] | None, train: Example, test: Example,
                masks: np.ndarray, *, steps: int, learning_rate: float, batch_size: int | None = None,
                seed: int = 0, train_fn: str | None = None) -> RetrainJob:
    """Build a ``RetrainJob`` from decoded batches (keyword arguments as in ``beam_influence.train.train``;
    ``train_fn``: the import path of another training function with that signature)."""
    return RetrainJob(spec=spec_path, spec_args=json.dumps(dict(spec_args or {}), sort_keys=True),
                      train={k: np.asarray(v) for k, v in train.items()},
                      test={k: np.asarray(v) for k, v in test.items()}, masks=np.asarray(masks, bool),
                      steps=int(steps), learning_rate=float(learning_rate), batch_size=batch_size, seed=int(seed),
                      train_fn=train_fn)
