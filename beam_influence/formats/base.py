"""The format-independent part of ``beam_influence.formats``: the registry, ``Split`` / ``Chunk`` /
``ErrorRecord``, ids, canonical values, file matching and opening, and the top-level read/write functions
(which dispatch to the registered formats).

A *format* is a ``Format`` subclass registered with ``@register``, one module per format (see
``parquet.py``): it says which extensions are its own, how a file is cut into ``Split``s, how a split is
read into ``Chunk``s, and how records / tables are written.
"""
from __future__ import annotations

import collections.abc as _abc
import contextlib
import dataclasses
import datetime as _dt
import decimal as _decimal
import gzip
import io
import logging
import re
import zlib
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from beam_influence.formats._arrow import ID_KEY, batch_records
from beam_influence.formats._gzip import GzipMemberError, RecordCounter, VerifiedGzip, check_gzip

ERROR_KEY = "__error__"
RAW_KEY = "__raw__"
MAX_RAW = 10_000  # error records keep at most this many bytes (or characters) of the raw input
DEFAULT_BATCH_ROWS = 65536
DEFAULT_ROWS_PER_SPLIT = 65536

# Errors reading a truncated or corrupt gzip stream (``_gzip.GzipMemberError`` is a ``gzip.BadGzipFile``;
# EOFError and zlib.error are what Python's gzip module raises, kept for readers that use it).
GZIP_ERRORS: tuple[type[BaseException], ...] = (EOFError, gzip.BadGzipFile, zlib.error)


# ---- error records --------------------------------------------------------------------------------
def _cut_raw(raw: Any) -> bytes | str:
    if raw is None:
        return b""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw[:MAX_RAW])
    return str(raw)[:MAX_RAW]


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
    """A bad record (or a lost range of records) of a shard: its id, why, and its raw input.

    ``id`` is the derived id ``f"{shard}:{offset}"`` of the (first) record it stands for, or
    ``f"{shard}:file"`` when the whole file is unreadable. ``raw`` is cut to ``MAX_RAW`` bytes/characters.
    ``offset`` (not compared) is that record's offset in the file, None for a whole-file failure.
    """

    id: str
    reason: str
    raw: bytes | str = b""
    offset: int | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "raw", _cut_raw(self.raw))

    def to_dict(self) -> dict:
        """The record-dict form (``{"id", "__error__", "__raw__"}``) that ``read_records`` returns."""
        return {ID_KEY: self.id, ERROR_KEY: self.reason, RAW_KEY: self.raw}


def error_record(record_id: str, reason: str, raw: bytes | str | None = b"") -> dict:
    """A bad-record marker (dict form) for the dead-letter output."""
    return {ID_KEY: record_id, ERROR_KEY: reason, RAW_KEY: _cut_raw(raw)}


def is_error_record(record: Mapping[str, Any]) -> bool:
    """True for the bad-record markers readers yield instead of raising."""
    return ERROR_KEY in record


# ---- splits and chunks ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Split:
    """A unit of reading work (picklable); a file has one or more.

    ``index``: 0-based split number within the file. ``start``: offset (record number in the file) of
    its first record when known. ``num_rows``: its record count when known from metadata (Parquet).
    ``row_groups``: the Parquet row groups it covers (empty: all of them).
    """

    path: str
    format: str
    index: int
    start: int | None = None
    num_rows: int | None = None
    row_groups: tuple[int, ...] = ()


@dataclasses.dataclass
class Chunk:
    """What reading yields: the good records of a range of a shard as an Arrow batch, and the bad ones.

    ``offset`` is the file offset of the first record the chunk covers; the chunk covers ``records``
    consecutive records (good and bad, in file order). ``batch`` holds the good ones: column ``id``
    (string, non-null) first, then the fields. ``errors`` the bad ones, in order. An ``ErrorRecord``
    counts as one record, even where it stands for a lost range (an unreadable Parquet row group, the
    rest of a truncated shard).
    """

    source: str
    offset: int
    batch: pa.RecordBatch
    errors: list[ErrorRecord] = dataclasses.field(default_factory=list)

    @property
    def records(self) -> int:
        """Records covered: good rows + error records."""
        return (0 if self.batch is None else self.batch.num_rows) + len(self.errors)

    def row_offsets(self) -> np.ndarray:
        """The file offset of each row of ``batch`` (int64): the covered range less the error records'
        offsets (``offset + i`` only when no error precedes row i)."""
        n = 0 if self.batch is None else self.batch.num_rows
        taken = sorted(e.offset for e in self.errors if e.offset is not None)
        if not taken:
            return np.arange(self.offset, self.offset + n, dtype=np.int64)
        pos = np.arange(self.offset, self.offset + n + len(taken), dtype=np.int64)
        return np.setdiff1d(pos, np.asarray(taken, np.int64), assume_unique=True)[:n]


