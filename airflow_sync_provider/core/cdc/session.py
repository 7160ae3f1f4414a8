"""Connections to a CDC source: one per use, or a :class:`SourceSession` a stream keeps open.

Everything read from the source is staged as UTF-8, so every connection asks for it (see
:func:`open_source`; :data:`NOT_UTF8` says why a SQL_ASCII source's value may still fail).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import sqlalchemy as sa

from airflow_sync_provider.core.cdc import slot
from airflow_sync_provider.core.cdc.spec import CdcSpec
from airflow_sync_provider.core.errors import SyncError, database_error


def open_source(engine: sa.Engine, sync_id: str) -> psycopg.Connection[Any]:
    """A psycopg (autocommit) connection to the PostgreSQL source behind a SQLAlchemy engine."""
    if engine.dialect.name != "postgresql":
        raise SyncError(f"CDC needs a PostgreSQL source, not {engine.dialect.name}", sync_id=sync_id)
    url = engine.url.set(drivername="postgresql")
    try:
        conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
    except psycopg.OperationalError as error:
        raise slot.connect_error(error, sync_id) from error
    if conn.info.encoding != "utf-8":
        # pgoutput converts names and values to the client encoding of the session that reads the slot,
        # and everything here is staged as UTF-8: ask for UTF-8 (a LATIN1... source converts).  A
        # SQL_ASCII database cannot convert (PostgreSQL does not know what its bytes are): its text
        # passes through as is, so ASCII and UTF-8 text works, and a value that is not UTF-8 fails by
        # name (see NOT_UTF8).  Without this, psycopg returns SQL_ASCII text as bytes.
        conn.execute("SET client_encoding = 'UTF8'")
        if conn.info.parameter_status("server_encoding") == "SQL_ASCII":
            _utf8_connections(engine)
    return conn


@contextmanager
def source_connection(engine: sa.Engine, sync_id: str, doing: str) -> Iterator[psycopg.Connection[Any]]:
    """:func:`open_source`, closed after the block; a connection lost in it (the source restarted,
    the backend was terminated) is a :class:`~..errors.SourceUnavailableError`, which a retry may fix."""
    conn = open_source(engine, sync_id)
    try:
        yield conn
    except (psycopg.OperationalError, psycopg.InterfaceError) as error:
        raise database_error(error, doing, sync_id=sync_id, table=None) from error
    finally:
        conn.close()


class SourceSession:
    """The source side of one stream: a connection kept open across its micro-batches.

    A batch of a one-off run opens a connection to read the slot and another to confirm it, and checks
    the source (wal_level, privileges, tables, keys, publication) each time: ~10 round trips and two
    TCP + authentication handshakes, a third of a small batch's time (measured at 100 changes/s:
    55 -> 36 ms per batch, client CPU 19.5 -> 16 ms).  A stream does that
    once: the probe, the read and the confirmation share this connection, the checked tables are
    reused for ``recheck_every`` seconds (a table's columns changing is seen in the stream itself, by
    its Relation message), and the type names are looked up once.  A connection lost between batches
    (the source restarted, the backend was terminated) is replaced by a new one, and the source is
    checked again; one lost inside a batch fails that batch as a one-off run's would (nothing was
    committed) and the next batch reconnects.  Each use first pings the kept connection (one round
    trip), so a source restarted between two batches costs a reconnect, not a failed batch.
    """

    def __init__(self, engine: sa.Engine, spec: CdcSpec, *, recheck_every: float = 60.0) -> None:
        self.engine = engine
        self.spec = spec
        self.recheck_every = recheck_every
        #: (type oid, typmod) -> type name, shared by the batches' reads (see ``_columns``).
        self.types: dict[tuple[int, int], str] = {}
        self.connects = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._tables: list[slot.SourceTableInfo] | None = None
        self._checked_at = 0.0

    def _open(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not (self._conn.closed or self._conn.broken):
            try:  # one round trip: a server restarted since the last use is noticed here, not mid-batch
                self._conn.execute("SELECT 1")
                return self._conn
            except psycopg.Error:
                pass
        self.close()
        self._conn = open_source(self.engine, self.spec.sync_id)
        self.connects += 1
        return self._conn

    @contextmanager
    def connection(self, doing: str) -> Iterator[psycopg.Connection[Any]]:
        """The session's connection for one use.  A lost connection is dropped and becomes a
        :class:`~..errors.SourceUnavailableError` (as with :func:`source_connection`); after any other
        error it is kept only when it is idle (a failed statement outside a transaction)."""
        conn = self._open()
        try:
            yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            self.close()
            raise database_error(error, doing, sync_id=self.spec.sync_id, table=None) from error
        except BaseException:
            if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self.close()
            raise

    def checked_tables(self, conn: psycopg.Connection[Any]) -> list[slot.SourceTableInfo]:
        """The source checks of :func:`changes_to_staging`, once per ``recheck_every`` seconds."""
        if self._tables is None or time.monotonic() - self._checked_at > self.recheck_every:
            tables = slot.check_source(conn, self.spec)
            slot.check_publication(conn, self.spec, tables)
            self._tables, self._checked_at = tables, time.monotonic()
        return self._tables

    def close(self) -> None:
        conn, self._conn, self._tables = self._conn, None, None
        if conn is not None and not conn.closed:
            conn.close()


@contextmanager
def source_connection_for(
    engine: sa.Engine, sync_id: str, doing: str, session: SourceSession | None
) -> Iterator[psycopg.Connection[Any]]:
    """The session's connection when there is one, else a connection of its own for the block."""
    if session is None:
        with source_connection(engine, sync_id, doing) as conn:
            yield conn
    else:
        with session.connection(doing) as conn:
            yield conn


#: Why a value of a SQL_ASCII source cannot be staged (the CDC and the snapshot errors say it).
NOT_UTF8 = (
    "the source database's encoding is SQL_ASCII, so PostgreSQL does not know what encoding its text is in "
    "and cannot convert it; it is passed through as is, and this value is not valid UTF-8, which the staged "
    "batch and the target need. Convert the value at the source to UTF-8 (e.g. UPDATE ... SET col = "
    "convert_from(convert(convert_to(col, 'SQL_ASCII'), 'LATIN1', 'UTF8'), 'SQL_ASCII') if it is Latin-1), "
    "then re-snapshot this table "
    "(resnapshot_tables; the changes already in the stream are skipped for it), or move the data to a "
    "database with a real encoding"
)


def _utf8_connections(engine: sa.Engine) -> None:
    """Make the engine's new connections ask for UTF-8 too (a SQL_ASCII source; see ``open_source``).

    Without it SQLAlchemy cannot even connect there with psycopg (it gets the server version as
    bytes).  Once per engine; a client encoding the engine's own settings ask for is left alone.
    """
    if getattr(engine, "_sync_utf8_connections", False):
        return

    def utf8(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams.setdefault("client_encoding", "UTF8")

    sa.event.listen(engine, "do_connect", utf8)
    engine._sync_utf8_connections = True  # type: ignore[attr-defined]
