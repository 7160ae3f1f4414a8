"""Load a staged batch into PostgreSQL: COPY into a temp stage, one set-based merge, one commit
(or, into an empty target, COPY straight into it: nothing to merge or delete).

Everything a load changes happens in one transaction: the target rows, the deletes and the sync
state (new version and watermark).  A crash before the commit leaves all of them as they were; a
crash after leaves all of them new.  Re-running a committed manifest is a logged no-op.

The target table is created or checked by :mod:`.target`, the merge and delete detection are
:mod:`.merge`'s, the SCD2 history :mod:`.history`'s; this module holds the flow and the COPY.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Protocol

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql

from airflow_sync_provider.core import drift
from airflow_sync_provider.core.audit import AuditEntry, BatchChecksum, append_entry, ensure_audit_table
from airflow_sync_provider.core.errors import (
    DataError,
    TargetUnavailableError,
    first_line,
)
from airflow_sync_provider.core.history import close_deleted, record_history
from airflow_sync_provider.core.manifest import Manifest, StagedFile
from airflow_sync_provider.core.merge import delete_missing, key_match, merge_and_delete
from airflow_sync_provider.core.pgcopy import BoundedQueuedWriter, hex_bytea, naive_utc, utc_session
from airflow_sync_provider.core.progress import LOG, Logger, PhaseObserver, Progress
from airflow_sync_provider.core.spec import RUN_ID_COLUMN, SYNCED_AT_COLUMN
from airflow_sync_provider.core.staging import StagedBatch, iter_staged_batches, remove_staged
from airflow_sync_provider.core.state import SyncState, ensure_state_table, lock_state, write_state
from airflow_sync_provider.core.target import TargetTable, ensure_target_table, idle_autocommit

LoadStatus = Literal["applied", "backfilled", "stale", "already_applied"]

_LINE = re.compile(r"\bline (\d+)\b")
_COLUMN = re.compile(r'\bcolumn "?([^":]+)"?:')
COPY_ROWS = 65_536


@dataclass(frozen=True)
class LoadResult:
    """What a load did: small enough for XCom, complete enough for an audit line."""

    sync_id: str
    manifest_id: str
    status: LoadStatus
    rows_staged: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    version: int = 0
    watermark: list[Any] | dict[str, Any] | None = None
    seconds: float = 0.0
    message: str = ""

    @property
    def unchanged(self) -> int:
        return max(self.rows_staged - self.inserted - self.updated, 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare_load(conn: psycopg.Connection[Any], sync_id: str, schema: str, state_table: str) -> None:
    """Before a load's transaction: an idle autocommit connection, and the state and ledger tables."""
    idle_autocommit(conn, step="load", sync_id=sync_id)
    ensure_state_table(conn, schema, state_table)
    ensure_audit_table(conn, schema)


def load_manifest(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    *,
    run_id: str | None = None,
    logger: Logger | None = None,
    observer: PhaseObserver | None = None,
    keep_staged: bool = False,
    feed: BatchFeed | None = None,
) -> LoadResult:
    """Apply a staged batch and its watermark to the target in one transaction.

    ``feed``: the batch is still being extracted (see :func:`~.sync.run_sync`); ``manifest`` is its
    head (no files yet) and the load takes the files as the feed hands them over, then the final
    manifest.  Anything the feed raises rolls the whole load back.

    A lost target connection (killed, server restart) raises :class:`TargetUnavailableError` (a
    retryable error naming the sync and table): the transaction did not commit, or its commit was
    not confirmed, and a retry applies the batch exactly once either way (a committed manifest is
    recognised as already applied).
    """
    try:
        return _load_manifest(conn, feed or CompleteBatch(manifest), run_id, logger, observer, keep_staged)
    except psycopg.OperationalError as error:
        raise TargetUnavailableError(
            f"the target connection was lost during the load of manifest {manifest.manifest_id} "
            f"({first_line(error)}); nothing was committed, or the commit was not confirmed: retry the load, "
            "it applies the batch exactly once",
            sync_id=manifest.sync_id,
            table=f"{manifest.target_schema}.{manifest.target_table}",
        ) from error


