"""Attribution quality: LDS (retraining on random halves, through Beam), mislabel ROC-AUC, agreement with
exact influence, and the baselines (exact, CG, LiSSA, TracIn) beside Arnoldi and its complement term.

Modules (one concept each): ``lds`` (the score and the Beam retraining), ``mislabel``, ``agreement``,
``complement`` (the :math:`\\rho^{-1}(I - UU^\\top)` term), ``gradients`` (leafwise gradient inner
products), ``methods`` (the baselines behind one interface), ``cli`` (``beam-influence evaluate``).
Module names are not shadowed by functions here: ``from beam_influence.evaluation.lds import lds``.

The names below load their module on first use (PEP 562): the CLI parser imports neither Beam nor SciPy.
"""
import importlib

# The methods of ``beam_influence.evaluation.methods.make_method`` (kept here, import-free, for the CLI).
# ``arnoldi_kfac_residual`` / ``arnoldi_kfac_additive``: ``arnoldi_kfac`` with that composition (``core.kfac.Complement``).
METHOD_NAMES = ("arnoldi", "arnoldi_complement", "ideal_complement", "arnoldi_kfac", "arnoldi_kfac_residual",
                "arnoldi_kfac_additive", "ekfac", "kfac", "exact", "cg", "lissa", "tracin")

_EXPORTS = {
    "Agreement": "agreement", "top_k_overlap": "agreement",
    "complement_scores": "complement", "complement_self_influence": "complement", "default_rho": "complement",
    "LDSResult": "lds", "RetrainJob": "lds", "retrain_job": "lds", "run_retraining": "lds", "subset_masks": "lds",
    "InfluenceMethod": "methods", "Task": "methods", "make_method": "methods",
    "MislabelResult": "mislabel", "mislabel_auc": "mislabel", "roc_auc": "mislabel",
}

__all__ = ["METHOD_NAMES", *sorted(_EXPORTS)]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"beam_influence.evaluation.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'beam_influence.evaluation' has no attribute {name!r}")
