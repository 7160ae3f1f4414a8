"""Decoder for PostgreSQL's built-in ``pgoutput`` logical-replication messages (protocol version 1).

The messages are documented in "Logical Replication Message Formats" of the PostgreSQL manual.
Values arrive in PostgreSQL's text format (the ``binary`` option is off), so they are kept as text
and rebuilt losslessly by the target PostgreSQL on load; Python never re-parses them.

Written by hand rather than taken from a library: the PyPI decoders for pgoutput are unmaintained
or tied to psycopg2's replication protocol, and the format is small and stable (PostgreSQL 10+).
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass

#: Marks a column whose TOASTed value did not change in an UPDATE: pgoutput does not send it.
UNCHANGED_TOAST = object()

_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_INT16 = struct.Struct(">h")
_INT32 = struct.Struct(">i")
_UINT32 = struct.Struct(">I")
_INT64 = struct.Struct(">q")
_UINT64 = struct.Struct(">Q")


class DecodeError(ValueError):
    """A message that is not valid pgoutput (protocol 1)."""


@dataclass(frozen=True)
class NotUtf8:
    """A text value that is not valid UTF-8, kept as its bytes.

    Only a SQL_ASCII database sends one (it cannot convert its text, so its slot is read without
    conversion); whoever stages the value decides whether that is an error (a change that is skipped
    never matters).
    """

    raw: bytes


@dataclass(frozen=True)
class RelationColumn:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True)
class Begin:
    final_lsn: int  # LSN of the commit record
    commit_time: dt.datetime
    xid: int


@dataclass(frozen=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time: dt.datetime


@dataclass(frozen=True)
class Relation:
    relation_id: int
    namespace: str
    name: str
    replica_identity: str  # d(efault), n(othing), f(ull), i(ndex)
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True)
class TypeInfo:
    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True)
class Insert:
    relation_id: int
    new: tuple[object, ...]


@dataclass(frozen=True)
class Update:
    relation_id: int
    new: tuple[object, ...]
    #: The old key ('K', when the key changed) or the whole old row ('O', REPLICA IDENTITY FULL).
    old: tuple[object, ...] | None = None
    old_kind: str | None = None


@dataclass(frozen=True)
class Delete:
    relation_id: int
    old: tuple[object, ...]  # key columns only ('K'), others None; or the whole row ('O')
    old_kind: str


@dataclass(frozen=True)
class Truncate:
    relation_ids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = Begin | Commit | Relation | TypeInfo | Insert | Update | Delete | Truncate | Origin | LogicalMessage


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = bytes(data)
        self.pos = 0

    def _take(self, fmt: struct.Struct) -> int:
        try:
            (value,) = fmt.unpack_from(self.data, self.pos)
        except struct.error as error:
            raise DecodeError(f"message truncated at byte {self.pos}") from error
        self.pos += fmt.size
        return int(value)

    def byte(self) -> str:
        if self.pos >= len(self.data):
            raise DecodeError(f"message truncated at byte {self.pos}")
        value = chr(self.data[self.pos])
        self.pos += 1
        return value

    def int8(self) -> int:
        return ord(self.byte())

    def int16(self) -> int:
        return self._take(_INT16)

    def int32(self) -> int:
        return self._take(_INT32)

    def uint32(self) -> int:
        return self._take(_UINT32)

    def uint64(self) -> int:
        return self._take(_UINT64)

    def count(self, fmt: struct.Struct) -> int:
        """A count of columns or relations: never negative."""
        at, value = self.pos, self._take(fmt)
        if value < 0:
            raise DecodeError(f"negative count {value} at byte {at}")
        return value

    def timestamp(self) -> dt.datetime:
        at, micros = self.pos, self._take(_INT64)
        try:
            return _PG_EPOCH + dt.timedelta(microseconds=micros)
        except OverflowError:
            raise DecodeError(
                f"commit time of {micros} microseconds after 2000-01-01 at byte {at} is out of range"
            ) from None

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise DecodeError(f"unterminated string at byte {self.pos}")
        try:
            value = self.data[self.pos : end].decode()
        except UnicodeDecodeError:
            raise DecodeError(
                f"name {self.data[self.pos : end]!r} at byte {self.pos} is not UTF-8 (a SQL_ASCII source sends names "
                "unconverted: rename the schema, table or column with ASCII or UTF-8 characters)"
            ) from None
        self.pos = end + 1
        return value

    def raw(self, length: int) -> bytes:
        if length < 0:
            raise DecodeError(f"negative length {length} at byte {self.pos}")
        if self.pos + length > len(self.data):
            raise DecodeError(f"value of {length} bytes truncated at byte {self.pos}")
        value = self.data[self.pos : self.pos + length]
        self.pos += length
        return value

    def tuple_data(self) -> tuple[object, ...]:
        """One TupleData: the hot loop of CDC (every changed row), so written with locals only.

        Measured: ~2.5x faster than one method call per field (100k updates of 7 columns).
        """
        data, pos = self.data, self.pos
        size = len(data)
        values: list[object] = []
        append = values.append
        try:
            (count,) = _INT16.unpack_from(data, pos)
            if count < 0:
                raise DecodeError(f"negative column count {count} at byte {pos}")
            pos += 2
            for _ in range(count):
                kind = data[pos]
                pos += 1
                if kind == 116:  # 't': text value
                    (length,) = _INT32.unpack_from(data, pos)
                    pos += 4
                    end = pos + length
                    if end > size or length < 0:
                        raise DecodeError(f"value of {length} bytes truncated at byte {pos}")
                    try:
                        append(data[pos:end].decode())
                    except UnicodeDecodeError:
                        append(NotUtf8(data[pos:end]))
                    pos = end
                elif kind == 110:  # 'n': NULL
                    append(None)
                elif kind == 117:  # 'u': unchanged TOASTed value
                    append(UNCHANGED_TOAST)
                elif kind == 98:  # 'b': binary value
                    (length,) = _INT32.unpack_from(data, pos)
                    pos += 4
                    end = pos + length
                    if end > size or length < 0:
                        raise DecodeError(f"value of {length} bytes truncated at byte {pos}")
                    append(data[pos:end])
                    pos = end
                else:
                    raise DecodeError(f"unknown tuple column kind {chr(kind)!r}")
        except (struct.error, IndexError) as error:
            raise DecodeError(f"message truncated at byte {pos}") from error
        self.pos = pos
        return tuple(values)


#: What each message type is called in errors.
MESSAGE_TYPES = {
    "B": "Begin",
    "C": "Commit",
    "R": "Relation",
    "Y": "Type",
    "I": "Insert",
    "U": "Update",
    "D": "Delete",
    "T": "Truncate",
    "O": "Origin",
    "M": "logical Message",
}


def decode(data: bytes | memoryview) -> Message:
    """Decode one pgoutput message (one row of ``pg_logical_slot_*_binary_changes``).

    Anything that is not a whole, valid protocol-1 message (truncated, corrupt lengths or counts,
    bytes after the last field) raises :class:`DecodeError` naming the message type.
    """
    reader = _Reader(data)
    tag = reader.byte()
    if tag not in MESSAGE_TYPES:
        raise DecodeError(f"unknown pgoutput message type {tag!r}")
    try:
        message = _decode(reader, tag)
    except DecodeError as error:
        raise DecodeError(f"{MESSAGE_TYPES[tag]} message ({tag!r}, {len(reader.data)} bytes): {error}") from None
    if reader.pos != len(reader.data):
        raise DecodeError(
            f"{MESSAGE_TYPES[tag]} message ({tag!r}): {len(reader.data) - reader.pos} unexpected byte(s) "
            f"after its last field at byte {reader.pos}"
        )
    return message


def _decode(reader: _Reader, tag: str) -> Message:
    if tag in ("I", "U", "D"):  # row changes: by far the most messages
        reader.pos = 5
        try:
            (relation_id,) = _UINT32.unpack_from(reader.data, 1)
        except struct.error as error:
            raise DecodeError("message truncated at byte 1") from error
        kind = reader.byte()
        if tag == "I":
            if kind != "N":
                raise DecodeError("insert without a new tuple")
            return Insert(relation_id, reader.tuple_data())
        if tag == "D":
            if kind not in ("K", "O"):
                raise DecodeError(f"delete without an old key or row (got {kind!r})")
            return Delete(relation_id, reader.tuple_data(), kind)
        old = None
        old_kind = None
        if kind in ("K", "O"):
            old_kind, old = kind, reader.tuple_data()
            kind = reader.byte()
        if kind != "N":
            raise DecodeError(f"update without a new tuple (got {kind!r})")
        return Update(relation_id, reader.tuple_data(), old, old_kind)
    if tag == "B":
        final_lsn = reader.uint64()
        return Begin(final_lsn=final_lsn, commit_time=reader.timestamp(), xid=reader.uint32())
    if tag == "C":
        reader.int8()  # flags, unused
        commit_lsn, end_lsn = reader.uint64(), reader.uint64()
        return Commit(commit_lsn=commit_lsn, end_lsn=end_lsn, commit_time=reader.timestamp())
    if tag == "R":
        relation_id, namespace, name = reader.uint32(), reader.string(), reader.string()
        identity = reader.byte()
        columns = []
        for _ in range(reader.count(_INT16)):
            flags = reader.int8()
            columns.append(RelationColumn(reader.string(), reader.uint32(), reader.int32(), bool(flags & 1)))
        return Relation(relation_id, namespace, name, identity, tuple(columns))
    if tag == "Y":
        return TypeInfo(reader.uint32(), reader.string(), reader.string())
    if tag == "T":
        count = reader.count(_INT32)
        options = reader.int8()
        ids = tuple(reader.uint32() for _ in range(count))
        return Truncate(ids, cascade=bool(options & 1), restart_identity=bool(options & 2))
    if tag == "O":
        return Origin(reader.uint64(), reader.string())
    if tag == "M":
        transactional = bool(reader.int8())
        lsn, prefix = reader.uint64(), reader.string()
        return LogicalMessage(transactional, lsn, prefix, reader.raw(reader.int32()))
    raise AssertionError(tag)  # decode() admits only the types above


_BEGIN = struct.Struct(">QqI")  # final LSN, commit time, xid
_COMMIT = struct.Struct(">QQ")  # commit LSN, end LSN (after the flags byte)


def begin_fields(data: bytes) -> tuple[int, int]:
    """``(final_lsn, xid)`` of a Begin message, without building a :class:`Begin` (the hot loop
    sees one per transaction: a third of all messages when every change is its own transaction)."""
    try:
        final_lsn, _time, xid = _BEGIN.unpack_from(data, 1)
    except struct.error as error:
        raise DecodeError("begin message truncated") from error
    return final_lsn, xid


def commit_fields(data: bytes) -> tuple[int, int]:
    """``(commit_lsn, end_lsn)`` of a Commit message (see :func:`begin_fields`)."""
    try:
        commit_lsn, end_lsn = _COMMIT.unpack_from(data, 2)
    except struct.error as error:
        raise DecodeError("commit message truncated") from error
    return commit_lsn, end_lsn


def lsn_to_int(lsn: str) -> int:
    """``'16/B374D848'`` -> 64-bit integer."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
