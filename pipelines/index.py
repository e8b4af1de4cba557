"""Index job: training records → projected gradients → influence index (Parquet shards + manifest).

    python -m pipelines.index --spec beam_influence.models.digits:cnn --checkpoint ckpt.msgpack \
        --eigensystem eig.safetensors --train_data 'data/train-*.parquet' --index_dir out/index \
        [--runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=2]
"""
from __future__ import annotations

import sys

from apache_beam.io.filesystems import FileSystems

from beam_influence.beam import IndexRecords, ReadExamples, list_shards, preflight, read_manifest, write_manifest
from pipelines._job import count_lines, execute, parse


def manifest_args(ref, opts, train_data: str) -> dict:
    """The arguments an index records in its manifest."""
    return {"train_data": train_data, "spec": ref.spec, "spec_args": ref.spec_args, "checkpoint": ref.checkpoint,
            "eigensystem": ref.eigensystem, "batch_size": opts.batch_size, "projection_method": ref.method}


def run(argv=None, test_pipeline=None) -> dict:
    options, opts = parse(argv, __doc__)
    ref, ctx = preflight(opts, "train_data", "index_dir")
    index_dir = opts.index_dir.rstrip("/")
    if FileSystems.exists(f"{index_dir}/manifest.json"):
        old = read_manifest(index_dir)
        if old.get("eigensystem_id") != ctx.eigensystem.id:
            raise ValueError(f"{index_dir!r} holds an index built under eigensystem {old.get('eigensystem_id')}; "
                             f"refusing to overwrite it with one under {ctx.eigensystem.id}. Use another "
                             "--index_dir or delete the old index.")
    stale = list_shards(index_dir) if FileSystems.exists(index_dir) else []
    if stale:
        FileSystems.delete(stale)  # same eigensystem (or unfinished run): rebuild from scratch, idempotently

    def build(p):
        (p | "ReadTrain" >> ReadExamples(opts.train_data, opts.data_format)
         | "Index" >> IndexRecords(ref, index_dir, batch_size=opts.batch_size, num_shards=opts.index_shards))

    counts, seconds = execute(options, build, test_pipeline)
    dead = count_lines(f"{index_dir}/dead_letter.jsonl")
    manifest = write_manifest(index_dir, ctx.eigensystem, manifest_args(ref, opts, opts.train_data),
                              extra={"dead_letters": dead, "seconds": seconds, "counters": counts})
    print(f"index: {manifest['rows']} rows in {len(manifest['shards'])} shards, {dead} dead letters, "
          f"{seconds:.1f}s → {index_dir}")
    return manifest


if __name__ == "__main__":
    run(sys.argv[1:])
