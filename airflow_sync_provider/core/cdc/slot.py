"""The source side of CDC: publication, replication slot, guards, reading and confirming changes.

Changes are read with ``pg_logical_slot_peek_binary_changes`` (pgoutput, over an ordinary SQL
connection, no replication protocol) and confirmed with ``pg_replication_slot_advance`` only after
the target has committed them.  A crash anywhere in between leaves the slot behind the target, and
the target's state tells the next run which transactions to skip: exactly-once effect.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from airflow_sync_provider.core.cdc.pgoutput import int_to_lsn, lsn_to_int
from airflow_sync_provider.core.cdc.spec import CdcSpec
from airflow_sync_provider.core.errors import (
    ConfigurationError,
    SchemaError,
    SourceUnavailableError,
    SyncError,
    UnsafeOperationError,
)

_PEEK = (
    "SELECT data FROM pg_logical_slot_peek_binary_changes("
    "%(slot)s, %(upto_lsn)s::pg_lsn, %(upto_n)s, 'proto_version', '1', 'publication_names', %(publication)s, "
    "'messages', 'true')"
)

#: How long a read or confirm waits for a slot that another session (a sensor's peek) briefly holds.
SLOT_BUSY_WAIT_SECONDS = 30.0

#: Prefix of the logical message each read emits to learn how far the stream was read (see ``emit_heartbeat``).
HEARTBEAT_PREFIX = "airflow_sync_provider.heartbeat"


@dataclass(frozen=True)
class SourceTableInfo:
    schema: str
    name: str
    oid: int
    primary_key: tuple[str, ...]
    replica_identity: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class SlotInfo:
    slot_name: str
    exists: bool
    restart_lsn: int | None = None
    confirmed_flush_lsn: int | None = None
    current_lsn: int = 0
    retained_bytes: int = 0
    active: bool = False
    wal_status: str | None = None

    def describe(self) -> str:
        if not self.exists:
            return f"slot {self.slot_name!r} does not exist"
        confirmed = int_to_lsn(self.confirmed_flush_lsn) if self.confirmed_flush_lsn is not None else "-"
        return (
            f"slot {self.slot_name!r}: confirmed up to {confirmed}, WAL at {int_to_lsn(self.current_lsn)}, "
            f"{self.retained_bytes:,} bytes of WAL retained (wal_status={self.wal_status})"
        )


def check_source(conn: psycopg.Connection[Any], spec: CdcSpec) -> list[SourceTableInfo]:
    """Fail early, naming what to fix: wal_level, privileges, tables, keys and replica identity."""
    wal_level = setting(conn, "wal_level")
    if wal_level != "logical":
        raise ConfigurationError(
            f"the source server has wal_level={wal_level}; CDC needs wal_level=logical "
            "(ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL)",
            sync_id=spec.sync_id,
            rule="wal_level",
        )
    version = int(setting(conn, "server_version_num"))
    if version < 140000:
        raise ConfigurationError(
            f"the source runs PostgreSQL {version // 10000}; CDC needs PostgreSQL 14 or later (pgoutput messages)",
            sync_id=spec.sync_id,
            rule="server version",
        )
    can_replicate = _scalar(conn, "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user")
    if not can_replicate:
        raise ConfigurationError(
            "the source user lacks the REPLICATION privilege needed to read a replication slot "
            "(ALTER ROLE <user> WITH REPLICATION)",
            sync_id=spec.sync_id,
            rule="privileges",
        )
    tables = []
    for declared in spec.tables:
        schema, name = spec.source_name(declared)
        row = conn.execute(
            "SELECT c.oid, c.relreplident::text, coalesce(("
            "  SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum))"
            "  FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            "  WHERE i.indrelid = c.oid AND i.indisprimary), '{}') "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (schema, name),
        ).fetchone()
        if row is None:
            raise SchemaError("source table does not exist", sync_id=spec.sync_id, table=f"{schema}.{name}")
        oid, identity, primary_key = row
        if not primary_key:
            raise SchemaError(
                "table has no primary key: CDC cannot match updates and deletes to target rows; add a primary key",
                sync_id=spec.sync_id,
                table=f"{schema}.{name}",
                rule="primary key required",
            )
        if identity == "n":
            raise SchemaError(
                "table has REPLICA IDENTITY NOTHING, so deletes and updates carry no key; "
                "ALTER TABLE ... REPLICA IDENTITY DEFAULT",
                sync_id=spec.sync_id,
                table=f"{schema}.{name}",
                rule="replica identity",
            )
        if identity == "i":
            raise SchemaError(
                "table uses REPLICA IDENTITY USING INDEX; CDC needs the primary key (REPLICA IDENTITY DEFAULT) or FULL",
                sync_id=spec.sync_id,
                table=f"{schema}.{name}",
                rule="replica identity",
            )
        tables.append(SourceTableInfo(schema, name, int(oid), tuple(primary_key), identity))
    return tables


def ensure_publication(conn: psycopg.Connection[Any], spec: CdcSpec, tables: Sequence[SourceTableInfo]) -> None:
    """Create the publication, or add the sync's tables to an existing one."""
    exists = _scalar(conn, "SELECT count(*) FROM pg_publication WHERE pubname = %s", (spec.publication,))
    idents = [sql.Identifier(t.schema, t.name) for t in tables]
    if not exists:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(spec.publication), sql.SQL(", ").join(idents)
            )
        )
        return
    published = {
        (r[0], r[1])
        for r in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (spec.publication,)
        )
    }
    for table, ident in zip(tables, idents, strict=True):
        if (table.schema, table.name) not in published:
            conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(spec.publication), ident))


