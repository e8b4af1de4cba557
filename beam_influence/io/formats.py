"""Reading and writing example records: Parquet, JSONL, NumPy ``.npz`` and TFRecord (``tf.train.Example``).

A *record* is a dict ``{"id": str, <feature>: value, ..., <metadata>: value}``. Every reader here
yields records in one canonical form, whatever the file format:

* ``"id"`` comes first and is a ``str``: the record's own ``"id"`` field (a non-empty string, or an
  integer turned into a string) when present, else the *derived id* ``f"{shard}:{offset}"``, where
  ``shard`` is the file's basename without the format extension (and ``.gz``), e.g.
  ``train-00000-of-00002``, and ``offset`` the 0-based index of the record within that file. The
  derived id does not depend on the format, so converting a data set between formats keeps its ids.
* arrays (lists, nested lists, numpy arrays) become numpy arrays: floats → ``float32``, integers →
  ``int64``, booleans → ``bool``; lists of strings stay python lists of ``str``;
* scalars become python ``bool`` / ``int`` / ``float`` / ``str`` (``bytes`` stay ``bytes``);
* fields whose value is null (``None``, a Parquet null) are left out.

Bad input is never dropped silently and never raises: a JSONL line that is not a JSON object, a
TFRecord payload that is not a ``tf.train.Example``, a value of an unsupported type, an unreadable
file (a corrupt Parquet file, an ``.npz`` holding pickled objects) each yield an *error record*
``{"id": <derived id>, "__error__": <reason>, "__raw__": <raw bytes or str, at most 10 000>}``
(``is_error_record`` tells them apart). A whole-file failure uses the id ``f"{shard}:file"``; a
failure part-way (a corrupt TFRecord frame, an unreadable Parquet row group) uses the derived id of
the first record lost. Configuration errors (unknown format, missing file, TensorFlow not
installed) do raise.

Format notes:

* Parquet: one row per record, list (of list …) columns for arrays; float arrays are written as
  ``float32``. Fields missing from some records are written as nulls (and so left out on reading).
* JSONL: one JSON object per line; blank lines are skipped and do not count as records.
* ``.npz``: one array per field with leading axis N (ids as a unicode array); every record must have
  the same fields with equal shapes. Always loaded with ``allow_pickle=False``.
* TFRecord: a ``tf.train.Example`` per record (needs the ``beam-influence[tf]`` extra); floats go to
  ``float_list``, ints and bools to ``int64_list``, strings to ``bytes_list``; arrays are flattened
  (``ModelSpec.decode`` reshapes). On reading, a one-element list becomes a scalar, so shapes, bools
  (read back as 0/1) and float64 precision (read back as float32 values) are not preserved.
  Framing (length + masked CRC32C) is Beam's ``tfrecordio`` framing.

All files are opened through ``apache_beam.io.filesystems.FileSystems``, so ``gs://`` etc. work.
"""
from __future__ import annotations

import functools
import io
import json
import zipfile
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

FORMATS = ("parquet", "jsonl", "npz", "tfrecord")

ERROR_KEY = "__error__"
RAW_KEY = "__raw__"
ID_KEY = "id"
MAX_RAW = 10_000  # error records keep at most this many bytes (or characters) of the raw input

# Extension -> format; longest first so ".tfrecords" wins over ".tfrecord".
_EXTENSIONS = (
    (".parquet", "parquet"),
    (".jsonl", "jsonl"),
    (".ndjson", "jsonl"),
    (".json", "jsonl"),
    (".npz", "npz"),
    (".tfrecords", "tfrecord"),
    (".tfrecord", "tfrecord"),
    (".tfrec", "tfrecord"),
)
_WRITE_EXTENSION = {"parquet": "parquet", "jsonl": "jsonl", "npz": "npz", "tfrecord": "tfrecord"}
_GZIP_OK = ("jsonl", "tfrecord")

_LOG = logging.getLogger(__name__)


# ---- names, ids, error records --------------------------------------------------------------------
def _basename(path: str) -> str:
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _split_name(path: str) -> tuple[str, str | None, bool]:
    """(stem, format or None, gzipped) of a path's basename."""
    name = _basename(path)
    gz = name.lower().endswith(".gz")
    if gz:
        name = name[:-3]
    lower = name.lower()
    for ext, fmt in _EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], fmt, gz
    return name, None, gz


