"""The ``beam-influence`` command line: one subcommand per job, each parser generated from the job's options
dataclass (``beam_influence.options``), so every flag has one spelling and one name across subcommands.

Subcommands:
  digits-data   write scikit-learn's digits (train/test, optional label noise) as record shards
  train         train a ModelSpec on record shards (optax Adam) and write a checkpoint
  eigensystem   Arnoldi on the training-loss curvature → eigensystem file (+ spectrum summary)
  index | query | self-influence | run   the Beam pipelines (``pipelines/``); other flags go to Beam
  report        build the HTML report from result files
  audit         the recurring data audit (only new shards, diff against the previous run, alerts)
  evaluate      attribution quality: LDS, mislabel AUC, agreement with exact influence, baselines

Exit status: 0 done, 2 a user error (one line on stderr; BEAM_INFLUENCE_DEBUG=1 shows the traceback),
3 an audit alert, 1 anything else.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from beam_influence.logs import quiet_known_noise

quiet_known_noise()  # before anything imports apache_beam (its 'apitools not found' line is logged at import)

from beam_influence.cli import flags  # noqa: E402
from beam_influence.cli.runtime import UserError, prepare_process  # noqa: E402

BEAM_EPILOG = ("Any other --flag is a Beam pipeline option (--runner, --direct_running_mode, --direct_num_workers, "
               "--flink_master, --project, …) and goes to Beam untouched; without --runner the job runs in "
               "process (FnApiRunner).")


class Command:
    """A subcommand: its options dataclass, what it does with them, and whether Beam flags pass through."""

    def __init__(self, name: str, options, fn: Callable, *, help: str, beam: bool = False,  # noqa: A002
                 description: str | None = None):
        self.name, self.options, self.fn, self.help, self.beam = name, options, fn, help, beam
        self.description = description or (options.__doc__ or help)


def all_commands() -> list[Command]:
    """Every subcommand (imports stay light until one runs)."""
    from beam_influence import options as o
    import beam_influence.cli.commands as c
    from beam_influence.cli.audit import run_audit
    from beam_influence.cli.evaluate import EvaluateCommandOptions, run_evaluate
    from beam_influence.cli.report import run_report

    def job(module: str):
        def run(opts, beam_args):
            import importlib

            return importlib.import_module(module).run_options(opts, beam_args)
        return run

    return [
        Command("digits-data", o.DigitsDataOptions, c.digits_data, help="write scikit-learn digits as record shards"),
        Command("train", o.TrainOptions, c.train, help="train a model spec on record shards"),
        Command("eigensystem", o.EigensystemOptions, c.eigensystem,
                help="Arnoldi → top-k eigensystem of the loss curvature"),
        Command("index", o.IndexOptions, job("pipelines.index"), beam=True,
                help="Beam: training records → projected gradients → influence index"),
        Command("query", o.QueryOptions, job("pipelines.query"), beam=True,
                help="Beam: test records × index → top-k proponents/opponents"),
        Command("self-influence", o.SelfInfluenceOptions, job("pipelines.self_influence"), beam=True,
                help="Beam: top-N training examples by self-influence, from the index"),
        Command("run", o.FusedOptions, job("pipelines.fused"), beam=True,
                help="Beam: index + query + self-influence in one pass, no index written"),
        Command("report", o.ReportOptions, run_report, help="static HTML report from index/query/audit files"),
        Command("audit", o.AuditOptions, run_audit, beam=True,
                help="recurring audit: index new shards, refresh suspects and standing queries, report + diff; "
                     "exit 3 on a crossed threshold"),
        Command("evaluate", EvaluateCommandOptions, run_evaluate, beam=True,
                help="attribution quality: LDS, mislabel AUC, agreement with exact, per method"),
    ]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(prog="beam-influence", description=__doc__,
                                     formatter_class=flags.HelpFormatter, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    table = {}
    for cmd in all_commands():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description,
                           epilog=BEAM_EPILOG if cmd.beam else None, formatter_class=flags.HelpFormatter,
                           allow_abbrev=False)
        flags.add_arguments(p, cmd.options)
        table[cmd.name] = cmd
    return parser, table


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prepare_process()
    parser, table = build_parser()
    ns, rest = parser.parse_known_args(argv)
    cmd = table[ns.command]
    try:
        if rest:
            flags.check_rest(cmd.options, rest, beam=cmd.beam)
        opts = flags.from_namespace(cmd.options, ns)
        status = cmd.fn(opts, rest) if cmd.beam else cmd.fn(opts)
        return status if isinstance(status, int) else 0  # the Beam jobs return their summary
    except UserError.catch as e:
        if os.environ.get("BEAM_INFLUENCE_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"beam-influence {cmd.name}: error: {message}", file=sys.stderr)  # one line (the docstring says
        # how to get the traceback: BEAM_INFLUENCE_DEBUG=1)
        return 2


if __name__ == "__main__":
    sys.exit(main())