ID_FIELD = pa.field(ID_KEY, pa.string(), nullable=False)


def chunk_digest(chunk: Chunk) -> str:
    """A content digest of a chunk as read: sha256 of its range (offset, records), its good records (the
    Arrow IPC form of ``batch``) and its error records' ids and reasons. Reading the same unchanged range
    of a file the same way gives the same digest; any changed byte of a record that decodes gives another.
    An index keeps it per part, so records can be read back by position and checked (``beam.rerank``)."""
    import hashlib

    h = hashlib.sha256(f"{chunk.offset}:{chunk.records}\0".encode())
    if chunk.batch is not None and chunk.batch.num_rows:
        h.update(memoryview(chunk.batch.serialize()))
    for e in chunk.errors:
        h.update(f"\0{e.id}\0{e.reason}".encode())
    return h.hexdigest()


def empty_batch() -> pa.RecordBatch:
    """A batch with no rows and only the ``id`` column."""
    return pa.RecordBatch.from_arrays([pa.array([], pa.string())], schema=pa.schema([ID_FIELD]))


def error_chunk(source: str, offset: int, error: ErrorRecord, batch: pa.RecordBatch | None = None) -> Chunk:
    """A chunk holding one error record and no good rows."""
    return Chunk(source, offset, batch if batch is not None else empty_batch(), [error])


# ---- the registry ---------------------------------------------------------------------------------
class Format:
    """A record format. Subclass, set the class attributes, implement ``read_split`` and ``writer``, and
    decorate with ``@register``; the module goes in ``beam_influence/formats/`` (it is imported there)."""

    name: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]  # lower-case, with the dot; the first is the one written
    gzip: ClassVar[bool] = False  # files of this format may be gzip-compressed (``.gz``)
    # read_records: an empty numeric array reads back as float32 (list-based formats, where ``[]`` has
    # no dtype, as ``np.asarray([])``); otherwise with the column's dtype.
    empty_lists_float32: ClassVar[bool] = True

    def splits(self, path: str, rows_per_split: int) -> list[Split]:
        """The splits of ``path`` (default: one, the whole file)."""
        return [Split(path, self.name, 0, start=0)]

    def read_split(self, split: Split, batch_rows: int) -> Iterator[Chunk]:
        raise NotImplementedError

    def writer(self, records: list[dict]) -> Callable[[int, int, Any], None]:
        """``records`` (canonical, validated) → ``write(start, end, f)`` writing ``records[start:end]`` to
        the open binary stream ``f``. Raise ValueError for records the format cannot hold."""
        raise NotImplementedError

    def write_table(self, table: pa.Table, f) -> None:
        """Write a columnar table to the open binary stream ``f`` (default: through its records)."""
        records = []
        for batch in table.to_batches():
            records.extend(batch_records(batch, self.empty_lists_float32))
        self.writer(prepare_records(records))(0, len(records), f)


_REGISTRY: dict[str, Format] = {}


def register(fmt):
    """Register a ``Format`` (class or instance); usable as a class decorator."""
    inst = fmt() if isinstance(fmt, type) else fmt
    name = inst.name
    if name in _REGISTRY:
        raise ValueError(f"record format {name!r} is already registered")
    taken = {ext: f.name for f in _REGISTRY.values() for ext in f.extensions}
    for ext in inst.extensions:
        if ext != ext.lower() or not ext.startswith("."):
            raise ValueError(f"format {name!r}: extension {ext!r} must be lower-case and start with '.'")
        if ext in taken:
            raise ValueError(f"format {name!r}: extension {ext!r} is already used by {taken[ext]!r}")
    _REGISTRY[name] = inst
    return fmt


