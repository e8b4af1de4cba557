"""Exact scoring of training rows against query gradients held beside U, in blocks the memory plan sizes.

Shared by the query job's stage 2 (the candidates read back) and the fused job (every training row): the
launcher computes the test gradients of one block of queries (``complement_term.write_query_gradients``),
the workers project onto ``[U; ∇ℓ(z_test)]`` and score ``⟨∇ℓ(z), ∇ℓ(z_test)⟩`` exactly.
"""
from __future__ import annotations

import dataclasses
import pickle
from typing import Iterator, Sequence

import numpy as np

from beam_influence.beam import complement_term


@dataclasses.dataclass
class Block:
    """One block of queries: their ids, the ``ModelRef`` projecting beside their gradients, the exact term."""

    index: int
    ids: list[str]
    ref: object
    term: complement_term.ComplementTerm


def block_size(ctx, num_queries: int, requested: int | None) -> tuple[int, str]:
    """(queries per block, why): ``requested`` (``--query_block``) or the memory plan's
    (``core.memory.query_block_size``: U + the block + 8 gradients against the free memory)."""
    from beam_influence.core.memory import device_memory, fmt_bytes, host_free_bytes, query_block_size

    p = int(sum(np.size(x) for x in __import__("jax").tree.leaves(ctx.params)))
    k = int(ctx.eigvals.shape[0])
    if requested:
        return min(requested, max(num_queries, 1)), f"--query_block {requested}"
    dev = ctx.devices[0]
    info = device_memory(dev) if dev.platform != "cpu" else None
    size = query_block_size(num_queries, p=p, k=k, platform=dev.platform, host_free=host_free_bytes(),
                            device_free=(info or {}).get("free"))
    return size, f"memory plan: {size} × p={p:,} × 4 B = {fmt_bytes(4 * size * p)} of query gradients per block"


def blocks(ctx, ref, queries, ids: Sequence[str], size: int, rho: float, out_dir: str, *, transform=None,
           mode: str = "exact", kfac: tuple = ()) -> Iterator[Block]:
    """The blocks of ``ids`` (``size`` each), their test gradients written to ``<out_dir>/_query_gradients_<b>.npz``
    just before the block is used. ``queries``: ``data.LoadedData`` of the test data (holding ``ids``).
    ``mode="kfac"``: the vectors written are ``transform(gradients)`` (the K-FAC complement vectors)."""
    pos = {q: i for i, q in enumerate(queries.ids)}
    missing = [q for q in ids if q not in pos]
    if missing:
        raise ValueError(f"{len(missing)} queries projected by the pipeline are not in the launcher's test data "
                         f"(first: {missing[:3]}); the test files changed during the job")
    for b, start in enumerate(range(0, len(ids), size)):
        part = list(ids[start:start + size])
        rows = np.asarray([pos[q] for q in part], np.int64)
        sub = dataclasses.replace(queries, batch={key: np.asarray(v)[rows] for key, v in queries.batch.items()},
                                  ids=part, records=[], bad=[])
        path = f"{out_dir}/_query_gradients_{b}.npz"
        kept = complement_term.write_query_gradients(path, ctx.spec, ctx.params, sub, transform=transform)
        block_ref = dataclasses.replace(ref, sketch_dim=0, sketch_space="gradient", query_gradients=path)
        yield Block(b, part, block_ref, complement_term.ComplementTerm(mode, rho, query_ids=tuple(kept), kfac=kfac))


def write_pickle(path: str, obj) -> None:
    """An internal hand-over file between a job's stages (written and read by the same job)."""
    from beam_influence.core.files import write_bytes

    write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def read_pickle(path: str):
    from beam_influence.core.files import read_bytes

    return pickle.loads(read_bytes(path))


def remove(paths: Sequence[str]) -> None:
    """Delete the job's internal files (best effort: the staging folder is replaced as a whole anyway)."""
    from apache_beam.io.filesystems import FileSystems

    for path in paths:
        try:
            if FileSystems.exists(path):
                FileSystems.delete([path])
        except Exception:  # noqa: BLE001
            pass
