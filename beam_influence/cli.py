"""The ``beam-influence`` command line.

Subcommands:
  digits-data   write scikit-learn's digits (train/test, optional label noise) as record shards
  train         train a ModelSpec on record shards (optax Adam) and write a checkpoint
  eigensystem   Arnoldi on the training-loss curvature → eigensystem file (+ spectrum summary)
  index | query | self-influence | run   the Beam pipelines (see ``pipelines/``)
  report        build the HTML report from result files
  audit         the recurring data audit (only new shards, diff against the previous run, alerts)
  evaluate      attribution quality: LDS, mislabel AUC, agreement with exact influence, baselines
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Sequence

from beam_influence.cli_args import add_spec_args, spec_kwargs


def _cmd_digits_data(a: argparse.Namespace) -> int:
    from beam_influence.formats.convert import convert_digits

    patterns = convert_digits(a.out, formats=a.formats, num_shards=a.num_shards, label_noise=a.label_noise, seed=a.seed)
    print(json.dumps(patterns, indent=2))
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from beam_influence.data import load_examples
    from beam_influence.core.model_spec import fingerprint, load_spec
    from beam_influence.train import train

    spec = load_spec(a.spec, **spec_kwargs(a.spec_arg))
    data = load_examples(spec, a.train_data)
    if data.bad:
        print(f"warning: {len(data.bad)} of {data.stats.get('records_read', '?')} training records could not be "
              f"decoded and are not used (first: {data.bad[0]})", file=sys.stderr)
    t0 = time.time()
    params = train(spec, data.batch, steps=a.steps, learning_rate=a.learning_rate, batch_size=a.batch_size, seed=a.seed)
    spec.save_params(a.out, params)
    loss = float(spec.batch_loss(params, data.batch))
    print(f"trained {spec.name} on {data.n} examples ({len(data.bad)} bad) in {time.time() - t0:.1f}s: "
          f"objective {loss:.4f}; fingerprint {fingerprint(spec, params)} → {a.out}")
    return 0


def _cmd_eigensystem(a: argparse.Namespace) -> int:
    from beam_influence.data import sample_examples
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
    from beam_influence.core.model_spec import check_spec, load_spec

    spec = load_spec(a.spec, **spec_kwargs(a.spec_arg))
    params = spec.load_params(a.checkpoint)
    if a.fixed_batch and a.fresh_batches:
        raise ValueError("--fixed-batch and --fresh-batches contradict each other (a fixed sample is the default)")
    optional = {k: v for k, v in (("sample_size", a.sample_size), ("micro_batch", a.micro_batch),
                                  ("num_iters", a.num_iters), ("top_k", a.top_k)) if v is not None}
    args = EigensystemArgs(batch_size=a.batch_size, fresh_batches=a.fresh_batches, curvature=a.curvature,
                           negative=a.negative,
                           damping=a.damping, residuals=not a.no_residuals, seed=a.seed,
                           basis=a.basis, basis_path=a.basis_path or "", devices=a.devices, **optional)
    t0 = time.time()
    data = sample_examples(spec, a.train_data, size=args.sample_size, seed=args.seed)
    st = data.stats
    print(f"read {st['records_read']} records from {st['files']} file(s) in {time.time() - t0:.1f}s: "
          f"{data.n} sampled (size {args.sample_size}, seed {args.seed}), {len(data.bad)} rejected")
    if data.bad:
        print(f"warning: {len(data.bad)} training records could not be decoded and are not used "
              f"(first: {data.bad[0]})", file=sys.stderr)
    check_spec(spec, params, {k: v[0] for k, v in data.batch.items()})  # scalar, finite loss; grad like params
    sample_info = {"sample_seed": args.seed, "sample_records_read": st["records_read"],
                   "sample_records_rejected": len(data.bad), "sample_pattern": a.train_data}
    t0 = time.time()
    es = compute_eigensystem(spec, params, data.batch, args, progress=True, sample_info=sample_info)
    es.save(a.out)
    print(es.summary())
    print(f"computed in {time.time() - t0:.1f}s from a sample of {data.n} examples → {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beam-influence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("digits-data", help="write scikit-learn digits as record shards")
    p.add_argument("--out", required=True)
    p.add_argument("--formats", nargs="+", default=["parquet"], choices=["parquet", "jsonl", "npz", "tfrecord"])
    p.add_argument("--num-shards", type=int, default=4)
    p.add_argument("--label-noise", type=float, default=0.1, help="fraction of training labels flipped (ids recorded)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_digits_data)

    p = sub.add_parser("train", help="train a model spec on record shards")
    add_spec_args(p, checkpoint=False)
    p.add_argument("--train-data", required=True, help="file pattern of training shards")
    p.add_argument("--out", required=True, help="checkpoint path: msgpack; *.safetensors; an orbax directory when it "
                                               "ends in / or .orbax")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=None, help="default: full batch")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("eigensystem", help="Arnoldi → top-k eigensystem of the loss curvature")
    add_spec_args(p)
    p.add_argument("--train-data", required=True, help="file pattern of training shards")
    p.add_argument("--out", required=True, help="eigensystem file (.safetensors)")
    p.add_argument("--num-iters", type=int, default=None, help="Arnoldi steps n (default 150; docs/quality.md)")
    p.add_argument("--top-k", type=int, default=None, help="Ritz pairs kept k (default 50)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per curvature product (default: the whole fixed sample; 512 with --fresh-batches)")
    p.add_argument("--fresh-batches", action="store_true",
                   help="a fresh batch per product (the reference code's choice): cheaper products, but an "
                        "inconsistent operator (Ritz values off by a few %%, spurious negatives; docs/quality.md)")
    p.add_argument("--fixed-batch", action="store_true", help="one fixed sample for all products (the default now)")
    p.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian")
    p.add_argument("--negative", choices=["abs", "drop", "keep"], default="abs",
                   help="treatment of negative Ritz values in 1/λ")
    p.add_argument("--damping", type=float, default=0.0, help="δ added to λ")
    p.add_argument("--no-residuals", action="store_true", help="skip ‖Hu − λu‖ (saves k products)")
    p.add_argument("--sample-size", "--max-examples", dest="sample_size", type=int, default=None,
                   help="the fixed, seeded sample of the training set whose curvature is taken (streamed; "
                        "default 8192; --max-examples is an alias)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="examples per compiled curvature step; each product accumulates ⌈batch/micro⌉ steps "
                        "(default 256; the device-memory knob)")
    p.add_argument("--basis", choices=["auto", "device", "host", "mmap"], default="auto",
                   help="where the Krylov basis ((n+1)·p floats) lives: device = Gram-Schmidt on the accelerator; "
                        "auto = device when it fits beside the model, else host (mmap with --basis-path); "
                        "docs/accelerators.md")
    p.add_argument("--basis-path", default=None, help="the .npy file of a memory-mapped basis (--basis mmap/auto)")
    p.add_argument("--devices", type=int, default=0,
                   help="local devices the curvature product is data-parallel over (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_eigensystem)

    from beam_influence.audit.cli import register as register_audit
    from beam_influence.evaluation.cli import register as register_evaluate
    from beam_influence.report.cli import register as register_report

    register_report(sub)
    register_audit(sub)
    register_evaluate(sub)
    try:
        from pipelines import register_cli
    except ImportError:  # pipelines not installed: the one-host commands still work
        register_cli = None
    if register_cli is not None:
        register_cli(sub)
    return parser


class _QuietBeamImports(logging.Filter):
    """Hide Beam's import-time note about optional GCP client libraries (not an error here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger().addFilter(_QuietBeamImports())
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "accepts_beam_args", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.beam_args = rest
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        if os.environ.get("BEAM_INFLUENCE_DEBUG"):
            raise
        print(f"beam-influence {args.command}: error: {e}\n(set BEAM_INFLUENCE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
