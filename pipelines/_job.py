"""The few lines every job shares: parse options, run, wait, write a summary (I/O at the edge)."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_influence.beam.options import InfluenceOptions
from beam_influence.util import count_lines, write_json  # noqa: F401 - the jobs import them from here

LOCAL_DEFAULT = ["--runner=FnApiRunner"]  # the DirectRunner would first try to download Prism


def print_help(doc: str | None) -> None:
    """Help for a job: its docstring, its own flags, and a pointer to Beam's runner flags."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Plus any Beam pipeline option: --runner, --direct_running_mode, "
                                            "--direct_num_workers, --flink_master, --project, ...")
    InfluenceOptions._add_argparse_args(parser)  # noqa: SLF001 - Beam's documented extension hook
    parser.print_help()


def parse(argv: Sequence[str] | None, doc: str | None = None) -> tuple[PipelineOptions, InfluenceOptions]:
    argv = list(argv or [])
    if "-h" in argv or "--help" in argv:
        print_help(doc)
        raise SystemExit(0)
    if not any(a.startswith("--runner") for a in argv):
        argv = LOCAL_DEFAULT + argv
    unknown = unknown_flags(argv)
    if unknown:
        raise ValueError(f"unknown option(s) {' '.join(unknown)}: neither a beam-influence flag nor a Beam pipeline "
                         "option (see --help); refusing to run with it ignored")
    options = PipelineOptions(argv)
    return options, options.view_as(InfluenceOptions)


def unknown_flags(argv: Sequence[str]) -> list[str]:
    """The ``--flags`` of ``argv`` that no ``PipelineOptions`` subclass defines (Beam would drop them with a
    log line, and the job would run with defaults)."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser  # the parser Beam itself uses

    parser = _BeamArgumentParser(allow_abbrev=False)
    classes = {}
    for cls in PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)  # noqa: SLF001 - Beam's documented extension hook
    _, rest = parser.parse_known_args(list(argv))
    return [a.split("=", 1)[0] for a in rest if a.startswith("--")]


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


def execute(options: PipelineOptions, build: Callable[[beam.Pipeline], None],
            test_pipeline: beam.Pipeline | None = None) -> tuple[dict, float]:
    """Build the pipeline with ``build(p)``, run it to completion; returns (counters, seconds)."""
    t0 = time.time()
    p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=options)
    build(p)
    result = p.run()
    result.wait_until_finish()
    return counters(result), time.time() - t0


def expect_rows(job: str, rows: int, path: str, query_dead: int, train_dead: int | None = None) -> None:
    """An empty result where input was expected is an error, never a success."""
    if rows == 0:
        extra = f", {train_dead} training records dead-lettered" if train_dead is not None else ""
        raise RuntimeError(f"{job}: no top-k rows were produced ({path}); {query_dead} queries dead-lettered{extra}. "
                           "Check the dead-letter files beside it.")
