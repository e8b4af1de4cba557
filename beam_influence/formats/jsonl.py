"""JSONL: one JSON object per line (``.jsonl`` / ``.ndjson`` / ``.json``, optionally ``.gz``); blank lines
are skipped and do not count as records.

A block of up to ``batch_rows`` lines is parsed at once with ``pyarrow.json.read_json``. That parser is
more lenient than ``json.loads`` (the per-record reference) in places, and types a column per block, so a
block is used as parsed only when cheap vectorised checks show it agrees with ``json.loads`` line by
line: every line one object (starts with ``{``, ends with ``}``, one row per line), valid UTF-8, no
non-finite floats, no integer token that Arrow turned into a float (a column mixing integers and
decimals, or an integer beyond int64), at most ``_MAX_DEPTH`` levels of nesting, no empty object type,
no column Arrow built invalid (it does for a list whose first values are nulls, ``[null, 2.5]``) —
else the block is read line by line with ``json.loads``, exactly as before, into columns (a chunk is cut
where a field changes type between records, so each record keeps its own types). Strings Arrow reads as
timestamps (also inside objects) are read again as strings. Suspect rows of a parsed block (nulls inside
arrays, ragged arrays, bad ids) are re-read with ``json.loads`` to get their error reasons.

Nested objects (and lists of objects) are metadata that travels, never an error: in a block Arrow parses
they are ``struct`` (``list<struct>``) columns, as Arrow types them (a key an object lacks is null in the
struct); in a block read line by line they are a ``string`` column holding each value's compact JSON text
(``_columns.json_text``). A field that is an object in one record and a number in another makes Arrow
refuse the block, so such a block is read line by line (every record kept; a chunk is cut where the
field's type changes).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beam_influence.formats import _columns as C
from beam_influence.formats._gzip import LineCounter
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
    error_record,
    gzip_truncation_error,
    is_gzip_path,
    open_shard,
    record_or_error,
    register,
    unmarked_gzip,
)

READ_BYTES = 1 << 22  # bytes read (decompressed) at a time
BLOCK_BYTES = 1 << 28  # a block is parsed once it holds this many bytes, even with fewer than batch_rows lines
_WS = b" \t\n\r\x0b\x0c"  # what bytes.strip() strips: a line of only these is blank
_NONWS = np.ones(256, bool)
_NONWS[list(_WS)] = False
_DIGIT = np.zeros(256, bool)
_DIGIT[list(b"0123456789")] = True
_BEFORE_INT = np.zeros(256, bool)  # bytes that may precede an integer token (or its '-')
_BEFORE_INT[list(b":,[ \t\r\n")] = True
_AFTER_INT = np.zeros(256, bool)  # bytes that may follow an integer token
_AFTER_INT[list(b",]} \t\r\n")] = True
_MAX_DEPTH = 64


@register
class Jsonl(Format):
    name = "jsonl"
    extensions = (".jsonl", ".ndjson", ".json")
    gzip = True

    def read_split(self, split: Split, batch_rows: int) -> Iterator[Chunk]:
        if split.index != 0:
            raise ValueError(f"{split.path!r}: JSONL files have one split, got index {split.index}")
        unmarked = unmarked_gzip(split.path)
        if unmarked is not None:
            yield error_chunk(split.path, 0, unmarked)
            return
        with open_shard(split.path, LineCounter) as f:
            yield from _read(f, split.path, batch_rows, is_gzip_path(split.path))

    def writer(self, records: list[dict]) -> Callable[[int, int, Any], None]:
        def write(start: int, end: int, f) -> None:
            _write_jsonl(records[start:end], f)

        return write


# ---- reading ---------------------------------------------------------------------------------------
def _read(f, path: str, batch_rows: int, gz: bool) -> Iterator[Chunk]:
    offset = 0
    for item in _line_blocks(f, batch_rows, gz):
        if item[0] == "lines":
            _, block, starts, ends = item
            yield from _parse_block(block, starts, ends, path, offset, batch_rows)
            offset += len(starts)
        else:
            _, exc, nbytes, partial = item
            yield error_chunk(path, offset, gzip_truncation_error(path, offset, nbytes, exc, partial))


def _line_blocks(f, batch_rows: int, gz: bool):
    """Yield ("lines", block, starts, ends) with at most ``batch_rows`` non-blank lines each (``block``
    holds whole lines; ``starts``/``ends`` the non-blank ones, ends exclusive of the newline), then, for a
    truncated/corrupt gzip stream, ("error", exception, decompressed bytes read, partial last line).

    Bytes are copied once (into the block); per line, only its first byte is looked at (a line starting
    with whitespace is checked for blankness on its own)."""
    read = getattr(f, "read1", None) or f.read
    catch = GZIP_ERRORS if gz else ()
    segs: list = []  # complete lines not yet emitted (bytes / memoryviews, in stream order)
    size = 0  # their total length
    tail: list = []  # pieces of the incomplete last line
    tail_len = 0
    st: list[np.ndarray] = []  # non-blank lines: starts / ends, as positions in the concatenated segs
    en: list[np.ndarray] = []
    n_lines = nbytes = 0
    error = None
    while True:
        try:
            data = read(READ_BYTES)
        except catch as e:
            error, data = e, b""
        nbytes += len(data)
        eof = not data
        if eof:
            data = b"\n" if error is None and tail_len else b""  # a last line without its newline
        if data:
            k = data.rfind(b"\n")
            if k < 0:
                tail.append(data)
                tail_len += len(data)
                continue
            arr = np.frombuffer(data, np.uint8, count=k + 1)
            nl = np.flatnonzero(arr == 10)
            pos0 = size + tail_len  # position of data[0]
            starts = np.empty(len(nl), np.int64)
            starts[0] = size
            starts[1:] = nl[:-1] + 1 + pos0
            ends = nl + pos0
            first = np.empty(len(nl), np.uint8)
            first[0] = tail[0][0] if tail_len else arr[0]
            first[1:] = arr[nl[:-1] + 1]
            nonblank = _NONWS[first]
            for j in np.flatnonzero(~nonblank).tolist():  # starts with whitespace: blank?
                a = int(nl[j - 1]) + 1 if j else 0
                line = data[a: int(nl[j])]
                if j == 0 and tail_len:
                    line = b"".join(tail) + line
                nonblank[j] = bool(line.strip())
            segs.extend(tail)
            segs.append(data if k + 1 == len(data) else memoryview(data)[: k + 1])
            size = pos0 + k + 1
            tail = [memoryview(data)[k + 1:]] if k + 1 < len(data) else []
            tail_len = len(data) - k - 1
            st.append(starts[nonblank])
            en.append(ends[nonblank])
            n_lines += int(nonblank.sum())
        while n_lines and (n_lines >= batch_rows or eof or size >= BLOCK_BYTES):
            starts, ends = np.concatenate(st), np.concatenate(en)
            take = min(batch_rows, n_lines)
            cut = int(ends[take - 1]) + 1
            out, got = [], 0
            while got < cut:
                seg = segs[0]
                if got + len(seg) <= cut:
                    out.append(segs.pop(0))
                    got += len(seg)
                else:
                    out.append(seg[: cut - got])
                    segs[0] = seg[cut - got:]
                    got = cut
            size -= cut
            yield "lines", b"".join(out), starts[:take], ends[:take]
            st, en = [starts[take:] - cut], [ends[take:] - cut]
            n_lines -= take
        if eof:
            if error is not None:
                yield "error", error, nbytes, b"".join(tail)
            return


def _line(block: bytes, s: int, e: int) -> bytes:
    return block[s:e].rstrip(b"\r\n")


def _reference(line: bytes, path: str, offset: int) -> dict:
    """Today's reader of one (non-blank) line: a canonical record or an error record."""
    rid = derive_id(path, offset)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return error_record(rid, f"line is not valid UTF-8: {e}", line)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        return error_record(rid, f"invalid JSON: {type(e).__name__}: {e}", text)
    return record_or_error(obj, path, offset, text)


