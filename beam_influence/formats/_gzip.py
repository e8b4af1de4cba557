"""Verified reading of gzip shards: no byte of a member whose CRC or length check fails reaches a reader.

Python's ``gzip`` hands out a member's data as it inflates it and checks the member's CRC-32 and length
only at its end, so the records of a corrupt member (a flipped bit in its deflate data) are decoded, and
would be indexed, before the error. Here a shard is read twice:

1. ``check_gzip`` inflates every member (streaming, nothing kept), checks each member's header, deflate
   data, CRC-32 and length, and counts the records of the first member that fails (``counter``);
2. ``VerifiedGzip`` inflates again and hands out only the data of the members that passed, then raises
   ``GzipMemberError`` carrying what the check found.

A member cut short is not vouched for either: its CRC-32 cannot be checked, and a flipped bit can make
the inflater run past the member's true end as if the stream were cut (it inflates bytes that were never
written), so a cut cannot be told from corruption.

The error says which member failed, how (``kind``: "CRC", "length", "deflate data", "header",
"truncated"), how many records of that member are withheld, and whether anything after it is unread, so
the reader's dead letter never claims records were lost when none were (a CRC that fails on a member that
inflated completely is data withheld, not lost).

This module imports nothing from the rest of the package.
"""
from __future__ import annotations

import dataclasses
import gzip
import struct
import zlib
from typing import Callable, Iterator, Protocol

READ_SIZE = 1 << 20  # compressed bytes read, and most bytes inflated, at a time
_FTEXT, _FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 1, 2, 4, 8, 16


class RecordCounter(Protocol):
    """Counts the records that start in the inflated data fed to it (one counter per member)."""

    count: int

    def feed(self, data: bytes) -> None: ...


@dataclasses.dataclass(frozen=True)
class GzipCheck:
    """What ``check_gzip`` found. ``good_bytes``: inflated bytes a reader may use (every member before the
    first bad one). ``members``: members that
    passed. ``kind`` (None when every member passed): how the next member failed. ``detail``: the low-level
    reason. ``bad_bytes``: bytes inflated from the failing member (all of it for a CRC or length failure).
    ``bad_records``: records that start in those bytes (None without a counter). ``complete``: the failing
    member inflated to its end (only its check failed). ``unread``: compressed data follows the failing
    member and is not read."""

    good_bytes: int
    members: int
    kind: str | None = None
    detail: str = ""
    bad_bytes: int = 0
    bad_records: int | None = None
    complete: bool = False
    unread: bool = False


class GzipMemberError(gzip.BadGzipFile):
    """Raised by ``VerifiedGzip`` where the verified data ends; ``check`` says why."""

    def __init__(self, check: GzipCheck):
        self.check = check
        super().__init__(f"gzip member {check.members + 1}: {check.kind}: {check.detail}")


class _Fail(Exception):
    def __init__(self, kind: str, detail: str, complete: bool = False):
        super().__init__(detail)
        self.kind, self.detail, self.complete = kind, detail, complete


class _Input:
    """Compressed bytes of a binary stream, with look-ahead."""

    def __init__(self, f):
        self.f, self.buf, self.eof = f, b"", False

    def fill(self, n: int) -> bool:
        """At least ``n`` bytes buffered (False at the end of the stream with fewer)."""
        while len(self.buf) < n and not self.eof:
            data = self.f.read(READ_SIZE)
            if not data:
                self.eof = True
            else:
                self.buf += data
        return len(self.buf) >= n

    def take(self, n: int) -> bytes:
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def until_zero(self) -> bytes:
        """Bytes up to a zero byte (consumed with it): a header's file name or comment."""
        while True:
            k = self.buf.find(b"\0")
            if k >= 0:
                return self.take(k + 1)
            if not self.fill(len(self.buf) + 1):
                raise _Fail("header", "the header ends inside its file name or comment")


def _header(src: _Input) -> None:
    if not src.fill(10):
        raise _Fail("header", f"{len(src.buf)} bytes where a 10-byte member header was expected")
    head = src.take(10)
    if head[:2] != b"\x1f\x8b":
        raise _Fail("header", f"not a gzip member (starts with {head[:2]!r}, expected b'\\x1f\\x8b')")
    if head[2] != 8:
        raise _Fail("header", f"unknown compression method {head[2]}")
    flags = head[3]
    if flags & _FEXTRA:
        if not src.fill(2):
            raise _Fail("header", "the header ends inside its extra field")
        (n,) = struct.unpack("<H", src.take(2))
        if not src.fill(n):
            raise _Fail("header", "the header ends inside its extra field")
        src.take(n)
    if flags & _FNAME:
        src.until_zero()
    if flags & _FCOMMENT:
        src.until_zero()
    if flags & _FHCRC:
        if not src.fill(2):
            raise _Fail("header", "the header ends inside its CRC")
        src.take(2)


