"""``beam-influence report``: one static HTML page from the result files of the pipelines.

    beam-influence report --index_dir out/index --query_dir out/query --audit_dir out/audit \
        --eigensystem eig.safetensors --data_meta data/digits_meta.json --out report.html
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index_dir", required=True, help="influence index directory (Parquet shards + manifest.json)")
    p.add_argument("--query_dir", help="output directory of `beam-influence query` (topk.jsonl, summary.json)")
    p.add_argument("--audit_dir", help="output directory of `beam-influence self-influence`")
    p.add_argument("--eigensystem", help="eigensystem file (default: the one named in the index manifest)")
    p.add_argument("--data_meta", help="data meta JSON (digits_meta.json: flipped ids, data patterns)")
    p.add_argument("--run_json", help="run.json of `python -m pipelines.demo` (stage timings), optional")
    p.add_argument("--train_data", help="training record pattern for images (default: from --data_meta/manifest)")
    p.add_argument("--test_data", help="test record pattern for images and predictions (default: from --data_meta)")
    p.add_argument("--spec", help="model spec for predicted labels (default: from the index manifest)")
    p.add_argument("--spec_args", help="JSON object of spec factory arguments (default: from the manifest)")
    p.add_argument("--checkpoint", help="checkpoint for predicted labels (default: from the index manifest)")
    p.add_argument("--max_queries", type=int, default=12, help="queries shown (first in id order)")
    p.add_argument("--max_suspects", type=int, default=30, help="self-influence suspects shown as images")
    p.add_argument("--image_key", default="x", help="record field drawn as an image")
    p.add_argument("--label_key", default="y", help="record field holding the label")
    p.add_argument("--out", required=True, help="the HTML file to write")


def inputs_from_args(a: argparse.Namespace):
    from beam_influence.report.results import ReportInputs

    return ReportInputs(index_dir=a.index_dir, query_dir=a.query_dir, audit_dir=a.audit_dir,
                        eigensystem=a.eigensystem, data_meta=a.data_meta, run_json=a.run_json,
                        train_data=a.train_data, test_data=a.test_data, spec=a.spec, spec_args=a.spec_args,
                        checkpoint=a.checkpoint, max_queries=a.max_queries, max_suspects=a.max_suspects,
                        image_key=a.image_key, label_key=a.label_key)


def _cmd_report(a: argparse.Namespace) -> int:
    from beam_influence.report.html import build_report

    metrics = build_report(inputs_from_args(a), a.out)
    keys = ("auc", "recall_at_1", "recall_at_5", "recall_at_10", "recall_at_20", "n_index_rows", "dead_letters",
            "capture", "test_accuracy")
    print(json.dumps({k: metrics.get(k) for k in keys}, indent=1))
    print(f"report → {a.out}")
    return 0


def register(sub) -> None:
    """Add ``report`` to the ``beam-influence`` subcommands (``sub`` from ``add_subparsers``)."""
    p = sub.add_parser("report", help="static HTML report from index/query/audit/eigensystem files",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(fn=_cmd_report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beam_influence.report.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return _cmd_report(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
