"""Stage a CDC batch: the initial snapshot, or the changes the slot holds past the committed state.

:func:`changes_to_staging` is the entry point; the parts live in their own modules: the committed
position (:mod:`.position`), source connections (:mod:`.session`), the snapshot copies
(:mod:`.snapshot`), a read of the slot (:mod:`.read`) and its two decoders (:mod:`.per_message`,
:mod:`.bulk`).  Their public names are re-exported here, where they were first defined.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from airflow_sync_provider.core.cdc import slot
from airflow_sync_provider.core.cdc.bulk import read_bulk
from airflow_sync_provider.core.cdc.manifest import CdcManifest, manifest_header
from airflow_sync_provider.core.cdc.per_message import read_per_message
from airflow_sync_provider.core.cdc.position import POSITION_KEYS, CdcPosition, SnapshotFilter, still_loadable
from airflow_sync_provider.core.cdc.read import ChangeRead, TableStream, catalog_columns, stream_columns, table_manifest
from airflow_sync_provider.core.cdc.session import (
    NOT_UTF8,
    SourceSession,
    open_source,
    source_connection,
    source_connection_for,
)
from airflow_sync_provider.core.cdc.snapshot import snapshot_to_staging, table_snapshot_to_staging
from airflow_sync_provider.core.cdc.spec import CdcSpec
from airflow_sync_provider.core.cdc.watch import Watch
from airflow_sync_provider.core.extract import new_manifest_id
from airflow_sync_provider.core.progress import LOG, Logger, Progress
from airflow_sync_provider.core.staging import StagingArea
from airflow_sync_provider.core.state import SyncState


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
    staging.sweep_abandoned(spec.sync_id, pending=still_loadable(state, position), log=log)
    if position is None:
        return snapshot_to_staging(engine, spec, state=state, staging=staging, run_id=run_id, logger=log)
    if change_staging is not None and change_staging is not staging:
        staging = change_staging
        staging.sweep_abandoned(spec.sync_id, pending=still_loadable(state, position), log=log)
    manifest_id = new_manifest_id()
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
            streams={t.oid: TableStream(t) for t in tables},
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
                read_bulk(read)
            else:
                read_per_message(read)
        streams = read.streams
        for stream in streams.values():
            if stream.buffer or stream.pieces:
                read.flush(stream)
            elif stream.relation is not None and not stream.columns:
                stream.columns = stream_columns(stream, conn, read.pending_types)
        read.progress.done(f"{read.transactions} transaction(s), {read.skipped} already applied or in the snapshot")
        last_end = read.last_end
        if read.reached:
            # Everything committed before the heartbeat was read: nothing older is left to apply.
            last_end = max(last_end, read.heartbeat_end)
            if read.transactions == 0:
                slot.advance_slot(conn, spec.slot_name, read.heartbeat_end)
        target_columns = {oid: s.columns or catalog_columns(conn, s.source) for oid, s in streams.items()}
    manifest = CdcManifest(
        **manifest_header(spec, run_id, manifest_id, "changes", staging_dir, started),
        tables=tuple(
            table_manifest(spec, s, target_columns[oid], run_id, manifest_id, staging_dir) for oid, s in streams.items()
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


__all__ = [
    "NOT_UTF8",
    "POSITION_KEYS",
    "CdcPosition",
    "SnapshotFilter",
    "SourceSession",
    "changes_to_staging",
    "open_source",
    "snapshot_to_staging",
    "source_connection",
    "source_connection_for",
    "table_snapshot_to_staging",
]