def infer_format(path: str) -> str:
    """The format of ``path`` from its extension: .parquet, .jsonl/.ndjson/.json, .npz,
    .tfrecord/.tfrecords/.tfrec; JSONL and TFRecord may end in ``.gz`` (gzip)."""
    _, fmt, gz = _split_name(path)
    if fmt is None:
        raise ValueError(
            f"cannot infer the record format of {path!r} from its extension; pass format= one of {FORMATS}"
        )
    if gz and fmt not in _GZIP_OK:
        raise ValueError(f"{path!r}: gzip is supported only for {_GZIP_OK}, not {fmt!r}")
    return fmt


def shard_basename(path: str) -> str:
    """The file's basename without its format extension and ``.gz``: the prefix of derived ids."""
    stem, fmt, gz = _split_name(path)
    if fmt is None:
        return _basename(path)
    return stem


def derive_id(path: str, offset: int | str) -> str:
    """The stable id of the record at ``offset`` (0-based) in shard ``path``: ``f"{shard}:{offset}"``."""
    return f"{shard_basename(path)}:{offset}"


def error_record(record_id: str, reason: str, raw: bytes | str | None = b"") -> dict:
    """A bad-record marker for the dead-letter output."""
    if raw is None:
        raw = b""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw[:MAX_RAW])
    else:
        raw = str(raw)[:MAX_RAW]
    return {ID_KEY: record_id, ERROR_KEY: reason, RAW_KEY: raw}


def is_error_record(record: Mapping[str, Any]) -> bool:
    """True for the bad-record markers readers yield instead of raising."""
    return ERROR_KEY in record


def _check_format(format: str | None, path: str) -> str:
    if format is None:
        return infer_format(path)
    if format not in FORMATS:
        raise ValueError(f"unknown record format {format!r}; expected one of {FORMATS}")
    return format


def _compression(path: str):
    from apache_beam.io.filesystem import CompressionTypes

    return CompressionTypes.GZIP if path.lower().endswith(".gz") else CompressionTypes.UNCOMPRESSED


# ---- canonical values ------------------------------------------------------------------------------
class BadValue(ValueError):
    """A value that is not a number, string, or (nested) list / array of numbers or strings."""


_DROP = object()


def _all_strings(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_all_strings(v) for v in value)
    return isinstance(value, (str, bytes))


def canonical_value(value: Any) -> Any:
    """The canonical form of one field value (see the module docstring); ``BadValue`` if unsupported."""
    if value is None:
        return _DROP
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError, OverflowError) as e:
            raise BadValue(f"not a regular (rectangular) array: {e}") from None
        kind = arr.dtype.kind
        if kind == "b":
            return arr.astype(bool, copy=False)
        if kind in "iu":
            if kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
                raise BadValue("unsigned integers out of int64 range")
            return arr.astype(np.int64, copy=False)
        if kind == "f":
            return arr.astype(np.float32, copy=False)
        if kind in "US":
            if not isinstance(value, np.ndarray) and not _all_strings(value):
                raise BadValue("a list mixing strings and non-strings")
            return arr.tolist()
        if kind == "O":
            raise BadValue("not a regular array of numbers or strings (ragged, nulls or mixed types)")
        raise BadValue(f"unsupported array dtype {arr.dtype}")
    raise BadValue(f"unsupported value type {type(value).__name__}")


def _canonical_id(value: Any) -> str | None:
    """The id from a record's own "id" value; None when absent; BadValue when unusable."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadValue("field 'id' is not valid UTF-8") from None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise BadValue(f"field 'id' must be a non-empty string or an integer, got {value!r:.80}")


def canonical_record(fields: Mapping[str, Any], default_id: str) -> dict:
    """Canonicalise one record's fields; ``default_id`` is used when it has no id. Raises BadValue."""
    rid = _canonical_id(fields.get(ID_KEY))
    out = {ID_KEY: rid if rid is not None else default_id}
    for key, value in fields.items():
        if key == ID_KEY:
            continue
        if not isinstance(key, str):
            raise BadValue(f"field name {key!r} is not a string")
        if key in (ERROR_KEY, RAW_KEY):
            raise BadValue(f"field name {key!r} is reserved for error records")
        try:
            cv = canonical_value(value)
        except BadValue as e:
            raise BadValue(f"field {key!r}: {e}") from None
        if cv is not _DROP:
            out[key] = cv
    return out


