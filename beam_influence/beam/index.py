"""The influence index: Parquet shards of projected rows plus a manifest, published atomically.

    <index dir>/manifest.json                     eigensystem id + model fingerprint, arguments, totals (records,
                                                  rows, dead letters, zero-gradient rows), and per shard: path
                                                  (relative to the index dir), rows, sha256
    <index dir>/data-<run>/part-<key>.parquet     index rows (schema: ``beam_influence.beam.project``; the
                                                  gradient sketch in the manifest's ``args.sketch.dtype``:
                                                  ``project.encode_sketch_column``)
    <index dir>/data-<run>/_entries.jsonl         what the job wrote (the manifest is built from it)
    <index dir>/data-<run>/dead_letter.jsonl      records that could not be indexed, with reasons

A job writes into a fresh ``data-<run>`` folder; only when it has finished and the counts add up
(records read = rows indexed + dead letters) is ``manifest.json`` replaced (write, then rename), and
older data folders are removed. A failed or killed run leaves the previous index usable. Each part
file is named by its source chunk (``sha1(source, offset)``), so a retried bundle rewrites the same
file, and holds at most ``batch_rows`` rows. Readers verify each shard's row count and checksum
against the manifest (``verify_shard``) and fail clearly on any difference.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from typing import Any, Callable, Iterator, Mapping

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_influence.beam.project import NAMESPACE, ProjectChunks, ProjectedChunk
from beam_influence.beam.read import BATCH_ROWS, ReadChunks
from beam_influence.core.eigensystem import Eigensystem, EigensystemMismatchError

MANIFEST = "manifest.json"
MAX_ZERO_IDS = 20  # zero-gradient ids kept per part and in the manifest (the count is exact)
ENTRIES = "_entries"
DEAD_LETTERS = "dead_letter"


class IndexCorruptError(ValueError):
    """An index shard does not match its manifest (missing, truncated, altered)."""


def _join(base: str, name: str) -> str:
    return FileSystems.join(base, name) if "://" in base else os.path.join(base, name)


class WriteIndexPartFn(beam.DoFn):
    """ProjectedChunk → one Parquet part file in ``data_dir`` (temp + rename) → its manifest entry; the
    sketch column is stored in ``sketch_dtype`` (``project.encode_sketch_column``)."""

    def __init__(self, data_dir: str, sketch_dtype: str = "float32"):
        super().__init__()
        from beam_influence.core.sketch import check_storage_dtype

        self.data_dir, self.sketch_dtype = data_dir, check_storage_dtype(sketch_dtype)
        self.rows = Metrics.counter(NAMESPACE, "index_rows_written")
        self.zero = Metrics.counter(NAMESPACE, "zero_gradient_rows")

    def process(self, chunk: ProjectedChunk) -> Iterator[dict]:
        import pyarrow.parquet as pq

        entry = {"source": chunk.source, "offset": chunk.offset, "records": chunk.records, "rows": chunk.table.num_rows,
                 "digest": chunk.digest}
        zero = _zero_gradient_ids(chunk.table)
        if zero is not None:
            entry.update(zero_gradient=len(zero), zero_gradient_ids=zero[:MAX_ZERO_IDS])
            self.zero.inc(len(zero))
        if chunk.table.num_rows:
            key = hashlib.sha1(f"{chunk.source}\0{chunk.offset}".encode()).hexdigest()[:20]
            name = f"part-{key}.parquet"
            from beam_influence.beam.project import encode_sketch_column

            table = encode_sketch_column(chunk.table, self.sketch_dtype)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, row_group_size=65536, use_dictionary=False,  # dictionaries of float
                           write_statistics=_statistics_columns(table))
            # projections cost 5× the write time and grow the file
            data = sink.getvalue().to_pybytes()
            final = _join(self.data_dir, name)
            tmp = final + f".tmp-{uuid.uuid4().hex[:8]}"
            with FileSystems.create(tmp) as f:
                f.write(data)
            if FileSystems.exists(final):
                FileSystems.delete([final])
            FileSystems.rename([tmp], [final])
            entry.update(path=name, sha256=hashlib.sha256(data).hexdigest())
            self.rows.inc(chunk.table.num_rows)
        yield entry


def _statistics_columns(table: pa.Table) -> bool | list[str]:
    """``write_statistics`` of a part file: every column's, except a 16-bit sketch's (its min/max would be two
    2d-byte values per page, about 5 bytes per row, that no reader uses)."""
    import pyarrow.parquet as pq

    if "sketch_scale" not in table.column_names:
        return True
    sink = pa.BufferOutputStream()
    pq.write_table(table.schema.empty_table(), sink)
    schema = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return [schema.column(i).path for i in range(len(schema)) if schema.column(i).path.split(".")[0] != "sketch"]


def _zero_gradient_ids(table: pa.Table) -> list[str] | None:
    """Ids of the rows whose loss gradient is exactly zero (``grad_sq_norm == 0``: the loss is constant in θ,
    so every influence score of the row is 0 and it would silently rank last), in row order; None when that
    is not known (no rows, or no ``grad_sq_norm``: the "jvp" projection method never forms the gradient and
    leaves it NaN)."""
    if "grad_sq_norm" not in table.column_names or not table.num_rows:
        return None
    import pyarrow.compute as pc

    sq = table.column("grad_sq_norm")
    if not pc.any(pc.is_finite(sq)).as_py():
        return None
    zero = pc.equal(sq, 0.0)
    if not pc.any(zero).as_py():
        return []
    return table.column("id").filter(zero).to_pylist()


class IndexChunks(beam.PTransform):
    """Chunks → projected index parts in ``data_dir`` + ``_entries.jsonl`` + ``dead_letter.jsonl``."""

    def __init__(self, ref, data_dir: str, *, batch_size: int = 64, sketch_dtype: str = "float32"):
        super().__init__()
        self.ref, self.data_dir, self.batch_size = ref, data_dir.rstrip("/"), batch_size
        self.sketch_dtype = sketch_dtype

    def expand(self, chunks):
        from beam_influence.beam.outputs import WriteDeadLetters, WriteJsonLines

        out = chunks | "Project" >> ProjectChunks(self.ref, batch_size=self.batch_size)
        (out["projected"] | "WriteParts" >> beam.ParDo(WriteIndexPartFn(self.data_dir, self.sketch_dtype))
         | "WriteEntries" >> WriteJsonLines(_join(self.data_dir, ENTRIES)))
        out["dead_letter"] | "WriteDeadLetters" >> WriteDeadLetters(_join(self.data_dir, DEAD_LETTERS))
        return out


class IndexRecords(beam.PTransform):
    """Files (pattern or paths) → ``ReadChunks`` → ``IndexChunks`` into ``data_dir``."""

    def __init__(self, ref, files, data_dir: str, *, format: str | None = None, batch_size: int = 64,
                 batch_rows: int = BATCH_ROWS, sketch_dtype: str = "float32"):
        super().__init__()
        self.read = ReadChunks(files, format, rows_per_split=batch_rows, batch_rows=batch_rows)
        self.ref, self.data_dir, self.batch_size, self.sketch_dtype = ref, data_dir, batch_size, sketch_dtype

    def expand(self, pbegin):
        return (pbegin | "Read" >> self.read
                | "Index" >> IndexChunks(self.ref, self.data_dir, batch_size=self.batch_size,
                                         sketch_dtype=self.sketch_dtype))


# ---- launcher side: staging, manifest, publication, verification ----------------------------------
def new_data_dir(index_dir: str) -> str:
    """A fresh, unique data folder for one index job (``<index_dir>/data-<UTC>-<random>``)."""
    name = f"data-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    return _join(index_dir.rstrip("/"), name)


def _read_lines(path: str) -> list[dict]:
    if not FileSystems.exists(path):
        return []
    with FileSystems.open(path) as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


def collect(data_dir: str) -> dict:
    """What a finished index job wrote in ``data_dir``: shard entries, totals, dead letters.

    Raises ValueError when the counts do not add up (records read ≠ rows + dead letters)."""
    entries = _read_lines(_join(data_dir, ENTRIES + ".jsonl"))
    dead = len(_read_lines(_join(data_dir, DEAD_LETTERS + ".jsonl")))
    records = sum(e["records"] for e in entries)
    rows = sum(e["rows"] for e in entries)
    if records != rows + dead:
        raise ValueError(f"index job in {data_dir!r}: {records} records read but {rows} rows indexed + {dead} dead "
                         "letters; refusing to publish an index that lost records")
    folder = data_dir.rstrip("/").rsplit("/", 1)[-1]
    check_unique_ids([_join(data_dir, e["path"]) for e in entries if e["rows"]])
    shards = sorted(({"path": f"{folder}/{e['path']}", "rows": e["rows"], "sha256": e["sha256"],
                      "source": e["source"], "offset": e["offset"], "records": e["records"],
                      "digest": e.get("digest", "")} for e in entries if e["rows"]),
                    key=lambda s: (s["source"], s["offset"]))
    ordered = sorted(entries, key=lambda e: (e["source"], e["offset"]))
    zero_ids = [i for e in ordered for i in e.get("zero_gradient_ids", [])][:MAX_ZERO_IDS]
    return {"shards": shards, "rows": rows, "records": records, "dead_letters": dead,
            "dead_letter_file": f"{folder}/{DEAD_LETTERS}.jsonl",
            "zero_gradient_rows": (sum(int(e.get("zero_gradient", 0)) for e in entries)
                                   if any("zero_gradient" in e for e in entries) else None),
            "zero_gradient_ids": zero_ids}


def check_unique_ids(paths: list[str]) -> None:
    """Refuse an index in which a training id occurs more than once (within or across shards): a repeated id
    would appear twice in a top-k list and make every score ambiguous. One Arrow hash table over the id
    column (C++, about 0.1 s per 10⁶ ids; memory: the ids)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cols = []
    for path in paths:
        with FileSystems.open(path) as f:
            cols.extend(pq.read_table(pa.BufferReader(f.read()), columns=["id"]).column("id").chunks)
    if not cols:
        return
    ids = pa.chunked_array(cols, pa.string())
    if len(pc.unique(ids)) == len(ids):
        return
    counts = pc.value_counts(ids)
    values, n = counts.field("values"), counts.field("counts").to_numpy()
    dup = sorted(values.filter(pa.array(n > 1)).to_pylist())
    raise ValueError(f"{len(dup)} training ids occur more than once in the data (first: {dup[:5]}); ids must "
                     "be unique. Fix the data's id column, or drop it so that readers derive <shard>:<offset> ids "
                     "(derived ids collide when files in different folders share a name: rename one)")


