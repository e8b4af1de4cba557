"""TFRecord: a ``tf.train.Example`` per record (needs the ``beam-influence[tf]`` extra), optionally ``.gz``.

Floats go to ``float_list``, ints and bools to ``int64_list``, strings to ``bytes_list``; arrays are
flattened (``ModelSpec.decode`` reshapes). On reading, a one-element list becomes a scalar, so shapes,
bools (read back as 0/1) and float64 precision (read back as float32 values) are not preserved. Framing
(length + masked CRC32C) is Beam's ``tfrecordio`` framing.

Protos are parsed one record at a time (unavoidable), but their values go straight into column
accumulators (no per-record dicts); a chunk is cut where a feature changes kind between records (e.g.
a one-element list, read as a scalar, after longer ones), so every record keeps its types.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Iterator

import numpy as np

from beam_influence.formats import _columns as C
from beam_influence.formats._gzip import FrameCounter
from beam_influence.formats.base import (
    GZIP_ERRORS,
    ID_KEY,
    BadValue,
    Chunk,
    ErrorRecord,
    Format,
    Split,
    as_error,
    derive_id,
    error_chunk,
    gzip_truncation_error,
    is_gzip_path,
    is_structured,
    open_shard,
    record_or_error,
    register,
    unmarked_gzip,
)

_LOG = logging.getLogger(__name__)

_F32 = ("float32",)
_INT = ("int",)
_STR = ("str",)
_BYTES = ("bytes",)
_F32A = ("arr", "float32", 1)
_I64A = ("arr", "int64", 1)
_STRS = ("strs", "str", 1)


@register
class TFRecord(Format):
    name = "tfrecord"
    extensions = (".tfrecord", ".tfrecords", ".tfrec")
    gzip = True
    empty_lists_float32 = False  # an empty int64_list reads back as an empty int64 array, as before

    def read_split(self, split: Split, batch_rows: int) -> Iterator[Chunk]:
        if split.index != 0:
            raise ValueError(f"{split.path!r}: TFRecord files have one split, got index {split.index}")
        example_pb2 = _example_pb2()
        framing = _framing()
        path = split.path
        catch = GZIP_ERRORS if is_gzip_path(path) else ()
        unmarked = unmarked_gzip(path)
        if unmarked is not None:
            yield error_chunk(path, 0, unmarked)
            return
        with open_shard(path, FrameCounter) as f:
            b = C.Builder(path, batch_rows, 0)
            offset = nbytes = 0
            while True:
                try:
                    payload = framing.read_record(f)
                except ValueError as e:
                    yield from b.add_error(offset, ErrorRecord(
                        derive_id(path, offset),
                        f"corrupt TFRecord framing at record {offset}; the rest of the shard is lost: {e}",
                        offset=offset))
                    break
                except catch as e:
                    yield from b.add_error(offset, gzip_truncation_error(path, offset, nbytes, e))
                    break
                if payload is None:
                    break
                nbytes += len(payload) + 16
                try:
                    example = example_pb2.Example.FromString(payload)
                except Exception as e:  # noqa: BLE001 - protobuf DecodeError (type differs between backends)
                    yield from b.add_error(offset, ErrorRecord(
                        derive_id(path, offset), f"payload is not a parsable tf.train.Example: {e}", payload,
                        offset=offset))
                    offset += 1
                    continue
                try:
                    rid, cells = _cells(example)
                except _Odd:
                    rec = record_or_error(_fields(example), path, offset, payload)
                    if "__error__" in rec:
                        yield from b.add_error(offset, as_error(rec, offset))
                        offset += 1
                        continue
                    try:
                        rid, cells = rec[ID_KEY], [(k, _F32 if kd == ("float64",) else kd, v)
                                                   for k, kd, v in C.canonical_cells(rec)]
                    except BadValue as e:  # pragma: no cover - tf.Example values always fit
                        yield from b.add_error(offset, ErrorRecord(derive_id(path, offset), str(e), payload, offset))
                        offset += 1
                        continue
                yield from b.add(offset, rid, cells)
                offset += 1
            last = b.flush(offset)
            if last is not None:
                yield last

    def writer(self, records: list[dict]) -> Callable[[int, int, Any], None]:
        for i, rec in enumerate(records):  # before any file is written
            for key, value in rec.items():
                if is_structured(value):
                    raise ValueError(f"record {rec.get(ID_KEY, i)!r}: field {key!r}: a {type(value).__name__} "
                                     "(a structured value) cannot be written to a tf.train.Example")
        example_pb2 = _example_pb2()
        framing = _framing()

        def write(start: int, end: int, f) -> None:
            for rec in records[start:end]:
                example = example_pb2.Example()
                for key, value in rec.items():
                    _fill_feature(example.features.feature[key], key, value)
                framing.write_record(f, example.SerializeToString(deterministic=True))

        return write


class _Odd(Exception):
    """A record the column fast path does not handle (bad or unusual id, reserved name, non-UTF-8 in a
    list): read it with the per-record reference."""


def _cells(example) -> tuple[str | None, list]:
    """(own id or None, cells) of an Example, straight from its repeated fields."""
    feats = example.features.feature
    rid = None
    cells = []
    for key in sorted(feats):
        f = feats[key]
        kind = f.WhichOneof("kind")
        if key == ID_KEY:
            if kind == "bytes_list" and len(f.bytes_list.value) == 1:
                try:
                    rid = f.bytes_list.value[0].decode("utf-8")
                except UnicodeDecodeError:
                    raise _Odd from None
                if rid:
                    continue
            elif kind == "int64_list" and len(f.int64_list.value) == 1:
                rid = str(f.int64_list.value[0])
                continue
            raise _Odd
        if key in C.RESERVED:
            raise _Odd
        if kind == "float_list":
            v = f.float_list.value
            cells.append((key, _F32, v[0]) if len(v) == 1 else (key, _F32A, v))
        elif kind == "int64_list":
            v = f.int64_list.value
            cells.append((key, _INT, v[0]) if len(v) == 1 else (key, _I64A, v))
        elif kind == "bytes_list":
            v = f.bytes_list.value
            if len(v) == 1:
                try:
                    cells.append((key, _STR, v[0].decode("utf-8")))
                except UnicodeDecodeError:
                    cells.append((key, _BYTES, bytes(v[0])))
            elif not v:
                cells.append((key, _F32A, ()))  # as np.asarray([]): an empty float32 array
            else:
                try:
                    cells.append((key, _STRS, [s.decode("utf-8") for s in v]))
                except UnicodeDecodeError:
                    raise _Odd from None
        else:
            cells.append((key, _F32A, ()))  # a Feature with no list set: an empty array
    return rid, cells


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


def _fields(example) -> dict:
    feats = example.features.feature
    return {key: _from_feature(feats[key]) for key in sorted(feats)}


# ---- TensorFlow, framing ---------------------------------------------------------------------------
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