def _parse_block(block: bytes, starts, ends, path: str, offset: int, batch_rows: int) -> Iterator[Chunk]:
    try:
        yield _fast_block(block, starts, ends, path, offset)
        return
    except C.Fallback:
        pass
    yield from _slow_block(block, starts, ends, path, offset, batch_rows)


def _slow_block(block: bytes, starts, ends, path: str, offset: int, batch_rows: int) -> Iterator[Chunk]:
    """Line by line with ``json.loads`` (the reference), into columns."""
    b = C.Builder(path, batch_rows, offset)
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        off = offset + i
        line = _line(block, s, e)
        rec = _reference(line, path, off)
        if "__error__" in rec:
            yield from b.add_error(off, as_error(rec, off))
            continue
        try:
            cells = C.canonical_cells(rec)
        except BadValue as err:
            yield from b.add_error(off, ErrorRecord(derive_id(path, off), str(err), line.decode("utf-8"), off))
            continue
        yield from b.add(off, rec[ID_KEY], cells)
    last = b.flush(offset + len(starts))
    if last is not None:
        yield last


def _type_info(t: pa.DataType) -> tuple[int, bool, bool]:
    """(nesting depth of lists and structs, capped past ``_MAX_DEPTH``; whether a temporal type is nested
    in ``t``; whether ``t`` holds a struct Arrow or Parquet cannot take as is: no fields, or a repeated
    field name)."""
    depth, temporal, odd = 0, False, False
    level = [t]
    while level and depth <= _MAX_DEPTH:
        nxt = []
        for u in level:
            if pa.types.is_temporal(u):
                temporal = True
            elif C.is_listlike(u):
                nxt.append(u.value_type)
            elif pa.types.is_struct(u):
                names = [u.field(i).name for i in range(u.num_fields)]
                if not names or len(set(names)) != len(names):
                    odd = True
                nxt.extend(u.field(i).type for i in range(u.num_fields))
        level = nxt
        depth += 1
    return depth, temporal, odd


