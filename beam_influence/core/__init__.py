"""Pure JAX/numpy core: no Beam imports here (I/O lives in ``beam_influence.formats`` and ``beam_influence.beam``).

Modules: ``model_spec`` (the ModelSpec contract, decode/decode_batch, checkpoints), ``curvature`` (HVP/GGN products),
``arnoldi`` (Krylov basis, distill, residuals), ``estimate`` (the eigensystem computation and eigenvalue treatment),
``eigensystem`` (the file), ``projection``, ``scoring`` (scores and the one top-k rule), ``exact`` (dense ground truth).
"""
