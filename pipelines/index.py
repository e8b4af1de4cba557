"""Index job: training records → projected gradients → influence index (Parquet shards + manifest).

    python -m pipelines.index --spec beam_influence.models.digits:cnn --checkpoint ckpt.msgpack \
        --eigensystem eig.safetensors --train_data 'data/train-*.parquet' --index_dir out/index \
        [--runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=2]

The new index is written beside the old one and published atomically when complete: a failed or
killed run leaves the previous index usable (see ``beam_influence.beam.index``); a failed run removes
the data folder it wrote (``beam_influence.beam.cleanup``; a full disk: exit 2, one line naming the path).
"""
from __future__ import annotations

import sys

from apache_beam.io.filesystems import FileSystems

from beam_influence.beam import IndexRecords, new_data_dir, preflight, publish, read_manifest
from beam_influence.beam.cleanup import removed_on_failure
from beam_influence.beam.index import kept_on_failure
from beam_influence.options import IndexOptions
from pipelines._job import main as job_main
from pipelines._job import execute, parse, pipeline_options


def manifest_args(ref, opts, train_data: str) -> dict:
    """The arguments an index records in its manifest."""
    from beam_influence.beam.complement_term import kfac_description
    from beam_influence.beam.resources import sketch_record

    return {"train_data": train_data, "spec": ref.spec, "spec_args": ref.spec_args, "checkpoint": ref.checkpoint,
            "eigensystem": ref.eigensystem, "projection_batch_size": opts.projection_batch_size,
            "batch_rows": opts.batch_rows, "data_format": opts.data_format,
            "projection_method": ref.method, "projection_plan": ref.load().plan._asdict(),
            "grad_sq_norm": ref.load().plan.method != "jvp",
            "sketch": sketch_record(ref, getattr(opts, "sketch_dtype", "float32")),
            "kfac_self": bool(ref.kfac_self),
            "kfac_complement": kfac_description(ref.load().kfac) if ref.kfac_self else None}


def _with_kfac(ref, ctx, opts: IndexOptions):
    """(ref, ctx) indexing the K-FAC complement when the eigensystem carries K-FAC factors: each row's self-term
    (column ``kfac_self``) and, with ``--sketch_space kfac`` (auto), the sketch of its whitened residual in place
    of the gradient's (same bytes; queries then score the K-FAC complement: ``core.kfac.Complement.whitened``)."""
    import dataclasses

    has = bool(getattr(ctx.eigensystem, "kfac", None))
    space = opts.sketch_space if opts.sketch_space != "auto" else "kfac" if has and opts.sketch_dim else "gradient"
    if space == "kfac" and not has:
        raise ValueError("--sketch_space kfac sketches the K-FAC complement, but this eigensystem carries no K-FAC "
                         "factors: compute it with `beam-influence eigensystem --kfac`, or use --sketch_space gradient")
    if space == "kfac" and not opts.sketch_dim:
        raise ValueError("--sketch_space kfac needs a sketch: --sketch_dim > 0")
    if not has:
        return ref, ctx
    ref = dataclasses.replace(ref, kfac_self=True, sketch_space=space)
    ctx = ref.load()
    print("index: the eigensystem carries K-FAC factors: each row also gets its K-FAC complement self-term "
          "(column kfac_self; self-influence --complement kfac)"
          + ("; the sketch is of the K-FAC whitened residual (queries: --complement kfac)" if space == "kfac" else
             "; the sketch is of the gradient (--sketch_space gradient: queries use the scalar complement)"),
          flush=True)
    return ref, ctx


def run(argv=None, test_pipeline=None) -> dict:
    """``python -m pipelines.index``: parse the flags (``IndexOptions``; the rest go to Beam) and run."""
    opts, beam_args = parse(IndexOptions, argv, __doc__, prog="python -m pipelines.index")
    return run_options(opts, beam_args, test_pipeline)


def run_options(opts: IndexOptions, beam_args=(), test_pipeline=None) -> dict:
    """Build the index that ``opts`` describe; returns its manifest."""
    options = pipeline_options(opts, beam_args)
    index_dir = opts.index_dir.rstrip("/")
    # A failed run removes what it wrote (its data folder, temporary files; the index dir if it made it),
    # never the published index; a full disk becomes one line naming the path (DiskFullError, exit 2).
    with removed_on_failure(index_dir, keep=kept_on_failure(index_dir)):
        ref, ctx = preflight(opts, "index_dir")
        if FileSystems.exists(f"{index_dir}/manifest.json"):
            old = read_manifest(index_dir)
            if old.get("eigensystem_id") != ctx.eigensystem.id:
                raise ValueError(f"{index_dir!r} holds an index built under eigensystem "
                                 f"{old.get('eigensystem_id')}; refusing to overwrite it with one under "
                                 f"{ctx.eigensystem.id}. Use another --index_dir or delete the old index.")
        ref, ctx = _with_kfac(ref, ctx, opts)
        data_dir = new_data_dir(index_dir)
        index = IndexRecords(ref, opts.train_data, data_dir, format=opts.data_format,
                             batch_size=opts.projection_batch_size,
                             batch_rows=opts.batch_rows,  # matches the files now: no match is an error
                             sketch_dtype=opts.sketch_dtype)
        from beam_influence.beam.progress import parquet_rows

        counts, seconds = execute(options, lambda p: p | "Index" >> index, test_pipeline,
                                  progress=("index", parquet_rows(index.read.paths)))
        manifest = publish(index_dir, data_dir, ctx.eigensystem, manifest_args(ref, opts, opts.train_data),
                           extra={"seconds": seconds, "counters": counts, "input_files": len(index.read.paths)})
    print(f"index: {manifest['rows']} rows in {len(manifest['shards'])} shards from {manifest['records']} records, "
          f"{manifest['dead_letters']} dead letters, {seconds:.1f}s → {index_dir}")
    return manifest


if __name__ == "__main__":
    sys.exit(job_main(run, sys.argv[1:]))
