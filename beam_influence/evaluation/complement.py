"""The complement term (re-exported): the one copy lives in ``beam_influence.core.complement``."""
from beam_influence.core.complement import (augment, complement_scores, complement_self_influence,  # noqa: F401
                                            default_rho, resolve_rho)