def _load_manifest(
    conn: psycopg.Connection[Any],
    feed: BatchFeed,
    run_id: str | None,
    logger: Logger | None,
    observer: PhaseObserver | None,
    keep_staged: bool,
) -> LoadResult:
    log = logger or LOG
    started = time.monotonic()
    manifest = feed.head()
    run_id = run_id or manifest.run_id
    prepare_load(conn, manifest.sync_id, manifest.target_schema, manifest.state_table)

    with conn.transaction():
        state = lock_state(conn, manifest.target_schema, manifest.state_table, manifest.sync_id)
        if manifest.window is None and state.version != manifest.base_version:
            manifest = feed.final()
            result = _skip(manifest, state, started)
            log.warning("sync %s: %s", manifest.sync_id, result.message)
            append_entry(conn, manifest.target_schema, _audit_entry(manifest, run_id, result, None))
            return result

        applied = apply_table_batch(conn, manifest, run_id, log, observer, feed)
        manifest = feed.final()
        target, staged = applied.target, applied.staged
        inserted, updated, deleted = applied.inserted, applied.updated, applied.deleted
        new_state = state
        if manifest.window is None:  # a backfill window never writes the state: the watermark stays
            new_state = replace(
                state,
                version=state.version + 1,
                mode=manifest.mode,
                source_table=manifest.source_table,
                target_table=target.display,
                watermark=manifest.watermark_high,
                last_manifest_id=manifest.manifest_id,
                last_run_id=run_id,
                rows_inserted=inserted,
                rows_updated=updated,
                rows_deleted=deleted,
                extracted_at=dt.datetime.fromisoformat(manifest.extracted_at) if manifest.extracted_at else None,
            )
            write_state(conn, manifest.target_schema, manifest.state_table, new_state)
        result = LoadResult(
            sync_id=manifest.sync_id,
            manifest_id=manifest.manifest_id,
            status="applied" if manifest.window is None else "backfilled",
            rows_staged=staged,
            inserted=inserted,
            updated=updated,
            deleted=deleted,
            version=new_state.version,
            watermark=new_state.watermark,
            seconds=round(time.monotonic() - started, 3),
        )
        append_entry(conn, manifest.target_schema, _audit_entry(manifest, run_id, result, applied.checksum))
        notify(observer, "merged", {"inserted": inserted, "updated": updated, "deleted": deleted})
    # committed: data, deletes, state and the ledger row together
    log.info(
        "sync %s: committed %s into %s: %d staged, %d inserted, %d updated, %d unchanged, %d deleted in %.2f s",
        manifest.sync_id,
        f"version {result.version}" if manifest.window is None else f"backfill {manifest.window} (state untouched)",
        target.display,
        staged,
        inserted,
        updated,
        result.unchanged,
        deleted,
        result.seconds,
    )
    after_commit(manifest, result.to_dict(), observer=observer, keep_staged=keep_staged, log=log)
    return result


class CommittedBatch(StagedBatch, Protocol):
    """What :func:`after_commit` needs of a manifest (table or CDC)."""

    @property
    def sync_id(self) -> str: ...


def after_commit(
    manifest: CommittedBatch,
    result: dict[str, Any],
    *,
    observer: PhaseObserver | None,
    keep_staged: bool,
    log: Logger,
) -> None:
    """Once a load (table or CDC) committed: tell the observer, then remove the staged files unless
    ``keep_staged``.  Best effort: the data is committed, so a leftover file is only clutter."""
    notify(observer, "committed", result)
    if not keep_staged:
        try:
            remove_staged(manifest)
        except OSError as error:
            log.warning("sync %s: could not remove staged files %s: %s", manifest.sync_id, manifest.staging_dir, error)


@dataclass(frozen=True)
class TableApplied:
    target: TargetTable
    staged: int
    inserted: int
    updated: int
    deleted: int
    #: Order-independent checksum of the staged rows (for the audit ledger, see :class:`.BatchChecksum`).
    checksum: str
    #: SCD2 history versions opened and closed (when the sync keeps a history table).
    history_opened: int = 0
    history_closed: int = 0


