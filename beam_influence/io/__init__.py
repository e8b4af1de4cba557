"""Record I/O: Parquet, JSONL, ``.npz`` and TFRecord examples with stable ids, as plain Python
(``iter_records`` / ``read_records`` / ``write_records``) and as a Beam PTransform (``ReadExamples``),
both on one parser. See ``beam_influence.io.formats`` for the record conventions."""
from beam_influence.io.beam_io import ReadExamples
from beam_influence.io.convert import convert_digits
from beam_influence.io.formats import (
    ERROR_KEY,
    FORMATS,
    MAX_RAW,
    RAW_KEY,
    BadValue,
    canonical_record,
    canonical_value,
    derive_id,
    error_record,
    infer_format,
    is_error_record,
    iter_records,
    match_files,
    parse_shard,
    read_records,
    shard_basename,
    write_records,
)

__all__ = [
    "ERROR_KEY",
    "FORMATS",
    "MAX_RAW",
    "RAW_KEY",
    "BadValue",
    "ReadExamples",
    "canonical_record",
    "canonical_value",
    "convert_digits",
    "derive_id",
    "error_record",
    "infer_format",
    "is_error_record",
    "iter_records",
    "match_files",
    "parse_shard",
    "read_records",
    "shard_basename",
    "write_records",
]
