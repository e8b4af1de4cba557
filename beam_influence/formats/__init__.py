"""Example records in Parquet, JSONL, NumPy ``.npz`` and TFRecord (``tf.train.Example``), read as
columnar chunks: Arrow ``RecordBatch``es of good records plus the bad records of the same range.

Reading::

    for path in match_files("data/train-*"):
        for split in splits(path):                 # Parquet: runs of row groups; others: the file
            for chunk in read_split(split):        # Chunk(source, offset, batch, errors)
                ...                                # chunk.batch: "id" (string) first, then the fields

or ``iter_chunks(pattern)`` for all of it; ``read_records`` / ``iter_records`` give the record dicts of
before (built from the chunks).

Records and ids (unchanged): ``id`` is the record's own ``id`` (a non-empty string, or an integer turned
into a string) when present, else the *derived id* ``f"{shard}:{offset}"`` — ``shard`` the basename
without the format extension (and ``.gz``), ``offset`` the 0-based record number in the file — so
converting a data set between formats keeps its ids. Columns keep natural Arrow types: numbers int64 /
float32 / float64 / bool, arrays as (nested) ``list<...>`` (float leaves float32, integer leaves int64),
strings as string; a field a record lacks is null.

Values that are not features travel, never kill a record: a nested object / Parquet struct or map, a
timestamp, date, time, decimal or duration, a list of objects are kept (``canonical_value``; Parquet
columns of those types pass through untouched; JSONL objects are ``struct`` columns where Arrow parses the
block, else their compact JSON text in a ``string`` column; ``read_records`` gives the python value). The
model's features are checked later, column-wise (``ModelSpec.decode_batch``).

Bad input is never dropped silently and never raises: a line that is not a JSON object, a payload that
is not a ``tf.train.Example``, an unsupported value (ragged array, nulls inside an array, a list mixing
strings and numbers, ...), a bad id, a reserved field name (``__error__``, ``__raw__``), an unreadable file (corrupt Parquet, a pickled
``.npz``), a truncated gzip stream each give an ``ErrorRecord`` (``raw`` at most ``MAX_RAW``). A
whole-file failure uses the id ``f"{shard}:file"``; a failure part-way (a corrupt TFRecord frame, an
unreadable Parquet row group, a truncated or corrupt ``.gz`` member) the derived id of the first record
lost, and that one error record stands for the rest (of the row group / member / shard), with the count
where it is known. Configuration errors (unknown format, no
matching file, TensorFlow not installed) raise. A pattern skips the marker files beside shards
(``is_marker_file``: ``_SUCCESS``, ``*.crc``, names starting with ``_`` or ``.``), counted and logged, and
warns when its files have different name prefixes (``train-*`` and ``test-*``: two data sets mixed).

Files are opened through ``apache_beam.io.filesystems.FileSystems`` (gs:// etc. work; local Parquet is
read natively); a ``.gz`` shard is checked before it is read (``_gzip``: every member's deflate data,
CRC-32 and length), and only the members that pass are read: no record of a corrupt or cut-short member
is ever a good record.

Formats register themselves (``base.register``); adding one is adding a module here.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from beam_influence.formats.base import (
    ERROR_KEY,
    ID_KEY,
    MAX_RAW,
    RAW_KEY,
    BadValue,
    Chunk,
    ErrorRecord,
    Format,
    Split,
    canonical_record,
    canonical_value,
    chunk_digest,
    chunk_records,
    derive_id,
    error_record,
    infer_format,
    is_error_record,
    is_marker_file,
    iter_chunks,
    iter_records,
    match_data_files,
    match_files,
    read_records,
    read_split,
    register,
    registered_formats,
    report_matches,
    shard_basename,
    shard_prefix,
    splits,
    write_records,
    write_table,
)

# The built-in formats, in this order; then any other format module of the package.
from beam_influence.formats import parquet, jsonl, npz, tfrecord  # noqa: E402,F401

for _m in _pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name not in ("base", "convert", "parquet", "jsonl", "npz", "tfrecord"):
        _importlib.import_module(f"{__name__}.{_m.name}")

FORMATS: tuple[str, ...] = registered_formats()

__all__ = [
    "ERROR_KEY",
    "FORMATS",
    "ID_KEY",
    "MAX_RAW",
    "RAW_KEY",
    "BadValue",
    "Chunk",
    "ErrorRecord",
    "Format",
    "Split",
    "canonical_record",
    "canonical_value",
    "chunk_digest",
    "chunk_records",
    "derive_id",
    "error_record",
    "infer_format",
    "is_error_record",
    "is_marker_file",
    "iter_chunks",
    "iter_records",
    "match_data_files",
    "match_files",
    "read_records",
    "read_split",
    "register",
    "registered_formats",
    "report_matches",
    "shard_basename",
    "shard_prefix",
    "splits",
    "write_records",
    "write_table",
]
