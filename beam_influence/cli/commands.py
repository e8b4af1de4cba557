"""The one-host subcommands: ``digits-data``, ``train``, ``eigensystem`` (their options: ``beam_influence.options``)."""
from __future__ import annotations

import json
import sys
import time

from beam_influence.cli.flags import spec_kwargs
from beam_influence.cli.runtime import apply_compilation_options, phase
from beam_influence.options import DigitsDataOptions, EigensystemOptions, TrainOptions


def digits_data(o: DigitsDataOptions) -> int:
    from beam_influence.formats.convert import convert_digits

    patterns = convert_digits(o.output, formats=list(o.formats), num_shards=o.num_shards, label_noise=o.label_noise,
                              seed=o.seed)
    print(json.dumps(patterns, indent=2))
    return 0


def load_spec_of(o):
    """The ModelSpec named by ``--spec``/``--spec_arg``, with a line while its code is imported."""
    from beam_influence.core.model_spec import load_spec

    with phase(f"loading the model spec {o.spec}"):
        return load_spec(o.spec, **spec_kwargs(o.spec_arg))


def train(o: TrainOptions) -> int:
    from beam_influence.core.model_spec import fingerprint
    from beam_influence.data import load_examples
    from beam_influence.train import train as train_spec

    apply_compilation_options(o)
    spec = load_spec_of(o)
    with phase(f"reading {o.train_data}"):
        data = load_examples(spec, o.train_data)
    if data.bad:
        print(f"warning: {len(data.bad)} of {data.n + len(data.bad)} training records could not be decoded and "
              f"are not used (first: {data.bad[0]})", file=sys.stderr)
    t0 = time.time()
    with phase(f"training {spec.name} for {o.steps} steps (the first step compiles)"):
        params = train_spec(spec, data.batch, steps=o.steps, learning_rate=o.learning_rate,
                            batch_size=o.train_batch_size, seed=o.seed)
    spec.save_params(o.output, params)
    loss = float(spec.batch_loss(params, data.batch))
    print(f"trained {spec.name} on {data.n} examples ({len(data.bad)} bad) in {time.time() - t0:.1f}s: "
          f"objective {loss:.4f}; fingerprint {fingerprint(spec, params)} → {o.output}")
    return 0


def eigensystem(o: EigensystemOptions) -> int:
    import jax

    from beam_influence.core.estimate import compute_eigensystem
    from beam_influence.core.model_spec import check_spec
    from beam_influence.data import sample_examples

    apply_compilation_options(o)
    args = o.eigensystem_args()
    spec = load_spec_of(o)
    with phase(f"loading the checkpoint {o.checkpoint}"):
        # θ once: moved to the device the curvature operator uses (on the CPU backend device_put copies, so the
        # host arrays are dropped here rather than held beside the operator's copy: one p-sized buffer fewer)
        params = jax.device_put(spec.load_params(o.checkpoint))
    t0 = time.time()
    with phase(f"sampling {args.sample_size} training examples (seed {args.seed}) from {o.train_data}"):
        data = sample_examples(spec, o.train_data, size=args.sample_size, seed=args.seed, format=o.data_format)
    st = data.stats
    print(f"read {st['records_read']} records from {st['files']} file(s) in {time.time() - t0:.1f}s: "
          f"{data.n} sampled, {len(data.bad)} rejected")
    if data.bad:
        print(f"warning: {len(data.bad)} training records could not be decoded and are not used "
              f"(first: {data.bad[0]})", file=sys.stderr)
    with phase("checking the spec on one example (compiles the loss and its gradient)"):
        check_spec(spec, params, {k: v[0] for k, v in data.batch.items()})  # scalar, finite loss; grad like params
    sample_info = {"sample_seed": args.seed, "sample_records_read": st["records_read"],
                   "sample_records_rejected": len(data.bad), "sample_pattern": o.train_data}
    t0 = time.time()
    es = compute_eigensystem(spec, params, data.batch, args, progress=True, sample_info=sample_info)
    if o.kfac:
        from beam_influence.api import fit_eigensystem_kfac
        from beam_influence.core.kfac import fixed_sample

        # the rows the operator used: compute_eigensystem's own subsample of data.batch (all of it when it
        # holds at most sample_size rows, as sample_examples gives)
        sample = fixed_sample(data.batch, args.sample_size, args.seed)
        with phase(f"fitting the K-FAC curvature on the same {len(next(iter(sample.values())))} examples"):
            es = fit_eigensystem_kfac(spec, params, sample, es)
        print(f"K-FAC curvature ({es.args['kfac']['fisher']} Fisher, EK-FAC) fitted in "
              f"{es.args['kfac_fit_s']:.1f}s; its factors are saved with the eigensystem")
    es.save(o.output)
    print(es.summary())
    print(f"computed in {time.time() - t0:.1f}s from a sample of {data.n} examples → {o.output}")
    return 0
