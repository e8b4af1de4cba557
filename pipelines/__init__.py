"""Runnable jobs: parse options → compose beam_influence transforms → run.

``python -m pipelines.<job>`` or ``beam-influence <job>`` (index, query, self-influence, run).
"""

JOBS = {"index": "pipelines.index", "query": "pipelines.query", "self-influence": "pipelines.self_influence",
        "run": "pipelines.fused"}


def register_cli(sub) -> None:
    """Add the pipeline subcommands to the ``beam-influence`` CLI (all flags go to the job)."""
    import importlib

    for name, module in JOBS.items():
        doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, add_help=False, description=doc)
        p.set_defaults(fn=lambda a, module=module: (importlib.import_module(module).run(a.beam_args), 0)[1],
                       accepts_beam_args=True)
