"""``beam-influence audit --config <file>``: the recurring audit as a CLI subcommand.

Register it in ``beam_influence/cli.py``'s ``build_parser``::

    from beam_influence.audit.cli import register as register_audit; register_audit(sub)

Flags after the config (``--runner=...``, ``--project=...``) go to Beam and override the config's
``beam_args``. The exit status is 0, 3 (``ALERT_EXIT_CODE``) when a configured threshold was crossed
or an input shard is unreadable, 2 when the run could not start (bad config or run id, an input
pattern that matches nothing, another run holding the lock), 1 when it failed.
"""
from __future__ import annotations

import argparse


def _cmd_audit(a: argparse.Namespace) -> int:
    from pipelines import audit

    argv = ["--config", a.config] + (["--run_id", a.run_id] if a.run_id is not None else []) + list(a.beam_args or [])
    return audit.main(argv)


def register(sub) -> argparse.ArgumentParser:
    """Add the ``audit`` subcommand to an ``add_subparsers()`` object; returns its parser."""
    p = sub.add_parser("audit", help="recurring audit: index new shards, refresh suspects and standing queries, "
                                     "report + diff; exit 3 on a crossed threshold",
                       description=(__doc__ or "").strip().splitlines()[0])
    p.add_argument("--config", required=True, help="audit config (JSON, or YAML with .yaml/.yml)")
    p.add_argument("--run-id", "--run_id", dest="run_id", default=None, help="run folder name, [A-Za-z0-9._-]+ (default: UTC timestamp)")
    p.set_defaults(fn=_cmd_audit, accepts_beam_args=True)
    return p