def _record_or_error(fields: Any, path: str, offset: int, raw: Callable[[], Any] | bytes | str) -> dict:
    rid = derive_id(path, offset)
    if not isinstance(fields, Mapping):
        kind = type(fields).__name__
        return error_record(rid, f"record is a {kind}, expected an object/mapping", raw() if callable(raw) else raw)
    try:
        return canonical_record(fields, rid)
    except BadValue as e:
        return error_record(rid, str(e), raw() if callable(raw) else raw)


# ---- per-format parsers (the one implementation shared by iter_records and ReadExamples) ---------
def parse_shard(f, path: str, format: str | None = None) -> Iterator[dict]:
    """Yield the canonical records (and error records) of one shard from the open binary stream ``f``.

    ``path`` names the shard (for derived ids and messages); ``format`` defaults to ``infer_format(path)``.
    The stream must already be decompressed (``.gz``). Used by ``iter_records`` and ``ReadExamples``.
    """
    fmt = _check_format(format, path)
    return _PARSERS[fmt](f, path)


def _parse_jsonl(f, path: str) -> Iterator[dict]:
    offset = 0
    while True:
        line = f.readline()
        if not line:
            return
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        rid = derive_id(path, offset)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield error_record(rid, f"line is not valid UTF-8: {e}", line)
        else:
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError) as e:
                yield error_record(rid, f"invalid JSON: {type(e).__name__}: {e}", text)
            else:
                yield _record_or_error(obj, path, offset, text)
        offset += 1


def _seekable(f):
    try:
        if f.seekable():
            return f
    except (AttributeError, OSError, ValueError):
        pass
    return io.BytesIO(f.read())


