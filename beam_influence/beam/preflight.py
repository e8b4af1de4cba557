"""The launcher's pre-flight check of a Beam job: its options (``beam_influence.options``) are turned into a
``ModelRef``, and model + eigensystem are loaded and cross-checked once before any pipeline work starts."""
from __future__ import annotations

import json

from beam_influence.beam.resources import InfluenceContext, ModelRef
from beam_influence.cli.flags import spec_kwargs
from beam_influence.cli.runtime import phase
from beam_influence.core.model_spec import probe_example


def model_ref(opts) -> ModelRef:
    """The ModelRef named by a job's options (``ModelOptions`` + projection and sketch fields where the job
    has them); a clear error when a required option is missing."""
    missing = [f"--{n}" for n in ("spec", "checkpoint", "eigensystem") if not getattr(opts, n)]
    if missing:
        raise ValueError(f"missing required option(s) {', '.join(missing)}")
    return ModelRef(spec=opts.spec, checkpoint=opts.checkpoint, eigensystem=opts.eigensystem,
                    spec_args=json.dumps(spec_kwargs(opts.spec_arg), sort_keys=True),
                    method=getattr(opts, "projection_method", "auto"), micro_batch=getattr(opts, "micro_batch", None),
                    sketch_dim=int(getattr(opts, "sketch_dim", 0) or 0),
                    sketch_seed=int(getattr(opts, "sketch_seed", 0) or 0),
                    sketch_method=getattr(opts, "sketch_method", "count"),
                    compute_dtype=getattr(opts, "compute_dtype", None), devices=int(getattr(opts, "devices", 0) or 0))


def preflight(opts, *writes: str) -> tuple[ModelRef, InfluenceContext]:
    """Load model + eigensystem on the launcher and refuse a mismatch before any work; ``writes``: the
    options naming directories the job writes (checked writable now). The options dataclass has already
    validated every value and the required ones."""
    complement = getattr(opts, "complement", None)
    if complement is not None:
        from beam_influence.beam.complement_term import check_mode

        check_mode(complement, getattr(opts, "normalization", "none") if complement != "auto" else "none")
    ref = model_ref(opts)
    with phase(f"loading the model ({opts.spec}), its checkpoint and the eigensystem"):
        ctx = ref.load()  # plans the projection's memory first (core.memory): refused here when it cannot fit
    if ctx.memory_plan:
        print(ctx.memory_plan["line"], flush=True)
    from beam_influence.core.model_spec import check_spec

    with phase("checking the spec on a probe example (compiles the loss and its gradient)"):
        check_spec(ctx.spec, ctx.params, probe_example(ctx.spec))
    for name in writes:
        if getattr(opts, name):
            check_writable(getattr(opts, name), f"--{name}")
    return ref, ctx


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
