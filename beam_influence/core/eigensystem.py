"""The eigensystem: top-k Ritz pairs of the training-loss curvature, and its safe on-disk format.

File format: one safetensors file (no pickle) with tensors
  ``eigvals`` [k] (the λ used for scoring, after the negative/damping treatment),
  ``ritz_values`` [k] (raw Ritz values of the chosen pairs), ``residuals`` [k] (‖Hu − λu‖, NaN if not computed),
  ``krylov_ritz_values`` [m] (all Ritz values of the Krylov space, for the spectrum plot),
  ``u/<param path>`` [k, *leaf shape] (the eigenvectors, leaf by leaf),
and string metadata ``beam_influence`` = JSON {format version, model fingerprint, spec name, args}.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax
import numpy as np

from beam_influence.core.files import read_bytes, write_bytes

from beam_influence.core.types import Params

FORMAT_VERSION = 1


class EigensystemMismatchError(ValueError):
    """The eigensystem was computed for another model (fingerprints differ)."""


class CorruptEigensystemError(ValueError):
    """The eigensystem file cannot be read or fails validation."""


@dataclasses.dataclass(frozen=True)
class Eigensystem:
    """Top-k eigenpairs (λ_i, u_i) of the loss curvature at θ.

    Attributes:
      eigvals: [k] λ used in 1/λ scaling (after treatment of negative/tiny values; see ``args``).
      ritz_values: [k] raw Ritz values of the kept pairs.
      residuals: [k] ‖H u_i − λ_i u_i‖ (NaN when not computed).
      eigvecs: param path (``jax.tree_util.keystr``) -> [k, *leaf shape] float32.
      krylov_ritz_values: [m] all Ritz values of the Krylov space, largest first.
      fingerprint: the model fingerprint it was computed for.
      spec_name: the model spec name.
      args: every argument used to compute it (JSON-serialisable).
    """

    eigvals: np.ndarray
    ritz_values: np.ndarray
    residuals: np.ndarray
    eigvecs: Mapping[str, np.ndarray]
    krylov_ritz_values: np.ndarray
    fingerprint: str
    spec_name: str
    args: Mapping[str, Any]

    @property
    def k(self) -> int:
        return int(self.eigvals.shape[0])

    @property
    def id(self) -> str:
        """A short id of this eigensystem (fingerprint of the eigenvalues and arguments)."""
        import hashlib

        h = hashlib.sha256(self.fingerprint.encode())
        h.update(np.ascontiguousarray(self.eigvals, np.float64).tobytes())
        h.update(json.dumps(dict(self.args), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def eigvecs_tree(self, params: Params) -> Params:
        """The eigenvectors as a pytree shaped like ``params`` with leaves [k, *leaf shape]."""
        leaves = []
        for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
            key = jax.tree_util.keystr(kp)
            if key not in self.eigvecs:
                raise EigensystemMismatchError(f"eigensystem has no eigenvector block for parameter {key}")
            u = self.eigvecs[key]
            if u.shape[1:] != np.shape(leaf):
                raise EigensystemMismatchError(
                    f"eigenvector block {key} has shape {u.shape[1:]}, parameter has {np.shape(leaf)}")
            leaves.append(u)
        return jax.tree.unflatten(jax.tree.structure(params), leaves)

    def flat_eigvecs(self, params: Params) -> np.ndarray:
        """[k, p]: the eigenvectors ravelled in the order of ``jax.flatten_util.ravel_pytree(params)``."""
        leaves = jax.tree.leaves(self.eigvecs_tree(params))
        return np.concatenate([u.reshape(self.k, -1) for u in leaves], axis=1)

    def check_model(self, fingerprint: str, *, what: str = "model") -> None:
        """Raise EigensystemMismatchError unless this eigensystem was computed for ``fingerprint``."""
        if fingerprint != self.fingerprint:
            raise EigensystemMismatchError(
                f"the eigensystem was computed for model fingerprint {self.fingerprint} "
                f"(spec {self.spec_name!r}), but the {what} has fingerprint {fingerprint}. "
                "Recompute it with `beam-influence eigensystem` for this model and checkpoint, "
                "or pass the checkpoint it was computed with."
            )

    # ---- persistence --------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        # safetensors writes the raw buffer: every tensor must be C-contiguous (no reversed views)
        tensors = {
            "eigvals": np.ascontiguousarray(self.eigvals, np.float64),
            "ritz_values": np.ascontiguousarray(self.ritz_values, np.float64),
            "residuals": np.ascontiguousarray(self.residuals, np.float64),
            "krylov_ritz_values": np.ascontiguousarray(self.krylov_ritz_values, np.float64),
        }
        for key, u in self.eigvecs.items():
            tensors["u/" + key] = np.ascontiguousarray(u, np.float32)
        meta = {"version": FORMAT_VERSION, "fingerprint": self.fingerprint, "spec_name": self.spec_name,
                "args": dict(self.args)}
        return save(tensors, metadata={"beam_influence": json.dumps(meta, sort_keys=True)})

    def save(self, path: str) -> None:
        """Write the safetensors file (local, or gs:// etc. through Beam's FileSystems)."""
        write_bytes(path, self.to_bytes())

    @classmethod
    def from_bytes(cls, raw: bytes, *, source: str = "<bytes>") -> "Eigensystem":
        from safetensors.numpy import load

        try:
            tensors = load(raw)
            header_len = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8 : 8 + header_len])
            meta = json.loads(header["__metadata__"]["beam_influence"])
        except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
            raise CorruptEigensystemError(
                f"{source} is not a readable beam-influence eigensystem file ({type(e).__name__}: {e}); "
                "recompute it with `beam-influence eigensystem`"
            ) from None
        if meta.get("version") != FORMAT_VERSION:
            raise CorruptEigensystemError(f"{source}: unsupported format version {meta.get('version')!r}")
        try:
            eigvals = tensors["eigvals"]
            k = eigvals.shape[0]
            eigvecs = {key[2:]: v for key, v in tensors.items() if key.startswith("u/")}
            for key, v in eigvecs.items():
                if v.ndim < 1 or v.shape[0] != k or v.dtype != np.float32:
                    raise ValueError(f"eigenvector block {key} has shape {v.shape} {v.dtype}, expected [{k}, ...] float32")
            for name in ("ritz_values", "residuals"):
                if tensors[name].shape != (k,):
                    raise ValueError(f"{name} has shape {tensors[name].shape}, expected ({k},)")
            if not np.all(np.isfinite(eigvals)) or np.any(eigvals == 0):
                raise ValueError("eigvals must be finite and non-zero")
            return cls(eigvals=eigvals, ritz_values=tensors["ritz_values"], residuals=tensors["residuals"],
                       eigvecs=eigvecs, krylov_ritz_values=tensors["krylov_ritz_values"],
                       fingerprint=str(meta["fingerprint"]), spec_name=str(meta["spec_name"]),
                       args=dict(meta["args"]))
        except (KeyError, ValueError) as e:
            raise CorruptEigensystemError(f"{source} failed validation: {e}") from None

    @classmethod
    def load(cls, path: str) -> "Eigensystem":
        """Read and validate a file written by ``save``."""
        try:
            raw = read_bytes(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"cannot open eigensystem file: {e}") from None
        return cls.from_bytes(raw, source=repr(path))

    def summary(self) -> str:
        """A human-readable spectrum summary."""
        lines = [f"eigensystem {self.id}: k={self.k} of m={len(self.krylov_ritz_values)} Krylov Ritz values, "
                 f"spec {self.spec_name}, model {self.fingerprint}"]
        rv = self.krylov_ritz_values
        lines.append(f"  Krylov spectrum: max {rv.max():.4g}, min {rv.min():.4g}, negatives {int((rv < 0).sum())}")
        kept = np.abs(self.ritz_values).sum() / max(np.abs(rv).sum(), 1e-300)
        lines.append(f"  kept pairs capture {100 * kept:.1f}% of the Krylov spectrum's |λ| mass")
        lines.append("   i        ritz λ      used λ     residual")
        for i in range(self.k):
            if i < 8 or i >= self.k - 2:
                lines.append(f"  {i:2d}  {self.ritz_values[i]:12.5g} {self.eigvals[i]:11.5g}  {self.residuals[i]:11.3g}")
            elif i == 8:
                lines.append("  ...")
        return "\n".join(lines)
