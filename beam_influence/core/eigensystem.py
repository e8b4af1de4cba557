"""The eigensystem: top-k Ritz pairs of the training-loss curvature, and its safe on-disk format.

File format: one safetensors file (no pickle) with tensors
  ``eigvals`` [k] (the λ used for scoring, after the negative/damping treatment),
  ``ritz_values`` [k] (raw Ritz values of the chosen pairs), ``residuals`` [k] (‖Hu − λu‖, NaN if not computed),
  ``krylov_ritz_values`` [m] (all Ritz values of the Krylov space, for the spectrum plot),
  ``u/<param path>`` [k, *leaf shape] (the eigenvectors, leaf by leaf),
  optionally ``kfac/<param path>/<field>`` (float64: the Kronecker-factored curvature fitted on the same fixed
  sample, ``beam-influence eigensystem --kfac``; fields ``core.kfac.LEAF_FIELDS``, its fit in ``args["kfac"]``),
and string metadata ``beam_influence`` = JSON {format version, model fingerprint, spec name, args,
``sha256``: the content digest (see ``Eigensystem.content_sha256``; the id is its first 16 hex digits)}.

Loading recomputes the digest over every tensor and refuses a file whose digest differs from the stored
one (``CorruptEigensystemError``: a bit flip, a truncation, an edit), then checks the basis: finite,
unit-norm, near-orthogonal eigenvectors and finite, non-zero eigenvalues. Version-1 files (written
before the digest existed) still load, with a warning that they cannot be verified.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import warnings
from typing import Any, Mapping

import jax
import numpy as np

from beam_influence.core.files import read_bytes, write_bytes
from beam_influence.core.projection import flatten_eigvecs
from beam_influence.core.types import Params

FORMAT_VERSION = 2  # 2: the metadata carries the content digest ``sha256``; 1: no digest (legacy)
_LEGACY_VERSIONS = (1,)
_HASH_DOMAIN = b"beam-influence eigensystem content v1\n"

# basis sanity tolerances (float32 eigenvectors from a reorthogonalised Arnoldi are far inside these)
UNIT_NORM_TOL = 1e-3  # | ‖u_i‖ − 1 |
ORTHOGONALITY_TOL = 1e-2  # max_{i≠j} |u_iᵀ u_j|
_GRAM_BLOCK_BYTES = 64 << 20  # float64 bytes of one [k, block] slab in the Gram accumulation

_SPECTRA = ("eigvals", "ritz_values", "residuals", "krylov_ritz_values")  # the [k] / [m] float64 tensors
_RECOMPUTE = "recompute it with `beam-influence eigensystem`"


class EigensystemMismatchError(ValueError):
    """The eigensystem was computed for another model (fingerprints differ)."""


class CorruptEigensystemError(ValueError):
    """The eigensystem file cannot be read or fails validation (digest, structure or basis checks)."""


class UnverifiedEigensystemWarning(UserWarning):
    """A legacy eigensystem file without a stored content digest was loaded: it cannot be verified."""


RUN_FACTS = ("memory_plan", "first_product_s", "product_s", "estimated_total_s", "kfac_fit_s")
"""Entries of ``Eigensystem.args`` that describe the run, not the result (kept in the file, not in the id)."""


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
      kfac: None, or the Kronecker-factored curvature fitted on the same sample: ``"<param path>/<field>"`` ->
        float64 (``core.kfac.curvature_tensors``; its fit described by ``args["kfac"]``); in the file and the
        content digest as ``kfac/<param path>/<field>``. ``kfac_curvature(params)`` rebuilds it.
    """

    eigvals: np.ndarray
    ritz_values: np.ndarray
    residuals: np.ndarray
    eigvecs: Mapping[str, np.ndarray]
    krylov_ritz_values: np.ndarray
    fingerprint: str
    spec_name: str
    args: Mapping[str, Any]
    kfac: Mapping[str, np.ndarray] | None = None

    @property
    def k(self) -> int:
        return int(self.eigvals.shape[0])

    @property
    def id(self) -> str:
        """A short, stable id of this eigensystem: the first 16 hex digits of ``content_sha256``.

        Two eigensystems have the same id iff (up to sha256 collisions) every tensor, the model
        fingerprint, the spec name and the arguments are the same; it survives a save/load round trip."""
        return self.content_sha256[:16]

    @functools.cached_property
    def content_sha256(self) -> str:
        """sha256 (hex) over every tensor as written to the file (name, dtype, shape, bytes, in name
        order: eigvals, ritz_values, residuals, krylov_ritz_values, every ``u/<param path>`` block and every
        ``kfac/`` factor),
        the model fingerprint, the spec name and the arguments (less ``RUN_FACTS``: the free memory and the
        timings of the run that computed it, which differ between equal runs). Computed once per instance (do not
        mutate the arrays in place afterwards; build a new instance, e.g. with ``dataclasses.replace``)."""
        return _content_sha256(self._tensors(), self.fingerprint, self.spec_name, self.args)

    def _tensors(self) -> dict[str, np.ndarray]:
        """The tensors exactly as stored: float64 spectra, float32 eigenvector blocks, C-contiguous."""
        # safetensors writes the raw buffer: every tensor must be C-contiguous (no reversed views)
        tensors = {
            "eigvals": np.ascontiguousarray(self.eigvals, np.float64),
            "ritz_values": np.ascontiguousarray(self.ritz_values, np.float64),
            "residuals": np.ascontiguousarray(self.residuals, np.float64),
            "krylov_ritz_values": np.ascontiguousarray(self.krylov_ritz_values, np.float64),
        }
        for key, u in self.eigvecs.items():
            tensors["u/" + key] = np.ascontiguousarray(u, np.float32)
        for key, v in (self.kfac or {}).items():
            tensors["kfac/" + key] = np.ascontiguousarray(v, np.float64)
        return tensors

    def with_kfac(self, curvature, params: Params, *, fit_seconds: float | None = None) -> "Eigensystem":
        """This eigensystem carrying ``curvature`` (a ``core.kfac.KroneckerCurvature`` fitted on its sample):
        its factors as tensors, its fit in ``args["kfac"]`` (a new instance: a new id)."""
        from beam_influence.core import kfac

        self.eigvecs_tree(params)  # the parameters are the eigensystem's
        args = dict(self.args, kfac=kfac.curvature_metadata(curvature))
        if fit_seconds is not None:
            args["kfac_fit_s"] = float(fit_seconds)
        return dataclasses.replace(self, args=args, kfac=kfac.curvature_tensors(curvature, params))

    def kfac_curvature(self, params: Params):
        """The ``core.kfac.KroneckerCurvature`` saved with this eigensystem (no recomputation), in the leaf
        order of ``params``; None when the file has none."""
        if not self.kfac:
            return None
        from beam_influence.core import kfac

        self.eigvecs_tree(params)  # the parameters are the eigensystem's
        return kfac.curvature_from_tensors(dict(self.kfac), params, dict(self.args.get("kfac") or {}))

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
        return flatten_eigvecs(self.eigvecs_tree(params))

    @staticmethod
    def eigvecs_by_path(tree: Params) -> dict[str, np.ndarray]:
        """The ``eigvecs`` mapping (param path -> [k, *leaf shape] float32) of a pytree of eigenvector
        blocks: the inverse of ``eigvecs_tree``. From flat ``U [k, p]``:
        ``eigvecs_by_path(beam_influence.core.projection.unflatten_eigvecs(U, params))``."""
        return {jax.tree_util.keystr(kp): np.asarray(leaf, np.float32)
                for kp, leaf in jax.tree_util.tree_leaves_with_path(tree)}

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
    def _file_metadata(self, tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
        digest = _content_sha256(tensors, self.fingerprint, self.spec_name, self.args)
        meta = {"version": FORMAT_VERSION, "fingerprint": self.fingerprint, "spec_name": self.spec_name,
                "args": dict(self.args), "sha256": digest}
        return {"beam_influence": json.dumps(meta, sort_keys=True)}

    def to_bytes(self) -> bytes:
        """The safetensors file, its metadata carrying the content digest (checked by ``from_bytes``)."""
        from safetensors.numpy import save

        tensors = self._tensors()
        return save(tensors, metadata=self._file_metadata(tensors))

    def save(self, path: str) -> None:
        """Write the safetensors file (local, or gs:// etc. through Beam's FileSystems). A local file is
        written by safetensors straight from the arrays (no in-memory copy of the file: at 110M parameters
        that copy was the eigensystem job's peak), to a temporary name, then renamed."""
        import os

        if "://" in path:
            write_bytes(path, self.to_bytes())
            return
        from safetensors.numpy import save_file

        tensors = self._tensors()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, tmp, metadata=self._file_metadata(tensors))
        os.replace(tmp, path)

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
        version = meta.get("version") if isinstance(meta, dict) else None
        if version != FORMAT_VERSION and version not in _LEGACY_VERSIONS:
            raise CorruptEigensystemError(
                f"{source}: unsupported eigensystem format version {version!r} (this beam-influence reads "
                f"{FORMAT_VERSION} and {', '.join(map(str, _LEGACY_VERSIONS))}); {_RECOMPUTE}")
        try:
            eigvals = tensors["eigvals"]
            k = eigvals.shape[0]
            eigvecs = {key[2:]: v for key, v in tensors.items() if key.startswith("u/")}
            if not eigvecs:
                raise ValueError("the file has no eigenvector blocks (u/<param path>)")
            kfac_tensors = {key[5:]: v for key, v in tensors.items() if key.startswith("kfac/")}
            unknown = sorted(set(tensors) - set(_SPECTRA) - {"u/" + key for key in eigvecs}
                             - {"kfac/" + key for key in kfac_tensors})
            if unknown:
                raise ValueError(f"the file has unexpected tensors {unknown}")
            for key, v in eigvecs.items():
                if v.ndim < 1 or v.shape[0] != k or v.dtype != np.float32:
                    raise ValueError(f"eigenvector block {key} has shape {v.shape} {v.dtype}, expected [{k}, ...] float32")
            for name in _SPECTRA:
                if tensors[name].ndim != 1 or tensors[name].dtype != np.float64:
                    raise ValueError(f"{name} has shape {tensors[name].shape} {tensors[name].dtype}, "
                                     "expected a 1-d float64 vector")
            for name in ("ritz_values", "residuals"):
                if tensors[name].shape != (k,):
                    raise ValueError(f"{name} has shape {tensors[name].shape}, expected ({k},)")
            es = cls(eigvals=eigvals, ritz_values=tensors["ritz_values"], residuals=tensors["residuals"],
                     eigvecs=eigvecs, krylov_ritz_values=tensors["krylov_ritz_values"],
                     fingerprint=str(meta["fingerprint"]), spec_name=str(meta["spec_name"]),
                     args=dict(meta["args"]), kfac=kfac_tensors or None)
            if kfac_tensors:
                from beam_influence.core.kfac import check_tensors

                check_tensors(kfac_tensors, {key: v.shape[1:] for key, v in eigvecs.items()}, es.args.get("kfac"))
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptEigensystemError(f"{source} failed validation: {e}; {_RECOMPUTE}") from None

        # 1. integrity: the digest over every tensor and the metadata must be the one written
        computed = es.content_sha256
        if version == FORMAT_VERSION:
            stored = meta.get("sha256")
            if not isinstance(stored, str):
                raise CorruptEigensystemError(
                    f"{source}: the file (format version {version}) has no stored content digest 'sha256'; "
                    f"the file was altered or truncated after it was written; {_RECOMPUTE}")
            if stored != computed:
                raise CorruptEigensystemError(
                    f"{source}: content check failed: stored eigensystem id {stored[:16]} (sha256 {stored}), "
                    f"computed id {computed[:16]} (sha256 {computed}); the file was altered or truncated "
                    f"after it was written; {_RECOMPUTE}")
        else:
            warnings.warn(
                f"{source} is a format-version-{version} eigensystem file without a stored content digest: "
                "it cannot be verified (a corrupted eigenvector would go unnoticed), and its id is now "
                f"computed over its content ({computed[:16]}), so indexes built from it before must be "
                f"rebuilt; {_RECOMPUTE} to get a verifiable file",
                UnverifiedEigensystemWarning, stacklevel=3)

        # 2. the basis must be a usable one (catches a file written from a broken computation)
        try:
            es.check_basis()
        except ValueError as e:
            raise CorruptEigensystemError(f"{source} failed the basis check: {e}; {_RECOMPUTE}") from None
        return es

    def check_basis(self, *, unit_norm_tol: float = UNIT_NORM_TOL,
                    orthogonality_tol: float = ORTHOGONALITY_TOL) -> None:
        """Raise ValueError unless the eigenvalues are finite and non-zero and the eigenvectors are
        finite, of unit norm (flattened over all leaves) and near-orthogonal.

        The Gram matrix UᵀU [k, k] is accumulated in float64 over column blocks of each leaf, so memory
        stays O(k² + k·block) even for p ~ 10⁸ (no [k, p] float64 copy)."""
        ev = np.asarray(self.eigvals)
        if ev.shape[0] == 0:
            raise ValueError("the eigensystem has no eigenpairs (k = 0): every influence score would be 0")
        if not np.all(np.isfinite(ev)):
            bad = np.flatnonzero(~np.isfinite(ev))
            raise ValueError(f"eigvals must be finite: eigval {int(bad[0])} is {ev[bad[0]]} "
                             f"({len(bad)} non-finite of {len(ev)})")
        if np.any(ev == 0):
            raise ValueError(f"eigvals must be non-zero: eigval {int(np.flatnonzero(ev == 0)[0])} is 0 "
                             "(1/λ scoring would divide by zero)")
        k = self.k
        gram = np.zeros((k, k), np.float64)
        for key, u in self.eigvecs.items():
            flat = np.asarray(u).reshape(k, -1)
            part = np.zeros((k, k), np.float64)
            block = max(1, _GRAM_BLOCK_BYTES // (8 * max(k, 1)))
            for start in range(0, flat.shape[1], block):
                b = flat[:, start : start + block].astype(np.float64)
                part += b @ b.T
            if not np.all(np.isfinite(np.diag(part))):
                rows = np.flatnonzero(~np.isfinite(np.diag(part)))
                raise ValueError(f"eigenvector block {key} has non-finite values (eigenvector {int(rows[0])}"
                                 f"{f' and {len(rows) - 1} more' if len(rows) > 1 else ''})")
            gram += part
        norms = np.sqrt(np.diag(gram))
        dev = np.abs(norms - 1.0)
        if k and dev.max() > unit_norm_tol:
            i = int(dev.argmax())
            raise ValueError(f"eigenvector {i} has norm {norms[i]:.6g}, expected 1 (tolerance {unit_norm_tol:g}): "
                             "the basis is not orthonormal")
        off = np.abs(gram - np.diag(np.diag(gram)))
        if k > 1 and off.max() > orthogonality_tol:
            i, j = np.unravel_index(int(off.argmax()), off.shape)
            raise ValueError(f"eigenvectors {min(i, j)} and {max(i, j)} have inner product {gram[i, j]:.6g}, "
                             f"expected ~0 (max |UᵀU − I| off-diagonal must be ≤ {orthogonality_tol:g}): "
                             "the basis is not orthogonal")

    @classmethod
    def load(cls, path: str) -> "Eigensystem":
        """Read and validate a file written by ``save``."""
        try:
            raw = read_bytes(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"cannot open eigensystem file: {e}") from None
        return cls.from_bytes(raw, source=repr(path))

    def summary(self, *, convex: bool = False) -> str:
        """A human-readable spectrum summary with the diagnostics (``beam_influence.core.diagnostics``):
        the operator and sample, the captured mass, and warnings (residuals comparable to eigenvalues,
        negative Ritz values of a GGN or of a convex loss (``convex=True``), pairs scored with |λ|)."""
        from beam_influence.core.diagnostics import diagnose

        lines = [f"eigensystem {self.id}: k={self.k} of m={len(self.krylov_ritz_values)} Krylov Ritz values, "
                 f"spec {self.spec_name}, model {self.fingerprint}"]
        rv = self.krylov_ritz_values
        lines.append(f"  Krylov spectrum: max {rv.max():.4g}, min {rv.min():.4g}, negatives {int((rv < 0).sum())}")
        lines += diagnose(self, convex=convex).lines()
        lines.append("   i        ritz λ      used λ   ‖Hu − λu‖   ‖Hu − λu‖/|λ|")
        for i in range(self.k):
            if i < 8 or i >= self.k - 2:
                rel = self.residuals[i] / abs(self.ritz_values[i]) if self.ritz_values[i] else float("nan")
                lines.append(f"  {i:2d}  {self.ritz_values[i]:12.5g} {self.eigvals[i]:11.5g}  {self.residuals[i]:10.3g}"
                             f"  {rel:14.3g}")
            elif i == 8:
                lines.append("  ...")
        return "\n".join(lines)


def _content_sha256(tensors: Mapping[str, np.ndarray], fingerprint: str, spec_name: str,
                    args: Mapping[str, Any]) -> str:
    """sha256 hex over the metadata and every tensor (name, dtype, shape, little-endian C-order bytes)."""
    h = hashlib.sha256(_HASH_DOMAIN)
    args = {k: v for k, v in args.items() if k not in RUN_FACTS}
    meta = json.dumps({"fingerprint": fingerprint, "spec_name": spec_name, "args": args}, sort_keys=True)
    h.update(len(meta.encode()).to_bytes(8, "little") + meta.encode())
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        arr = np.ascontiguousarray(arr, arr.dtype.newbyteorder("<"))
        head = json.dumps([name, arr.dtype.str, list(arr.shape)]).encode()
        h.update(len(head).to_bytes(8, "little") + head)  # the byte count follows from dtype and shape
        h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return h.hexdigest()
