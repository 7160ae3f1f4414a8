"""``repair``: re-sync exactly the differing keys in one target transaction; the sync state is untouched."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
import pyarrow as pa
import sqlalchemy as sa
from psycopg import sql

from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.load import apply_table_batch, copy_files
from airflow_sync_provider.core.manifest import Manifest, ManifestColumn, StagedFile
from airflow_sync_provider.core.merge import key_match, remove_rows
from airflow_sync_provider.core.progress import LOG, Logger
from airflow_sync_provider.core.reconcile import limits
from airflow_sync_provider.core.reconcile.differences import discard_keys, stamp
from airflow_sync_provider.core.reconcile.fingerprint import canonical_keys, column_kinds, key_index, plan_of
from airflow_sync_provider.core.reconcile.record import ensure_reconcile_table, record_reconciliation
from airflow_sync_provider.core.reconcile.results import ReconcileResult, RepairResult
from airflow_sync_provider.core.reconcile.sides import snapshot_connection, source_error, source_rows_by_key
from airflow_sync_provider.core.schema import ColumnPlan
from airflow_sync_provider.core.source import SourceTable, reflect_source, rows_to_table
from airflow_sync_provider.core.spec import SyncSpec
from airflow_sync_provider.core.staging import StagingArea, iter_staged_batches
from airflow_sync_provider.core.state import hold_state_row
from airflow_sync_provider.core.target import TargetTable, idle_autocommit


def repair(
    source_engine: sa.Engine,
    target_conn: psycopg.Connection[Any],
    spec: SyncSpec,
    result: ReconcileResult,
    *,
    run_id: str,
    logger: Logger | None = None,
    staging: StagingArea | None = None,
) -> RepairResult:
    """Re-sync exactly the keys ``result`` found different, in one target transaction; state untouched.

    Keys the source has are re-read (current values) and merged; keys it does not have are deleted
    from the target (soft-deleted with ``delete_mode="soft"``; kept, and counted, with ``"none"``).
    Appends a ``repaired`` row to ``_sync_reconciliations`` in the same transaction.
    """
    log = logger or LOG
    started = time.monotonic()
    if not result.keys_uri or not result.differing_keys:
        return RepairResult(spec.sync_id, run_id, keys=0)
    if result.sync_id != spec.sync_id:
        raise ConfigurationError(f"the reconciliation result belongs to sync {result.sync_id!r}", sync_id=spec.sync_id)
    source = reflect_source(source_engine, spec)
    staging = staging or StagingArea()
    work_dir = staging.batch_uri(spec.sync_id, f"repair-{stamp()}")
    idle_autocommit(target_conn, step="reconciliation", sync_id=spec.sync_id)
    ensure_reconcile_table(target_conn, spec.target_schema)
    key_plans = [plan_of(source, k) for k in source.primary_key]
    try:
        with target_conn.transaction():
            # Serialise with loads of this sync (they lock the same row); the row is only read.
            hold_state_row(target_conn, spec.target_schema, spec.state_table, spec.sync_id)
            # Read the source only now, under the state lock: no load can commit older values after us.
            rows_file, delete_file, found, gone = _stage_repair_rows(
                source_engine, source, spec, result, staging, work_dir
            )
            manifest = _repair_manifest(spec, source, run_id, work_dir, rows_file)
            applied = apply_table_batch(target_conn, manifest, run_id, log)
            deleted = not_deleted = 0
            if gone and spec.delete_mode == "none":
                not_deleted = gone
            elif gone:
                assert delete_file is not None
                deleted = _delete_keys(target_conn, manifest, applied.target, delete_file, key_plans, run_id, log)
            repaired = RepairResult(
                sync_id=spec.sync_id,
                run_id=run_id,
                keys=found + gone,
                inserted=applied.inserted,
                updated=applied.updated,
                deleted=deleted,
                not_deleted=not_deleted,
                seconds=round(time.monotonic() - started, 3),
            )
            record_reconciliation(
                target_conn, spec.target_schema, result, run_id=run_id, repaired=True, details=repaired.to_dict()
            )
    finally:
        staging.discard(work_dir, log)
    discard_keys(result)
    log.info(
        "reconcile %s: repaired %d key(s) in %s: %d inserted, %d updated, %d deleted%s in %.2f s (state untouched)",
        spec.sync_id,
        repaired.keys,
        spec.qualified_target,
        repaired.inserted,
        repaired.updated,
        repaired.deleted,
        f", {not_deleted} kept (delete_mode='none')" if not_deleted else "",
        repaired.seconds,
    )
    return repaired


def _stage_repair_rows(
    engine: sa.Engine,
    source: SourceTable,
    spec: SyncSpec,
    result: ReconcileResult,
    staging: StagingArea,
    work_dir: str,
) -> tuple[StagedFile | None, StagedFile | None, int, int]:
    """Stage the source rows of the differing keys, and the keys the source does not have."""
    assert result.keys_uri
    key_plans = [plan_of(source, k) for k in source.primary_key]
    kinds = column_kinds(source)
    key_kinds = [kinds[i] for i in key_index(source)]
    key_schema = pa.schema([pa.field(p.name, p.arrow_type) for p in key_plans])
    rows_uri, delete_uri = f"{work_dir}/rows-00000.parquet", f"{work_dir}/delete-keys-00000.parquet"
    rows_writer = delete_writer = None
    found = gone = 0
    conn = snapshot_connection(engine, source)
    try:
        with conn.begin():
            for batch in iter_staged_batches(result.keys_uri, limits.KEYS_PER_QUERY):
                keys = pa.Table.from_batches([batch]).select([p.name for p in key_plans])
                typed = list(zip(*(c.to_pylist() for c in keys.columns), strict=True))
                table = rows_to_table(source_rows_by_key(conn, source, typed), source, spec)
                if table.num_rows:
                    if rows_writer is None:
                        rows_writer = staging.open_writer(rows_uri, table.schema)
                    rows_writer.write_table(table)
                    found += table.num_rows
                present = set(canonical_keys(table, kinds, key_index(source)))
                wanted = canonical_keys(keys, key_kinds, list(range(len(key_plans))))
                missing = [i for i, k in enumerate(wanted) if k not in present]
                if missing:
                    if delete_writer is None:
                        delete_writer = staging.open_writer(delete_uri, key_schema)
                    delete_writer.write_table(keys.take(pa.array(missing, pa.int64())).cast(key_schema))
                    gone += len(missing)
    except sa.exc.DBAPIError as error:
        raise source_error("repair", spec, error) from error
    finally:
        conn.close()
        for writer in (rows_writer, delete_writer):
            if writer is not None:
                writer.close()
    rows_file = StagedFile(rows_uri, found) if found else None
    delete_file = StagedFile(delete_uri, gone) if gone else None
    return rows_file, delete_file, found, gone


def _repair_manifest(
    spec: SyncSpec, source: SourceTable, run_id: str, work_dir: str, rows_file: StagedFile | None
) -> Manifest:
    return Manifest(
        sync_id=spec.sync_id,
        run_id=run_id,
        manifest_id=work_dir.rsplit("/", 1)[-1],
        mode="full",
        source_table=spec.qualified_source,
        target_schema=spec.target_schema,
        target_table=spec.target_table,
        primary_key=source.primary_key,
        cursor_column=spec.cursor_column,
        columns=tuple(ManifestColumn(p.name, p.pg_type, p.nullable) for p in source.plans),
        files=(rows_file,) if rows_file else (),
        rows=rows_file.rows if rows_file else 0,
        base_version=0,
        watermark_low=None,
        watermark_high=None,
        staging_dir=work_dir,
        delete_mode=spec.delete_mode,
        detect_deletes=False,
        state_table=spec.state_table,
        max_delete_fraction=spec.max_delete_fraction,  # guards the deletes of keys the source lacks
    )


def _delete_keys(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    target: TargetTable,
    keys_file: StagedFile,
    key_plans: Sequence[ColumnPlan],
    run_id: str,
    log: Logger,
) -> int:
    """Delete (or soft-delete) the target rows with the staged keys, within ``max_delete_fraction``."""
    keys = [p.name for p in key_plans]
    stage = sql.Identifier(f"_sync_repair_keys_{uuid.uuid4().hex[:16]}")
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
            stage, sql.SQL(", ").join(map(sql.Identifier, keys)), target.ident
        )
    )
    copy_files(conn, manifest, target, stage, log, [keys_file], keys, "loaded keys the source does not have")
    return remove_rows(conn, manifest, target, run_id, where=key_match("t", "s", keys), using=stage, guard="the repair")


__all__ = [
    "repair",
]