def registered_formats() -> tuple[str, ...]:
    """The names of the registered formats, in registration order."""
    return tuple(_REGISTRY)


def get_format(name: str) -> Format:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown record format {name!r}; expected one of {registered_formats()}") from None


# ---- names, ids -----------------------------------------------------------------------------------
def _basename(path: str) -> str:
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _split_name(path: str) -> tuple[str, str | None, bool]:
    """(stem, format or None, gzipped) of a path's basename."""
    name = _basename(path)
    gz = name.lower().endswith(".gz")
    if gz:
        name = name[:-3]
    lower = name.lower()
    exts = sorted(((ext, f.name) for f in _REGISTRY.values() for ext in f.extensions), key=lambda e: -len(e[0]))
    for ext, fmt in exts:  # longest first, so ".tfrecords" wins over ".tfrecord"
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], fmt, gz
    return name, None, gz


def infer_format(path: str) -> str:
    """The format of ``path`` from its extension: .parquet, .jsonl/.ndjson/.json, .npz,
    .tfrecord/.tfrecords/.tfrec; JSONL and TFRecord may end in ``.gz`` (gzip)."""
    _, fmt, gz = _split_name(path)
    if fmt is None:
        raise ValueError(
            f"cannot infer the record format of {path!r} from its extension; pass format= one of "
            f"{registered_formats()}"
        )
    if gz and not _REGISTRY[fmt].gzip:
        ok = tuple(f.name for f in _REGISTRY.values() if f.gzip)
        raise ValueError(f"{path!r}: gzip is supported only for {ok}, not {fmt!r}")
    return fmt


def shard_basename(path: str) -> str:
    """The file's basename without its format extension and ``.gz``: the prefix of derived ids."""
    stem, fmt, _ = _split_name(path)
    if fmt is None:
        return _basename(path)
    return stem


def derive_id(path: str, offset: int | str) -> str:
    """The stable id of the record at ``offset`` (0-based) in shard ``path``: ``f"{shard}:{offset}"``."""
    return f"{shard_basename(path)}:{offset}"


def check_format(format: str | None, path: str) -> str:
    """``format`` if registered (ValueError otherwise), else the one inferred from ``path``."""
    if format is None:
        return infer_format(path)
    get_format(format)
    return format


def is_gzip_path(path: str) -> bool:
    return path.lower().endswith(".gz")


# ---- canonical values ------------------------------------------------------------------------------
class BadValue(ValueError):
    """A value that is not a number, string, or (nested) list / array of numbers or strings."""


_DROP = object()

# Values kept as they are ("structured" values: the fields a model does not use, which must travel, never kill a
# record): JSON objects / Parquet structs (dicts), dates and times, decimals, durations, and lists holding any
# of them. Feature values (numbers, strings, bytes, arrays of them) keep their canonical forms and checks.
STRUCTURED_TYPES: tuple[type, ...] = (_abc.Mapping, _dt.date, _dt.time, _dt.timedelta, _decimal.Decimal,
                                      np.datetime64, np.timedelta64)


def is_structured(value: Any) -> bool:
    """True for a value ``canonical_value`` keeps as is: a mapping, date/time/datetime/timedelta, decimal,
    or a list / tuple / object array holding one of these anywhere (nested lists walked; dicts not)."""
    if isinstance(value, STRUCTURED_TYPES):
        return True
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "Mm":
            return True
        if value.dtype.kind != "O":
            return False
        value = value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        stack = [value]
        while stack:
            for v in stack.pop():
                if isinstance(v, STRUCTURED_TYPES):
                    return True
                if isinstance(v, (list, tuple)):
                    stack.append(v)
                elif isinstance(v, np.ndarray) and v.dtype.kind in "OMm":
                    if v.dtype.kind != "O" or is_structured(v):
                        return True
    return False


def _all_strings(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_all_strings(v) for v in value)
    return isinstance(value, (str, bytes))


