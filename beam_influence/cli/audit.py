"""``beam-influence audit --config <file>``: the recurring audit (``pipelines.audit``) as a subcommand.

Flags after the config (``--runner=...``, ``--project=...``) go to Beam and override the config's
``beam_args``. The exit status is 0, 3 (``ALERT_EXIT_CODE``) when a configured threshold was crossed
or an input shard is unreadable, 2 when the run could not start (bad config or run id, an input
pattern that matches nothing, another run holding the lock), 1 when it failed.
"""
from __future__ import annotations

from typing import Sequence

from beam_influence.options import AuditOptions


def run_audit(o: AuditOptions, beam_args: Sequence[str]) -> int:
    from pipelines import audit

    return audit.main_options(o, list(beam_args))
