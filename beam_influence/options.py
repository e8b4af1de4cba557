"""The options of every job, declared once: frozen dataclasses whose fields are the project's flags.

Each concept has one name across all jobs (``--num_eigenpairs`` is the eigensystem's k; ``--top_k`` is
proponents/opponents per query), one spelling (underscores, as Beam's own options), one help text, one
default. Jobs compose the groups below; ``beam_influence.cli.flags`` generates their parsers (the CLI
subcommands, ``python -m pipelines.*``), the audit config is one of them read from JSON, and the demo builds
the job options directly. ``__post_init__`` validates every field (bounds, choices, required), so a job
never starts on a bad value; library code receives these objects and never reads flags.

Example::

    opts = IndexOptions(spec="beam_influence.models.digits:cnn", checkpoint="ckpt.msgpack",
                        eigensystem="eig.safetensors", train_data="data/train-*.parquet", index_dir="out/index")
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

from beam_influence.core.estimate import EigensystemArgs  # the eigensystem's library defaults
from beam_influence.core.sketch import DEFAULT_DIM as DEFAULT_SKETCH_DIM  # by measurement: docs/complement.md
from beam_influence.core.sketch import DEFAULT_STORAGE_DTYPE as DEFAULT_SKETCH_DTYPE
from beam_influence.core.sketch import STORAGE_DTYPES as SKETCH_DTYPES

_MISSING = dataclasses.MISSING
NORMALIZATIONS = ("none", "train_norm", "cosine")  # = core.scoring.NORMALIZATIONS (test_options checks)
PROJECTION_METHODS = ("auto", "leafwise", "flat", "jvp")
COMPLEMENT_MODES = ("auto", "exact", "sketch", "kfac", "none")
EXACT_SCORING = ("auto", "passes", "rerank")
RECORD_FORMATS = ("parquet", "jsonl", "npz", "tfrecord")
_DEFAULTS = EigensystemArgs()


def option(default: Any = _MISSING, *, help: str, choices: Sequence[Any] | None = None,  # noqa: A002
           low: float | None = None, high: float | None = None, above: float | None = None,
           metavar: str | None = None, split: str | None = None) -> Any:
    """A dataclass field that is a flag: its help, choices and bounds (``low ≤ v ≤ high``, ``v > above``)
    are checked by :class:`Options` for every instance. ``default`` omitted: required. ``split``: a
    repeatable field whose values may also be given separated by it (``--methods a,b``)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "low": low, "high": high,
            "above": above, "metavar": metavar, "split": split}
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=meta)