def _to_string_type(t: pa.DataType) -> pa.DataType:
    """``t`` with every temporal type nested in it (in lists and structs) replaced by ``string``."""
    if pa.types.is_temporal(t):
        return pa.string()
    if C.is_listlike(t):
        return pa.list_(_to_string_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_to_string_type(t.field(i).type)) for i in range(t.num_fields)])
    return t


def _read_json(block: bytes, max_line: int, schema: pa.Schema | None = None) -> pa.Table:
    import pyarrow.json as pj

    ropts = pj.ReadOptions(use_threads=True, block_size=max(1 << 20, max_line + 16))
    popts = pj.ParseOptions(newlines_in_values=False, explicit_schema=schema,
                            unexpected_field_behavior="infer")
    return pj.read_json(pa.BufferReader(block), read_options=ropts, parse_options=popts)


def _leaves(col: pa.Array) -> list[pa.Array]:
    """The leaf values of a column: through lists and structs (a null struct's fields count as null)."""
    out, stack = [], [col]
    while stack:
        a = stack.pop()
        if C.is_listlike(a.type):
            stack.append(a.flatten())
        elif pa.types.is_struct(a.type):
            stack.extend(a.flatten())
        else:
            out.append(a)
    return out


def _fast_block(block: bytes, starts: np.ndarray, ends: np.ndarray, path: str, offset: int) -> Chunk:
    """The block parsed by Arrow, when the checks above vouch for it (else ``Fallback``)."""
    n = len(starts)
    arr = np.frombuffer(block, np.uint8)
    # Each line one object: '{' first, '}' last (before an optional '\r'), one row per line (below).
    if not (arr[starts] == 123).all():
        raise C.Fallback("a line does not start with '{'")
    last = ends - 1
    last = last - (arr[last] == 13)
    if not (arr[last] == 125).all():
        raise C.Fallback("a line does not end with '}'")
    if int(arr.max()) >= 0x80:
        try:
            block.decode("utf-8")
        except UnicodeDecodeError:
            raise C.Fallback("not UTF-8") from None
    # Blank lines (whitespace other than JSON's confuses Arrow) are dropped from what Arrow sees.
    lens = ends - starts
    keep_bytes = None
    if n and (int(starts[0]) != 0 or (starts[1:] != ends[:-1] + 1).any() or int(ends[-1]) + 1 != len(block)):
        line_of = np.zeros(len(block) + 1, np.int64)
        np.add.at(line_of, starts, 1)
        np.add.at(line_of, ends + 1, -1)
        keep_bytes = np.cumsum(line_of[:-1]) > 0
        block_for_arrow = arr[keep_bytes].tobytes()
    else:
        block_for_arrow = block
    max_line = int(lens.max()) if n else 0
    try:
        table = _read_json(block_for_arrow, max_line)
        info = [_type_info(f.type) for f in table.schema]
        if any(depth > _MAX_DEPTH or odd for depth, _, odd in info):
            raise C.Fallback("deeply nested values, or an empty object")
        temporal = [f for f, (_, tmp, _) in zip(table.schema, info) if tmp]
        if temporal:  # strings Arrow read as timestamps: read them again as strings
            schema = pa.schema([pa.field(f.name, _to_string_type(f.type)) for f in temporal])
            table = _read_json(block_for_arrow, max_line, schema)
        # pyarrow.json builds an invalid list column when a list's first values are nulls, before the type
        # of its elements is known (``[null, 2.5]``, ``[null, {"a": 1}]``): such a block is read line by line
        table.validate(full=True)
    except (pa.ArrowException, UnicodeDecodeError, ValueError, OverflowError) as e:
        raise C.Fallback(f"pyarrow.json: {e}") from None
    if table.num_rows != n:
        raise C.Fallback("rows != lines")
    names = table.schema.names
    if len(set(names)) != len(names) or any(nm in C.RESERVED for nm in names):
        raise C.Fallback("reserved or duplicate field names")
    for field in table.schema:
        depth, temporal, odd = _type_info(field.type)
        if depth > _MAX_DEPTH or temporal or odd:
            raise C.Fallback(f"field {field.name!r} has type {field.type}")
    raw = C.one_batch(table.combine_chunks())
    _check_numbers(raw, arr)

    def reference(i: int) -> dict:
        return _reference(_line(block, int(starts[i]), int(ends[i])), path, offset + i)

    return C.arrow_chunk(raw, path, offset, reference, strict=True)


