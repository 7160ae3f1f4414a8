"""Incremental and full extraction from any SQLAlchemy source into staged Parquet batches.

Rows are read in keyset pages ordered by ``(cursor, primary key)`` (incremental) or by the primary
key (full), never with OFFSET.  All pages are read in one REPEATABLE READ transaction where the
dialect has it, so a full extraction is a consistent snapshot (deletes are detected against it).
Each page becomes one Parquet file; memory is bounded by ``batch_rows``, not by table size.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from airflow_sync_provider.core.errors import (
    ConfigurationError,
    DataError,
    SyncError,
    database_error,
    first_line,
)
from airflow_sync_provider.core.manifest import Manifest, ManifestColumn, StagedFile
from airflow_sync_provider.core.progress import LOG, Logger, Progress
from airflow_sync_provider.core.schema import pg_type_for_arrow
from airflow_sync_provider.core.source import (
    SourceTable,
    bound_value,
    copy_eligible,
    copy_page,
    orderable,
    reflect_source,
    rows_to_table,
)
from airflow_sync_provider.core.spec import SyncSpec
from airflow_sync_provider.core.staging import StagingArea
from airflow_sync_provider.core.state import SyncState
from airflow_sync_provider.core.values import decode_row, encode_row, encode_value

#: A pandas transform applied to every staged batch between extract and load.
BatchTransform = Callable[[pd.DataFrame], pd.DataFrame]

_FETCH_CHUNK = 10_000


def _is_temporal(column: sa.Column[Any]) -> bool:
    return isinstance(column.type, (sa.DateTime, sa.Date))


def compute_upper_bound(
    engine: sa.Engine, spec: SyncSpec, source: SourceTable, logger: Logger
) -> tuple[Any, list[str]]:
    """Upper bound (exclusive) on the cursor for this run, and notes on how it was chosen.

    Read *before* the extraction snapshot is taken: any transaction that could still commit rows
    with a cursor below the bound was open at this moment and so lowers the bound to its start.
    Rows stamped with the database clock at write time (``DEFAULT now()``, triggers) are covered by
    this guard; application-stamped cursors need ``lag`` (or ``lookback``) as well.
    """
    notes: list[str] = []
    assert spec.cursor_column
    cursor = source.table.c[spec.cursor_column]
    if not _is_temporal(cursor):
        notes.append("cursor is not a date/time: no time upper bound; late commits are covered only by lookback")
        return None, notes

    holder: str | None = None
    with engine.connect() as conn:
        if source.dialect == "postgresql":
            now, oldest, pid, user, application = conn.execute(
                sa.text(
                    "SELECT now(), a.xact_start, a.pid, a.usename, a.application_name "
                    "FROM (SELECT 1) one LEFT JOIN LATERAL ("
                    "  SELECT xact_start, pid, usename, application_name FROM pg_stat_activity"
                    "  WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    "    AND xact_start IS NOT NULL AND backend_type = 'client backend'"
                    "  ORDER BY xact_start LIMIT 1) a ON true"
                )
            ).one()
            holder = describe_session(pid, user=user, application=application)
        elif source.dialect in ("mysql", "mariadb"):
            now = conn.execute(sa.text("SELECT NOW(6)")).scalar_one()
            oldest = None
            if spec.guard_open_transactions:
                try:
                    oldest, thread = conn.execute(
                        sa.text(
                            "SELECT trx_started, trx_mysql_thread_id FROM information_schema.innodb_trx "
                            "WHERE trx_mysql_thread_id <> CONNECTION_ID() ORDER BY trx_started LIMIT 1"
                        )
                    ).one_or_none() or (None, None)
                    holder = describe_session(thread, kind="thread")
                except sa_exc.DBAPIError as error:
                    notes.append(
                        f"open-transaction guard unavailable ({first_line(error.orig or error)}); relying on lag"
                    )
        else:
            now = conn.execute(sa.select(sa.func.current_timestamp())).scalar_one()
            if isinstance(now, str):  # SQLite returns UTC text
                now = dt.datetime.fromisoformat(now)
            oldest = None

    bound = now - spec.lag
    if spec.guard_open_transactions and oldest is not None and oldest < bound:
        notes.append(f"upper bound lowered from {bound.isoformat()} to {oldest.isoformat()}: open transaction {holder}")
        logger.info("sync %s: %s", spec.sync_id, notes[-1])
        bound = oldest
    timezone_aware = bool(getattr(cursor.type, "timezone", False))
    if not timezone_aware and bound.tzinfo is not None:
        bound = bound.replace(tzinfo=None)  # naive columns hold the session's local time
    if isinstance(cursor.type, sa.Date) and not isinstance(cursor.type, sa.DateTime):
        bound = bound.date()
    return bound, notes


def describe_session(
    session_id: Any, *, kind: str = "pid", user: str | None = None, application: str | None = None
) -> str:
    """``pid 16956 (user 'etl', application 'psql')``: what a DBA needs to find the open transaction;
    parts the server did not report are left out rather than shown empty."""
    details = [f"{label} {value!r}" for label, value in (("user", user), ("application", application)) if value]
    return f"{kind} {session_id}" + (f" ({', '.join(details)})" if details else "")


def _cursor_bound(cursor: sa.Column[Any], value: Any) -> Any:
    """A window bound (an Airflow data-interval end, say) in the cursor column's own terms.

    Aware datetimes meet naive columns as UTC (state it in the column's docs); dates take the day.
    """
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if isinstance(value, dt.datetime):
        if not getattr(cursor.type, "timezone", False) and value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        if isinstance(cursor.type, sa.Date) and not isinstance(cursor.type, sa.DateTime):
            value = value.date()
    return value


def _table_watermark(state: SyncState | None, spec: SyncSpec) -> list[Any] | None:
    """The committed ``[cursor, *key]`` of an incremental sync (None: start from the beginning)."""
    if state is None or state.watermark is None:
        return None
    if not isinstance(state.watermark, list):
        raise ConfigurationError(
            f"the state row of this sync_id holds a {state.mode or 'different'} sync's position, not a cursor "
            "watermark: give the table sync its own sync_id",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
        )
    return state.watermark if spec.mode == "incremental" else None


def _lookback_start(spec: SyncSpec, cursor_value: Any) -> Any:
    lookback = spec.lookback
    if lookback is None or cursor_value is None:
        return None
    try:
        return cursor_value - lookback
    except TypeError:
        raise SyncError(
            f"lookback {lookback!r} cannot be subtracted from a cursor value of type {type(cursor_value).__name__}",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
            column=spec.cursor_column,
        ) from None


def apply_transform(table: pa.Table, transform: BatchTransform, spec: SyncSpec, batch_number: int) -> pa.Table:
    """Run a pandas transform over one batch, keeping Arrow types exact (ArrowDtype round trip).

    ``batch_number`` 0 is the typed empty batch of a run that extracted nothing (see
    :func:`quiet_run_columns`).
    """
    frame = table.to_pandas(types_mapper=pd.ArrowDtype)
    which = f"batch {batch_number}" if batch_number else "the empty batch of a run that extracted no rows"
    try:
        result = transform(frame)
    except Exception as error:
        raise SyncError(
            f"transform {getattr(transform, '__name__', transform)!r} failed on {which}: "
            f"{type(error).__name__}: {error}",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
        ) from error
    if not isinstance(result, pd.DataFrame):
        raise SyncError(
            f"transform must return a pandas DataFrame, got {type(result).__name__}",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
        )
    return pa.Table.from_pandas(result, preserve_index=False)


def extract_to_staging(
    engine: sa.Engine,
    spec: SyncSpec,
    *,
    state: SyncState | None,
    staging: StagingArea,
    run_id: str,
    transform: BatchTransform | None = None,
    logger: Logger | None = None,
    connection: sa.Connection | None = None,
    window: tuple[Any, Any] | None = None,
    recorded_columns: Sequence[tuple[str, str]] | None = None,
    on_file: Callable[[Manifest, pa.Table], None] | None = None,
) -> Manifest:
    """Extract the rows past the committed watermark (or the whole table) into staged Parquet files.

    ``on_file``: called after each staged file with the batch so far (its files, no final watermark
    or key files yet) and the rows just staged, so a load can take them while the next page is read (see
    :func:`~.sync.run_sync`); whatever it raises ends the extraction like any error.

    ``recorded_columns``: the ``(name, type)`` columns the last committed load of this sync synced
    (its transformed schema, from the state row); a run that extracts nothing takes from them the
    types an empty transformed batch cannot tell (see :func:`quiet_run_columns`).

    ``connection``: read inside this caller-owned transaction instead of opening a REPEATABLE READ
    one (CDC snapshots read several tables from one snapshot this way).

    ``window``: a backfill: read the rows whose cursor is in ``[low, high)`` whatever the watermark,
    and leave the watermark alone (the manifest's watermarks stay the committed ones, and the load
    of a window manifest never writes them); delete detection is left to reconciliation.
    """
    log = logger or LOG
    started = time.monotonic()
    source = reflect_source(engine, spec)
    table = source.table
    base_version = state.version if state else 0
    low = _table_watermark(state, spec)
    notes: list[str] = []
    if window is not None and (spec.mode != "incremental" or not spec.cursor_column):
        raise ConfigurationError(
            "a backfill window needs an incremental sync (a cursor column to select the window by)",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
        )

    if spec.mode == "incremental":
        assert spec.cursor_column
        order = [table.c[spec.cursor_column], *(table.c[k] for k in source.primary_key)]
        _refuse_null_cursors(engine, spec, source)
        upper, bound_notes = compute_upper_bound(engine, spec, source, log)
        notes.extend(bound_notes)
    else:
        order = [table.c[k] for k in source.primary_key]
        upper = None

    after: tuple[Any, ...] | None = decode_row(low) if low else None
    first_lower = _lookback_start(spec, after[0]) if after else None
    if first_lower is not None:
        notes.append(f"lookback: re-reading from {first_lower!r}")
        after = None
    window_bounds: tuple[Any, Any] | None = None
    if window is not None:
        window_bounds = (_cursor_bound(order[0], window[0]), _cursor_bound(order[0], window[1]))
        notes.append(f"backfill window [{window_bounds[0]!r}, {window_bounds[1]!r}); the watermark stays as committed")
        after, first_lower = None, window_bounds[0]

    manifest_id = new_manifest_id()
    staging_dir = staging.batch_uri(spec.sync_id, manifest_id)
    progress = Progress(f"sync {spec.sync_id}: extracted from {spec.qualified_source}", log)
    files: list[StagedFile] = []
    schema: pa.Schema | None = None
    high: tuple[Any, ...] | None = after if after else (decode_row(low) if low else None)
    order_index = [next(i for i, p in enumerate(source.plans) if p.name == c.name) for c in order]

    key_files: list[StagedFile] = []

    def batch(
        columns: tuple[ManifestColumn, ...],
        files: Sequence[StagedFile],
        high: tuple[Any, ...] | None,
        key_files: Sequence[StagedFile],
    ) -> Manifest:
        return staged_manifest(
            spec,
            run_id=run_id,
            manifest_id=manifest_id,
            staging_dir=staging_dir,
            started=started,
            primary_key=source.primary_key,
            columns=columns,
            files=files,
            base_version=base_version,
            watermark_low=low,
            watermark_high=encode_row(high) if high is not None and spec.mode == "incremental" and not window else low,
            window=window_bounds,
            notes=notes,
            upper_bound=upper,
            key_files=key_files,
        )

    owned = connection is None
    if connection is None:
        connection = engine.connect()
        if source.dialect in ("postgresql", "mysql", "mariadb"):
            connection = connection.execution_options(isolation_level="REPEATABLE READ")
    try:
        with connection.begin() if owned else contextlib.nullcontext():
            conditions = []
            if upper is not None:
                bound = sa.bindparam("upper_bound", upper, type_=order[0].type)
                conditions.append(orderable(order[0], source.dialect) < orderable(order[0], source.dialect, bound))
            if window_bounds is not None:
                end = sa.bindparam("window_end", window_bounds[1], type_=order[0].type)
                conditions.append(orderable(order[0], source.dialect) < orderable(order[0], source.dialect, end))
            first = None
            if first_lower is not None:
                start = sa.bindparam("lookback_start", first_lower, type_=order[0].type)
                first = orderable(order[0], source.dialect) >= orderable(order[0], source.dialect, start)
            selected = [p.select for p in source.plans]
            for rows in _pages(connection, source, spec, selected, order, order_index, after, conditions, first):
                after = tuple(rows[-1][i] for i in order_index)
                if high is None or spec.mode == "full" or _later(after, high):
                    high = after
                page = rows_to_table(rows, source, spec)
                if transform is not None:
                    page = apply_transform(page, transform, spec, len(files) + 1)
                    _check_transformed(page, source, spec)
                if schema is None:
                    schema = page.schema
                elif page.schema != schema:
                    page = _conform(page, schema, spec)
                if page.num_rows:
                    files.append(_write(staging, f"{staging_dir}/part-{len(files):05d}.parquet", page))
                    if on_file is not None:
                        on_file(batch(_manifest_columns(schema, source), files, high, ()), page)
                progress.add(page.num_rows)
            if spec.mode == "incremental" and spec.detect_deletes and window is None:
                key_files = _stage_keys(connection, source, spec, staging, staging_dir, log)
    except BaseException as error:
        staging.discard(staging_dir, log)  # a half-written batch is never loaded: do not leave it behind
        if isinstance(error, sa_exc.DBAPIError):
            raise database_error(error, "extraction", sync_id=spec.sync_id, table=spec.qualified_source) from error
        raise
    finally:
        if owned:
            connection.close()

    if schema is None:  # nothing extracted: the batch still has the columns a batch with rows has
        columns = quiet_run_columns(source, spec, transform, recorded_columns, notes, log)
    else:
        columns = _manifest_columns(schema, source)
    progress.done(f"{len(files)} staged file(s) in {staging_dir}")
    manifest = batch(columns, files, high, key_files)
    staging.write_manifest(manifest)
    return manifest


def new_manifest_id() -> str:
    """A unique, time-ordered id for a staged batch (its folder's name under the sync's)."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"


def staged_manifest(
    spec: SyncSpec,
    *,
    run_id: str,
    manifest_id: str,
    staging_dir: str,
    started: float,
    primary_key: tuple[str, ...],
    columns: tuple[ManifestColumn, ...],
    files: Sequence[StagedFile],
    base_version: int,
    watermark_low: list[Any] | None,
    watermark_high: list[Any] | None,
    window: tuple[Any, Any] | None,
    notes: Sequence[str],
    upper_bound: Any = None,
    key_files: Sequence[StagedFile] = (),
) -> Manifest:
    """The manifest of an extracted batch: what the extraction staged, with the settings of ``spec``
    the load reads from it (a table sync's spec, or an API sync's table-sync view).

    ``started``: the extraction's ``time.monotonic()`` start; ``window``: a backfill's cursor bounds
    (a backfill never detects deletes).
    """
    return Manifest(
        sync_id=spec.sync_id,
        run_id=run_id,
        manifest_id=manifest_id,
        mode=spec.mode,
        source_table=spec.qualified_source,
        target_schema=spec.target_schema,
        target_table=spec.target_table,
        primary_key=primary_key,
        cursor_column=spec.cursor_column,
        columns=columns,
        files=tuple(files),
        rows=sum(f.rows for f in files),
        base_version=base_version,
        watermark_low=watermark_low,
        watermark_high=watermark_high,
        upper_bound=encode_value(upper_bound),
        extracted_at=dt.datetime.now(dt.UTC).isoformat(),
        staging_dir=staging_dir,
        delete_mode=spec.delete_mode,
        detect_deletes=bool(spec.detect_deletes) and window is None,
        key_files=tuple(key_files),
        state_table=spec.state_table,
        max_delete_fraction=spec.max_delete_fraction,
        history_table=spec.history_table,
        window=[encode_value(v) for v in window] if window is not None else None,
        extract_seconds=round(time.monotonic() - started, 3),
        notes=tuple(notes),
        schema_drift=spec.schema_drift,
    )


def quiet_run_columns(
    source: SourceTable,
    spec: SyncSpec,
    transform: BatchTransform | None,
    recorded: Sequence[tuple[str, str]] | None,
    notes: list[str],
    log: Logger,
) -> tuple[ManifestColumn, ...]:
    """The columns of a run that extracted no rows: the ones a batch with rows would have had.

    A transform shapes every batch (it adds, renames, masks or drops columns), so it also runs on
    the typed empty batch: otherwise a quiet run would stage the raw source columns, and the gate,
    the drift check and the load would see the transform's columns as dropped and fail, with the
    deletes the run found never applied.  Source columns keep their reflected types.  A column the
    transform made takes the type the last committed load recorded for it (an empty frame is weak
    evidence of a type: ``.apply`` on no rows gives no type at all), else the type Arrow inferred.
    A transform that cannot run on an empty frame falls back to the recorded columns, with a note.
    """
    empty = pa.schema([pa.field(p.name, p.arrow_type) for p in source.plans]).empty_table()
    if transform is None:
        return _manifest_columns(empty.schema, source)
    known = dict(recorded or ())
    try:
        batch = apply_transform(empty, transform, spec, 0)
    except SyncError as error:
        if not known:
            raise
        notes.append(f"{error.reason}; the batch takes the columns of the last committed load")
        log.warning("sync %s: %s", spec.sync_id, notes[-1])
        plans = {p.name: p for p in source.plans}
        return tuple(
            ManifestColumn(name, pg_type, plans[name].nullable if name in plans else True)
            for name, pg_type in known.items()
        )
    _check_transformed(batch, source, spec)
    planned = {p.name for p in source.plans}
    columns = []
    for column, field in zip(_manifest_columns(batch.schema, source), batch.schema, strict=True):
        made_by_transform = column.name not in planned or column.pg_type != _plan_type(source, column.name)
        if made_by_transform and column.name in known:
            column = ManifestColumn(column.name, known[column.name], column.nullable)
        elif pa.types.is_null(field.type):
            notes.append(
                f"the transform gave column {column.name!r} no type on an empty batch and no load recorded one: "
                f"{column.pg_type}"
            )
        columns.append(column)
    return tuple(columns)


def _plan_type(source: SourceTable, name: str) -> str | None:
    return next((p.pg_type for p in source.plans if p.name == name), None)


def _pages(
    connection: sa.Connection,
    source: SourceTable,
    spec: SyncSpec,
    selected: Sequence[Any],
    order: Sequence[sa.Column[Any]],
    order_index: Sequence[int],
    after: tuple[Any, ...] | None,
    conditions: Sequence[Any] = (),
    first_condition: Any = None,
) -> Iterator[Sequence[Sequence[Any]]]:
    """Keyset pagination: ``WHERE (order) > (last row's order) ORDER BY order LIMIT batch_rows``.

    On PostgreSQL (psycopg) a page is read with ``COPY (SELECT ...) TO STDOUT`` straight into Arrow
    (no Python object per value); pages COPY cannot read exactly fall back to the row path.
    """
    copy_ok: bool | None = None
    while True:
        query = sa.select(*selected).select_from(source.table).where(*conditions)
        if after is not None:
            query = query.where(keyset_after(order, after, source))
        elif first_condition is not None:
            query = query.where(first_condition)
        order_by = [orderable(c, source.dialect) for c in order]
        page = query.order_by(*order_by).limit(spec.batch_rows)
        if copy_ok is None:
            copy_ok = copy_eligible(connection, source)
        rows: Sequence[Sequence[Any]] | None = copy_page(connection, page, source, spec) if copy_ok else None
        if rows is None:
            rows = _fetch_page(connection, page, spec)
        if not rows:
            return
        yield rows
        if len(rows) < spec.batch_rows:
            return
        after = tuple(rows[-1][i] for i in order_index)


def _write(staging: StagingArea, file_uri: str, batch: pa.Table) -> StagedFile:
    with staging.open_writer(file_uri, batch.schema) as writer:
        writer.write_table(batch)
    return StagedFile(uri=file_uri, rows=batch.num_rows)


def _stage_keys(
    connection: sa.Connection,
    source: SourceTable,
    spec: SyncSpec,
    staging: StagingArea,
    staging_dir: str,
    log: Logger,
) -> list[StagedFile]:
    """Stage every source key (same snapshot as the rows) so the load can find deleted rows."""
    key_plans = [next(p for p in source.plans if p.name == k) for k in source.primary_key]
    key_source = SourceTable(source.table, source.dialect, source.primary_key, tuple(key_plans))
    order = [source.table.c[k] for k in source.primary_key]
    progress = Progress(f"sync {spec.sync_id}: staged source keys for delete detection", log)
    files: list[StagedFile] = []
    index = list(range(len(order)))
    for rows in _pages(connection, key_source, spec, [p.select for p in key_plans], order, index, None):
        batch = rows_to_table(rows, key_source, spec)
        files.append(_write(staging, f"{staging_dir}/keys-{len(files):05d}.parquet", batch))
        progress.add(batch.num_rows)
    progress.done()
    return files


def keyset_after(order: Sequence[sa.Column[Any]], values: tuple[Any, ...], source: SourceTable) -> Any:
    """``(order...) > (values...)`` in the dialect's comparable terms: the keyset page condition (and the
    stream probe's), with every value a bound parameter."""
    columns = [orderable(c, source.dialect) for c in order]
    params = [
        orderable(c, source.dialect, bound_value(f"after_{i}", c, v, source))
        for i, (c, v) in enumerate(zip(order, values, strict=True))
    ]
    if len(order) == 1:
        return columns[0] > params[0]
    return sa.tuple_(*columns) > sa.tuple_(*params)


def _later(candidate: tuple[Any, ...], current: tuple[Any, ...]) -> bool:
    """Whether a lookback page moved past the committed watermark (pages are in ascending order)."""
    try:
        return candidate > current
    except TypeError:
        return True


def _fetch_page(connection: sa.Connection, query: sa.Select[Any], spec: SyncSpec) -> list[sa.Row[Any]]:
    try:
        result = connection.execution_options(yield_per=_FETCH_CHUNK).execute(query)
        return list(result)
    except (ValueError, TypeError) as error:  # a driver/type processor could not read a value
        raise DataError(
            f"a source value could not be read: {error}", sync_id=spec.sync_id, table=spec.qualified_source
        ) from error


def _refuse_null_cursors(engine: sa.Engine, spec: SyncSpec, source: SourceTable) -> None:
    """A row whose cursor is NULL would never be extracted incrementally: refuse, naming the rows."""
    assert spec.cursor_column
    table = source.table
    cursor = table.c[spec.cursor_column]
    normalised = orderable(cursor, source.dialect)  # on SQLite, text it cannot read as a time is NULL here
    query = sa.select(*(table.c[k] for k in source.primary_key)).where(normalised.is_(None)).limit(5)
    with engine.connect() as conn:
        rows = conn.execute(query).fetchall()
    if rows:
        raise DataError(
            f"{len(rows)}{'+' if len(rows) == 5 else ''} row(s) have a NULL "
            f"{'(or unreadable) ' if normalised is not cursor else ''}cursor and would never be synced "
            f"incrementally (example keys: {[dict(zip(source.primary_key, r, strict=True)) for r in rows]}); "
            "give the column a NOT NULL default or use mode='full'",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
            column=spec.cursor_column,
            key=dict(zip(source.primary_key, rows[0], strict=True)),
            rule="cursor not null",
        )


def _check_transformed(batch: pa.Table, source: SourceTable, spec: SyncSpec) -> None:
    missing = [k for k in source.primary_key if k not in batch.column_names]
    if missing:
        raise SyncError(
            f"the transform dropped primary-key column(s) {missing}; the load needs them to merge",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
            column=missing,
        )


def _conform(batch: pa.Table, schema: pa.Schema, spec: SyncSpec) -> pa.Table:
    """Later batches of a transform must have the schema of the first one."""
    if batch.column_names != schema.names:
        raise SyncError(
            f"the transform returned columns {batch.column_names} after returning {schema.names} for an earlier batch",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
        )
    try:
        return batch.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise SyncError(
            f"the transform returned types {batch.schema} after {schema} for an earlier batch: {error}",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
        ) from error


def _manifest_columns(schema: pa.Schema, source: SourceTable) -> tuple[ManifestColumn, ...]:
    plans = {p.name: p for p in source.plans}
    columns = []
    for field in schema:
        plan = plans.get(field.name)
        if plan is not None and _same_kind(field.type, plan.arrow_type):
            columns.append(ManifestColumn(field.name, plan.pg_type, plan.nullable))
        else:  # added (or retyped) by the transform
            columns.append(ManifestColumn(field.name, pg_type_for_arrow(field.type), True))
    return tuple(columns)


def _same_kind(staged: pa.DataType, planned: pa.DataType) -> bool:
    if staged == planned:
        return True
    text = (pa.types.is_string(staged) or pa.types.is_large_string(staged)) and pa.types.is_string(planned)
    return bool(text)
