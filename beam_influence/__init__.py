"""beam-influence: "Scaling Up Influence Functions" (Schioppa et al., AAAI-22, arXiv 2112.03052) in JAX,
fanned out over training data with Apache Beam.

Sign convention everywhere: influence(z_test, z_train) = Σ_i P_i(z_test) P_i(z_train) / λ_i;
larger = the training example is more helpful to the test prediction (proponent), most negative =
most harmful (opponent). Self-influence(z) = Σ_i P_i(z)² / λ_i.

The public API: the ModelSpec contract, the eigensystem (compute, save, load), projection, scoring.
"""
from beam_influence.core.arnoldi import ArnoldiResult, distill
from beam_influence.core.eigensystem import CorruptEigensystemError, Eigensystem, EigensystemMismatchError
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.core.model_spec import FeatureSpec, ModelSpec, RecordError, fingerprint, load_spec
from beam_influence.core.projection import make_projector
from beam_influence.core.decode import DecodedBatch
from beam_influence.core.scoring import influence_scores, self_influence, top_k
from beam_influence.core.topk import TopK

__version__ = "0.1.0"

__all__ = [
    "ArnoldiResult", "CorruptEigensystemError", "DecodedBatch", "TopK", "Eigensystem", "EigensystemArgs", "EigensystemMismatchError", "FeatureSpec",
    "ModelSpec", "RecordError", "compute_eigensystem", "distill", "fingerprint", "influence_scores",
    "load_spec", "make_projector", "self_influence", "top_k",
]