def _audit_entry(manifest: Manifest, run_id: str, result: LoadResult, checksum: str | None) -> AuditEntry:
    return AuditEntry(
        sync_id=manifest.sync_id,
        run_id=run_id,
        manifest_id=manifest.manifest_id,
        mode="backfill" if manifest.window is not None else manifest.mode,
        status=result.status,
        source_table=manifest.source_table,
        target_table=f"{manifest.target_schema}.{manifest.target_table}",
        range_low=manifest.watermark_low if manifest.window is None else manifest.window[0],
        range_high=manifest.watermark_high if manifest.window is None else manifest.window[1],
        rows_staged=result.rows_staged,
        inserted=result.inserted,
        updated=result.updated,
        deleted=result.deleted,
        state_version=result.version,
        batch_checksum=checksum,
        extract_seconds=manifest.extract_seconds,
        load_seconds=result.seconds,
        details={"notes": list(manifest.notes), "message": result.message} if manifest.notes or result.message else {},
    )


class BatchFeed(Protocol):
    """A staged batch as the load takes it: the head (everything but the files, known when the
    first file is staged), the files one by one, then the final manifest (watermark, key files)."""

    def head(self) -> Manifest: ...

    def files(self) -> Iterator[StagedFile]: ...

    def final(self) -> Manifest: ...

    def batches(self, staged: StagedFile) -> Iterator[pa.RecordBatch]: ...


class CompleteBatch:
    """The feed of a batch whose extraction is complete (the split operators, a retry)."""

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest

    def head(self) -> Manifest:
        return self._manifest

    def files(self) -> Iterator[StagedFile]:
        return iter(self._manifest.files)

    def final(self) -> Manifest:
        return self._manifest

    def batches(self, staged: StagedFile) -> Iterator[pa.RecordBatch]:
        return _read_file(staged)


def apply_table_batch(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    run_id: str,
    log: Logger,
    observer: PhaseObserver | None = None,
    feed: BatchFeed | None = None,
) -> TableApplied:
    """Inside the caller's transaction: create/check the target, COPY the batch, merge, delete missing,
    and keep the SCD2 history when the sync has one.

    An empty target takes the batch by COPY straight into it (no stage, no merge, nothing to
    delete); any value it rejects rolls that back and the batch goes the staged way, whose COPY
    names the row.  A backfill window's rows never overwrite a target row whose cursor is newer (a
    live run may have committed a later version of the row since the window was read).
    """
    feed = feed or CompleteBatch(manifest)
    target = ensure_target_table(conn, manifest)
    if target.discarded:
        manifest = drift.narrowed(manifest, target.discarded)
    checksum = BatchChecksum()
    files = _Replay(feed.files())
    if _straight_copy_fits(conn, manifest, target):
        try:
            with conn.transaction():
                if target.created:  # nobody else sees it: the metadata columns' values come from defaults
                    _metadata_defaults(conn, target, run_id)
                staged = copy_files(
                    conn,
                    manifest,
                    target,
                    target.ident,
                    log,
                    files,
                    checksum=checksum,
                    metadata=None if target.created else run_id,
                    name_rows=False,
                    read=feed.batches,
                )
                if target.created:
                    _metadata_defaults(conn, target, None)
        except _Rejected:
            log.info("sync %s: the COPY into the empty target was refused; loading through a stage", manifest.sync_id)
        else:
            notify(observer, "staged", {"rows": staged, "into": "target"})
            return TableApplied(target, staged, staged, 0, 0, checksum.value)
    stage = _create_stage(conn, manifest, target)
    staged = copy_files(
        conn, manifest, target, stage, log, files, checksum=checksum, read=feed.batches, key=manifest.primary_key
    )
    notify(observer, "staged", {"rows": staged, "into": "stage"})
    final = feed.final()
    if target.discarded:
        final = drift.narrowed(final, target.discarded)
    where = _not_older_than_target(final, target) if final.window is not None else None
    opened = closed = 0
    if final.history_table:  # before the merge: the merge's counts do not depend on it
        opened, closed = record_history(conn, final, stage, run_id, where)
    full_deletes = final.detect_deletes and final.mode == "full" and not final.history_table
    inserted, updated, merged_deletes = merge_and_delete(
        conn, final, target, stage, run_id, where, delete_missing_keys=full_deletes
    )
    deleted = merged_deletes or 0
    if final.detect_deletes and merged_deletes is None:
        keys = stage if final.mode == "full" else _stage_keys(conn, final, target, log)
        deleted = delete_missing(conn, final, target, keys, run_id)
        if deleted and final.history_table:
            closed += close_deleted(conn, final, target.ident, run_id)
    if final.history_table:
        log.info(
            "sync %s: history %s.%s: %d version(s) opened, %d closed",
            final.sync_id,
            final.target_schema,
            final.history_table,
            opened,
            closed,
        )
    return TableApplied(target, staged, inserted, updated, deleted, checksum.value, opened, closed)


