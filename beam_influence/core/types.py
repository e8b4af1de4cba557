"""Type aliases used across beam-influence (pytrees live here, in one place)."""
from typing import Any, Mapping

import numpy as np

Params = Any  # a pytree of arrays (Flax variables / params)
Example = Mapping[str, Any]  # feature name -> array; unbatched or with a leading batch axis
Record = Mapping[str, Any]  # a raw record as read from a file: feature name -> python/numpy value
FlatVector = np.ndarray  # a float vector of length p (ravelled parameters)