def _parse_parquet(f, path: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(_seekable(f))
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not readable Parquet
        yield error_record(derive_id(path, "file"), f"not a readable Parquet file: {type(e).__name__}: {e}")
        return
    offset = 0
    for group, size in enumerate(sizes):
        try:
            rows = pf.read_row_group(group).to_pylist()
            if len(rows) != size:
                raise ValueError(f"row group has {len(rows)} rows, metadata says {size}")
        except Exception as e:  # noqa: BLE001 - a corrupt row group loses its rows, reported once
            yield error_record(
                derive_id(path, offset),
                f"Parquet row group {group} (records {offset}..{offset + size - 1}) is unreadable: "
                f"{type(e).__name__}: {e}",
            )
            offset += size
            continue
        for row in rows:
            yield _record_or_error(row, path, offset, lambda row=row: repr(row))
            offset += 1


def _parse_npz(f, path: str) -> Iterator[dict]:
    def fail(reason: str) -> Iterator[dict]:
        yield error_record(derive_id(path, "file"), reason)

    try:
        npz = np.load(_seekable(f), allow_pickle=False)  # files are untrusted: never unpickle
    except Exception as e:  # noqa: BLE001 - not a zip / .npy / refuses pickled data
        yield from fail(f"not a readable .npz file (loaded with allow_pickle=False): {type(e).__name__}: {e}")
        return
    if not isinstance(npz, np.lib.npyio.NpzFile):
        yield from fail("not an .npz archive (a single .npy array?); expected one array per field")
        return
    columns: dict[str, Any] = {}
    with npz:
        for name in npz.files:
            try:
                arr = npz[name]
            except Exception as e:  # noqa: BLE001 - object (pickled) arrays refuse to load
                yield from fail(f"array {name!r} cannot be loaded with allow_pickle=False: {type(e).__name__}: {e}")
                return
            if arr.ndim == 0:
                yield from fail(f"array {name!r} is 0-d; every field needs a leading record axis")
                return
            if arr.dtype.kind not in "biufUS":
                yield from fail(f"array {name!r} has unsupported dtype {arr.dtype}")
                return
            columns[name] = arr
    lengths = {name: len(arr) for name, arr in columns.items()}
    if len(set(lengths.values())) > 1:
        yield from fail(f"arrays have different leading lengths {lengths}")
        return
    n = next(iter(lengths.values()), 0)
    per_row = {}
    for name, arr in columns.items():
        if arr.ndim == 1 or arr.dtype.kind in "US":
            per_row[name] = arr.tolist()  # python scalars (or nested lists of str)
        else:
            try:
                per_row[name] = canonical_value(arr)  # one cast for the whole column
            except BadValue as e:
                yield from fail(f"array {name!r}: {e}")
                return
    for i in range(n):
        row = {name: col[i] for name, col in per_row.items()}
        yield _record_or_error(row, path, i, lambda row=row: repr(row))


# -- TFRecord ------------------------------------------------------------------------------------
def _example_pb2():
    """tensorflow's Example proto module, imported only when TFRecords are used."""
    import importlib

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return importlib.import_module("tensorflow.core.example.example_pb2")
    except ImportError as e:
        raise ImportError(
            "TFRecord (tf.train.Example) support needs TensorFlow: install the extra "
            "`pip install 'beam-influence[tf]'` (tensorflow-cpu)"
        ) from e


_CRC32C: Callable[[bytes], int] | None = None


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


def _crc32c_python(data: bytes, _table=[]) -> int:  # noqa: B006 - lazily filled cache
    if not _table:
        _table.extend(_crc32c_table())
    t, crc = _table, 0xFFFFFFFF
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc32c(data: bytes) -> int:
    """CRC32C via Beam's choice (python-snappy, google-crc32c or crcmod), else pure python (slow)."""
    global _CRC32C
    if _CRC32C is None:
        from apache_beam.io import tfrecordio

        try:
            tfrecordio._default_crc32c_fn(b"")  # pylint: disable=protected-access
            _CRC32C = tfrecordio._default_crc32c_fn  # pylint: disable=protected-access
        except RuntimeError:
            _LOG.warning("no fast CRC32C library (google-crc32c, crcmod, python-snappy); TFRecord framing "
                         "uses a pure-python CRC32C (a few MB/s). `pip install google-crc32c` to speed it up.")
            _CRC32C = _crc32c_python
    return _CRC32C(data)


@functools.lru_cache(maxsize=None)
def _framing():
    """Beam's TFRecord framing (apache_beam.io.tfrecordio), with the CRC32C hook above."""
    from apache_beam.io.tfrecordio import _TFRecordUtil  # pylint: disable=protected-access

    class _Framing(_TFRecordUtil):
        @classmethod
        def _masked_crc32c(cls, value, crc32c_fn=None):
            return super()._masked_crc32c(value, crc32c_fn or _crc32c)

    return _Framing


def _from_feature(feature) -> Any:
    kind = feature.WhichOneof("kind")
    if kind == "float_list":
        vals = np.asarray(feature.float_list.value, dtype=np.float32)
        return float(vals[0]) if len(vals) == 1 else vals
    if kind == "int64_list":
        vals = np.asarray(feature.int64_list.value, dtype=np.int64)
        return int(vals[0]) if len(vals) == 1 else vals
    if kind == "bytes_list":
        out = []
        for b in feature.bytes_list.value:
            try:
                out.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(bytes(b))
        return out[0] if len(out) == 1 else out
    return np.zeros(0, np.float32)  # a Feature with no list set: an empty array


def _parse_tfrecord(f, path: str) -> Iterator[dict]:
    example_pb2 = _example_pb2()
    framing = _framing()
    offset = 0
    while True:
        try:
            payload = framing.read_record(f)
        except ValueError as e:
            yield error_record(derive_id(path, offset),
                               f"corrupt TFRecord framing at record {offset}; the rest of the shard is lost: {e}")
            return
        if payload is None:
            return
        rid = derive_id(path, offset)
        try:
            example = example_pb2.Example.FromString(payload)
        except Exception as e:  # noqa: BLE001 - protobuf DecodeError (type differs between backends)
            yield error_record(rid, f"payload is not a parsable tf.train.Example: {e}", payload)
        else:
            feats = example.features.feature
            fields = {key: _from_feature(feats[key]) for key in sorted(feats)}
            yield _record_or_error(fields, path, offset, payload)
        offset += 1


_PARSERS = {"parquet": _parse_parquet, "jsonl": _parse_jsonl, "npz": _parse_npz, "tfrecord": _parse_tfrecord}


# ---- reading -----------------------------------------------------------------------------------------
def iter_records(path: str, format: str | None = None) -> Iterator[dict]:
    """Yield the records (and error records) of one shard file, in file order."""
    fmt = _check_format(format, path)  # raise here, not at the first next()
    return _iter_file(path, fmt)


def _iter_file(path: str, fmt: str) -> Iterator[dict]:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type=_compression(path)) as f:
        yield from parse_shard(f, path, fmt)


