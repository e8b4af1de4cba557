"""Speed and memory measurements of beam-influence (not tests): each module writes JSON results into
``benchmarks/results/<name>.json`` with the machine they were measured on and its load.

    python -m benchmarks.run_all [--quick]        # what `make bench` runs (without --quick)
    python -m benchmarks.projection [--quick]     # projection vs a training step, CPU (digits CNN, small Transformer)
    python -m benchmarks.beam_overhead [--quick]  # index pipeline vs a bare JAX loop over the same records
    python -m benchmarks.scaling [--quick]        # time per example and peak memory for N = 1e4 .. 1e6
    python benchmarks/gpu_projection.py [--tiny]  # the 110M Transformer on one GPU (H200), writes to $OUT

Findings and numbers: docs/benchmarks.md.
"""
