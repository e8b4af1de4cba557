"""Static HTML reports built from result files (index, query, audit, eigensystem, data meta).

    from beam_influence.report import ReportInputs, build_report
    metrics = build_report(ReportInputs(index_dir="out/index", query_dir="out/query", audit_dir="out/audit",
                                        eigensystem="eig.safetensors", data_meta="data/digits_meta.json"),
                           "out/report.html")

or ``beam-influence report --index_dir … --out report.html``. Plots use matplotlib's Agg canvas;
images are inlined as base64 PNG; the page has no scripts and opens offline.
"""
from beam_influence.report.html import build_report, render
from beam_influence.report.results import ReportInputs, Results, compute_metrics, load_results

__all__ = ["ReportInputs", "Results", "build_report", "compute_metrics", "load_results", "render"]
