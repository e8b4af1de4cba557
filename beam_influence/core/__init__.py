"""Pure JAX/numpy core: no Beam imports here (I/O lives in ``beam_influence.formats`` and ``beam_influence.beam``).

Modules: ``model_spec`` (the ModelSpec contract, decode/decode_batch, checkpoints), ``curvature`` (HVP/GGN products),
``arnoldi`` (Krylov basis, distill, residuals), ``estimate`` (the eigensystem computation and eigenvalue treatment),
``eigensystem`` (the file), ``projection``, ``scoring`` (scores and the top-k ordering rule), ``topk`` (``TopK``: the one accumulator, float32
candidates + exact float64 rescoring), ``decode`` (column-wise decoding), ``files`` (local/remote bytes),
``exact`` (dense ground truth).
"""