def check_publication(conn: psycopg.Connection[Any], spec: CdcSpec, tables: Sequence[SourceTableInfo]) -> None:
    """Between runs the publication must stay as the snapshot left it.

    While a publication is missing, PostgreSQL decodes nothing for it (it only logs a warning), so
    changes made meanwhile are gone from the stream: recreating it silently would lose them.
    """
    exists = _scalar(conn, "SELECT count(*) FROM pg_publication WHERE pubname = %s", (spec.publication,))
    published = {
        (r[0], r[1])
        for r in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (spec.publication,)
        )
    }
    missing = [t.qualified for t in tables if (t.schema, t.name) not in published]
    if not exists or missing:
        what = (
            f"publication {spec.publication!r} is missing"
            if not exists
            else (f"publication {spec.publication!r} does not include {', '.join(missing)}")
        )
        raise SchemaError(
            f"{what}: changes made while a table is not published never reach the slot, so they cannot be "
            "streamed. Reset the sync (delete its state row) to take a new initial snapshot, which recreates it",
            sync_id=spec.sync_id,
            table=", ".join(missing) or None,
            rule="publication",
        )


def emit_heartbeat(conn: psycopg.Connection[Any]) -> tuple[str, int]:
    """Commit a tiny transactional logical message; returns its token and the WAL position after it.

    Reading the slot up to that position and seeing the message's transaction come back proves
    every transaction committed before it was decoded, so the slot may be confirmed up to it even
    when none touched the published tables (otherwise a quiet publication on a busy database would
    retain WAL forever).  Committed with synchronous_commit on: decoding reads only flushed WAL.
    """
    token = uuid.uuid4().hex
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = on")
        conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (HEARTBEAT_PREFIX, token))
    return token, lsn_to_int(str(_scalar(conn, "SELECT pg_current_wal_lsn()::text")))


def slot_info(conn: psycopg.Connection[Any], slot_name: str) -> SlotInfo:
    row = conn.execute(
        "SELECT pg_current_wal_lsn()::text, s.restart_lsn::text, s.confirmed_flush_lsn::text, s.active, "
        "s.wal_status, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn), 0)::bigint, s.plugin "
        "FROM (SELECT 1) one LEFT JOIN pg_replication_slots s ON s.slot_name = %s",
        (slot_name,),
    ).fetchone()
    assert row is not None
    current, restart, confirmed, active, wal_status, retained, plugin = row
    if restart is None and wal_status is None and plugin is None:
        return SlotInfo(slot_name, False, current_lsn=lsn_to_int(current))
    return SlotInfo(
        slot_name,
        True,
        restart_lsn=lsn_to_int(restart) if restart else None,
        confirmed_flush_lsn=lsn_to_int(confirmed) if confirmed else None,
        current_lsn=lsn_to_int(current),
        retained_bytes=int(retained),
        active=bool(active),
        wal_status=wal_status,
    )


def ensure_slot(conn: psycopg.Connection[Any], spec: CdcSpec) -> SlotInfo:
    """Create the logical slot (pgoutput) if missing; refuse one that is unusable."""
    info = slot_info(conn, spec.slot_name)
    if not info.exists:
        try:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (spec.slot_name,))
        except psycopg.errors.InsufficientPrivilege as error:
            raise ConfigurationError(
                f"cannot create replication slot: {error.diag.message_primary}", sync_id=spec.sync_id, rule="privileges"
            ) from error
        except psycopg.errors.ObjectNotInPrerequisiteState as error:
            raise ConfigurationError(
                f"cannot create replication slot: {error.diag.message_primary} ({error.diag.message_hint or ''})",
                sync_id=spec.sync_id,
                rule="max_replication_slots",
            ) from error
        return slot_info(conn, spec.slot_name)
    check_slot_usable(info, spec)
    return info


