"""beam-influence: "Scaling Up Influence Functions" (Schioppa et al., AAAI-22, arXiv 2112.03052) in JAX,
fanned out over training data with Apache Beam.

Sign convention everywhere: influence(z_test, z_train) = Σ_i P_i(z_test) P_i(z_train) / λ_i;
larger = the training example is more helpful to the test prediction (proponent), most negative =
most harmful (opponent). Self-influence(z) = Σ_i P_i(z)² / λ_i. With the complement term H⁻¹ ≈ UΛ⁻¹Uᵀ + (1/ρ)(I − UUᵀ):
``complement_scores`` / ``complement_self_influence`` (exact gradients), ``GradientSketch`` +
``residual_sketch`` + ``augment`` (from an index's gradient sketch).

The public API: the ModelSpec contract, the eigensystem (compute, save, load), projection, scoring.
"""
from beam_influence.core.arnoldi import ArnoldiResult, distill
from beam_influence.core.complement import augment, complement_scores, complement_self_influence, default_rho
from beam_influence.core.eigensystem import CorruptEigensystemError, Eigensystem, EigensystemMismatchError
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.core.model_spec import FeatureSpec, ModelSpec, RecordError, fingerprint, load_spec
from beam_influence.core.projection import make_projector
from beam_influence.core.decode import DecodedBatch
from beam_influence.core.scoring import influence_scores, self_influence, top_k
from beam_influence.core.sketch import GradientSketch, residual_sketch
from beam_influence.core.topk import TopK
from beam_influence.api import KFACOptions, pairwise_scores, self_influence_scores
from beam_influence.core.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

__version__ = "0.1.0"


def __getattr__(name: str):
    """``nnx_spec``/``nnx_params`` load ``flax.nnx`` (about a second) only when asked for."""
    if name in ("nnx_spec", "nnx_params"):
        from beam_influence.core import nnx

        return getattr(nnx, name)
    raise AttributeError(f"module 'beam_influence' has no attribute {name!r}")


__all__ = [
    "KFACOptions", "pairwise_scores", "self_influence_scores",
    "GradientSketch", "augment", "complement_scores", "complement_self_influence", "default_rho", "residual_sketch",
    "ArnoldiResult", "CheckpointError", "CorruptEigensystemError", "DecodedBatch", "TopK", "Eigensystem", "EigensystemArgs", "EigensystemMismatchError", "FeatureSpec",
    "ModelSpec", "RecordError", "compute_eigensystem", "distill", "fingerprint", "influence_scores",
    "load_checkpoint", "load_spec", "nnx_params", "nnx_spec", "save_checkpoint", "make_projector", "self_influence", "top_k",
]
