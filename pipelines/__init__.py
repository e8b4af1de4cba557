"""Runnable jobs: parse options → compose beam_influence transforms → run.

``python -m pipelines.<job>`` or ``beam-influence <job>`` (index, query, self-influence, run); each job's
flags are generated from its options dataclass (``beam_influence.options``) and it has ``run(argv)`` and
``run_options(options, beam_args)``.
"""

JOBS = {"index": "pipelines.index", "query": "pipelines.query", "self-influence": "pipelines.self_influence",
        "run": "pipelines.fused"}

from beam_influence.logs import quiet_known_noise  # noqa: E402

quiet_known_noise()  # before a job module imports apache_beam (its 'apitools not found' line is logged at import)
