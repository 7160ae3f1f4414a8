"""Stage a CDC batch: the initial snapshot, or the changes the slot holds past the committed state.

Snapshot hand-off (no gap, no duplicate): the slot is created *before* the snapshot is read, so
every transaction committing after the slot's start is in the stream.  The tables are then read in
one REPEATABLE READ transaction whose snapshot (``pg_current_snapshot()``) is stored with the copy.
When the stream is read, a transaction that the snapshot already saw is skipped: it is the overlap.
That decision is exact (by transaction id, not by time), so nothing is applied twice and nothing
is missed, whatever the concurrent writes.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pyarrow as pa
import sqlalchemy as sa

from airflow_sync_provider.core.cdc import pgoutput, slot
from airflow_sync_provider.core.cdc.manifest import (
    LSN_COLUMN,
    MOVED_FROM_COLUMN,
    OP_COLUMN,
    SEQ_COLUMN,
    UNCHANGED_COLUMN,
    CdcManifest,
    TruncateEvent,
    skip_reason,
)
from airflow_sync_provider.core.cdc.spec import CdcSpec
from airflow_sync_provider.core.cdc.watch import Watch
from airflow_sync_provider.core.errors import ConfigurationError, DataError, SchemaError, SyncError, database_error
from airflow_sync_provider.core.extract import extract_to_staging
from airflow_sync_provider.core.manifest import Manifest, ManifestColumn, StagedFile
from airflow_sync_provider.core.progress import LOG, Logger, Progress
from airflow_sync_provider.core.schema import validate_pg_type
from airflow_sync_provider.core.spec import SyncSpec
from airflow_sync_provider.core.staging import StagingArea, delete_staged_file
from airflow_sync_provider.core.state import SyncState

#: Key of the CDC position inside the state row's ``watermark`` JSON.
POSITION_KEYS = ("commit_lsn", "end_lsn", "snapshot", "snapshot_lsn")


@dataclass(frozen=True)
class CdcPosition:
    """Where a CDC sync is, as committed in the target state row (``watermark`` JSON)."""

    commit_lsn: int
    end_lsn: int
    snapshot: str | None = None
    snapshot_lsn: int | None = None
    #: Tables re-snapshotted since: ``{"schema.table": {"snapshot": str, "snapshot_lsn": int}}``.
    table_snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_watermark(self) -> dict[str, Any]:
        mark: dict[str, Any] = {
            "cdc": True,
            "commit_lsn": pgoutput.int_to_lsn(self.commit_lsn),
            "end_lsn": pgoutput.int_to_lsn(self.end_lsn),
            "snapshot": self.snapshot,
            "snapshot_lsn": pgoutput.int_to_lsn(self.snapshot_lsn) if self.snapshot_lsn is not None else None,
        }
        if self.table_snapshots:
            mark["table_snapshots"] = {
                table: {"snapshot": t["snapshot"], "snapshot_lsn": pgoutput.int_to_lsn(t["snapshot_lsn"])}
                for table, t in sorted(self.table_snapshots.items())
            }
        return mark

    @classmethod
    def from_state(cls, state: SyncState | None) -> CdcPosition | None:
        mark = state.watermark if state else None
        if not isinstance(mark, dict) or not mark.get("cdc"):
            return None
        snapshot_lsn = mark.get("snapshot_lsn")
        return cls(
            commit_lsn=pgoutput.lsn_to_int(mark["commit_lsn"]),
            end_lsn=pgoutput.lsn_to_int(mark["end_lsn"]),
            snapshot=mark.get("snapshot"),
            snapshot_lsn=pgoutput.lsn_to_int(snapshot_lsn) if snapshot_lsn else None,
            table_snapshots={
                table: {"snapshot": t["snapshot"], "snapshot_lsn": pgoutput.lsn_to_int(t["snapshot_lsn"])}
                for table, t in (mark.get("table_snapshots") or {}).items()
            },
        )

    def after(self, commit_lsn: int, end_lsn: int) -> CdcPosition:
        """The position once a batch up to ``commit_lsn`` is applied: a snapshot hand-off is kept while
        transactions up to its WAL position may still be read."""
        keep = self.snapshot_lsn is not None and commit_lsn <= self.snapshot_lsn
        return CdcPosition(
            commit_lsn,
            end_lsn,
            self.snapshot if keep else None,
            self.snapshot_lsn if keep else None,
            {table: t for table, t in self.table_snapshots.items() if commit_lsn <= t["snapshot_lsn"]},
        )


class SnapshotFilter:
    """Is a transaction already contained in the initial snapshot (``xmin:xmax:xip,...``)?"""

    def __init__(self, snapshot: str) -> None:
        xmin, xmax, xip = snapshot.split(":")
        self.xmin, self.xmax = int(xmin), int(xmax)
        self.in_progress = {int(x) for x in xip.split(",") if x}

    def visible(self, xid32: int) -> bool:
        # pgoutput gives 32-bit xids; the snapshot has 64-bit ones. The transactions in question are
        # recent (they commit before snapshot_lsn), so place the xid in the epoch nearest to xmax.
        full = (self.xmax & ~0xFFFFFFFF) | xid32
        if full > self.xmax + 2**31:
            full -= 2**32
        elif full < self.xmax - 2**31:
            full += 2**32
        if full < self.xmin:
            return True
        return full < self.xmax and full not in self.in_progress


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


def _new_manifest_id() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- snapshot


def snapshot_to_staging(
    engine: sa.Engine,
    spec: CdcSpec,
    *,
    state: SyncState | None,
    staging: StagingArea,
    run_id: str,
    logger: Logger | None = None,
) -> CdcManifest:
    """Create publication and slot, then copy every table from one snapshot (see the module doc)."""
    log = logger or LOG
    started = time.monotonic()
    with source_connection(engine, spec.sync_id, "creating the slot") as conn:
        tables = slot.check_source(conn, spec)
        slot.ensure_publication(conn, spec, tables)
        info = slot.ensure_slot(conn, spec)
        sql_ascii = conn.info.parameter_status("server_encoding") == "SQL_ASCII"
    assert info.confirmed_flush_lsn is not None
    log.info("sync %s: initial snapshot after %s", spec.sync_id, info.describe())
    manifest_id = _new_manifest_id()
    staging_dir = staging.batch_uri(spec.sync_id, manifest_id)
    snapshot, snapshot_lsn, table_manifests = _copy_tables(
        engine, spec, tables, staging_dir, run_id, log, sql_ascii=sql_ascii
    )
    manifest = CdcManifest(
        **_manifest_header(spec, run_id, manifest_id, "snapshot", staging_dir, started),
        tables=tuple(table_manifests),
        base_version=state.version if state else 0,
        applied_lsn=0,
        commit_lsn=info.confirmed_flush_lsn,
        end_lsn=info.confirmed_flush_lsn,
        snapshot=snapshot,
        snapshot_lsn=snapshot_lsn,
        notes=(
            f"snapshot {snapshot} at {pgoutput.int_to_lsn(snapshot_lsn)}; slot {spec.slot_name} from {info.describe()}",
        ),
    )
    staging.write_manifest(manifest)
    return manifest


def _manifest_header(
    spec: CdcSpec, run_id: str, manifest_id: str, kind: str, staging_dir: str, started: float
) -> dict[str, Any]:
    """What every CDC manifest (snapshot, table re-snapshot, changes) says of its sync, run and batch."""
    return {
        "sync_id": spec.sync_id,
        "run_id": run_id,
        "manifest_id": manifest_id,
        "kind": kind,
        "slot_name": spec.slot_name,
        "publication": spec.publication,
        "target_schema": spec.target_schema,
        "state_table": spec.state_table,
        "delete_mode": spec.delete_mode,
        "staging_dir": staging_dir,
        "extracted_at": dt.datetime.now(dt.UTC).isoformat(),
        "extract_seconds": round(time.monotonic() - started, 3),
    }


def _copy_tables(
    engine: sa.Engine,
    spec: CdcSpec,
    tables: Sequence[slot.SourceTableInfo],
    staging_dir: str,
    run_id: str,
    log: Logger,
    *,
    sql_ascii: bool,
) -> tuple[str, int, list[Manifest]]:
    """Copy ``tables`` in one REPEATABLE READ snapshot; returns it, the WAL position read right after
    it, and one full-table manifest per table."""
    table_manifests: list[Manifest] = []
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="REPEATABLE READ")
        with connection.begin():
            snapshot, snapshot_lsn = connection.execute(
                sa.text("SELECT pg_current_snapshot()::text, pg_current_wal_lsn()::text")
            ).one()
            for table in tables:
                rows_per_page = _rows_per_page(connection, table, spec)
                if rows_per_page < spec.batch_rows:
                    log.info(
                        "sync %s: %s has wide rows: pages of %d rows (batch_bytes=%d)",
                        spec.sync_id,
                        table.qualified,
                        rows_per_page,
                        spec.batch_bytes,
                    )
                table_spec = SyncSpec(
                    sync_id=spec.sync_id,
                    source_table=table.name,
                    source_schema=table.schema,
                    target_schema=spec.target_schema,
                    target_table=spec.target_name(table.qualified),
                    mode="full",
                    primary_key=table.primary_key,
                    delete_mode=spec.delete_mode,
                    batch_rows=rows_per_page,
                    state_table=spec.state_table,
                    schema_drift=spec.schema_drift,
                    history_table=spec.history_table_of(table.qualified),
                )
                try:
                    part = extract_to_staging(
                        engine,
                        table_spec,
                        state=None,
                        staging=StagingArea(staging_dir),
                        run_id=run_id,
                        logger=log,
                        connection=connection,
                    )
                except SyncError as error:
                    if sql_ascii and 'for encoding "UTF8"' in str(error):
                        raise DataError(NOT_UTF8, sync_id=spec.sync_id, table=table.qualified) from error
                    raise
                table_manifests.append(part)
    return str(snapshot), pgoutput.lsn_to_int(str(snapshot_lsn)), table_manifests


def _rows_per_page(connection: sa.Connection, table: slot.SourceTableInfo, spec: CdcSpec) -> int:
    """Rows per page of a snapshot copy so a page holds about ``batch_bytes`` (memory is bounded by
    bytes, not only by ``batch_rows``): the text width of a sample of the table's rows, doubled."""
    rows: sa.Select[Any] = (
        sa.select(sa.literal_column("*")).select_from(sa.table(table.name, schema=table.schema)).limit(20)
    )
    text = sa.cast(sa.literal_column("t"), sa.Text)  # the whole row as text (t: the subquery's alias)
    sample = sa.select(sa.func.coalesce(sa.func.max(sa.func.octet_length(text)), 0)).select_from(rows.subquery("t"))
    width = int(connection.execute(sample).scalar_one() or 0)
    if width <= 0:
        return spec.batch_rows
    return max(1, min(spec.batch_rows, spec.batch_bytes // (2 * width)))


def table_snapshot_to_staging(
    engine: sa.Engine,
    spec: CdcSpec,
    tables: Sequence[str],
    *,
    state: SyncState | None,
    staging: StagingArea,
    run_id: str,
    logger: Logger | None = None,
) -> CdcManifest:
    """Copy some of the sync's tables anew while the others keep streaming from the committed position.

    The recovery for one table whose target copy cannot be trusted (a value a change left out cannot
    be known, rows edited in the target, a value the stream cannot carry): the same hand-off as the
    initial snapshot, for those tables only.  Loaded, it replaces the tables' target rows and records
    the snapshot per table; the next change batches skip, for those tables only, the transactions the
    snapshot already holds (the other tables get every change as before).
    """
    log = logger or LOG
    started = time.monotonic()
    position = CdcPosition.from_state(state)
    if position is None or state is None:
        raise ConfigurationError(
            "the sync has no committed snapshot yet: its first run copies every table anyway", sync_id=spec.sync_id
        )
    declared = {".".join(spec.source_name(t)): t for t in spec.tables}
    wanted = [".".join(spec.source_name(t)) for t in tables]
    unknown = [t for t in wanted if t not in declared]
    if not wanted or unknown:
        raise ConfigurationError(
            f"re-snapshot needs tables of the sync ({', '.join(declared)}); got {', '.join(unknown) or 'none'}",
            sync_id=spec.sync_id,
        )
    with source_connection(engine, spec.sync_id, "checking the source") as conn:
        infos = slot.check_source(conn, spec)
        chosen = [t for t in infos if t.qualified in wanted]
        # The other tables must still be published as the snapshot left them (else their changes were
        # lost, and only re-snapshotting them too would do); the chosen ones are (re-)added.
        slot.check_publication(conn, spec, [t for t in infos if t.qualified not in wanted])
        slot.ensure_publication(conn, spec, chosen)
        info = slot.slot_info(conn, spec.slot_name)
        slot.check_slot_usable(info, spec)
        sql_ascii = conn.info.parameter_status("server_encoding") == "SQL_ASCII"
    manifest_id = _new_manifest_id()
    staging_dir = staging.batch_uri(spec.sync_id, manifest_id)
    log.info("sync %s: re-snapshot of %s at %s", spec.sync_id, ", ".join(wanted), info.describe())
    snapshot, snapshot_lsn, table_manifests = _copy_tables(
        engine, spec, chosen, staging_dir, run_id, log, sql_ascii=sql_ascii
    )
    manifest = CdcManifest(
        **_manifest_header(spec, run_id, manifest_id, "table_snapshot", staging_dir, started),
        tables=tuple(table_manifests),
        base_version=state.version,
        applied_lsn=position.commit_lsn,
        commit_lsn=position.commit_lsn,
        end_lsn=position.end_lsn,
        snapshot=position.snapshot,
        snapshot_lsn=position.snapshot_lsn,
        table_snapshots={t.qualified: {"snapshot": snapshot, "snapshot_lsn": snapshot_lsn} for t in chosen},
        notes=(f"re-snapshot of {', '.join(wanted)}: snapshot {snapshot} at {pgoutput.int_to_lsn(snapshot_lsn)}",),
    )
    staging.write_manifest(manifest)
    return manifest


# --------------------------------------------------------------------------- change stream


@dataclass
class _TableStream:
    """Staged changes of one table: column buffers flushed to a Parquet file every ``batch_rows``."""

    source: slot.SourceTableInfo
    relation: pgoutput.Relation | None = None
    columns: tuple[ManifestColumn, ...] = ()
    files: list[StagedFile] = field(default_factory=list)
    buffer: list[list[Any]] = field(default_factory=list)
    buffer_bytes: int = 0
    rows: int = 0
    #: The bulk decoder's buffer: Arrow batches in this schema, in commit order (instead of ``buffer``).
    pieces: list[pa.RecordBatch] = field(default_factory=list)

    def schema(self) -> pa.Schema:
        fields = [pa.field(c.name, pa.string()) for c in self.columns]
        fields += [
            pa.field(OP_COLUMN, pa.string()),
            pa.field(LSN_COLUMN, pa.int64()),
            pa.field(SEQ_COLUMN, pa.int64()),
            pa.field(UNCHANGED_COLUMN, pa.string()),
            pa.field(MOVED_FROM_COLUMN, pa.int64()),
        ]
        return pa.schema(fields)


_ROW_TAGS = frozenset(b"IUD")


@dataclass(slots=True)
class _Txn:
    """The transaction being read: its changes are in the tables' buffers (and, for a big one, files).

    ``marks`` remembers, per table it touched, where its rows begin (files written, buffer rows), so
    ``undo`` can take them back when the batch must end before this transaction.
    """

    changes: int = 0
    bytes: int = 0  # buffered, not yet written out
    total_bytes: int = 0
    truncates: list[TruncateEvent] = field(default_factory=list)
    marks: dict[int, tuple[int, int]] = field(default_factory=dict)

    def add(self, stream: _TableStream, row: list[Any], size: int) -> None:
        if stream.source.oid not in self.marks:
            self.marks[stream.source.oid] = (len(stream.files), len(stream.buffer))
        stream.buffer.append(row)
        stream.buffer_bytes += size
        self.bytes += size
        self.total_bytes += size

    def reset(self) -> None:
        """Ready for the next transaction (one per commit: cheaper than a new object)."""
        self.changes = self.bytes = self.total_bytes = 0
        if self.truncates:
            self.truncates = []
        if self.marks:
            self.marks = {}

    def spill(self, streams: dict[int, _TableStream], flush: Any) -> None:
        """Write out every buffer: the rows of earlier transactions and this one's in separate files."""
        for oid, (files, start) in list(self.marks.items()):
            stream = streams[oid]
            if start:  # earlier transactions' rows first, on their own
                mine = stream.buffer[start:]
                del stream.buffer[start:]
                flush(stream)
                stream.buffer = mine
            self.marks[oid] = (len(stream.files) if start else files, 0)
            flush(stream)
        self.bytes = 0

    def undo(self, streams: dict[int, _TableStream]) -> None:
        """Take this transaction's rows back out of the buffers and the staged files."""
        for oid, (files, start) in self.marks.items():
            stream = streams[oid]
            for staged in stream.files[files:]:
                delete_staged_file(staged.uri)
                stream.rows -= staged.rows
            del stream.files[files:]
            del stream.buffer[start:]
        self.marks.clear()


def _pending_rows(values: Sequence[object], op: str, lsn: int, seq: int, moved_from: int | None = None) -> list[Any]:
    lsn = lsn - 2**63 if lsn >= 2**63 else lsn
    if not any(v is pgoutput.UNCHANGED_TOAST for v in values):  # the common case: one list, no per-value test
        return [*values, op, lsn, seq, None, moved_from]
    unchanged = [i + 1 for i, v in enumerate(values) if v is pgoutput.UNCHANGED_TOAST]
    row: list[Any] = [None if v is pgoutput.UNCHANGED_TOAST else v for v in values]
    row += [op, lsn, seq, "{" + ",".join(map(str, unchanged)) + "}", moved_from]
    return row


def _still_loadable(state: SyncState | None, position: CdcPosition | None) -> Callable[[dict[str, Any]], bool]:
    """For the staging sweep: whether a staged batch's manifest is one a load would still apply."""
    version = state.version if state else 0
    last_manifest_id = state.last_manifest_id if state else None

    def loadable(data: dict[str, Any]) -> bool:
        try:
            manifest = CdcManifest.from_dict(data)
        except (KeyError, TypeError, ValueError):  # not a CDC batch of this sync: its age decides
            return False
        return skip_reason(manifest, version, last_manifest_id, position) is None

    return loadable


@dataclass
class ChangeRead:
    """One read of the slot: what both decoders are given and what they hand back.

    The decoders (the per-message reference below, the bulk one in :mod:`.bulk`) fill the tables'
    streams and the counters; :func:`changes_to_staging` does what comes before and after.
    """

    spec: CdcSpec
    conn: psycopg.Connection[Any]
    position: CdcPosition
    staging: StagingArea
    staging_dir: str
    streams: dict[int, _TableStream]
    sql_ascii: bool
    heartbeat: str
    upto: int
    log: Logger
    progress: Progress
    snapshot_filter: SnapshotFilter | None
    #: Re-snapshotted tables: per source oid, the snapshot whose transactions are skipped for it.
    table_filters: dict[int, tuple[SnapshotFilter, int]]
    by_name: dict[tuple[str, str], int]
    pending_types: dict[tuple[int, int], str] = field(default_factory=dict)
    transactions: int = 0
    changes: int = 0
    skipped: int = 0
    truncates: list[TruncateEvent] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    last_commit: int = 0
    last_end: int = 0
    #: The heartbeat's transaction came back: everything committed before it was read.
    reached: bool = False
    heartbeat_end: int = 0

    def flush(self, stream: _TableStream) -> None:
        _flush(self.staging, self.staging_dir, stream, self.conn, self.pending_types, self.spec)

    def relation_changed(self, stream: _TableStream, txn_lsn: int, transactions: int) -> bool:
        """A table's columns changed mid-batch (its new Relation message has arrived): whether the batch
        must end before this transaction (the table has staged rows; ``transactions`` were read before
        it); fails if it is the first."""
        if not (stream.rows or stream.buffer or stream.pieces):
            stream.columns = ()
            return False
        # The table's columns changed mid-batch: end the batch before this transaction, so every
        # staged file has one shape; the next run starts with the new one.
        if not transactions:  # it is the first: ending before it would stall for ever
            raise SchemaError(
                f"the transaction committed at {pgoutput.int_to_lsn(txn_lsn)} changes this "
                "table's columns between two of its row changes, so its changes cannot be "
                "staged in one shape. Re-snapshot just this table (resnapshot_tables; the "
                "stream then skips that transaction for it, the other tables keep streaming)",
                sync_id=self.spec.sync_id,
                table=stream.source.qualified,
                rule="schema change inside a transaction",
            )
        self.notes.append(
            f"columns of {stream.source.qualified} changed at {pgoutput.int_to_lsn(txn_lsn)}; "
            "the batch ends before that transaction"
        )
        return True

    def new_relation(self, stream: _TableStream, relation: pgoutput.Relation) -> None:
        stream.relation = relation
        self.pending_types.update(
            {
                (c.type_oid, c.type_modifier): ""
                for c in relation.columns
                if (c.type_oid, c.type_modifier) not in self.pending_types
            }
        )


def changes_to_staging(
    engine: sa.Engine,
    spec: CdcSpec,
    *,
    state: SyncState | None,
    staging: StagingArea,
    run_id: str,
    logger: Logger | None = None,
    session: SourceSession | None = None,
    change_staging: StagingArea | None = None,
) -> CdcManifest:
    """Stage the committed transactions the slot holds past the target's committed position.

    With a ``session`` (a stream) the slot is read on its connection; ``change_staging`` (e.g. in
    memory) then holds a change batch, ``staging`` still the initial snapshot (which may be large).
    """
    log = logger or LOG
    started = time.monotonic()
    position = CdcPosition.from_state(state)
    staging.sweep_abandoned(spec.sync_id, pending=_still_loadable(state, position), log=log)
    if position is None:
        return snapshot_to_staging(engine, spec, state=state, staging=staging, run_id=run_id, logger=log)
    if change_staging is not None and change_staging is not staging:
        staging = change_staging
        staging.sweep_abandoned(spec.sync_id, pending=_still_loadable(state, position), log=log)
    manifest_id = _new_manifest_id()
    staging_dir = staging.batch_uri(spec.sync_id, manifest_id)
    with source_connection_for(engine, spec.sync_id, f"reading slot {spec.slot_name}", session) as conn:
        if session is not None:
            tables = session.checked_tables(conn)
        else:
            tables = slot.check_source(conn, spec)
            slot.check_publication(conn, spec, tables)
        info = slot.slot_info(conn, spec.slot_name)
        slot.check_slot_usable(info, spec)
        # The target committed up to end_lsn: confirm it now (a crash after the commit may have
        # skipped that), so the slot frees WAL and the peek starts where the target is.
        slot.advance_slot(conn, spec.slot_name, position.end_lsn)
        heartbeat, upto = slot.emit_heartbeat(conn)
        read = ChangeRead(
            spec=spec,
            conn=conn,
            position=position,
            staging=staging,
            staging_dir=staging_dir,
            streams={t.oid: _TableStream(t) for t in tables},
            sql_ascii=conn.info.parameter_status("server_encoding") == "SQL_ASCII",
            heartbeat=heartbeat,
            upto=upto,
            log=log,
            progress=Progress(f"sync {spec.sync_id}: read changes from slot {spec.slot_name}", log),
            snapshot_filter=SnapshotFilter(position.snapshot) if position.snapshot else None,
            table_filters={
                t.oid: (
                    SnapshotFilter(position.table_snapshots[t.qualified]["snapshot"]),
                    int(position.table_snapshots[t.qualified]["snapshot_lsn"]),
                )
                for t in tables
                if t.qualified in position.table_snapshots
            },
            by_name={(t.schema, t.name): t.oid for t in tables},
            pending_types=session.types if session is not None else {},
            last_commit=position.commit_lsn,
            last_end=position.end_lsn,
        )
        # The server decodes the whole range before the first row arrives: say so while it runs.
        watch = Watch(log, f"sync {spec.sync_id}: read of slot {spec.slot_name}")
        watch.phase("reading changes (the server decodes the range first)")
        with watch:
            if spec.decoder == "bulk":
                from airflow_sync_provider.core.cdc.bulk import read_bulk  # bulk imports this module

                read_bulk(read)
            else:
                _read_per_message(read)
        streams = read.streams
        for stream in streams.values():
            if stream.buffer or stream.pieces:
                read.flush(stream)
            elif stream.relation is not None and not stream.columns:
                stream.columns = _columns(stream, conn, read.pending_types)
        read.progress.done(f"{read.transactions} transaction(s), {read.skipped} already applied or in the snapshot")
        last_end = read.last_end
        if read.reached:
            # Everything committed before the heartbeat was read: nothing older is left to apply.
            last_end = max(last_end, read.heartbeat_end)
            if read.transactions == 0:
                slot.advance_slot(conn, spec.slot_name, read.heartbeat_end)
        target_columns = {oid: s.columns or _catalog_columns(conn, s.source) for oid, s in streams.items()}
    manifest = CdcManifest(
        **_manifest_header(spec, run_id, manifest_id, "changes", staging_dir, started),
        tables=tuple(
            _table_manifest(spec, s, target_columns[oid], run_id, manifest_id, staging_dir)
            for oid, s in streams.items()
        ),
        base_version=state.version if state else 0,
        applied_lsn=position.commit_lsn,
        commit_lsn=read.last_commit,
        end_lsn=last_end,
        changes=read.changes,
        transactions=read.transactions,
        truncates=tuple(read.truncates),
        snapshot=position.snapshot,
        snapshot_lsn=position.snapshot_lsn,
        table_snapshots=position.table_snapshots,
        notes=tuple(read.notes),
    )
    staging.write_manifest(manifest)
    return manifest


def _read_per_message(read: ChangeRead) -> None:
    """The reference decoder: one :func:`.pgoutput.decode` per message, rows buffered as Python lists."""
    spec, conn, position, streams = read.spec, read.conn, read.position, read.streams
    staging, staging_dir, pending_types, sql_ascii = read.staging, read.staging_dir, read.pending_types, read.sql_ascii
    snapshot_filter, table_filters, by_name, heartbeat = (
        read.snapshot_filter,
        read.table_filters,
        read.by_name,
        read.heartbeat,
    )
    progress, notes, truncates = read.progress, read.notes, read.truncates
    reached = in_heartbeat = False
    heartbeat_end = 0
    relation_map: dict[int, int] = {}  # relation id in the stream -> source oid we track
    seq = 0
    changes = transactions = skipped = 0
    read_bytes = 0  # of the changes staged so far (their pgoutput messages)
    last_commit, last_end = read.last_commit, read.last_end
    skip = False
    skip_tables: set[int] = set()
    txn_lsn = 0
    # Rows go to their table's buffer as they arrive; a buffer is written out at a commit once it
    # holds batch_rows rows or batch_bytes bytes, and within a transaction bigger than batch_bytes
    # (see _Txn), so memory is bounded by bytes whatever the row width or transaction size.
    txn = _Txn()
    reader = slot.read_changes(conn, spec, read.upto)
    for data in reader:
        tag = data[0]
        if tag in _ROW_TAGS:
            if skip:
                continue
            message = pgoutput.decode(data)
            assert isinstance(message, (pgoutput.Insert, pgoutput.Update, pgoutput.Delete))
            oid = relation_map.get(message.relation_id)
            if oid is None or oid in skip_tables:
                continue
            stream = streams[oid]
            if stream.relation is None:
                raise SyncError(
                    "a change arrived before its relation description",
                    sync_id=spec.sync_id,
                    table=stream.source.qualified,
                )
            txn.changes += 1
            size = len(data)
            if isinstance(message, pgoutput.Insert):
                seq += 1
                rows = [_pending_rows(message.new, "I", txn_lsn, seq)]
            elif isinstance(message, pgoutput.Update):
                moved_from = None
                new = message.new
                rows = []
                if message.old_kind == "O" and message.old is not None:
                    new = _with_old_values(new, message.old)
                if message.old_kind == "K" and message.old is not None:
                    seq += 1  # the key changed: delete the old key, then upsert the new one
                    moved_from = seq
                    rows.append(_pending_rows(message.old, "D", txn_lsn, seq))
                elif (
                    message.old_kind == "O"
                    and message.old is not None
                    and _key_changed(stream, message.old, message.new)
                ):
                    seq += 1
                    moved_from = seq
                    rows.append(_pending_rows(message.old, "D", txn_lsn, seq))
                seq += 1
                rows.append(_pending_rows(new, "U", txn_lsn, seq, moved_from))
            else:
                seq += 1
                rows = [_pending_rows(message.old, "D", txn_lsn, seq)]
            for row in rows:
                if sql_ascii and any(isinstance(v, pgoutput.NotUtf8) for v in row):
                    _refuse_not_utf8(stream, row, spec)
                txn.add(stream, row, size)
            if txn.bytes > spec.batch_bytes:  # a big transaction: write out what it holds so far
                txn.spill(streams, lambda s: _flush(staging, staging_dir, s, conn, pending_types, spec))
            continue
        if tag == 66:  # Begin: one per transaction, so read without building a message object
            txn_lsn, xid = pgoutput.begin_fields(data)
            skip = txn_lsn <= position.commit_lsn or bool(
                snapshot_filter
                and position.snapshot_lsn is not None
                and txn_lsn <= position.snapshot_lsn
                and snapshot_filter.visible(xid)
            )
            if table_filters:
                skip_tables = {
                    oid for oid, (held, lsn) in table_filters.items() if txn_lsn <= lsn and held.visible(xid)
                }
            continue
        if tag == 67:  # Commit: likewise
            commit_lsn, end_lsn = pgoutput.commit_fields(data)
            if in_heartbeat:  # everything committed before this transaction has been read
                reached, in_heartbeat, heartbeat_end = True, False, end_lsn
                continue
            last_commit, last_end = commit_lsn, end_lsn
            if skip:
                skipped += 1
                continue
            if not txn.changes:
                continue  # only other tables' rows or logical messages
            transactions += 1
            changes += txn.changes
            read_bytes += txn.total_bytes
            truncates.extend(txn.truncates)
            for oid in txn.marks:
                stream = streams[oid]
                if len(stream.buffer) >= spec.batch_rows or stream.buffer_bytes >= spec.batch_bytes:
                    _flush(staging, staging_dir, stream, conn, pending_types, spec)
            progress.add(txn.changes)
            txn.reset()
            if spec.max_batch_bytes is not None and read_bytes >= spec.max_batch_bytes:
                notes.append(f"the batch ends at {read_bytes:,} bytes of changes (max_batch_bytes)")
                break
            continue
        message = pgoutput.decode(data)
        if isinstance(message, pgoutput.Relation):
            oid = by_name.get((message.namespace, message.name))
            if oid is None:
                continue
            relation_map[message.relation_id] = oid
            stream = streams[oid]
            if (
                stream.relation is not None
                and _relation_shape(stream.relation) != _relation_shape(message)
                and read.relation_changed(stream, txn_lsn, transactions)
            ):
                txn.undo(streams)
                break
            read.new_relation(stream, message)
        elif isinstance(message, pgoutput.Truncate):
            if skip:
                continue
            for relation_id in message.relation_ids:
                oid = relation_map.get(relation_id)
                if oid is not None and oid not in skip_tables:
                    seq += 1
                    txn.changes += 1
                    txn.truncates.append(TruncateEvent(streams[oid].source.qualified, txn_lsn, seq))
        elif isinstance(message, pgoutput.LogicalMessage):
            in_heartbeat = in_heartbeat or (
                message.prefix == slot.HEARTBEAT_PREFIX and message.content == heartbeat.encode()
            )
    reader.close()  # ends the read's transaction (also after a break)
    read.transactions, read.changes, read.skipped = transactions, changes, skipped
    read.last_commit, read.last_end = last_commit, last_end
    read.reached, read.heartbeat_end = reached, heartbeat_end


def _refuse_not_utf8(stream: _TableStream, row: list[Any], spec: CdcSpec) -> None:
    """A SQL_ASCII source's value that is not UTF-8 cannot be staged: fail naming it (see NOT_UTF8)."""
    assert stream.relation is not None
    names = [c.name for c in stream.relation.columns]
    for name, value in zip(names, row, strict=False):
        if isinstance(value, pgoutput.NotUtf8):
            key = {k: row[names.index(k)] for k in stream.source.primary_key if k in names}
            raise DataError(
                f"a changed row holds {value.raw[:40]!r}, which is not valid UTF-8: {NOT_UTF8}",
                sync_id=spec.sync_id,
                table=stream.source.qualified,
                column=name,
                key=key,
                rule="encoding",
            )


def _with_old_values(new: tuple[object, ...], old: tuple[object, ...]) -> tuple[object, ...]:
    """REPLICA IDENTITY FULL: the old row arrives whole (TOASTed values detoasted), so a value the new
    row leaves out as unchanged is the old row's; the load then needs neither the batch nor the target."""
    if not any(v is pgoutput.UNCHANGED_TOAST for v in new):
        return new
    return tuple(
        o if n is pgoutput.UNCHANGED_TOAST and o is not pgoutput.UNCHANGED_TOAST else n
        for n, o in zip(new, old, strict=True)
    )


def _relation_shape(relation: pgoutput.Relation) -> tuple[tuple[str, int, int], ...]:
    return tuple((c.name, c.type_oid, c.type_modifier) for c in relation.columns)


def _key_changed(stream: _TableStream, old: Sequence[object], new: Sequence[object]) -> bool:
    """REPLICA IDENTITY FULL sends the whole old row: compare the primary-key columns."""
    assert stream.relation is not None
    names = [c.name for c in stream.relation.columns]
    return any(old[names.index(k)] != new[names.index(k)] for k in stream.source.primary_key)


def _columns(
    stream: _TableStream, conn: psycopg.Connection[Any], pending_types: dict[tuple[int, int], str]
) -> tuple[ManifestColumn, ...]:
    assert stream.relation is not None
    unknown = {k for k, v in pending_types.items() if not v}
    if unknown:
        pending_types.update(slot.type_names(conn, unknown))
    return tuple(
        ManifestColumn(
            c.name, pending_types[(c.type_oid, c.type_modifier)].upper(), c.name not in stream.source.primary_key
        )
        for c in stream.relation.columns
    )


def _catalog_columns(conn: psycopg.Connection[Any], table: slot.SourceTableInfo) -> tuple[ManifestColumn, ...]:
    rows = conn.execute(
        "SELECT a.attname, a.atttypid::int, a.atttypmod FROM pg_attribute a "
        "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (table.oid,),
    ).fetchall()
    names = slot.type_names(conn, {(r[1], r[2]) for r in rows})
    return tuple(ManifestColumn(r[0], _target_type(names[(r[1], r[2])]), r[0] not in table.primary_key) for r in rows)


def _target_type(source_type: str) -> str:
    """The source's type for the target column, or text for a type expression we would not put in DDL."""
    try:
        return validate_pg_type(source_type.upper())
    except ValueError:
        return "TEXT"


def _flush(
    staging: StagingArea,
    staging_dir: str,
    stream: _TableStream,
    conn: psycopg.Connection[Any],
    pending_types: dict[tuple[int, int], str],
    spec: CdcSpec,
) -> None:
    if not stream.columns:
        stream.columns = _columns(stream, conn, pending_types)
    schema = stream.schema()
    if stream.pieces:
        batch = pa.Table.from_batches(stream.pieces, schema=schema)
    else:
        batch = pa.Table.from_arrays(
            [pa.array(list(col), type=f.type) for col, f in zip(zip(*stream.buffer, strict=True), schema, strict=True)],
            schema=schema,
        )
    label = staging.file_label(f"{stream.source.schema}.{stream.source.name}")
    name = f"{staging_dir}/{label}-{len(stream.files):05d}.parquet"
    with staging.open_writer(name, schema) as writer:
        writer.write_table(batch)
    stream.files.append(StagedFile(uri=name, rows=batch.num_rows))
    stream.rows += batch.num_rows
    stream.buffer.clear()
    stream.pieces.clear()
    stream.buffer_bytes = 0


def _table_manifest(
    spec: CdcSpec,
    stream: _TableStream,
    columns: tuple[ManifestColumn, ...],
    run_id: str,
    manifest_id: str,
    staging_dir: str,
) -> Manifest:
    return Manifest(
        sync_id=spec.sync_id,
        run_id=run_id,
        manifest_id=manifest_id,
        mode="cdc",
        source_table=stream.source.qualified,
        target_schema=spec.target_schema,
        target_table=spec.target_name(stream.source.qualified),
        primary_key=stream.source.primary_key,
        cursor_column=None,
        columns=columns,
        files=tuple(stream.files),
        rows=sum(f.rows for f in stream.files),
        base_version=0,
        watermark_low=None,
        watermark_high=None,
        staging_dir=staging_dir,
        delete_mode=spec.delete_mode,
        state_table=spec.state_table,
        schema_drift=spec.schema_drift,
        history_table=spec.history_table_of(stream.source.qualified),
    )
