"""Arguments shared by the ``beam-influence`` subcommands (``beam_influence.cli`` and the subcommand
modules that register themselves into it, e.g. ``beam_influence.evaluation.cli``).

Standard library only, and no import of ``beam_influence.cli``: the subcommand modules import this one,
so they never import the command line that imports them.
"""
from __future__ import annotations

import argparse
import json
from typing import Sequence


def spec_kwargs(items: Sequence[str] | None) -> dict:
    """Parse ``--spec-arg key=value`` pairs; values are JSON when they parse, strings otherwise."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--spec-arg expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_spec_args(p: argparse.ArgumentParser, *, checkpoint: bool = True) -> None:
    """``--spec`` and ``--spec-arg`` (and ``--checkpoint`` unless ``checkpoint=False``)."""
    p.add_argument("--spec", required=True, help="model spec import path, e.g. beam_influence.models.digits:cnn")
    p.add_argument("--spec-arg", action="append", metavar="KEY=VALUE", help="keyword argument for the spec factory")
    if checkpoint:
        p.add_argument("--checkpoint", required=True,
                       help="params: an orbax checkpoint directory, a .safetensors file, or msgpack (bare params, "
                            "{'params': …} or a TrainState); a suffix #key/path selects the params subtree "
                            "(default: found automatically)")


__all__ = ["add_spec_args", "spec_kwargs"]
