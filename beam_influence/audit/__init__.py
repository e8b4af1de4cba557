"""The recurring data audit: incremental indexing per input shard, suspects + standing queries, diff, alerts.

The job itself is ``pipelines.audit`` (``beam-influence audit --config audit.json``); this package holds
its configuration (``AuditConfig``), durable state (``IndexState``: which shards are indexed under which
eigensystem), the run lock, lost-input accounting, the run-to-run diff and the report. See docs/audit.md.
"""
from beam_influence.audit.config import (AuditConfig, AuditConfigError, AuditInputError, AuditUsageError, Thresholds,
                                         check_run_id, config_from_dict, load_config)
from beam_influence.audit.diff import diff_suspects, diff_topk
from beam_influence.audit.lock import AuditLock, AuditLockedError
from beam_influence.audit.report import ALERT_EXIT_CODE, UNREADABLE_SHARDS, evaluate_thresholds, md_text

__all__ = ["ALERT_EXIT_CODE", "AuditConfig", "AuditConfigError", "AuditInputError", "AuditLock", "AuditLockedError",
           "AuditUsageError", "Thresholds", "UNREADABLE_SHARDS", "check_run_id", "config_from_dict", "diff_suspects",
           "diff_topk", "evaluate_thresholds", "load_config", "md_text"]
