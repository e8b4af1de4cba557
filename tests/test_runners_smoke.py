"""Smoke tests: the same small Beam pipeline on a real Flink cluster and on Prism
gives exactly the FnApiRunner's output.

Pipeline: Create 1000 ints -> DoFn using numpy -> CombinePerKey(custom CombineFn)
-> WriteToText. Needs the artefacts from ``make runners-fetch``; skipped otherwise.
"""
from __future__ import annotations

import glob
import json
import os
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions


N = 1000
KEYS = 7


class NumpyFeatures(beam.DoFn):
    """Keys each number by n % KEYS and derives integer features with numpy."""

    def setup(self):
        import numpy as np

        self.np = np

    def process(self, n):
        np = self.np
        v = np.arange(n % 13 + 1, dtype=np.int64)
        feat = int(np.dot(v, v) + n * n)  # exact integer arithmetic
        yield f"k{n % KEYS}", (n, feat)


class StatsFn(beam.CombineFn):
    """count, sum, min, max and sum of features; merge order independent."""

    def create_accumulator(self):
        return (0, 0, None, None, 0)

    def add_input(self, acc, item):
        n, feat = item
        c, s, lo, hi, f = acc
        return (c + 1, s + n, n if lo is None else min(lo, n), n if hi is None else max(hi, n), f + feat)

    def merge_accumulators(self, accs):
        c = s = f = 0
        lo = hi = None
        for a_c, a_s, a_lo, a_hi, a_f in accs:
            c, s, f = c + a_c, s + a_s, f + a_f
            if a_lo is not None:
                lo = a_lo if lo is None else min(lo, a_lo)
                hi = a_hi if hi is None else max(hi, a_hi)
        return (c, s, lo, hi, f)

    def extract_output(self, acc):
        c, s, lo, hi, f = acc
        return {"count": c, "sum": s, "min": lo, "max": hi, "feat": f, "mean": round(s / c, 6) if c else None}


def _format(kv):
    k, stats = kv
    return json.dumps({"key": k, **stats}, sort_keys=True)


def run_smoke(args: list[str], out_dir: str) -> tuple[list[str], float]:
    """Run the smoke pipeline with ``args``; return (sorted output lines, wall seconds)."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "stats")
    t0 = time.monotonic()
    with beam.Pipeline(options=PipelineOptions(args)) as p:
        (
            p
            | "Create" >> beam.Create(list(range(N)), reshuffle=True)
            | "Numpy" >> beam.ParDo(NumpyFeatures())
            | "Combine" >> beam.CombinePerKey(StatsFn())
            | "Format" >> beam.Map(_format)
            | "Write" >> beam.io.WriteToText(prefix, file_name_suffix=".jsonl")
        )
    wall = time.monotonic() - t0
    lines = []
    for path in sorted(glob.glob(prefix + "*.jsonl")):
        with open(path) as f:
            lines.extend(ln.strip() for ln in f if ln.strip())
    return sorted(lines), wall


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    lines, wall = run_smoke(["--runner=FnApiRunner"], str(tmp_path_factory.mktemp("fnapi")))
    print(f"\n[smoke] FnApiRunner wall time {wall:.1f}s")
    return lines


def test_reference_output_is_sane(reference):
    rows = [json.loads(ln) for ln in reference]
    assert len(rows) == KEYS
    assert sum(r["count"] for r in rows) == N
    assert sum(r["sum"] for r in rows) == N * (N - 1) // 2


@pytest.mark.flink
def test_flink_cluster_matches_fnapi(flink_env, reference, tmp_path):
    before = flink_env.cluster.overview()
    lines, wall = run_smoke(flink_env.args, str(tmp_path / "flink"))
    print(f"\n[smoke] Flink wall time {wall:.1f}s (args: {' '.join(flink_env.args)})")
    assert lines == reference
    # The job really ran on the standalone cluster (not an embedded mini-cluster).
    after = flink_env.cluster.overview()
    assert after["jobs-finished"] == before["jobs-finished"] + 1, (before, after)
    assert after["jobs-failed"] == before["jobs-failed"]


@pytest.mark.prism
def test_prism_matches_fnapi(prism_env, reference, tmp_path):
    lines, wall = run_smoke(prism_env.args, str(tmp_path / "prism"))
    print(f"\n[smoke] Prism wall time {wall:.1f}s (args: {' '.join(prism_env.args)})")
    assert lines == reference
