"""``beam-influence report``: one static HTML page from the result files of the pipelines.

    beam-influence report --index_dir out/index --query_dir out/query --audit_dir out/audit \\
        --eigensystem eig.safetensors --data_meta data/digits_meta.json --output report.html
"""
from __future__ import annotations

import json

from beam_influence.options import ReportOptions


def report_inputs(o: ReportOptions):
    """The report's inputs from its options (model and data default to what the index manifest names)."""
    from beam_influence.cli.flags import spec_kwargs
    from beam_influence.report.results import ReportInputs

    return ReportInputs(index_dir=o.index_dir, query_dir=o.query_dir, audit_dir=o.audit_dir,
                        eigensystem=o.eigensystem, data_meta=o.data_meta, run_json=o.run_json,
                        train_data=o.train_data, test_data=o.test_data, spec=o.spec,
                        spec_args=json.dumps(spec_kwargs(o.spec_arg)) if o.spec_arg else None,
                        checkpoint=o.checkpoint, max_queries=o.max_queries, max_suspects=o.max_suspects,
                        image_key=o.image_key, label_key=o.label_key)


def run_report(o: ReportOptions) -> int:
    from beam_influence.report.html import build_report

    metrics = build_report(report_inputs(o), o.output)
    keys = ("auc", "recall_at_1", "recall_at_5", "recall_at_10", "recall_at_20", "n_index_rows", "dead_letters",
            "capture", "test_accuracy")
    print(json.dumps({k: metrics.get(k) for k in keys}, indent=1))
    print(f"report → {o.output}")
    return 0