def check_slot_usable(info: SlotInfo, spec: CdcSpec) -> None:
    if not info.exists:
        raise SchemaError(
            f"replication slot {spec.slot_name!r} is missing, so changes since the last run cannot be read; "
            "reset the sync (drop its state row) to take a new initial snapshot",
            sync_id=spec.sync_id,
            rule="slot missing",
        )
    if info.wal_status == "lost" or info.restart_lsn is None:
        raise SchemaError(
            f"replication slot {spec.slot_name!r} was invalidated (wal_status={info.wal_status}): the WAL it "
            "needed is gone; drop the slot and reset the sync to take a new initial snapshot",
            sync_id=spec.sync_id,
            rule="slot invalidated",
        )
    if spec.max_retained_wal_bytes is not None and info.retained_bytes > spec.max_retained_wal_bytes:
        raise UnsafeOperationError(
            f"{info.describe()}: more than max_retained_wal_bytes={spec.max_retained_wal_bytes:,}. The source "
            "keeps this WAL on disk until the sync catches up; raise the limit to let this run catch up, or "
            "drop the slot (CdcHook.drop_slot) and reset the sync",
            sync_id=spec.sync_id,
            rule="max_retained_wal_bytes",
        )


def read_changes(
    conn: psycopg.Connection[Any],
    spec: CdcSpec,
    upto_lsn: int,
    fetch_rows: int = 2_000,
    fetch_bytes: int = 8 * 1024 * 1024,
) -> Generator[bytes, None, None]:
    """Yield the pgoutput messages of the complete transactions committed before ``upto_lsn``.

    Streams through a server-side cursor, so memory stays bounded however much is pending: each
    fetch asks for as many messages as the last ones' size says fit in ``fetch_bytes`` (at most
    ``fetch_rows``, which bounds a fetch whose messages turn out wider than the last ones: 1 MB rows
    come a few at a time, narrow ones thousands).  The slot is not
    consumed (``peek``): it moves only when :func:`advance_slot` is called.
    """
    with _peek_cursor(conn, spec, _PEEK, {"upto_lsn": int_to_lsn(upto_lsn)}) as cursor:
        size = min(8, fetch_rows)  # then as many as fit in fetch_bytes
        while rows := cursor.fetchmany(size):
            count, fetched = len(rows), 0
            for (data,) in rows:
                fetched += len(data)
                yield data
            del rows
            size = max(1, min(fetch_rows, fetch_bytes * count // max(fetched, 1)))


#: The same peek, the messages concatenated server-side into parts of about ``part_bytes`` each:
#: one row per part holding its messages' lengths (int4, big-endian) and their bytes, so the client
#: gets a few large buffers instead of one object per message.  A part is cut by a running byte
#: count (each message counting at least 64 bytes, which also bounds its message count); ``n`` (the
#: stream's order) orders the messages within a part, and the parts' ``n`` ranges are checked to
#: follow each other, so the concatenation is the stream whatever order the server summed in.
_PEEK_PARTS = (
    "SELECT min(n), max(n), count(*), string_agg(int4send(octet_length(data)), ''::bytea ORDER BY n), "
    "string_agg(data, ''::bytea ORDER BY n) FROM ("
    "  SELECT n, data, sum(octet_length(data) + 64) OVER (ROWS UNBOUNDED PRECEDING) / %(part_bytes)s AS part "
    "  FROM pg_logical_slot_peek_binary_changes("
    "  %(slot)s, %(upto_lsn)s::pg_lsn, %(upto_n)s, 'proto_version', '1', 'publication_names', %(publication)s, "
    "  'messages', 'true') WITH ORDINALITY AS m(lsn, xid, data, n)) s "
    "GROUP BY part ORDER BY part"
)


@dataclass(frozen=True)
class MessagePart:
    """Consecutive pgoutput messages in one buffer: message ``i`` is ``data[starts[i]:starts[i] + lengths[i]]``."""

    data: bytes
    starts: Any  # numpy int64 array
    lengths: Any  # numpy int64 array


#: The same peek in one row: every message's bytes and their lengths, and their order ``n`` to check
#: that the concatenation is the stream (the plain aggregate takes its rows in the scan's order).
_PEEK_WHOLE = (
    "SELECT count(*), string_agg(int4send(octet_length(data)), ''::bytea), string_agg(data, ''::bytea), "
    "string_agg(int8send(n), ''::bytea) FROM pg_logical_slot_peek_binary_changes("
    "%(slot)s, %(upto_lsn)s::pg_lsn, %(upto_n)s, 'proto_version', '1', 'publication_names', %(publication)s, "
    "'messages', 'true') WITH ORDINALITY AS m(lsn, xid, data, n)"
)


def read_change_parts(
    conn: psycopg.Connection[Any],
    spec: CdcSpec,
    upto_lsn: int,
    part_bytes: int = 8 * 1024 * 1024,
    *,
    whole: bool = False,
) -> Generator[MessagePart, None, None]:
    """The messages :func:`read_changes` yields, as parts of about ``part_bytes`` (see ``_PEEK_PARTS``).

    One binary fetch per part and no Python object per message: what the bulk decoder reads.
    ``whole``: fetch everything in one row (no server-side sort: as fast as the slot can be read,
    measured ~1.7x faster than the parts for 100k changes) and cut it into parts here; for a read
    known to be small, since it holds the whole read in memory.  Should the server find it too big
    for one value (1 GB), the parts are read instead.
    """
    if whole:
        try:
            with _peek_cursor(conn, spec, _PEEK_WHOLE, {"upto_lsn": int_to_lsn(upto_lsn)}) as cursor:
                row = cursor.fetchone()
        except (psycopg.errors.ProgramLimitExceeded, psycopg.errors.OutOfMemory):
            row = None
        if row is not None:
            count, lengths_raw, data, order = row
            if not count:
                return
            if not np.array_equal(np.frombuffer(order, dtype=">i8"), np.arange(1, count + 1)):
                raise SyncError(
                    "the server did not keep the stream's order in one read; set decoder='per_message'",
                    sync_id=spec.sync_id,
                )
            lengths = np.frombuffer(lengths_raw, dtype=">i4").astype(np.int64)
            starts = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1], out=starts[1:])
            if len(lengths) != count or int(lengths.sum()) != len(data):
                raise SyncError("the slot's messages do not add up", sync_id=spec.sync_id)
            data = bytes(data)
            # Cut where the running size (each message counting 64 bytes more, as the parts do) crosses part_bytes.
            cuts = np.flatnonzero(np.diff(np.cumsum(lengths + 64) // max(1, part_bytes))) + 1
            for first, last in zip([0, *cuts.tolist()], [*cuts.tolist(), count], strict=True):
                yield MessagePart(data, starts[first:last], lengths[first:last])
            return
    params = {"upto_lsn": int_to_lsn(upto_lsn), "part_bytes": max(1, part_bytes)}
    expected = 1
    with _peek_cursor(conn, spec, _PEEK_PARTS, params) as cursor:
        while row := cursor.fetchone():
            first, last, count, lengths_raw, data = row
            if first != expected or last - first + 1 != count:
                raise SyncError(
                    f"the slot's messages {first}-{last} ({count}) do not follow message {expected - 1}: "
                    "the server did not keep the stream's order; set decoder='per_message'",
                    sync_id=spec.sync_id,
                )
            expected = last + 1
            lengths = np.frombuffer(lengths_raw, dtype=">i4").astype(np.int64)
            starts = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1], out=starts[1:])
            if len(lengths) != count or int(lengths.sum()) != len(data):
                raise SyncError("a part of the slot's messages does not add up", sync_id=spec.sync_id)
            yield MessagePart(bytes(data), starts, lengths)


