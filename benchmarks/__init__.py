"""Speed and memory measurements of beam-influence (not tests): each module writes JSON results into
``benchmarks/results/<name>.json`` with the machine they were measured on and its load.

    python -m benchmarks.run_all [--quick]        # what `make bench` runs (without --quick)
    python -m benchmarks.projection [--quick]     # projection vs a training step, CPU (digits CNN, small Transformer)
    python -m benchmarks.arnoldi_host [--quick]   # host-side Gram-Schmidt cost of beam_influence.core.arnoldi
    python -m benchmarks.beam_overhead [--quick]  # index pipeline vs a bare JAX loop over the same records
    python -m benchmarks.scaling [--quick]        # time per example and peak memory for N = 1e4 .. 1e6
    python benchmarks/gpu_projection.py [--tiny]  # the 110M Transformer on one GPU (H200), writes to $OUT

``benchmarks.beam_prototypes`` holds batched prototypes of the index and query pipelines (same outputs),
measured beside the shipped ones to size the recommended changes.

Findings and numbers: docs/benchmarks.md.
"""