def match_files(pattern: str) -> list[str]:
    """Paths matching a glob, sorted. Like ``fileio.MatchFiles``: no match is an error unless the
    pattern holds a ``*``."""
    from apache_beam.io.filesystems import FileSystems

    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    paths = [p for p in paths if not p.endswith(("/", "\\"))]
    if not paths and "*" not in pattern:  # fileio.EmptyMatchTreatment.ALLOW_IF_WILDCARD
        raise FileNotFoundError(f"no files match {pattern!r}")
    return paths


def read_records(pattern: str, format: str | None = None) -> list[dict]:
    """All records of all files matching ``pattern`` (files sorted by path, records in file order)."""
    out: list[dict] = []
    for path in match_files(pattern):
        out.extend(iter_records(path, format))
    return out


# ---- writing -----------------------------------------------------------------------------------------
def _shard_bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, num_shards)
    bounds, start = [], 0
    for i in range(num_shards):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _prepared(records: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Canonical values for writing; records keep an "id" only when they had one."""
    out = []
    for i, rec in enumerate(records):
        if ERROR_KEY in rec:
            raise ValueError(f"record {i} is an error record ({rec.get(ERROR_KEY)!r}); route it elsewhere")
        try:
            canon = canonical_record(rec, "")
        except BadValue as e:
            raise ValueError(f"record {i} (id {rec.get(ID_KEY)!r}) cannot be written: {e}") from None
        if _canonical_id(rec.get(ID_KEY)) is None:
            del canon[ID_KEY]
        out.append(canon)
    return out


def _field_names(records: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for rec in records:
        for key in rec:
            names.setdefault(key, None)
    keys = list(names)
    return ([ID_KEY] if ID_KEY in names else []) + [k for k in keys if k != ID_KEY]


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        raise TypeError("bytes values cannot be written to JSONL")
    return value


def _write_jsonl(records: list[dict], f) -> None:
    for i, rec in enumerate(records):
        try:
            line = json.dumps({k: _jsonable(v) for k, v in rec.items()}, separators=(",", ":"))
        except TypeError as e:
            raise ValueError(f"record {rec.get(ID_KEY, i)!r}: {e}") from None
        f.write(line.encode("utf-8") + b"\n")


def _parquet_table(records: list[dict]):
    import pyarrow as pa

    columns = {}
    for key in _field_names(records):
        values = [rec.get(key) for rec in records]
        present = [v for v in values if v is not None]
        arrays = [isinstance(v, (np.ndarray, list)) for v in present]
        try:
            if any(arrays):
                if not all(arrays):
                    raise ValueError("mixes scalars and arrays")
                columns[key] = _parquet_list_column(values, present)
            else:
                columns[key] = pa.array(values)
        except (ValueError, TypeError, pa.ArrowException) as e:
            raise ValueError(f"field {key!r} cannot be written to Parquet: {e}") from None
    if not columns:
        return pa.table({})
    return pa.table(columns)


def _parquet_list_column(values: list, present: list):
    import pyarrow as pa

    ndims, kinds = set(), set()
    for v in present:
        if isinstance(v, np.ndarray):
            ndims.add(v.ndim)
            kinds.add(v.dtype.kind)
        else:  # list of str (possibly nested)
            ndims.add(np.asarray(v).ndim)
            kinds.add("U")
    if len(ndims) != 1:
        raise ValueError(f"arrays of different ranks {sorted(ndims)}")
    if "U" in kinds or "S" in kinds:
        if kinds - {"U", "S"}:
            raise ValueError("mixes string and numeric arrays")
        leaf = pa.string() if kinds == {"U"} else pa.binary()
    elif "f" in kinds:
        leaf = pa.float32()
    elif "i" in kinds:
        leaf = pa.int64()
    else:
        leaf = pa.bool_()
    typ = leaf
    for _ in range(ndims.pop()):
        typ = pa.list_(typ)
    py = [v.tolist() if isinstance(v, np.ndarray) else v for v in values]
    return pa.array(py, type=typ)


def _npz_arrays(records: list[dict]) -> dict[str, np.ndarray]:
    keys = _field_names(records)
    arrays = {}
    for key in keys:
        missing = [i for i, rec in enumerate(records) if key not in rec]
        if missing:
            raise ValueError(f"npz needs every field in every record: field {key!r} is missing from record "
                             f"{missing[0]} (id {records[missing[0]].get(ID_KEY)!r})")
        values = [rec[key] for rec in records]
        n_str = sum(isinstance(v, (str, bytes)) for v in values)
        if 0 < n_str < len(values):
            raise ValueError(f"field {key!r} mixes strings and non-strings; npz stores plain arrays only")
        try:
            arr = np.stack([np.asarray(v) for v in values]) if isinstance(values[0], np.ndarray) \
                else np.asarray(values)
        except ValueError as e:
            raise ValueError(f"field {key!r} cannot be stacked into one array: {e}") from None
        if arr.dtype.kind not in "biufUS":
            raise ValueError(f"field {key!r} mixes types (numpy dtype {arr.dtype}); npz stores plain arrays only")
        arrays[key] = arr
    return arrays


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz archive (what np.savez writes) without pickling, for any field names."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _fill_feature(feature, key: str, value: Any) -> None:
    """Set a tf.train.Feature (in place) from a canonical value."""
    if isinstance(value, (bool, int)):
        feature.int64_list.value.append(int(value))
    elif isinstance(value, float):
        feature.float_list.value.append(value)
    elif isinstance(value, (str, bytes)):
        feature.bytes_list.value.append(value.encode("utf-8") if isinstance(value, str) else value)
    elif isinstance(value, np.ndarray):
        flat = value.ravel()
        if value.dtype.kind in "bi":
            feature.int64_list.SetInParent()
            feature.int64_list.value.extend(flat.astype(np.int64).tolist())
        else:
            feature.float_list.SetInParent()
            feature.float_list.value.extend(flat.astype(np.float32).tolist())
    elif isinstance(value, list):  # (nested) list of strings
        flat = np.asarray(value, dtype=object).ravel().tolist()
        feature.bytes_list.SetInParent()
        feature.bytes_list.value.extend(s.encode("utf-8") if isinstance(s, str) else s for s in flat)
    else:  # pragma: no cover - canonical values are exhausted above
        raise ValueError(f"field {key!r}: cannot write {type(value).__name__} to a tf.train.Example")


def _write_tfrecord(records: list[dict], f) -> None:
    example_pb2 = _example_pb2()
    framing = _framing()
    for rec in records:
        example = example_pb2.Example()
        for key, value in rec.items():
            _fill_feature(example.features.feature[key], key, value)
        framing.write_record(f, example.SerializeToString(deterministic=True))


def write_records(records: Iterable[Mapping[str, Any]], path_prefix: str, format: str, num_shards: int = 1,
                  *, compression: str | None = None) -> list[str]:
    """Write records into ``num_shards`` files ``{path_prefix}-{i:05d}-of-{n:05d}.{ext}``; return their paths.

    Records are split contiguously (shard i holds the i-th run of records, the first ``N % n`` shards one
    more than the rest), so reading the shards in order gives the records back in order. Records without
    an "id" are written without one (readers then derive ``{shard}:{offset}``). ``compression="gzip"``
    (JSONL and TFRecord only) appends ``.gz``. Invalid values raise ValueError (writers are strict).
    """
    from apache_beam.io.filesystems import FileSystems

    if format not in FORMATS:
        raise ValueError(f"unknown record format {format!r}; expected one of {FORMATS}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if compression not in (None, "gzip"):
        raise ValueError(f"compression must be None or 'gzip', got {compression!r}")
    if compression and format not in _GZIP_OK:
        raise ValueError(f"gzip compression is supported only for {_GZIP_OK}")
    recs = _prepared(records)
    ext = _WRITE_EXTENSION[format] + (".gz" if compression else "")
    bounds = _shard_bounds(len(recs), num_shards)

    # Build whole-data columns once (validates types across all records), slice per shard.
    if format == "parquet":
        table = _parquet_table(recs)
    elif format == "npz":
        arrays = _npz_arrays(recs) if recs else {}

    paths = []
    for i, (start, end) in enumerate(bounds):
        path = f"{path_prefix}-{i:05d}-of-{num_shards:05d}.{ext}"
        with FileSystems.create(path, compression_type=_compression(path)) as f:
            if format == "jsonl":
                _write_jsonl(recs[start:end], f)
            elif format == "tfrecord":
                _write_tfrecord(recs[start:end], f)
            elif format == "parquet":
                import pyarrow.parquet as pq

                buf = io.BytesIO()
                pq.write_table(table.slice(start, end - start), buf)
                f.write(buf.getvalue())
            else:
                f.write(_npz_bytes({k: v[start:end] for k, v in arrays.items()}))
        paths.append(path)
    return paths