def publish(index_dir: str, data_dir: str, eigensystem: Eigensystem, args: Mapping[str, Any],
            extra: Mapping[str, Any] | None = None, *, require_rows: bool = True) -> dict:
    """Verify the job's output in ``data_dir`` and make it the index of ``index_dir`` atomically."""
    index_dir = index_dir.rstrip("/")
    got = collect(data_dir)
    if require_rows and got["rows"] == 0:
        raise ValueError(f"the index job read {got['records']} records and indexed none "
                         f"({got['dead_letters']} dead letters in {_join(data_dir, DEAD_LETTERS + '.jsonl')})")
    manifest = {"eigensystem_id": eigensystem.id, "model_fingerprint": eigensystem.fingerprint,
                "spec_name": eigensystem.spec_name, "k": eigensystem.k, "args": dict(args), **got,
                "written_at": time.time(), **(extra or {})}
    previous = None
    if FileSystems.exists(_join(index_dir, MANIFEST)):
        try:
            previous = read_manifest(index_dir)
        except (FileNotFoundError, ValueError):
            previous = None
    _write_atomic(_join(index_dir, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    _remove_unreferenced(index_dir, manifest, previous)
    if got["zero_gradient_rows"]:
        logging.getLogger(__name__).warning(
            "index %s: %d of %d rows have a loss gradient of exactly zero (the loss is constant in the "
            "parameters, so all their influence scores are 0; first ids: %s); they are counted in the manifest "
            "as zero_gradient_rows", index_dir, got["zero_gradient_rows"], got["rows"], got["zero_gradient_ids"])
    return manifest


def referenced(index_dir: str) -> set[str]:
    """The names directly in ``index_dir`` that its current manifest uses (``manifest.json``, its data folder):
    what a failed run must never remove (``cleanup.removed_on_failure(index_dir, keep=...)``)."""
    try:
        with FileSystems.open(_join(index_dir.rstrip("/"), MANIFEST)) as f:
            manifest = json.loads(f.read())
        paths = [s["path"] for s in manifest.get("shards", [])] + [manifest.get("dead_letter_file") or ""]
    except Exception:  # noqa: BLE001 - no (readable) manifest: nothing is published
        return set()
    return {MANIFEST} | {p.split("/", 1)[0] for p in paths if isinstance(p, str) and p}


def kept_on_failure(index_dir: str) -> Callable[[str], bool]:
    """``keep=`` for ``cleanup.removed_on_failure(index_dir)``: a failed index job removes only what index
    jobs write (``data-*`` folders, the manifest's temporary files) and, of that, never what the manifest
    published when the job failed references (``referenced``, read at that moment). Anything else in the
    directory is not the job's and is left alone."""
    def keep(name: str) -> bool:
        ours = name.startswith("data-") or name.startswith(f"{MANIFEST}.tmp-")
        return not ours or name in referenced(index_dir)

    return keep


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(tmp) as f:
        f.write(data)
    if "://" in path:
        if FileSystems.exists(path):
            FileSystems.delete([path])
        FileSystems.rename([tmp], [path])
    else:
        os.replace(tmp, path)


def _remove_unreferenced(index_dir: str, manifest: dict, previous: dict | None) -> None:
    """Delete the data folders the new manifest does not use (old runs, killed runs)."""
    keep = {s["path"].split("/", 1)[0] for s in manifest["shards"]} | {manifest["dead_letter_file"].split("/", 1)[0]}
    found = FileSystems.match([_join(index_dir, "data-*")])[0].metadata_list
    folders = {m.path[len(index_dir) + 1:].split("/", 1)[0] for m in found}
    if "://" not in index_dir:
        folders |= {d for d in os.listdir(index_dir) if d.startswith("data-")}
    for folder in sorted(folders - keep):
        path = _join(index_dir, folder)
        try:
            if "://" in path:
                FileSystems.delete([path])
            else:
                import shutil

                shutil.rmtree(path, ignore_errors=True)
        except Exception:  # noqa: BLE001 - a leftover folder is harmless (unreferenced)
            pass


def read_manifest(index_dir: str) -> dict:
    """The manifest of ``index_dir``, checked (``check_manifest``): FileNotFoundError when there is none,
    ``IndexCorruptError`` (a ValueError) when it is not consistent."""
    path = _join(index_dir.rstrip("/"), MANIFEST)
    try:
        with FileSystems.open(path) as f:
            manifest = json.loads(f.read())
    except Exception as e:  # noqa: BLE001
        raise FileNotFoundError(f"no readable index manifest at {path!r} ({e}); build the index with "
                                "`beam-influence index` first") from None
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise ValueError(f"{path!r} is not an index manifest (no 'shards')")
    check_manifest(index_dir, manifest)
    return manifest


def _count(manifest: Mapping[str, Any], key: str, where: str) -> int | None:
    value = manifest.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IndexCorruptError(f"{where}: {key!r} is {value!r}, not a count (an integer ≥ 0); rebuild the index")
    return value


def check_manifest(index_dir: str, manifest: Mapping[str, Any]) -> None:
    """Refuse a manifest whose paths leave the index directory or whose totals do not add up.

    Every shard path and the dead-letter file must be relative paths that resolve inside ``index_dir``
    (no absolute path, no URL, no ``..``, no symbolic link out of it); every count is an integer ≥ 0;
    ``rows`` is the sum of the shards' rows, ``records`` is ``rows + dead_letters``, ``zero_gradient_rows``
    is at most ``rows``. Raises ``IndexCorruptError`` naming the manifest and the total."""
    where = f"index manifest {_join(index_dir.rstrip('/'), MANIFEST)!r}"
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(isinstance(s, Mapping) for s in shards):
        raise IndexCorruptError(f"{where}: 'shards' is not a list of shard entries; rebuild the index")
    for s in shards:
        if _count(s, "rows", f"{where}, shard {s.get('path')!r}") is None:
            raise IndexCorruptError(f"{where}: shard {s.get('path')!r} states no row count; rebuild the index")
        shard_path(index_dir, s)
    if manifest.get("dead_letter_file") is not None:
        inside(index_dir, manifest["dead_letter_file"], "dead-letter file")
    rows, records, dead = (_count(manifest, k, where) for k in ("rows", "records", "dead_letters"))
    total = sum(int(s["rows"]) for s in shards)
    if rows is None or rows != total:
        raise IndexCorruptError(f"{where} states {rows} rows, but its {len(shards)} shards hold {total}; the "
                                "manifest was altered: rebuild the index")
    if records is not None and dead is not None and records != rows + dead:
        raise IndexCorruptError(f"{where} states {records} records read, but {rows} rows + {dead} dead letters "
                                f"= {rows + dead}; the manifest was altered: rebuild the index")
    zero = _count(manifest, "zero_gradient_rows", where)
    if zero is not None and zero > rows:
        raise IndexCorruptError(f"{where} states {zero} zero-gradient rows of {rows}; rebuild the index")


def check_dead_letters(index_dir: str, manifest: Mapping[str, Any]) -> None:
    """The dead-letter file holds as many lines as the manifest's ``dead_letters`` (``IndexCorruptError``)."""
    name, dead = manifest.get("dead_letter_file"), manifest.get("dead_letters")
    if name is None or dead is None:
        return
    lines = len(_read_lines(inside(index_dir, name, "dead-letter file")))
    if lines != dead:
        raise IndexCorruptError(f"index manifest of {index_dir!r} states {dead} dead letters, but {name!r} holds "
                                f"{lines}; rebuild the index")


def check_index(index_dir: str, eigensystem: Eigensystem) -> dict:
    """The manifest of ``index_dir`` if it was built under ``eigensystem`` and is not empty; else a clear error."""
    manifest = read_manifest(index_dir)
    if manifest.get("eigensystem_id") != eigensystem.id:
        raise EigensystemMismatchError(
            f"the index {index_dir!r} was built under eigensystem {manifest.get('eigensystem_id')} "
            f"(model {manifest.get('model_fingerprint')}), but this query uses eigensystem {eigensystem.id} "
            f"(model {eigensystem.fingerprint}). Rebuild the index with `beam-influence index` using this "
            "eigensystem, or query with the eigensystem the index was built with.")
    if not manifest["shards"] or not manifest.get("rows"):
        raise ValueError(f"the index {index_dir!r} holds no rows; rebuild it from non-empty training data")
    check_dead_letters(index_dir, manifest)
    for s in manifest["shards"]:
        path = shard_path(index_dir, s)
        if not FileSystems.exists(path):
            raise IndexCorruptError(f"index shard {path!r} listed in {index_dir!r}/{MANIFEST} is missing; "
                                    "rebuild the index")
    return manifest


def inside(index_dir: str, rel: Any, what: str = "shard") -> str:
    """The path of ``rel`` (a manifest path, relative to the index directory) if it resolves inside
    ``index_dir``; ``IndexCorruptError`` for an absolute path, a URL, a ``..`` component, or (local
    indexes) a symbolic link that leads out of the directory. A manifest is data: it never decides which
    files outside the index are read."""
    where = f"index manifest of {index_dir!r}"
    if not isinstance(rel, str) or not rel.strip():
        raise IndexCorruptError(f"{where}: {what} path {rel!r} is not a relative path; rebuild the index")
    norm = rel.replace("\\", "/")
    parts = norm.split("/")
    if "://" in rel or norm.startswith("/") or os.path.isabs(rel) or (len(rel) > 1 and rel[1] == ":") \
            or ".." in parts or "" in parts:
        raise IndexCorruptError(f"{where}: {what} path {rel!r} is not a plain path inside the index directory "
                                "(absolute, a URL, or with '..'); refusing to read it. Rebuild the index")
    root = index_dir.rstrip("/")
    path = _join(root, rel)
    if "://" not in root:
        real_root = os.path.realpath(root)
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise IndexCorruptError(f"{where}: {what} path {rel!r} resolves to {real!r}, outside the index "
                                    "directory (a symbolic link out of it); refusing to read it. Rebuild the index")
    return path


def shard_path(index_dir: str, shard: Mapping[str, Any]) -> str:
    """Path of a manifest shard, which must lie inside the index directory (``inside``)."""
    return inside(index_dir, shard.get("path"), "shard")


def shard_refs(index_dir: str, manifest: Mapping[str, Any]) -> list[dict]:
    """The manifest's shards with absolute paths, for the scoring DoFns."""
    return [dict(s, path=shard_path(index_dir, s)) for s in manifest["shards"]]


def read_shard(shard: Mapping[str, Any], columns=None, *, batch_rows: int = 65536) -> Iterator[pa.RecordBatch]:
    """Stream a verified index shard as RecordBatches: its bytes must hash to the manifest's sha256
    and hold its row count (``IndexCorruptError`` otherwise). ``columns`` naming ``sketch`` also read
    ``sketch_scale`` when the shard stores one (a 16-bit sketch: ``project.sketch_matrix`` decodes both)."""
    import pyarrow.parquet as pq

    path = shard["path"]
    try:
        with FileSystems.open(path) as f:
            data = f.read()
    except Exception as e:  # noqa: BLE001
        raise IndexCorruptError(f"index shard {path!r} cannot be read ({e}); rebuild the index") from None
    digest = hashlib.sha256(data).hexdigest()
    if shard.get("sha256") and digest != shard["sha256"]:
        raise IndexCorruptError(f"index shard {path!r} has checksum {digest[:16]}…, the manifest says "
                                f"{shard['sha256'][:16]}…: the file changed after indexing; rebuild the index")
    pf = pq.ParquetFile(pa.BufferReader(data))
    if pf.metadata.num_rows != shard["rows"]:
        raise IndexCorruptError(f"index shard {path!r} holds {pf.metadata.num_rows} rows, the manifest says "
                                f"{shard['rows']}; rebuild the index")
    if columns is not None and "sketch" in columns and "sketch_scale" not in columns \
            and "sketch_scale" in pf.schema_arrow.names:
        columns = list(columns) + ["sketch_scale"]
    yield from pf.iter_batches(batch_size=batch_rows, columns=columns)


def read_index_table(index_dir: str, columns=None) -> pa.Table:
    """The whole (verified) index as one Arrow table (small indexes, tests and reports)."""
    manifest = read_manifest(index_dir)
    tables = [pa.Table.from_batches(list(read_shard(s, columns))) for s in shard_refs(index_dir, manifest)]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({})
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.concat_tables(_as_json_where_types_differ(tables), promote_options="permissive")


def _as_json_where_types_differ(tables: list[pa.Table]) -> list[pa.Table]:
    """Record-field columns whose type differs between shards (e.g. a struct in one, JSON text in another)
    become JSON text everywhere, so the shards concatenate."""
    import json

    types: dict[str, set] = {}
    for t in tables:
        for f in t.schema:
            types.setdefault(f.name, set()).add(str(f.type))
    mixed = [name for name, ts in types.items() if len(ts) > 1 and name not in ("id", "projection", "loss",
                                                                                  "self_influence", "label",
                                                                                  "sketch", "sketch_scale")]
    out = []
    for t in tables:
        for name in mixed:
            if name in t.column_names:
                col = t.column(name)
                text = col if pa.types.is_string(col.type) else pa.array(
                    [None if v is None else json.dumps(v, sort_keys=True, default=str) for v in col.to_pylist()],
                    pa.string())
                t = t.set_column(t.schema.get_field_index(name), name, text)
        out.append(t)
    return out


def index_arrays(index_dir: str) -> tuple[list[str], np.ndarray]:
    """(ids, projections [N, k]) of a whole index."""
    from beam_influence.beam.project import projection_matrix

    t = read_index_table(index_dir, ["id", "projection"])
    return t.column("id").to_pylist(), projection_matrix(t)
