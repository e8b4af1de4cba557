"""Known third-party log noise, silenced where it is emitted: one filter per message, on the logger that emits it.

Every command printed the same lines that say nothing about the user's job. Each is matched by its exact text (and,
where the text carries data, only when that data is the known harmless case); every other record of these loggers,
and every other logger, is untouched:

- ``apitools not found, and bigquery client libraries are not available …`` — the root logger, once per process,
  while ``import apache_beam`` imports its BigQuery client without the optional ``apitools`` (GCP extra). Beam
  does not use BigQuery here. Installed before ``apache_beam`` is first imported, the filter catches it.
- ``Resource module is not available for current platform, memory usage cannot be fetched.`` — the root logger,
  from RunInference at every model load. On Linux it is false: Beam's ``ml.inference.base`` imports the stdlib
  ``resource`` together with its torch-only ``model_manager`` and drops both when torch is missing. Filtered only
  where ``resource`` imports (where the message is wrong); on a platform without it the message stays.
- ``Discarding unparseable args: [...]`` — ``apache_beam.options.pipeline_options``, in every process that rebuilds
  the options (launcher and each worker): ``PipelineOptions.from_dictionary`` turns a true ``store_false`` option
  (``pipeline_type_check``, ``direct_runner_use_stacked_bundle``) into a flag no parser knows. Filtered only when
  every discarded arg is such a Beam-internal ``--<dest>``; an unknown flag of the user's is still reported.
- The same messages relayed from local Beam workers by the job service's log server
  (``apache_beam.runners.portability.local_job_service``, ``Worker: …``), by the same tests.

Orbax's ``Metadata file does not exist: …/_CHECKPOINT_METADATA`` needs no filter: ``core.checkpoints`` no longer
asks orbax for step metadata of an item folder (its cause).

``quiet_known_noise()`` installs the filters (idempotent); call it first thing in every entry point, before
``apache_beam`` is imported. What a separate worker process prints on its own stderr while it boots (before
any of our code is loaded there: its ``apitools`` line and its ``Discarding unparseable args`` line) is out of
its reach; the launcher's copy of the worker's messages is filtered.
"""
from __future__ import annotations

import argparse
import functools
import logging
import re

APITOOLS = "apitools not found, and bigquery client libraries are not available"
RESOURCE = "Resource module is not available for current platform, memory usage cannot be fetched."
DISCARDING = "Discarding unparseable args: "

OPTIONS_LOGGER = "apache_beam.options.pipeline_options"
JOB_SERVICE_LOGGER = "apache_beam.runners.portability.local_job_service"

_FLAG = re.compile(r"--[A-Za-z0-9_\-]+(?:=[^'\"\],\s]*)?")


@functools.lru_cache(maxsize=None)
def _resource_available() -> bool:
    try:
        import resource  # noqa: F401 - the stdlib module Beam's message says is missing
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def beam_store_false_dests() -> frozenset[str]:
    """The ``dest`` of every ``store_false`` option Beam's ``PipelineOptions`` subclasses declare (``--no_x`` →
    ``x``): the names ``from_dictionary`` wrongly turns into ``--x`` when their value is true."""
    from apache_beam.options import pipeline_options as po

    dests: set[str] = set()
    seen: set[type] = set()
    stack = list(po.PipelineOptions.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        parser = po._BeamArgumentParser(allow_abbrev=False)  # noqa: SLF001 - Beam's own parser class
        try:
            cls._add_argparse_args(parser)  # noqa: SLF001 - Beam's documented extension hook
        except Exception:  # noqa: BLE001 - a user subclass that cannot be registered alone: not Beam's
            continue
        dests.update(a.dest for a in parser._actions if isinstance(a, argparse._StoreFalseAction))  # noqa: SLF001
    return frozenset(dests)


def _only_beam_internal(args) -> bool:
    """True when ``args`` (the discarded flags) are all ``--<dest>`` of Beam's own ``store_false`` options."""
    flags = [str(a) for a in args] if isinstance(args, (list, tuple)) else _FLAG.findall(str(args))
    if not flags:
        return False
    try:
        known = beam_store_false_dests()
    except ImportError:  # pragma: no cover - the record came from Beam, so Beam imports
        return False
    return all(f.startswith("--") and "=" not in f and f[2:] in known for f in flags)


def is_known_noise(record: logging.LogRecord) -> bool:
    """Whether ``record`` is one of the known noisy messages (see the module docstring)."""
    if record.name == "root":
        msg = record.getMessage()
        return msg.startswith(APITOOLS) or (msg == RESOURCE and _resource_available())
    if record.name == OPTIONS_LOGGER:
        return (isinstance(record.msg, str) and record.msg.startswith(DISCARDING) and len(record.args or ()) == 1
                and _only_beam_internal(record.args[0]))
    if record.name == JOB_SERVICE_LOGGER and isinstance(record.msg, str) and record.msg.startswith("Worker: "):
        msg = record.getMessage()
        if APITOOLS in msg or (RESOURCE in msg and _resource_available()):
            return True
        at = msg.find(DISCARDING)
        if at >= 0:
            end = msg.find("]", at)
            return end > at and _only_beam_internal(msg[at + len(DISCARDING):end + 1])
    return False


class KnownNoiseFilter(logging.Filter):
    """Drops the known noisy records of the logger it is attached to; passes every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_known_noise(record)


_LOGGERS = ("", OPTIONS_LOGGER, JOB_SERVICE_LOGGER)  # "": the root logger (``logging.warning``)


def quiet_known_noise() -> None:
    """Attach ``KnownNoiseFilter`` to the loggers that emit the known noise (once per process; safe to repeat).
    Logger filters see only the records logged on that logger itself, so nothing else is affected."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, KnownNoiseFilter) for f in logger.filters):
            logger.addFilter(KnownNoiseFilter())


__all__ = ["KnownNoiseFilter", "beam_store_false_dests", "is_known_noise", "quiet_known_noise"]