class OptionsError(ValueError):
    """An invalid option value; the message names the flag (or config field) and what it accepts."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every job's options: validates each field against its declaration."""

    required: ClassVar[tuple[str, ...]] = ()  # fields that must be given (None/empty is refused)
    help_overrides: ClassVar[dict[str, str]] = {}  # a job's more precise help for a shared field
    flag_prefix: ClassVar[str] = "--"  # how messages name a field ("" for config files)

    def __post_init__(self):
        missing = [self.name_of(n) for n in self.required if getattr(self, n) in (None, "", ())]
        if missing:
            raise OptionsError(f"missing required option(s) {', '.join(missing)}")
        for f in dataclasses.fields(self):
            m = f.metadata
            if "help" not in m:
                continue
            v = getattr(self, f.name)
            for item in (v if isinstance(v, tuple) else (v,)):
                self._check(f.name, item, m)
        self.validate()

    def _check(self, name: str, v: Any, m) -> None:
        if v is None:
            return
        if m["choices"] is not None and v not in m["choices"]:
            raise OptionsError(f"{self.name_of(name)} must be one of {', '.join(map(str, m['choices']))}; got {v!r}")
        if m["low"] is not None or m["high"] is not None or m["above"] is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise OptionsError(f"{self.name_of(name)} must be a number, got {v!r}")
            if m["low"] is not None and v < m["low"]:
                raise OptionsError(f"{self.name_of(name)} must be ≥ {m['low']:g}, got {v!r}")
            if m["high"] is not None and v > m["high"]:
                raise OptionsError(f"{self.name_of(name)} must be ≤ {m['high']:g}, got {v!r}")
            if m["above"] is not None and not v > m["above"]:
                raise OptionsError(f"{self.name_of(name)} must be > {m['above']:g}, got {v!r}")

    def validate(self) -> None:
        """Cross-field checks of a job (override)."""

    @classmethod
    def name_of(cls, field: str) -> str:
        return f"{cls.flag_prefix}{field}"

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ---- groups: each concept declared once ------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecOptions(Options):
    spec: str | None = option(None, help="model spec import path pkg.module:factory, e.g. "
                                         "beam_influence.models.digits:cnn (imports and runs that code)")
    spec_arg: tuple[str, ...] = option((), metavar="KEY=VALUE",
                                       help="keyword argument of the spec factory, repeatable; VALUE is JSON "
                                            "when it parses (--spec_arg hidden=128)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointOptions(Options):
    checkpoint: str | None = option(None, help="params of the trained model: an orbax checkpoint directory, a "
                                               ".safetensors file or msgpack (bare params, {'params': …} or a "
                                               "TrainState); a suffix #key/path selects the params subtree")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EigensystemFileOptions(Options):
    eigensystem: str | None = option(None, help="eigensystem file written by `beam-influence eigensystem`")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelOptions(SpecOptions, CheckpointOptions, EigensystemFileOptions):
    """The model and its eigensystem."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainDataOptions(Options):
    train_data: str | None = option(None, help="file pattern of the training records (Parquet, JSONL, npz, "
                                               "TFRecord; .gz allowed)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TestDataOptions(Options):
    test_data: str | None = option(None, help="file pattern of the test (query) records")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataFormatOptions(Options):
    data_format: str | None = option(None, choices=RECORD_FORMATS,
                                     help="record format of the data files (default: from the file extension)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputOptions(Options):
    output: str | None = option(None, help="where the job writes its result")


@dataclasses.dataclass(frozen=True, kw_only=True)
class IndexDirOptions(Options):
    index_dir: str | None = option(None, help="influence index directory (Parquet shards + manifest.json)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeedOptions(Options):
    seed: int = option(0, low=0, help="seed of every random choice of the job (data, init, sample)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompilationOptions(Options):
    compilation_cache_dir: str | None = option(
        None, help="persistent XLA compilation cache shared by this job and its Beam workers (default: "
                   "$BEAM_INFLUENCE_COMPILATION_CACHE, else ~/.cache/beam-influence/jax)")
    compilation_cache: bool = option(True, help="do not use the persistent compilation cache")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingOptions(Options):
    steps: int = option(1500, low=1, help="Adam steps of the model (and of every retraining in evaluate)")
    learning_rate: float = option(1e-2, above=0, help="Adam learning rate")
    train_batch_size: int | None = option(None, low=1, help="training mini-batch (none: the full batch)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceOptions(Options):
    micro_batch: int | None = option(None, low=1,
                                     help="examples per compiled step (vmap): the device-memory knob (none: "
                                          f"the plan's; eigensystem {_DEFAULTS.micro_batch})")
    devices: int = option(0, low=0, help="local accelerators used, each holding a model copy (0: all)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArnoldiOptions(Options):
    """The eigensystem: Arnoldi on the curvature of a fixed sample (core.estimate.EigensystemArgs)."""

    num_iters: int = option(_DEFAULTS.num_iters, low=1, help="Arnoldi steps n (curvature products); "
                                                             "docs/quality.md")
    num_eigenpairs: int = option(_DEFAULTS.top_k, low=1,
                                 help="Ritz pairs kept k (floats per example in the index)")
    sample_size: int = option(_DEFAULTS.sample_size, low=1,
                              help="the fixed, seeded sample of the training set whose curvature is taken "
                                   "(streamed)")
    curvature_batch_size: int | None = option(None, low=1,
                                              help="examples per curvature product (none: the whole fixed "
                                                   "sample; 512 with --fresh_batches)")
    fresh_batches: bool = option(False, help="a fresh batch per product (the reference code's choice): cheaper "
                                             "products, but an inconsistent operator (docs/quality.md)")
    negative: str = option(_DEFAULTS.negative, choices=("abs", "drop", "keep"),
                           help="treatment of negative Ritz values in 1/λ")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CurvatureOptions(Options):
    curvature: str = option(_DEFAULTS.curvature, choices=("hessian", "ggn"),
                            help="curvature: the loss Hessian or the Gauss-Newton matrix")
    damping: float = option(_DEFAULTS.damping, low=0, help="δ added to every λ")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LabelNoiseOptions(Options):
    label_noise: float = option(0.1, low=0, high=0.99,
                                help="fraction of training labels (pairs) corrupted, ids recorded (0: none)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardOptions(Options):
    num_shards: int = option(4, low=1, help="record shards written per split")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProjectionBatchOptions(Options):
    projection_batch_size: int = option(64, low=1, help="examples per projection batch (a fixed shape)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProjectionOptions(ProjectionBatchOptions, DeviceOptions):
    """How training and query gradients are projected onto the eigensystem."""

    projection_method: str = option("auto", choices=PROJECTION_METHODS,
                                    help="auto: method, micro-batch and dtype chosen for the model, k and the "
                                         "device (core.projection.choose_method; docs/accelerators.md)")
    compute_dtype: str | None = option(None, choices=("float32", "bfloat16"),
                                       help="dtype of the projection's contraction (none: the plan's; float32 "
                                            "on CPU)")
    batch_rows: int = option(16384, low=1, help="records per chunk: the unit of work between Beam steps, and "
                                                "the most rows an index shard holds")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SketchOptions(Options):
    sketch_dim: int = option(DEFAULT_SKETCH_DIM, low=0,
                             help="floats of the seeded gradient sketch stored per indexed example, for the "
                                  "complement term of queries (0: none)")
    sketch_seed: int = option(0, low=0, help="seed of the gradient sketch")
    sketch_method: str = option("count", choices=("count", "kron"),
                                help="the sketch map: CountSketch or per-leaf Kronecker (core.sketch)")
    sketch_dtype: str = option(DEFAULT_SKETCH_DTYPE, choices=SKETCH_DTYPES,
                               help="how the index stores the sketch: float32 (4 bytes a float), or float16 / "
                                    "bfloat16 scaled per row (2 bytes + a 4-byte scale per example); queries "
                                    "decode it, the fused job keeps float32 in memory (docs/benchmarks.md)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RhoOptions(Options):
    rho: float | None = option(None, above=0, help="the complement's scalar ρ (none: the smallest |λ| kept)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComplementOptions(RhoOptions):
    complement: str = option("auto", choices=COMPLEMENT_MODES,
                             help="the complement of the top-k eigenspace in H⁻¹: exact (scalar 1/ρ, test gradients "
                                  "beside U), sketch (scalar, the index's gradient sketch), kfac (the K-FAC factors "
                                  "saved by `eigensystem --kfac`: exact in the fused job and self-influence; "
                                  "sketched, or exact with --train_data, against an index built with them), none "
                                  "(truncated scores); auto: kfac where the factors and the path allow, else the best "
                                  "scalar one")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QueryListOptions(Options):
    top_k: int = option(10, low=1, help="proponents and opponents kept per query")
    normalization: str = option("none", choices=NORMALIZATIONS,
                                help="score normalisation: none (unnormalised: which training examples move "
                                     "this loss most, dominated by high-loss examples), train_norm (divide by "
                                     "‖P(z_train)‖: answers 'why this prediction'), cosine")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QueryBlockOptions(Options):
    query_block: int | None = option(None, low=1, help="queries whose gradients are held beside U at once in exact "
                                     "scoring (none: as many as the memory plan fits)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExactRerankOptions(QueryBlockOptions):
    exact_rerank: str = option("auto", choices=("auto", "on", "off"),
                               help="two-stage queries: the sketch finds candidates, their gradients are recomputed "
                                    "from --train_data and scored exactly (auto: on when the complement is sketched "
                                    "and --train_data is given)")
    rerank_candidates: int | None = option(None, low=1, help="at most this many candidates per list (the best by "
                                           "optimistic score; none: every row while 2·10⁶ candidates over all "
                                           "lists allow, at least 10·top_k); a list with more is not certified")
    rerank_margin: float = option(4.0, low=0, help="the candidates' margin in standard deviations of the sketch's "
                                  "error")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelfInfluenceOptions_(Options):  # noqa: N801 - a group, not a job
    self_influence_top: int = option(100, low=1, help="training examples kept by self-influence (suspects)")


# ---- the jobs --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class DigitsDataOptions(OutputOptions, LabelNoiseOptions, ShardOptions, SeedOptions):
    """``beam-influence digits-data``: scikit-learn's digits as record shards."""

    required: ClassVar = ("output",)
    help_overrides: ClassVar = {"output": "directory of the record shards"}
    formats: tuple[str, ...] = option(("parquet",), choices=RECORD_FORMATS, split=",",
                                      help="record formats written (repeatable or comma-separated)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainOptions(SpecOptions, TrainDataOptions, OutputOptions, TrainingOptions, SeedOptions, CompilationOptions):
    """``beam-influence train``: train a spec on record shards (optax Adam), write a checkpoint."""

    required: ClassVar = ("spec", "train_data", "output")
    help_overrides: ClassVar = {"output": "checkpoint path: msgpack; *.safetensors; an orbax directory when it "
                                          "ends in / or .orbax"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EigensystemOptions(SpecOptions, CheckpointOptions, TrainDataOptions, DataFormatOptions, OutputOptions,
                         ArnoldiOptions, CurvatureOptions, DeviceOptions, SeedOptions, CompilationOptions):
    """``beam-influence eigensystem``: Arnoldi → the top-k eigensystem file."""

    required: ClassVar = ("spec", "checkpoint", "train_data", "output")
    help_overrides: ClassVar = {"output": "eigensystem file (.safetensors)"}
    residuals: bool = option(True, help="skip the residuals ‖Hu − λu‖ (saves k products)")
    basis: str = option(_DEFAULTS.basis, choices=("auto", "device", "host", "mmap"),
                        help="where the Krylov basis ((n+1)·p floats) lives: auto = device when it fits beside "
                             "the model, else host (mmap with --basis_path); docs/accelerators.md")
    basis_path: str | None = option(None, help="the .npy file of a memory-mapped basis (--basis mmap/auto)")
    kfac: bool = option(False, help="also fit the Kronecker-factored (EK-FAC) curvature on the same fixed sample "
                                    "and save its factors in the eigensystem file (checksummed), for the "
                                    "K-FAC complement (beam_influence.KFACOptions defaults; docs/complement.md)")

    def validate(self) -> None:
        if self.num_eigenpairs > self.num_iters:
            raise OptionsError(f"--num_eigenpairs ({self.num_eigenpairs}) cannot exceed --num_iters "
                               f"({self.num_iters})")
        if self.basis == "mmap" and not self.basis_path:
            raise OptionsError("--basis mmap needs --basis_path (the .npy file of the basis)")

    def eigensystem_args(self) -> EigensystemArgs:
        """The library's arguments of ``core.estimate.compute_eigensystem``."""
        return EigensystemArgs(
            num_iters=self.num_iters, top_k=self.num_eigenpairs, batch_size=self.curvature_batch_size,
            fresh_batches=self.fresh_batches, micro_batch=self.micro_batch or _DEFAULTS.micro_batch,
            sample_size=self.sample_size, curvature=self.curvature, negative=self.negative, damping=self.damping,
            residuals=self.residuals, seed=self.seed, basis=self.basis, basis_path=self.basis_path or "",
            devices=self.devices)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IndexOptions(ModelOptions, TrainDataOptions, DataFormatOptions, IndexDirOptions, ProjectionOptions,
                   SketchOptions, CompilationOptions):
    """``beam-influence index``: training records → projected gradients → influence index."""

    required: ClassVar = ("spec", "checkpoint", "eigensystem", "train_data", "index_dir")
    sketch_space: str = option("auto", choices=("auto", "gradient", "kfac"),
                               help="what the sketch stores: gradient (for the scalar complement's queries) or kfac "
                                    "(the K-FAC complement's whitened residual, for --complement kfac queries; "
                                    "needs an eigensystem computed with --kfac); auto: kfac when the eigensystem "
                                    "carries K-FAC factors, else gradient")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QueryOptions(ModelOptions, TestDataOptions, TrainDataOptions, DataFormatOptions, IndexDirOptions,
                   OutputOptions, ProjectionOptions, QueryListOptions, ComplementOptions, ExactRerankOptions,
                   CompilationOptions):
    """``beam-influence query``: test records × the index → top-k proponents and opponents."""

    required: ClassVar = ("spec", "checkpoint", "eigensystem", "test_data", "index_dir", "output")
    help_overrides: ClassVar = {"output": "output directory (topk.jsonl/.parquet, summary.json, dead letters)",
                                "train_data": "the index's training records (file pattern): the exact rerank reads "
                                              "its candidates back from them by position"}

    def validate(self) -> None:
        if self.exact_rerank == "on" and not self.train_data:
            raise OptionsError("--exact_rerank on reads the candidates back from the training data: give "
                               "--train_data (the files the index was built from)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelfInfluenceOptions(ModelOptions, IndexDirOptions, OutputOptions, SelfInfluenceOptions_, ComplementOptions,
                           CompilationOptions):
    """``beam-influence self-influence``: the top-N training examples by self-influence, from the index."""

    required: ClassVar = ("spec", "checkpoint", "eigensystem", "index_dir", "output")
    help_overrides: ClassVar = {"output": "output directory (self_influence_top.jsonl/.parquet, summary)"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusedOptions(ModelOptions, TrainDataOptions, TestDataOptions, DataFormatOptions, OutputOptions,
                   ProjectionOptions, QueryListOptions, SelfInfluenceOptions_, ComplementOptions, SketchOptions,
                   QueryBlockOptions, CompilationOptions):
    """``beam-influence run``: index + query + self-influence in one pass, without writing an index."""

    required: ClassVar = ("spec", "checkpoint", "eigensystem", "train_data", "test_data", "output")
    help_overrides: ClassVar = {"output": "output directory (topk, self_influence_top, summary, dead letters); "
                                          "usable as `report --query_dir/--audit_dir`"}
    exact_scoring: str = option("auto", choices=EXACT_SCORING,
                                help="how the exact (or K-FAC) complement scores the training set: passes (one pass "
                                     "over the training data per block of query gradients the memory plan holds "
                                     "beside U; always exact), rerank (one indexing pass with a sketch into the "
                                     "output's staging folder, then the two-stage query, exact where its lists are "
                                     "certified, and self-influence from that index); auto: passes when one block "
                                     "holds every query or --query_block is given, else rerank (needs "
                                     "--sketch_dim > 0)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportOptions(ModelOptions, IndexDirOptions, TrainDataOptions, TestDataOptions, OutputOptions):
    """``beam-influence report``: one static HTML page from the result files (model and data default to
    what the index manifest names)."""

    required: ClassVar = ("index_dir", "output")
    help_overrides: ClassVar = {"output": "the HTML file to write"}
    query_dir: str | None = option(None, help="output directory of `query` or `run` (topk.jsonl, summary.json)")
    audit_dir: str | None = option(None, help="output directory of `self-influence` or `run`")
    data_meta: str | None = option(None, help="data meta JSON (digits_meta.json: flipped ids, data patterns)")
    run_json: str | None = option(None, help="run.json of the demo (stage timings)")
    max_queries: int = option(12, low=1, help="queries shown (first in id order)")
    max_suspects: int = option(30, low=0, help="self-influence suspects shown as images")
    image_key: str = option("x", help="record field drawn as an image")
    label_key: str = option("y", help="record field holding the label")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditOptions(Options):
    """``beam-influence audit``: the recurring audit of an audit config."""

    required: ClassVar = ("config",)
    config: str | None = option(None, help="audit config (JSON, or YAML with .yaml/.yml); its fields are spelled "
                                           "like the index and query options (docs/audit.md)")
    run_id: str | None = option(None, help="run folder name, [A-Za-z0-9._-]+ (default: UTC timestamp)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoOptions(SpecOptions, OutputOptions, LabelNoiseOptions, ShardOptions, SeedOptions, TrainingOptions,
                  ArnoldiOptions, ProjectionBatchOptions, QueryListOptions, SelfInfluenceOptions_,
                  CompilationOptions):
    """``python -m pipelines.demo`` / ``make demo``: the embedded default end to end (settings per task)."""

    required: ClassVar = ("output",)
    help_overrides: ClassVar = {
        "output": "output directory (the report is OUTPUT/report.html)",
        "spec": "model spec (default per task: digits → beam_influence.models.digits:cnn, translation → "
                "beam_influence.models.sequence:translation)",
        "steps": "training steps (default: per task and --fast, pipelines/demo.py SETTINGS)",
        "learning_rate": "Adam learning rate (default: per task)",
        "train_batch_size": "training mini-batch (default: per task)",
        "num_iters": "Arnoldi steps n (default: per task and --fast)",
        "num_eigenpairs": "Ritz pairs kept k (default: per task and --fast)",
        "curvature_batch_size": "examples per curvature product (default: per task and --fast)",
        "sample_size": "the fixed sample of the curvature (default: the whole training set)",
    }
    fast: bool = option(False, help="smoke run: fewer steps and iterations, in-process FnApiRunner (for tests)")
    task: str = option("digits", choices=("digits", "translation"),
                       help="digits (images, flipped labels) or translation (token sequences, noisy pairs)")
    n_train: int | None = option(None, low=1, help="translation: training pairs generated (default: per --fast)")
    n_test: int | None = option(None, low=1, help="translation: test pairs generated (default: per --fast)")
    num_queries: int = option(10, low=1, help="test examples to explain")
    show_beam_logs: bool = option(False, help="let Beam and its workers log to the terminal (default: "
                                              "OUTPUT/logs/<stage>.log)")


JOB_OPTIONS = {"demo": DemoOptions, "digits-data": DigitsDataOptions, "train": TrainOptions, "eigensystem": EigensystemOptions,
               "index": IndexOptions, "query": QueryOptions, "self-influence": SelfInfluenceOptions,
               "run": FusedOptions, "report": ReportOptions, "audit": AuditOptions}

__all__ = ["ArnoldiOptions", "AuditOptions", "ComplementOptions", "CurvatureOptions", "DemoOptions", "LabelNoiseOptions",
           "RhoOptions", "SeedOptions", "SpecOptions", "TrainingOptions", "DigitsDataOptions", "EigensystemOptions",
           "FusedOptions", "IndexOptions", "JOB_OPTIONS", "ModelOptions", "Options", "OptionsError",
           "ProjectionOptions", "QueryOptions", "ReportOptions", "SelfInfluenceOptions", "TrainOptions", "option"]
