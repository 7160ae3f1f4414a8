"""Copy a CDC sync's tables from one snapshot: the initial copy, or a re-snapshot of some tables.

Snapshot hand-off (no gap, no duplicate): the slot is created *before* the snapshot is read, so
every transaction committing after the slot's start is in the stream.  The tables are then read in
one REPEATABLE READ transaction whose snapshot (``pg_current_snapshot()``) is stored with the copy.
When the stream is read, a transaction that the snapshot already saw is skipped: it is the overlap.
That decision is exact (by transaction id, not by time), so nothing is applied twice and nothing
is missed, whatever the concurrent writes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from airflow_sync_provider.core.cdc import pgoutput, slot
from airflow_sync_provider.core.cdc.manifest import CdcManifest, manifest_header
from airflow_sync_provider.core.cdc.position import CdcPosition
from airflow_sync_provider.core.cdc.session import NOT_UTF8, source_connection
from airflow_sync_provider.core.cdc.spec import CdcSpec
from airflow_sync_provider.core.errors import ConfigurationError, DataError, SyncError
from airflow_sync_provider.core.extract import extract_to_staging, new_manifest_id
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.progress import LOG, Logger
from airflow_sync_provider.core.spec import SyncSpec
from airflow_sync_provider.core.staging import StagingArea
from airflow_sync_provider.core.state import SyncState


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
    manifest_id = new_manifest_id()
    staging_dir = staging.batch_uri(spec.sync_id, manifest_id)
    snapshot, snapshot_lsn, table_manifests = _copy_tables(
        engine, spec, tables, staging_dir, run_id, log, sql_ascii=sql_ascii
    )
    manifest = CdcManifest(
        **manifest_header(spec, run_id, manifest_id, "snapshot", staging_dir, started),
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
    manifest_id = new_manifest_id()
    staging_dir = staging.batch_uri(spec.sync_id, manifest_id)
    log.info("sync %s: re-snapshot of %s at %s", spec.sync_id, ", ".join(wanted), info.describe())
    snapshot, snapshot_lsn, table_manifests = _copy_tables(
        engine, spec, chosen, staging_dir, run_id, log, sql_ascii=sql_ascii
    )
    manifest = CdcManifest(
        **manifest_header(spec, run_id, manifest_id, "table_snapshot", staging_dir, started),
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