def _walk(f, counter: Callable[[], RecordCounter] | None = None) -> Iterator[tuple]:
    """Yield ("data", bytes) for each inflated piece, ("end",) after each member that passed, and last,
    for a bad member, ("fail", kind, detail, complete, records, unread)."""
    src = _Input(f)
    member = 0
    while True:
        if member:  # zero padding after a member is allowed (as Python's gzip allows it)
            while src.fill(1) and src.buf[:1] == b"\0":
                src.buf = src.buf.lstrip(b"\0")
        if not src.fill(1):
            return  # end of stream (an empty file is an empty stream, as for Python's gzip)
        count = counter() if counter else None
        crc = size = 0
        try:
            _header(src)
            d = zlib.decompressobj(-zlib.MAX_WBITS)
            while not d.eof:
                if not d.unconsumed_tail and not src.buf and not src.fill(1):
                    out = d.decompress(b"", READ_SIZE)  # output zlib still holds
                    if not out:
                        raise _Fail("truncated", f"the stream ends inside member {member + 1}")
                else:
                    data = d.unconsumed_tail or src.take(len(src.buf))
                    try:
                        out = d.decompress(data, READ_SIZE)
                    except zlib.error as e:
                        raise _Fail("deflate data", f"zlib.error: {e}") from None
                    if d.eof:
                        src.buf = d.unused_data + src.buf
                if out:
                    crc = zlib.crc32(out, crc)
                    size += len(out)
                    if count is not None:
                        count.feed(out)
                    yield ("data", out)
            if not src.fill(8):
                raise _Fail("truncated", f"the stream ends inside the trailer of member {member + 1}")
            want_crc, want_size = struct.unpack("<II", src.take(8))
            if want_crc != crc:
                raise _Fail("CRC", f"CRC-32 {crc:#010x} of the inflated data, {want_crc:#010x} recorded",
                            complete=True)
            if want_size != size & 0xFFFFFFFF:
                raise _Fail("length", f"{size} bytes inflated, {want_size} recorded (mod 2**32)", complete=True)
        except _Fail as e:
            unread = src.fill(1) if e.complete else e.kind != "truncated"
            yield ("fail", e.kind, e.detail, e.complete, None if count is None else count.count, unread)
            return
        yield ("end",)
        member += 1


def check_gzip(f, counter: Callable[[], RecordCounter] | None = None) -> GzipCheck:
    """Inflate the gzip stream ``f`` (nothing kept) and check every member; see ``GzipCheck``."""
    good = members = member_bytes = 0
    for item in _walk(f, counter):
        if item[0] == "data":
            member_bytes += len(item[1])
        elif item[0] == "end":
            good += member_bytes
            members += 1
            member_bytes = 0
        else:
            _, kind, detail, complete, records, unread = item
            return GzipCheck(good, members, kind, detail, member_bytes, records, complete, unread)
    return GzipCheck(good, members)


class VerifiedGzip:
    """The inflated data of a gzip stream, limited to what ``check`` vouches for; then ``GzipMemberError``
    (or the end of data, when every member passed). ``read(n)`` gives exactly ``n`` bytes unless the data
    ends (then it raises where a failure cut it short); ``read1(n)`` gives what it has."""

    def __init__(self, f, check: GzipCheck):
        self._it = _walk(f)
        self._left = check.good_bytes
        self._check = check
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def _more(self) -> bool:
        while not len(self._pending) and self._left > 0:
            item = next(self._it, None)
            if item is None or item[0] == "fail":
                # the data changed between the check and this read
                self._left = 0
                raise GzipMemberError(dataclasses.replace(
                    self._check, kind=self._check.kind or "changed",
                    detail=self._check.detail or "the shard changed while it was read"))
            if item[0] == "data":
                piece = item[1][: self._left]
                self._left -= len(piece)
                self._pending = memoryview(piece)
        return bool(len(self._pending))

    def _end(self) -> bytes:
        if self._check.kind is not None:
            raise GzipMemberError(self._check)
        return b""

    def read1(self, n: int = -1) -> bytes:
        if not self._more():
            return self._end()
        n = len(self._pending) if n is None or n < 0 else n
        out, self._pending = bytes(self._pending[:n]), self._pending[n:]
        return out

    def read(self, n: int = -1) -> bytes:
        parts, got = [], 0
        while n is None or n < 0 or got < n:
            if not self._more():
                if self._check.kind is not None:
                    raise GzipMemberError(self._check)  # a record cut by the failure is lost with it
                break
            k = len(self._pending) if n is None or n < 0 else n - got
            parts.append(bytes(self._pending[:k]))
            self._pending = self._pending[k:]
            got += len(parts[-1])
        return b"".join(parts)

    def close(self) -> None:
        self._it.close()


class LineCounter:
    """Counts the non-blank lines (JSONL records) that start in the data fed to it."""

    def __init__(self):
        self.count = 0
        self._open = False  # the current line has a non-blank byte already counted

    def feed(self, data: bytes) -> None:
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if not self._open and line.strip():
                self.count += 1
                self._open = True
            if i < len(lines) - 1:
                self._open = False


class FrameCounter:
    """Counts the TFRecord frames (8-byte length, 4-byte CRC, payload, 4-byte CRC) that start in the data."""

    def __init__(self):
        self.count = 0
        self._skip = 0  # bytes of the current frame still to skip
        self._head = b""  # bytes of a length field seen so far

    def feed(self, data: bytes) -> None:
        mv, i = memoryview(data), 0
        while i < len(mv):
            if self._skip:
                k = min(self._skip, len(mv) - i)
                self._skip -= k
                i += k
                continue
            if not self._head:
                self.count += 1
            k = min(8 - len(self._head), len(mv) - i)
            self._head += bytes(mv[i:i + k])
            i += k
            if len(self._head) == 8:
                (length,) = struct.unpack("<Q", self._head)
                self._head = b""
                self._skip = min(length, 1 << 62) + 8
