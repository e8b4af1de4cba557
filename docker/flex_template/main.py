"""Dataflow Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE of docker/flex_template/Dockerfile.flex).

    --job index|query|self-influence|run   which beam-influence job (default: index); every other flag
                                            goes to that job (``pipelines.<job>.run``) and to Beam.

The Flex Template launcher builds the pipeline graph with this file and submits it to Dataflow; the
jobs wait for their Dataflow job to finish because they write the index manifest / summary afterwards.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pipelines import JOBS


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="index", choices=sorted(JOBS))
    known, rest = parser.parse_known_args(argv)
    if not any(a.startswith("--runner") for a in rest):
        rest = ["--runner=DataflowRunner", *rest]  # a Flex Template always runs on Dataflow
    importlib.import_module(JOBS[known.job]).run(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
