"""The few lines every job shares: parse options, run, wait, write a summary (I/O at the edge)."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence, TypeVar

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_influence.cli import flags
from beam_influence.cli.runtime import apply_compilation_options, phase, prepare_process
from beam_influence.util import count_lines, write_json  # noqa: F401 - the jobs import them from here

LOCAL_DEFAULT = ["--runner=FnApiRunner"]  # the DirectRunner would first try to download Prism
T = TypeVar("T")
BEAM_EPILOG = ("Plus any Beam pipeline option: --runner, --direct_running_mode, --direct_num_workers, "
               "--flink_master, --project, ... (without --runner: the in-process FnApiRunner)")


def parse(cls: type[T], argv: Sequence[str] | None, doc: str | None = None,
          prog: str | None = None) -> tuple[T, list[str]]:
    """The job's own flags (generated from its options dataclass ``cls``) and the rest, for Beam."""
    return flags.parse(cls, argv, prog=prog or "python -m pipelines.<job>", description=doc, allow_rest=True,
                       epilog=BEAM_EPILOG)


def pipeline_options(opts, beam_args: Sequence[str] | None) -> PipelineOptions:
    """Beam's options from the flags the job did not take (untouched; an unknown one is an error, never
    silently dropped); the in-process FnApiRunner unless ``--runner`` is given. Also prepares the process
    (known noise quieted, the compilation cache of ``opts``, inherited by local Beam workers)."""
    argv = list(beam_args or [])
    if argv:
        flags.check_rest(type(opts), argv, beam=True)
    if not any(a.startswith("--runner") for a in argv):
        argv = LOCAL_DEFAULT + argv
    prepare_process()
    apply_compilation_options(opts)
    return PipelineOptions(argv)


def main(run: Callable[[list[str]], object], argv: Sequence[str]) -> int:
    """``python -m pipelines.<job>``: run, and turn a user error into one line on stderr and exit status 2."""
    import os
    import sys

    from beam_influence.cli.runtime import UserError

    try:
        run(list(argv))
        return 0
    except UserError.catch as e:
        if os.environ.get("BEAM_INFLUENCE_DEBUG"):
            raise
        print(f"{run.__module__}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def counters(result) -> dict:
    """Counter values of a finished pipeline: totals by name, and ``by_step`` {"step/name": value}
    ({} where the runner reports none)."""
    try:
        res = result.metrics().query()
    except Exception:  # noqa: BLE001 - some runners do not report metrics
        return {}
    out: dict = {"by_step": {}}
    for c in res.get("counters", []):
        value = (c.committed if c.committed is not None else c.attempted) or 0
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + value
        step = f"{c.key.step}/{c.key.metric.name}"
        out["by_step"][step] = out["by_step"].get(step, 0) + value
    return out


LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")


def execute(options: PipelineOptions, build: Callable[[beam.Pipeline], None],
            test_pipeline: beam.Pipeline | None = None, *, progress: tuple[str, int | None] | None = None,
            ) -> tuple[dict, float]:
    """Build the pipeline with ``build(p)``, run it to completion; returns (counters, seconds).
    ``progress=(label, expected rows or None)``: on a local runner, a line every 10 s with the records
    finished, rows/s and an ETA (``beam_influence.beam.progress``)."""
    from beam_influence.beam.progress import ProgressReporter

    t0 = time.time()
    p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=options)
    build(p)
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    runner = runner if test_pipeline is None else "the test pipeline"
    local = progress is not None and (test_pipeline is not None or runner.rsplit(".", 1)[-1] in LOCAL_RUNNERS)
    reporter = ProgressReporter(*progress) if local else contextlib.nullcontext()
    with phase(f"running the Beam job on {runner} (workers load the model and compile once per shape)"), reporter:
        result = p.run()
        result.wait_until_finish()
    return counters(result), time.time() - t0


def another_pipeline(test_pipeline: beam.Pipeline | None) -> beam.Pipeline | None:
    """For a job's next stage: a fresh pipeline like ``test_pipeline`` (its runner and options), or None (then
    ``execute`` builds one from the job's options)."""
    if test_pipeline is None:
        return None
    return beam.Pipeline(runner=test_pipeline.runner, options=test_pipeline.options)


class EmptyResultError(ValueError):
    """A job produced nothing where input was expected (every input dead-lettered, or none matched)."""


def expect_rows(job: str, rows: int, path: str, query_dead: int, train_dead: int | None = None) -> None:
    """An empty result where input was expected is an error, never a success."""
    if rows == 0:
        extra = f", {train_dead} training records dead-lettered" if train_dead is not None else ""
        raise EmptyResultError(f"{job}: no top-k rows were produced ({path}); {query_dead} queries dead-lettered{extra}. "
                           "Check the dead-letter files beside it.")
