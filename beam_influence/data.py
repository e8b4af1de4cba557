"""Local (non-Beam) loading of decoded examples for the one-host jobs (training, eigensystem).

Bad records (unparsable, or rejected by ``ModelSpec.decode``) are counted and returned with their
reasons, never dropped silently.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from beam_influence.core.model_spec import ModelSpec, RecordError
from beam_influence.core.types import Example


@dataclasses.dataclass
class LoadedData:
    """Decoded examples (leading axis N), their ids and raw records, and the rejected ones."""

    batch: Example
    ids: list[str]
    records: list[dict]
    bad: list[dict]  # {"id", "reason"}

    @property
    def n(self) -> int:
        return len(self.ids)


def decode_records(spec: ModelSpec, records: list[dict]) -> LoadedData:
    """Decode records with ``spec``; bad ones go to ``bad`` with their reason."""
    good, ids, raws, bad = [], [], [], []
    for rec in records:
        if "__error__" in rec:
            bad.append({"id": rec.get("id"), "reason": rec["__error__"]})
            continue
        try:
            good.append(spec.decode(rec))
        except RecordError as e:
            bad.append({"id": rec.get("id"), "reason": str(e)})
            continue
        ids.append(str(rec["id"]))
        raws.append(rec)
    if not good:
        raise ValueError(f"no decodable records ({len(bad)} bad; first reasons: {[b['reason'] for b in bad[:3]]})")
    return LoadedData(spec.stack(good), ids, raws, bad)


def load_examples(spec: ModelSpec, pattern: str, *, max_examples: int | None = None, seed: int = 0) -> LoadedData:
    """Read every record matching ``pattern`` (any supported format) and decode it.

    With ``max_examples`` a seeded uniform sample is kept (for the eigensystem of a huge set).
    """
    from beam_influence.io import read_records

    records = read_records(pattern)
    if max_examples is not None and len(records) > max_examples:
        idx = np.sort(np.random.default_rng(seed).choice(len(records), max_examples, replace=False))
        records = [records[i] for i in idx]
    return decode_records(spec, records)