def canonical_value(value: Any) -> Any:
    """The canonical form of one field value; ``BadValue`` if unsupported.

    Arrays (lists, nested lists, numpy arrays) become numpy arrays (floats → float32, integers → int64,
    booleans → bool); lists of strings stay python lists of ``str``; scalars become python
    bool / int / float / str (bytes stay bytes); None is dropped (a sentinel the callers skip).
    Structured values (``is_structured``: a dict, a datetime, a decimal, a list of objects, ...) are kept as
    they are: they are not features (a model's features are checked later, column-wise), so they travel.
    A ragged array, nulls inside an array, a list mixing strings and numbers stay ``BadValue`` (a feature
    could be such an array) unless the list also holds a structured value."""
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
            if is_structured(value):
                return value
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
                if is_structured(value):
                    return value
                raise BadValue("a list mixing strings and non-strings")
            return arr.tolist()
        if is_structured(value):
            return value
        if kind == "O":
            raise BadValue("not a regular array of numbers or strings (ragged, nulls or mixed types)")
        raise BadValue(f"unsupported array dtype {arr.dtype}")
    if isinstance(value, STRUCTURED_TYPES):
        return value
    raise BadValue(f"unsupported value type {type(value).__name__}")


def canonical_id(value: Any) -> str | None:
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
    rid = canonical_id(fields.get(ID_KEY))
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


def record_or_error(fields: Any, path: str, offset: int, raw: Callable[[], Any] | bytes | str) -> dict:
    """The canonical record of ``fields`` (the record at ``offset`` of ``path``), or its error record
    (dict form): the one per-record reference every reader falls back to for suspect records."""
    rid = derive_id(path, offset)
    if not isinstance(fields, Mapping):
        kind = type(fields).__name__
        return error_record(rid, f"record is a {kind}, expected an object/mapping", raw() if callable(raw) else raw)
    try:
        return canonical_record(fields, rid)
    except BadValue as e:
        return error_record(rid, str(e), raw() if callable(raw) else raw)


def as_error(record: dict, offset: int | None) -> ErrorRecord:
    """The ``ErrorRecord`` of an error-record dict."""
    return ErrorRecord(record[ID_KEY], record[ERROR_KEY], record.get(RAW_KEY, b""), offset=offset)