def _check_numbers(raw: pa.RecordBatch, arr: np.ndarray) -> None:
    """Fallback unless Arrow's numbers are what ``json.loads`` gives: no NaN/Infinity (Arrow also takes
    spellings json.loads refuses), and every integer token in an int64 column (Arrow turns the integers of a
    column that also holds decimals, and integers beyond int64, into floats)."""
    int_values = 0
    integral_floats = False
    for name, col in zip(raw.schema.names, raw.columns):
        for leaf in _leaves(col):
            t = leaf.type
            if pa.types.is_int64(t):
                int_values += len(leaf) - leaf.null_count
            elif pa.types.is_floating(t) and len(leaf) - leaf.null_count:
                if name == ID_KEY:
                    raise C.Fallback("a float id")  # maybe an integer id beyond int64
                if not pc.all(pc.is_finite(leaf)).as_py():
                    raise C.Fallback("non-finite number")
                if not integral_floats and pc.any(pc.equal(pc.floor(leaf), leaf)).as_py():
                    integral_floats = True
    if integral_floats and _int_tokens(arr) != int_values:
        raise C.Fallback("integer tokens in a float column")


def _int_tokens(arr: np.ndarray) -> int:
    """Upper bound on the integer tokens of a block (exact outside strings): digit runs not part of a
    decimal or exponent, preceded by ``:,[`` or whitespace (maybe with a '-') and followed by ``,]}`` or
    whitespace."""
    d = _DIGIT[arr]
    if not d.any():
        return 0
    nd = len(d)
    run_start = d.copy()
    run_start[1:] &= ~d[:-1]
    run_end = d.copy()
    run_end[:-1] &= ~d[1:]
    S = np.flatnonzero(run_start)
    E = np.flatnonzero(run_end)
    before = arr[np.maximum(S - 1, 0)]
    neg = before == 45  # '-'
    before = np.where(neg, arr[np.maximum(S - 2, 0)], before)
    ok = _BEFORE_INT[before] & (S >= np.where(neg, 2, 1))
    after = arr[np.minimum(E + 1, nd - 1)]
    ok &= _AFTER_INT[after] & (E + 1 < nd)
    return int(ok.sum())


# ---- writing ---------------------------------------------------------------------------------------
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