@contextmanager
def _peek_cursor(
    conn: psycopg.Connection[Any], spec: CdcSpec, query: str, params: dict[str, Any]
) -> Iterator[_Prefetched]:
    """A server-side binary cursor over a peek of the slot, in its own transaction.

    Waits for a slot another session briefly holds, and names a missing slot.
    """
    params = {"slot": spec.slot_name, "upto_n": spec.max_changes, "publication": spec.publication, **params}
    # pgoutput converts text to the session's client encoding; a SQL_ASCII database cannot convert,
    # only check, and a value that is not UTF-8 would fail the read of the whole slot with no table or
    # column named.  Read it as is: the decoder marks such values (pgoutput.NotUtf8) and the staging
    # refuses one by name, unless its change is skipped anyway (e.g. for a re-snapshotted table).
    raw_text = conn.info.parameter_status("server_encoding") == "SQL_ASCII"
    deadline = time.monotonic() + SLOT_BUSY_WAIT_SECONDS
    reading = False
    while True:
        try:
            with conn.transaction(), conn.cursor(name=f"cdc_{spec.slot_name}", binary=True) as cursor:
                if raw_text:  # no conversion, hence no server-side check that would stop the read
                    conn.execute("SET LOCAL client_encoding = 'SQL_ASCII'")
                try:
                    cursor.execute(query, params)
                except psycopg.errors.UndefinedObject as error:
                    raise SchemaError(
                        f"cannot read replication slot {spec.slot_name!r}: {error.diag.message_primary}",
                        sync_id=spec.sync_id,
                        rule="slot missing",
                    ) from error
                # The server takes the slot at the first FETCH, not at DECLARE: fetch the first row
                # here, inside the wait, so a slot another run or a sensor holds is waited for.
                first = cursor.fetchmany(1)
                reading = True
                yield _Prefetched(cursor, first)
            return
        except psycopg.errors.ObjectInUse:
            # A sensor or trigger peeking at the slot holds it for a moment: wait, don't fail the sync.
            if reading or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class _Prefetched:
    """A server-side cursor whose first row was fetched already: served first by ``fetchone``/``fetchmany``."""

    def __init__(self, cursor: psycopg.Cursor[Any], first: list[Any]) -> None:
        self._cursor = cursor
        self._first = first

    def fetchone(self) -> Any:
        if self._first:
            return self._first.pop()
        return self._cursor.fetchone()

    def fetchmany(self, size: int) -> list[Any]:
        if self._first:
            rows, self._first = self._first, []
            return rows + (self._cursor.fetchmany(size - 1) if size > 1 else [])
        return self._cursor.fetchmany(size)


