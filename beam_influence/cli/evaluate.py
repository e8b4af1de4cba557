"""``beam-influence evaluate``: attribution quality of every method on one model (``beam_influence.evaluation.run``).

Unknown flags are Beam pipeline options of the retraining job (default FnApiRunner).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import ClassVar, Sequence

from beam_influence.evaluation.run import EvalArgs
from beam_influence.options import CompilationOptions, OutputOptions, option


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateCommandOptions(EvalArgs, OutputOptions, CompilationOptions):
    """``beam-influence evaluate``: LDS, mislabel AUC and agreement with exact influence for each method (the
    evaluation's arguments, plus where the results go)."""

    required: ClassVar = ("spec", "output")
    help_overrides: ClassVar = {"output": "results JSON"}
    retrain_cache: str = option(".cache/lds", help="directory caching retraining targets ('' = off)")
    markdown: str | None = option(None, help="markdown table (none: <output without .json>.md)")
    overwrite: bool = option(False, help="replace --output even if it holds results of other arguments")
    progress: bool = option(True, help="no progress bars")

    def eval_args(self) -> EvalArgs:
        """The evaluation's own arguments (what the result records and compares)."""
        names = {f.name for f in dataclasses.fields(EvalArgs)}
        return EvalArgs(**{k: v for k, v in self.as_dict().items() if k in names})


def run_evaluate(o: EvaluateCommandOptions, beam_args: Sequence[str]) -> int:
    from beam_influence.cli.runtime import apply_compilation_options
    from beam_influence.evaluation.run import evaluate, format_table, markdown
    from beam_influence.util import exists, read_json, write_json, write_text

    a = o.eval_args()
    apply_compilation_options(o)
    recorded = json.loads(json.dumps(dataclasses.asdict(a)))
    if exists(o.output) and not o.overwrite:
        old = read_json(o.output).get("args")
        if old != recorded:
            raise ValueError(f"{o.output} holds results computed with other arguments; pass --overwrite to "
                             "replace it")
    log = (lambda *x: print(*x, file=sys.stderr, flush=True))
    result = evaluate(a, pipeline_args=list(beam_args) or None, retrain_cache=o.retrain_cache or None,
                      progress=o.progress, log=log)
    command = "beam-influence " + " ".join(sys.argv[1:]) if sys.argv and "evaluate" in sys.argv else None
    result["command"] = command
    write_json(o.output, result, sort_keys=False, default=float)  # atomic; creates the folder
    md_path = o.markdown or (o.output[:-5] if o.output.endswith(".json") else o.output) + ".md"
    write_text(md_path, markdown(result, command=command))
    print(format_table(result))
    print(f"→ {o.output}, {md_path}")
    return 0