def _straight_copy_fits(conn: psycopg.Connection[Any], manifest: Manifest, target: TargetTable) -> bool:
    """Whether the batch can be COPYed straight into the target: it is empty (so every row is new
    and no row can be missing from the source), and no history or backfill rule needs a stage."""
    if manifest.history_table or manifest.window is not None:
        return False
    row = conn.execute(sql.SQL("SELECT NOT EXISTS (SELECT FROM {})").format(target.ident)).fetchone()
    return bool(row and row[0])


def _metadata_defaults(conn: psycopg.Connection[Any], target: TargetTable, run_id: str | None) -> None:
    """Give the ``_sync_*`` columns of a target created in this transaction the run's values as
    defaults (so a COPY need not send them: ~35% fewer bytes to render and parse), or drop them.

    The run id reaches the default through a transaction-local setting (a bound parameter)."""
    if run_id is not None:
        conn.execute("SELECT set_config('airflow_sync.run_id', %s, true)", (run_id,))
        conn.execute(
            sql.SQL(
                "ALTER TABLE {} ALTER COLUMN {} SET DEFAULT current_setting('airflow_sync.run_id'), "
                "ALTER COLUMN {} SET DEFAULT now()"
            ).format(target.ident, sql.Identifier(RUN_ID_COLUMN), sql.Identifier(SYNCED_AT_COLUMN))
        )
    else:
        conn.execute(
            sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT, ALTER COLUMN {} DROP DEFAULT").format(
                target.ident, sql.Identifier(RUN_ID_COLUMN), sql.Identifier(SYNCED_AT_COLUMN)
            )
        )


class _Rejected(Exception):
    """The server refused a value of a COPY that was not asked to name the row (rolled back)."""


class _Replay:
    """The staged files of a feed, taken once, that a second pass (naming a rejected row) replays."""

    def __init__(self, files: Iterable[StagedFile]) -> None:
        self._source = iter(files)
        self._seen: list[StagedFile] = []

    def __iter__(self) -> Iterator[StagedFile]:
        yield from list(self._seen)
        for staged in self._source:
            self._seen.append(staged)
            yield staged


def _not_older_than_target(manifest: Manifest, target: TargetTable) -> sql.Composable:
    """Stage rows (alias ``s``) whose target row, if any, has no newer cursor value."""
    assert manifest.cursor_column
    return sql.SQL("NOT EXISTS (SELECT 1 FROM {} n WHERE {} AND {} > {})").format(
        target.ident,
        key_match("n", "s", manifest.primary_key),
        sql.Identifier("n", manifest.cursor_column),
        sql.Identifier("s", manifest.cursor_column),
    )


def notify(observer: PhaseObserver | None, phase: str, facts: dict[str, Any]) -> None:
    if observer is not None:
        observer(phase, facts)


def _skip(manifest: Manifest, state: SyncState, started: float) -> LoadResult:
    if state.last_manifest_id == manifest.manifest_id:
        status: LoadStatus = "already_applied"
        message = f"manifest {manifest.manifest_id} is already committed (state version {state.version}); nothing to do"
    else:
        status = "stale"
        message = (
            f"stale manifest {manifest.manifest_id} skipped: it was extracted at state version "
            f"{manifest.base_version} but version {state.version} (manifest {state.last_manifest_id}, "
            f"run {state.last_run_id}) is committed; the next run extracts from there, nothing is lost"
        )
    return LoadResult(
        sync_id=manifest.sync_id,
        manifest_id=manifest.manifest_id,
        status=status,
        version=state.version,
        watermark=state.watermark,
        seconds=round(time.monotonic() - started, 3),
        message=message,
    )