# ---- files -----------------------------------------------------------------------------------------
def is_local(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.get_scheme(path) is None


@contextlib.contextmanager
def open_shard(path: str, counter: Callable[[], RecordCounter] | None = None):
    """Open ``path`` for reading through Beam's FileSystems (so gs:// etc. work). A ``.gz`` path is read
    twice (``_gzip``): once to check every member's deflate data, CRC-32 and length (``counter`` counts the
    records of a member that fails), then for its data, of which only the checked members (and the
    inflated part of a stream merely cut short) are handed out, then ``GzipMemberError`` (one of
    ``GZIP_ERRORS``) is raised. So no record of a corrupt member reaches a reader."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    def raw_open():
        return FileSystems.open(path, mime_type="application/octet-stream",
                                compression_type=CompressionTypes.UNCOMPRESSED)

    if is_gzip_path(path):
        with contextlib.closing(raw_open()) as raw:
            check = check_gzip(raw, counter)
    raw = raw_open()
    try:
        if is_gzip_path(path):
            gz = VerifiedGzip(raw, check)
            try:
                yield gz
            finally:
                gz.close()
        else:
            yield raw
    finally:
        raw.close()


GZIP_MAGIC = b"\x1f\x8b"


def unmarked_gzip(path: str) -> ErrorRecord | None:
    """The whole-file error record of a shard that is gzip data but not named ``.gz`` (read as it is, it
    would fail line by line with no hint); None otherwise."""
    if is_gzip_path(path):
        return None
    with open_shard(path) as f:
        head = f.read(2)
    if head != GZIP_MAGIC:
        return None
    return ErrorRecord(derive_id(path, "file"),
                       f"{path!r} is gzip-compressed data (it starts with the gzip magic bytes 1f 8b) but its name "
                       f"does not end in .gz: rename it to {_basename(path)}.gz (then it is decompressed)")


def seekable(f):
    """``f`` if seekable, else its content in a BytesIO."""
    try:
        if f.seekable():
            return f
    except (AttributeError, OSError, ValueError):
        pass
    return io.BytesIO(f.read())


def gzip_truncation_error(path: str, offset: int, nbytes: int, exc: BaseException, raw: bytes = b"") -> ErrorRecord:
    """The error record ending the chunks of a truncated / corrupt gzip shard (``offset``: the first record
    not read as good). It says what is withheld and what is lost, with the count where known, and never
    claims records were lost when a member only failed its check."""
    rid = derive_id(path, offset)
    c = exc.check if isinstance(exc, GzipMemberError) else None
    if c is None or c.kind == "changed":
        return ErrorRecord(
            rid,
            f"gzip stream of shard {path!r} is truncated or corrupt after {nbytes} decompressed bytes "
            f"(at record {offset}); the rest of the shard is lost: {type(exc).__name__}: {exc}",
            raw, offset=offset)
    # Phrased for ``audit.losses.classify``: a withheld member is a range "(records a..b) is unreadable"
    # (exact), a loss running to the end of the shard "the rest of the shard is lost" "at record k".
    member = f"gzip member {c.members + 1} of shard {path!r}"
    n = c.bad_records
    if c.complete and not c.unread and n:
        return ErrorRecord(rid, (
            f"{member} fails its {c.kind} check ({c.detail}): it inflated completely but cannot be trusted, so "
            f"the member (records {offset}..{offset + n - 1}) is unreadable: none of its {n} records is indexed"),
            raw, offset=offset)
    if n is None:
        withheld = "none of the records inflated from it is indexed"
    elif n:
        withheld = f"none of the {n} records inflated from it is indexed"
    else:
        withheld = "no record was inflated from it"
    if c.complete:
        reason = (f"{member} fails its {c.kind} check ({c.detail}): it inflated completely but cannot be "
                  f"trusted, so {withheld}, and the data after it is not read")
    elif c.kind == "header":
        hint = " (is the file really gzip-compressed?)" if c.members == 0 else ""
        reason = f"{member} has a bad header: {c.detail}{hint}"
    elif c.kind == "truncated":
        reason = (f"{member} is cut short after {c.bad_bytes} inflated bytes ({c.detail}): its CRC-32 cannot "
                  f"be checked, so {withheld}")
    else:
        reason = f"{member} has corrupt {c.kind} after {c.bad_bytes} inflated bytes ({c.detail}): {withheld}"
    reason += f"; the rest of the shard is lost (at record {offset})"
    return ErrorRecord(rid, reason, raw, offset=offset)


def is_marker_file(path: str) -> bool:
    """True for the files that sit beside data shards but hold no records: Hadoop / Spark's hidden files
    (a name starting with ``_`` or ``.``: ``_SUCCESS``, ``_committed_*``, ``_metadata``, ``.part-0.crc``)
    and checksum files (``*.crc``). Hadoop's input formats skip the same names."""
    name = _basename(path)
    return name.startswith(("_", ".")) or name.lower().endswith(".crc")


_SHARD_NUMBER = re.compile(r"([-_.]?\d+-of-\d+|[-_.]?\d+)$")


def shard_prefix(path: str) -> str:
    """The data set a shard belongs to, by name: its basename without the format extension and a trailing
    shard number (``train-00003-of-00008.parquet`` → ``train``, ``part_7.jsonl.gz`` → ``part``)."""
    stem = shard_basename(path)
    return _SHARD_NUMBER.sub("", stem) or stem


def match_data_files(pattern: str) -> tuple[list[str], list[str]]:
    """(data files, skipped marker files) matching a glob (or one exact path), both sorted. A wildcard
    pattern skips marker files (``is_marker_file``); an exact path is taken as given. FileNotFoundError
    naming the pattern when no data file matches, wildcard or not (an exact path that does not exist:
    "... does not exist")."""
    from apache_beam.io.filesystems import FileSystems

    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    paths = [p for p in paths if not p.endswith(("/", "\\"))]
    wildcard = any(c in pattern for c in "*?[")
    skipped = [p for p in paths if is_marker_file(p)] if wildcard else []
    paths = [p for p in paths if not (wildcard and is_marker_file(p))]
    if not paths:
        if skipped:
            raise FileNotFoundError(f"no data files match {pattern!r}, only {len(skipped)} marker file(s) "
                                    f"({', '.join(_basename(p) for p in skipped[:3])})")
        if wildcard:
            raise FileNotFoundError(f"no files match {pattern!r}")
        raise FileNotFoundError(f"{pattern!r} does not exist")
    return paths, skipped


def match_files(pattern: str, *, warn: bool = True) -> list[str]:
    """The data files matching a glob (or one exact path), sorted (``match_data_files``). With ``warn``,
    logs the marker files skipped (counted) and a warning when the files have different name prefixes
    (``shard_prefix``: ``data/*`` matching ``train-*`` and ``test-*`` shards would mix two data sets)."""
    paths, skipped = match_data_files(pattern)
    if warn:
        report_matches(pattern, paths, skipped)
    return paths


def report_matches(pattern: str, paths: Sequence[str], skipped: Sequence[str]) -> None:
    """Log the marker files ``match_data_files`` skipped, and warn when ``paths`` mix name prefixes."""
    log = logging.getLogger("beam_influence.formats")
    if skipped:
        log.warning("%s: skipped %d marker file(s) that hold no records: %s", pattern, len(skipped),
                    ", ".join(_basename(p) for p in skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    families: dict[str, int] = {}
    for p in paths:
        families[shard_prefix(p)] = families.get(shard_prefix(p), 0) + 1
    if len(families) > 1:
        log.warning("%s matches files of %d different name prefixes (%s): are different data sets (e.g. train "
                    "and test) mixed? Use a pattern that matches one of them, e.g. %r", pattern, len(families),
                    ", ".join(f"{k}: {v} file(s)" for k, v in sorted(families.items())),
                    _join_dir(pattern, sorted(families)[0] + "*"))


def _join_dir(pattern: str, name: str) -> str:
    head = pattern.replace("\\", "/").rsplit("/", 1)
    return f"{head[0]}/{name}" if len(head) == 2 else name


# ---- reading ---------------------------------------------------------------------------------------
def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def splits(path: str, format: str | None = None, *, rows_per_split: int = DEFAULT_ROWS_PER_SPLIT) -> list[Split]:
    """The splits of one file. Parquet: consecutive row groups grouped up to about ``rows_per_split``
    rows (read from the footer only; a row group larger than that is a split of its own); other formats:
    one split per file. An unreadable Parquet file gives one split, whose reading reports the error."""
    fmt = check_format(format, path)
    return get_format(fmt).splits(path, _positive("rows_per_split", rows_per_split))


def read_split(split: Split, *, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[Chunk]:
    """The chunks of a split, in file order: each covers at most ``batch_rows`` consecutive records."""
    return get_format(split.format).read_split(split, _positive("batch_rows", batch_rows))


def iter_chunks(pattern: str, format: str | None = None, *, batch_rows: int = DEFAULT_BATCH_ROWS,
                rows_per_split: int = DEFAULT_ROWS_PER_SPLIT) -> Iterator[Chunk]:
    """The chunks of every file matching ``pattern`` (files sorted, chunks in file order). Matching and
    format checks happen at the call (FileNotFoundError / ValueError), reading lazily."""
    batch_rows = _positive("batch_rows", batch_rows)
    rows_per_split = _positive("rows_per_split", rows_per_split)
    jobs = [(p, check_format(format, p)) for p in match_files(pattern)]

    def gen():
        for path, fmt in jobs:
            for s in get_format(fmt).splits(path, rows_per_split):
                yield from read_split(s, batch_rows=batch_rows)

    return gen()


def chunk_records(chunk: Chunk, format: str | None = None) -> list[dict]:
    """The records of a chunk as canonical record dicts (error records as dicts), in file order.
    ``format`` (default: from ``chunk.source``) only decides the dtype of empty arrays."""
    try:
        empty_float32 = get_format(check_format(format, chunk.source)).empty_lists_float32
    except ValueError:
        if format is not None:
            raise
        empty_float32 = True
    good = batch_records(chunk.batch, empty_float32) if chunk.batch is not None else []
    if not chunk.errors:
        return good
    out: list[dict] = []
    errors = list(chunk.errors)
    gi = ei = 0
    pos = chunk.offset
    while gi < len(good) or ei < len(errors):
        if ei < len(errors) and (gi >= len(good) or errors[ei].offset is None or errors[ei].offset <= pos):
            out.append(errors[ei].to_dict())
            ei += 1
        else:
            out.append(good[gi])
            gi += 1
        pos += 1
    return out


def iter_records(path: str, format: str | None = None) -> Iterator[dict]:
    """Yield the records (and error records) of one shard file, in file order."""
    fmt = check_format(format, path)  # raise here, not at the first next()

    def gen():
        handler = get_format(fmt)
        for s in handler.splits(path, DEFAULT_ROWS_PER_SPLIT):
            for chunk in handler.read_split(s, DEFAULT_BATCH_ROWS):
                yield from chunk_records(chunk, fmt)

    return gen()


def read_records(pattern: str, format: str | None = None) -> list[dict]:
    """All records of all files matching ``pattern`` (files sorted by path, records in file order)."""
    out: list[dict] = []
    for path in match_files(pattern):
        out.extend(iter_records(path, format))
    return out


# ---- writing -----------------------------------------------------------------------------------------
def shard_bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, num_shards)
    bounds, start = [], 0
    for i in range(num_shards):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def prepare_records(records: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Canonical values for writing; records keep an "id" only when they had one. ValueError if bad."""
    out = []
    for i, rec in enumerate(records):
        if ERROR_KEY in rec:
            raise ValueError(f"record {i} is an error record ({rec.get(ERROR_KEY)!r}); route it elsewhere")
        try:
            canon = canonical_record(rec, "")
        except BadValue as e:
            raise ValueError(f"record {i} (id {rec.get(ID_KEY)!r}) cannot be written: {e}") from None
        if canonical_id(rec.get(ID_KEY)) is None:
            del canon[ID_KEY]
        out.append(canon)
    return out


def field_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """All field names, first-seen order, "id" first."""
    names: dict[str, None] = {}
    for rec in records:
        for key in rec:
            names.setdefault(key, None)
    keys = list(names)
    return ([ID_KEY] if ID_KEY in names else []) + [k for k in keys if k != ID_KEY]


def _create(path: str):
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    comp = CompressionTypes.GZIP if is_gzip_path(path) else CompressionTypes.UNCOMPRESSED
    return FileSystems.create(path, compression_type=comp)


def write_records(records: Iterable[Mapping[str, Any]], path_prefix: str, format: str, num_shards: int = 1,
                  *, compression: str | None = None) -> list[str]:
    """Write records into ``num_shards`` files ``{path_prefix}-{i:05d}-of-{n:05d}.{ext}``; return their paths.

    Records are split contiguously (shard i holds the i-th run of records, the first ``N % n`` shards one
    more than the rest), so reading the shards in order gives the records back in order. Records without
    an "id" are written without one (readers then derive ``{shard}:{offset}``). ``compression="gzip"``
    (JSONL and TFRecord only) appends ``.gz``. Invalid values raise ValueError (writers are strict).
    """
    handler = get_format(format)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if compression not in (None, "gzip"):
        raise ValueError(f"compression must be None or 'gzip', got {compression!r}")
    if compression and not handler.gzip:
        ok = tuple(f.name for f in _REGISTRY.values() if f.gzip)
        raise ValueError(f"gzip compression is supported only for {ok}")
    recs = prepare_records(records)
    ext = handler.extensions[0] + (".gz" if compression else "")
    write = handler.writer(recs)  # validates across all records before any file is created
    paths = []
    for i, (start, end) in enumerate(shard_bounds(len(recs), num_shards)):
        path = f"{path_prefix}-{i:05d}-of-{num_shards:05d}{ext}"
        with _create(path) as f:
            write(start, end, f)
        paths.append(path)
    return paths


def write_table(table: pa.Table | pa.RecordBatch, path: str, format: str | None = None) -> None:
    """Write a columnar table (e.g. chunk batches) to one file in a format (default: from the extension;
    ``.gz`` compresses, JSONL and TFRecord only). Parquet keeps the table's types; other formats write its
    rows as records (nulls left out), as ``write_records`` would."""
    fmt = check_format(format, path)
    handler = get_format(fmt)
    if is_gzip_path(path) and not handler.gzip:
        raise ValueError(f"{path!r}: gzip is not supported for {fmt!r}")
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    with _create(path) as f:
        handler.write_table(table, f)
