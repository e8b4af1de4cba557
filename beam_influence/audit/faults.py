"""Fault injection for the audit's crash tests: named points where a run can be killed on purpose.

Inactive unless an environment variable names a point (``tests/test_audit_faults.py`` sets them)::

    BEAM_INFLUENCE_AUDIT_TEST_KILL=after_publish      # SIGKILL this process the 1st time the point is reached
    BEAM_INFLUENCE_AUDIT_TEST_KILL=after_publish:2    # ... the 2nd time
    BEAM_INFLUENCE_AUDIT_TEST_CRASH=before_report     # raise SimulatedCrash instead (in-process tests)

Points, in the order a run reaches them: ``before_publish`` (an index job has finished, its output is
not published), ``after_publish`` (a shard's manifest is published, its ``_COMPLETED`` marker is not
written), ``after_marker`` (marker written, ``audit_manifest.json`` not updated), ``after_index_job``
(one index job fully recorded), ``during_refresh`` (inside the refresh Beam job), ``before_report``
(results written, no report), ``before_state`` (report written, ``state.json`` not updated).
"""
from __future__ import annotations

import collections
import os
import signal
import sys

KILL_ENV = "BEAM_INFLUENCE_AUDIT_TEST_KILL"
CRASH_ENV = "BEAM_INFLUENCE_AUDIT_TEST_CRASH"
POINTS = ("before_publish", "after_publish", "after_marker", "after_index_job", "during_refresh", "before_report",
          "before_state")

_reached: collections.Counter = collections.Counter()


class SimulatedCrash(RuntimeError):
    """Raised at a fault point named by ``BEAM_INFLUENCE_AUDIT_TEST_CRASH``."""


def _wanted(env: str, name: str) -> int | None:
    spec = os.environ.get(env, "")
    point, _, nth = spec.partition(":")
    if point != name:
        return None
    return int(nth) if nth else 1


def armed(name: str) -> bool:
    """Whether a fault is requested at ``name`` (used to add the in-job fault step only when asked)."""
    return _wanted(KILL_ENV, name) is not None or _wanted(CRASH_ENV, name) is not None


def point(name: str) -> None:
    """A fault point: kills the process (SIGKILL) or raises ``SimulatedCrash`` when the env asks for it."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {POINTS}")
    kill, crash = _wanted(KILL_ENV, name), _wanted(CRASH_ENV, name)
    if kill is None and crash is None:
        return
    _reached[name] += 1
    if kill is not None and _reached[name] == kill:
        print(f"audit: test fault: SIGKILL at {name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if crash is not None and _reached[name] == crash:
        raise SimulatedCrash(f"simulated crash at {name}")


def reset() -> None:
    """Forget how often each point was reached (tests running several audits in one process)."""
    _reached.clear()
