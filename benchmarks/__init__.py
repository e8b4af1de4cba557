"""Speed and memory measurements of beam-influence (not tests): each module writes JSON results into
``benchmarks/results/<name>.json`` with the machine they were measured on and its load.

    python -m benchmarks.run_all [--quick]        # what `make bench` runs (without --quick)
    python -m benchmarks.projection [--quick]     # projection vs a training step, CPU (digits CNN, small Transformer)
    python -m benchmarks.arnoldi_host [--quick]   # host-side Gram-Schmidt cost of beam_influence.core.arnoldi
    python -m benchmarks.columnar [--model logreg|cnn|transformer] [--quick]
                                                  # index / query / self-influence / eigensystem jobs at N = 1e4 .. 1e6
                                                  # against bare single-process floors, time and peak RSS
    python benchmarks/gpu_projection.py [--tiny]  # the 110M Transformer on one GPU (H200), writes to $OUT

Findings and numbers: docs/benchmarks.md.
"""