# --------------------------------------------------------------------------- staging into PostgreSQL


def _create_stage(
    conn: psycopg.Connection[Any], manifest: Manifest, target: TargetTable, columns: Sequence[str] | None = None
) -> sql.Identifier:
    """A temp table with the target's column types (its primary key on the sync key comes with
    :func:`copy_files`'s ``key``).

    COPY into it checks every value against the target types; the key rejects NULL or duplicate
    keys, with the line number (on the row-naming pass) that we turn into the row key of the error.
    """
    stage = sql.Identifier(f"_sync_stage_{uuid.uuid4().hex[:16]}")
    names = columns or [c.name for c in manifest.columns]
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
            stage, sql.SQL(", ").join(map(sql.Identifier, names)), target.ident
        )
    )
    return stage


def _add_primary_key(conn: psycopg.Connection[Any], table: sql.Identifier, key: Sequence[str]) -> None:
    conn.execute(
        sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(table, sql.SQL(", ").join(map(sql.Identifier, key)))
    )


def _stage_keys(conn: psycopg.Connection[Any], manifest: Manifest, target: TargetTable, log: Logger) -> sql.Identifier:
    """Load the staged source key set (incremental delete detection) into its own keyed temp table."""
    keys = list(manifest.primary_key)
    table = _create_stage(conn, manifest, target, keys)
    copy_files(conn, manifest, target, table, log, manifest.key_files, keys, "loaded source keys", key=keys)
    return table


def _csv_ready(batch: pa.RecordBatch, columns: Sequence[str]) -> pa.Table:
    """Arrange a staged batch for CSV COPY: manifest column order, bytea as PostgreSQL hex text, and
    aware timestamps as naive UTC (COPY runs under ``TimeZone`` UTC; see ``core/pgcopy.py``)."""
    table = pa.Table.from_batches([batch]).select(list(columns))
    for position, field in enumerate(table.schema):
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            table = table.set_column(position, field.name, hex_bytea(table.column(position)))
        elif pa.types.is_timestamp(field.type) and field.type.tz is not None:
            table = table.set_column(position, field.name, naive_utc(table.column(position)))
        elif pa.types.is_dictionary(field.type):
            table = table.set_column(position, field.name, pc.cast(table.column(position), field.type.value_type))
    return table