def has_pending_changes(conn: psycopg.Connection[Any], slot_name: str, publication: str, peek_rows: int = 64) -> bool:
    """Whether the slot holds at least one data change (insert/update/delete/truncate) not yet confirmed."""
    rows = conn.execute(
        "SELECT get_byte(data, 0) FROM pg_logical_slot_peek_binary_changes("
        "%s, NULL, %s, 'proto_version', '1', 'publication_names', %s)",
        (slot_name, peek_rows, publication),
    ).fetchall()
    return any(chr(r[0]) in "IUDT" for r in rows)


def advance_slot(conn: psycopg.Connection[Any], slot_name: str, lsn: int) -> int:
    """Confirm everything up to ``lsn`` (call only after the target committed it); returns the new position."""
    info = slot_info(conn, slot_name)
    if not info.exists or info.confirmed_flush_lsn is None or info.confirmed_flush_lsn >= lsn:
        return info.confirmed_flush_lsn or 0
    deadline = time.monotonic() + SLOT_BUSY_WAIT_SECONDS
    while True:
        try:
            row = conn.execute(
                "SELECT end_lsn::text FROM pg_replication_slot_advance(%s, %s::pg_lsn)", (slot_name, int_to_lsn(lsn))
            )
            break
        except psycopg.errors.ObjectInUse:  # a peek of a sensor/trigger holds the slot for a moment
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    result = row.fetchone()
    return lsn_to_int(result[0]) if result else lsn


def drop_slot(conn: psycopg.Connection[Any], slot_name: str) -> bool:
    """Drop the slot (frees the WAL it retains). Returns whether it existed."""
    if not slot_info(conn, slot_name).exists:
        return False
    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot_name,))
    return True


def type_names(conn: psycopg.Connection[Any], pairs: set[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """``format_type`` of (type oid, typmod) pairs; user-defined types (enums, domains...) map to text."""
    names: dict[tuple[int, int], str] = {}
    for oid, typmod in pairs:
        if oid >= 16384:  # FirstNormalObjectId: a user-defined type the target may not have
            names[(oid, typmod)] = "TEXT"
            continue
        names[(oid, typmod)] = str(_scalar(conn, "SELECT format_type(%s, %s)", (oid, typmod)))
    return names


def connect_error(error: psycopg.OperationalError, sync_id: str) -> SourceUnavailableError:
    return SourceUnavailableError(f"cannot reach the CDC source: {error}", sync_id=sync_id)


def setting(conn: psycopg.Connection[Any], name: str) -> str:
    """A server setting as text, whatever the connection's client encoding.

    With a ``SQL_ASCII`` client encoding psycopg returns text as ``bytes`` (it cannot know what
    encoding the bytes are in); server settings are ASCII, so they are decoded as such here.
    """
    value = _scalar(conn, "SELECT current_setting(%s)", (name,))
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _scalar(conn: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None
