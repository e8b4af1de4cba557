"""Pipeline options of the beam-influence jobs (a ``PipelineOptions`` subclass) and the launcher's
pre-flight check: everything is loaded and cross-checked once before any pipeline work starts."""
from __future__ import annotations

import json

from apache_beam.options.pipeline_options import PipelineOptions

from beam_influence.beam.resources import InfluenceContext, ModelRef
from beam_influence.core.scoring import NORMALIZATIONS
from beam_influence.core.sketch import DEFAULT_DIM as DEFAULT_SKETCH_DIM  # chosen by measurement: docs/complement.md


class InfluenceOptions(PipelineOptions):
    """Flags shared by the index, query, self-influence and fused jobs."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--spec", help="model spec import path, e.g. beam_influence.models.digits:cnn")
        parser.add_argument("--spec_arg", action="append", default=[], metavar="KEY=VALUE",
                            help="keyword argument of the spec factory (JSON value)")
        parser.add_argument("--checkpoint", help="params of the trained model: orbax checkpoint directory, "
                            ".safetensors or msgpack; a suffix #key/path selects the params subtree")
        parser.add_argument("--eigensystem", help="eigensystem file from `beam-influence eigensystem`")
        parser.add_argument("--train_data", help="file pattern of training records (Parquet/JSONL/npz/TFRecord)")
        parser.add_argument("--test_data", help="file pattern of test/query records")
        parser.add_argument("--data_format", default=None, help="record format; default: from the file extension")
        parser.add_argument("--index_dir", help="influence index directory (Parquet shards + manifest.json)")
        parser.add_argument("--output", help="output directory of the job's results")
        parser.add_argument("--batch_size", type=int, default=64, help="examples per projection batch (fixed)")
        parser.add_argument("--projection_method", default="auto", choices=["auto", "leafwise", "flat", "jvp"],
                            help="auto: method, micro-batch and compute dtype chosen for the model, k and the device "
                                 "(core.projection.choose_method; docs/accelerators.md)")
        parser.add_argument("--micro_batch", type=int, default=None, help="examples per vmap step")
        parser.add_argument("--compute_dtype", default=None, choices=["float32", "bfloat16"],
                            help="dtype of the projection's contraction (default: the plan's; float32 on CPU)")
        parser.add_argument("--devices", type=int, default=0,
                            help="local accelerators per worker process that each hold a model copy (0: all)")
        parser.add_argument("--top_k", type=int, default=10, help="proponents and opponents kept per query")
        parser.add_argument("--normalization", default="none", choices=list(NORMALIZATIONS))
        parser.add_argument("--self_influence_top", type=int, default=100, help="top-N self-influence suspects")
        parser.add_argument("--complement", default="auto", choices=["auto", "exact", "sketch", "none"],
                            help="the complement term (1/ρ)(I − UUᵀ) of H⁻¹: exact (fused job: test gradients beside "
                                 "U), sketch (from the index's gradient sketch), none (truncated); auto picks the "
                                 "best the inputs allow (beam_influence.beam.complement)")
        parser.add_argument("--rho", type=float, default=None,
                            help="the complement's scalar ρ (default: the smallest |λ| kept)")
        parser.add_argument("--sketch_dim", type=int, default=DEFAULT_SKETCH_DIM,
                            help="index job: floats of the seeded gradient sketch stored per example for the "
                                 "complement term of queries (0: none); query jobs use the index's")
        parser.add_argument("--sketch_seed", type=int, default=0, help="seed of the gradient sketch")
        parser.add_argument("--sketch_method", default="count", choices=["count", "kron"],
                            help="the sketch map: CountSketch (default) or per-leaf Kronecker (core.sketch)")
        parser.add_argument("--batch_rows", type=int, default=16384,
                            help="records per chunk: the unit of work between Beam steps, and the most rows an "
                                 "index shard holds")


def model_ref(opts: InfluenceOptions) -> ModelRef:
    """The ModelRef named by the options; a clear error when a required flag is missing."""
    missing = [f"--{n}" for n in ("spec", "checkpoint", "eigensystem") if not getattr(opts, n)]
    if missing:
        raise ValueError(f"missing required option(s) {', '.join(missing)}")
    kwargs = {}
    for item in opts.spec_arg or []:
        key, _, value = item.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return ModelRef(spec=opts.spec, checkpoint=opts.checkpoint, eigensystem=opts.eigensystem,
                    spec_args=json.dumps(kwargs, sort_keys=True), method=opts.projection_method,
                    micro_batch=opts.micro_batch, sketch_dim=int(opts.sketch_dim or 0), sketch_seed=int(opts.sketch_seed or 0),
                    sketch_method=opts.sketch_method, compute_dtype=opts.compute_dtype,
                    devices=int(opts.devices or 0))


def preflight(opts: InfluenceOptions, *required: str) -> tuple[ModelRef, InfluenceContext]:
    """Check flags, load model + eigensystem on the launcher and refuse a mismatch before any work."""
    missing = [f"--{n}" for n in required if not getattr(opts, n)]
    if missing:
        raise ValueError(f"missing required option(s) {', '.join(missing)}")
    for name in ("batch_size", "top_k", "self_influence_top", "batch_rows"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be ≥ 1, got {value}")
    if opts.micro_batch is not None and opts.micro_batch < 1:
        raise ValueError(f"--micro_batch must be ≥ 1, got {opts.micro_batch}")
    if opts.devices is not None and opts.devices < 0:
        raise ValueError(f"--devices must be ≥ 0 (0: all local devices), got {opts.devices}")
    if opts.sketch_dim is not None and opts.sketch_dim < 0:
        raise ValueError(f"--sketch_dim must be ≥ 0 (0: no sketch), got {opts.sketch_dim}")
    if opts.rho is not None and not opts.rho > 0:
        raise ValueError(f"--rho must be > 0, got {opts.rho}")
    from beam_influence.beam.complement import check_mode

    check_mode(opts.complement, opts.normalization if opts.complement != "auto" else "none")
    ref = model_ref(opts)
    ctx = ref.load()
    from beam_influence.core.model_spec import check_spec

    check_spec(ctx.spec, ctx.params, probe_example(ctx.spec))
    for name in ("output", "index_dir"):
        if name in required and getattr(opts, name):
            check_writable(getattr(opts, name), f"--{name}")
    return ref, ctx


def probe_example(spec) -> dict:
    """A synthetic example of the spec's features (zeros, moved into [min, max]) for the up-front check."""
    import numpy as np

    out = {}
    for key, fs in spec.features.items():
        value = 0.0
        if fs.min is not None:
            value = max(value, fs.min)
        if fs.max is not None:
            value = min(value, fs.max)
        if getattr(fs, "buckets", None) is not None:  # a token sequence: in its smallest bucket, with mask
            from beam_influence.core.buckets import probe_sequence

            out.update(probe_sequence(key, fs, value))
            continue
        out[key] = np.full(tuple(fs.shape), value, dtype=fs.dtype)
    return out


def check_writable(path: str, what: str) -> None:
    """Fail before any work when ``path`` (a directory to write into) is not writable."""
    import os
    import uuid

    from apache_beam.io.filesystems import FileSystems

    probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}"
    try:
        if "://" not in path:
            os.makedirs(path, exist_ok=True)
        with FileSystems.create(probe) as f:
            f.write(b"")
        FileSystems.delete([probe])
    except Exception as e:  # noqa: BLE001 - any failure means we cannot write there
        raise ValueError(f"{what} {path!r} is not writable ({type(e).__name__}: {e}); choose another location") from None