def copy_files(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    target: TargetTable,
    stage: sql.Identifier,
    log: Logger,
    files: Iterable[StagedFile] | None = None,
    names: Sequence[str] | None = None,
    what: str = "staged into PostgreSQL",
    *,
    checksum: BatchChecksum | None = None,
    metadata: str | None = None,
    name_rows: bool = True,
    read: Callable[[StagedFile], Iterator[pa.RecordBatch]] | None = None,
    key: Sequence[str] = (),
) -> int:
    """COPY the staged files into ``stage``.

    Inside a transaction all batches go through one COPY (from a savepoint), written by a
    background thread, so the server parses one batch while Arrow renders the next.  If the server
    rejects a value, the savepoint is rolled back and the files are copied again batch by batch:
    that COPY fails on the same row, and its line number names the row key in the error.  With
    ``name_rows`` false that second pass is left to the caller: :class:`_Rejected` is raised.

    ``files`` may still be arriving (an overlapped extraction): they are taken as they come.
    ``checksum`` adds the rows sent (the ``names`` columns).  ``metadata``: the run id of a COPY
    straight into the target, whose ``_sync_*`` columns get it and the transaction's ``now()``.
    ``read``: a staged file's batches (default: read from the file).  ``key``: the primary key
    ``stage`` gets, built after the one COPY (a sorted build is cheaper than keeping the index up
    row by row) and before the row-naming pass (whose COPY then fails on the duplicate's line).
    """
    names = list(names or [c.name for c in manifest.columns])
    extra: list[tuple[str, pa.Scalar]] = []
    if metadata is not None:
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        extra = [
            (RUN_ID_COLUMN, pa.scalar(metadata, pa.string())),
            (SYNCED_AT_COLUMN, pa.scalar(row[0].astimezone(dt.UTC).replace(tzinfo=None), pa.timestamp("us"))),
        ]
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
        stage, sql.SQL(", ").join(map(sql.Identifier, [*names, *(name for name, _ in extra)]))
    )
    staged_files = files if isinstance(files, _Replay) else _Replay(manifest.files if files is None else files)

    def batches() -> Iterator[tuple[pa.RecordBatch, pa.Table]]:
        if checksum is not None:
            checksum.reset()  # a second pass counts the rows again
        for staged in staged_files:
            for batch in (read or _read_file)(staged):
                table = _csv_ready(batch, names)
                for name, value in extra:
                    table = table.append_column(name, pa.repeat(value, table.num_rows))
                if checksum is not None:
                    checksum.add(batch, names)
                yield batch, table

    with utc_session(conn):
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
            progress = Progress(f"sync {manifest.sync_id}: {what}", log)
            try:
                with conn.transaction():  # the COPY and the key: a duplicate rolls both back
                    with conn.cursor() as cursor, cursor.copy(copy_sql, writer=BoundedQueuedWriter(cursor)) as copy:
                        for batch, table in batches():
                            copy.write(_csv_payload(table))
                            progress.add(batch.num_rows)
                    if key:
                        _add_primary_key(conn, stage, key)
                progress.done()
                return progress.rows
            except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as error:
                if not name_rows:
                    raise _Rejected(first_line(error)) from error
                # find and name the offending row below
        progress = Progress(f"sync {manifest.sync_id}: {what}", log)
        if key:
            _add_primary_key(conn, stage, key)
        with conn.cursor() as cursor:
            for batch, table in batches():
                payload = _csv_payload(table)
                try:
                    with cursor.copy(copy_sql) as copy:
                        copy.write(memoryview(payload))
                except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as error:
                    raise _row_error(error, manifest, target, table, payload.to_pybytes()) from error
                progress.add(batch.num_rows)
        progress.done()
        return progress.rows


def _read_file(staged: StagedFile) -> Iterator[pa.RecordBatch]:
    return iter_staged_batches(staged.uri, COPY_ROWS)


def _csv_payload(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False))
    return sink.getvalue()


def _row_error(
    error: psycopg.Error, manifest: Manifest, target: TargetTable, table: pa.Table, payload: bytes
) -> DataError:
    """Turn a COPY error into one naming the row key, the column and the rule that failed."""
    context = error.diag.context or ""
    column = error.diag.column_name
    match = _COLUMN.search(context)
    if match and not column:
        column = match.group(1)
    key = None
    line = _LINE.search(context)
    if line:
        index = _record_index(payload, int(line.group(1)))
        if index is not None and index < table.num_rows:
            row = table.slice(index, 1).to_pylist()[0]
            key = {k: row[k] for k in manifest.primary_key}
    primary = error.diag.message_primary or str(error)
    detail = f" ({error.diag.message_detail})" if error.diag.message_detail else ""
    if isinstance(error, psycopg.errors.UniqueViolation):
        rule = "duplicate key in batch"
        column = column or ", ".join(manifest.primary_key)
        message = f"the batch has two rows with the same primary key{detail}; keys must be unique"
    elif isinstance(error, psycopg.errors.NotNullViolation):
        rule = "key not null"
        message = f"a primary-key column is NULL: {primary}"
    else:
        rule = "target type"
        column_type = target.column_types.get(column or "", "?")
        message = f"the target column ({column_type}) cannot hold the value: {primary}{detail}"
    return DataError(message, sync_id=manifest.sync_id, table=target.display, column=column, key=key, rule=rule)


def _record_index(payload: bytes, line_number: int) -> int | None:
    """Map PostgreSQL's 1-based COPY line number to a record index (values may contain newlines)."""
    line = 1
    reader = csv.reader(io.StringIO(payload.decode("utf-8"), newline=""))
    for index, record in enumerate(reader):
        if line >= line_number:
            return index
        line += 1 + sum(value.count("\n") for value in record)
        if line > line_number:
            return index
    return None
