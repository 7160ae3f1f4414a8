"""Apply a staged CDC batch (or the initial snapshot) to PostgreSQL in one transaction with its LSN.

Per table: COPY the changes into a temp stage, drop those at or below the committed LSN (a replay
after a crash is a no-op), apply the last truncate, fill unchanged TOAST values (never NULL them),
keep the last change per key, delete, then merge the rest with the ordinary set-based merge.  The
state row (new commit LSN) is written in the same transaction; the slot is confirmed afterwards.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import psycopg
from psycopg import sql

from airflow_sync_provider.core.audit import AuditEntry, append_entry
from airflow_sync_provider.core.cdc.extract import CdcPosition
from airflow_sync_provider.core.cdc.manifest import (
    CHANGE_COLUMNS,
    LSN_COLUMN,
    MOVED_FROM_COLUMN,
    OP_COLUMN,
    SEQ_COLUMN,
    UNCHANGED_COLUMN,
    CdcManifest,
    TruncateEvent,
)
from airflow_sync_provider.core.cdc.pgoutput import int_to_lsn
from airflow_sync_provider.core.errors import DataError, SchemaError
from airflow_sync_provider.core.history import close_deleted, record_history
from airflow_sync_provider.core.load import (
    TargetTable,
    apply_table_batch,
    copy_files,
    ensure_target_table,
    merge_stage,
    metadata_columns,
    notify,
    prepare_load,
)
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.progress import LOG, Logger, PhaseObserver
from airflow_sync_provider.core.spec import DELETED_AT_COLUMN, RUN_ID_COLUMN
from airflow_sync_provider.core.staging import remove_staged
from airflow_sync_provider.core.state import lock_state, param_identifier, write_state

CdcLoadStatus = Literal["applied", "stale", "already_applied", "no_changes"]


@dataclass(frozen=True)
class CdcLoadResult:
    sync_id: str
    manifest_id: str
    kind: str
    status: CdcLoadStatus
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    version: int = 0
    commit_lsn: str = ""
    end_lsn: str = ""
    seconds: float = 0.0
    tables: dict[str, dict[str, int]] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_cdc_manifest(
    conn: psycopg.Connection[Any],
    manifest: CdcManifest,
    *,
    run_id: str | None = None,
    logger: Logger | None = None,
    observer: PhaseObserver | None = None,
    keep_staged: bool = False,
) -> CdcLoadResult:
    """Apply a CDC batch and its position to the target in one transaction (see the module doc)."""
    log = logger or LOG
    started = time.monotonic()
    run_id = run_id or manifest.run_id
    prepare_load(conn, manifest.sync_id, manifest.target_schema, manifest.state_table)
    counts: dict[str, dict[str, int]] = {}
    checksums: dict[str, str] = {}
    with conn.transaction():
        state = lock_state(conn, manifest.target_schema, manifest.state_table, manifest.sync_id)
        position = CdcPosition.from_state(state)
        skip = _skip_reason(manifest, state.version, state.last_manifest_id, position)
        if skip is not None:
            status, message = skip
            log.info("sync %s: %s", manifest.sync_id, message)
            skipped = CdcLoadResult(
                manifest.sync_id,
                manifest.manifest_id,
                manifest.kind,
                status,
                version=state.version,
                seconds=round(time.monotonic() - started, 3),
                message=message,
            )
            append_entry(conn, manifest.target_schema, _audit_entry(manifest, run_id, skipped, {}))
            return skipped
        if manifest.kind == "snapshot":
            for table in manifest.tables:
                applied = apply_table_batch(conn, table, run_id, log, observer)
                counts[table.source_table] = {
                    "inserted": applied.inserted,
                    "updated": applied.updated,
                    "deleted": applied.deleted,
                }
                checksums[table.source_table] = applied.checksum
            new_position = CdcPosition(manifest.commit_lsn, manifest.end_lsn, manifest.snapshot, manifest.snapshot_lsn)
        else:
            assert position is not None
            for table in manifest.tables:
                truncates = [t for t in manifest.truncates if t.table == table.source_table]
                if table.files or truncates:
                    counts[table.source_table] = apply_changes(conn, table, truncates, position.commit_lsn, run_id, log)
            keep_snapshot = position.snapshot_lsn is not None and manifest.commit_lsn <= position.snapshot_lsn
            new_position = CdcPosition(
                manifest.commit_lsn,
                manifest.end_lsn,
                position.snapshot if keep_snapshot else None,
                position.snapshot_lsn if keep_snapshot else None,
            )
        totals = {k: sum(c[k] for c in counts.values()) for k in ("inserted", "updated", "deleted")}
        notify(observer, "merged", totals)
        new_state = replace(
            state,
            version=state.version + 1,
            mode=f"cdc-{manifest.kind}",
            source_table=", ".join(t.source_table for t in manifest.tables),
            target_table=", ".join(f"{t.target_schema}.{t.target_table}" for t in manifest.tables),
            watermark=new_position.to_watermark(),
            last_manifest_id=manifest.manifest_id,
            last_run_id=run_id,
            rows_inserted=totals["inserted"],
            rows_updated=totals["updated"],
            rows_deleted=totals["deleted"],
        )
        write_state(conn, manifest.target_schema, manifest.state_table, new_state)
        result = CdcLoadResult(
            manifest.sync_id,
            manifest.manifest_id,
            manifest.kind,
            "applied",
            version=new_state.version,
            commit_lsn=int_to_lsn(new_position.commit_lsn),
            end_lsn=int_to_lsn(new_position.end_lsn),
            seconds=round(time.monotonic() - started, 3),
            tables=counts,
            inserted=totals["inserted"],
            updated=totals["updated"],
            deleted=totals["deleted"],
        )
        append_entry(conn, manifest.target_schema, _audit_entry(manifest, run_id, result, checksums))
    log.info(
        "sync %s: committed CDC %s version %d up to %s: %d inserted, %d updated, %d deleted in %.2f s",
        manifest.sync_id,
        manifest.kind,
        result.version,
        result.commit_lsn,
        result.inserted,
        result.updated,
        result.deleted,
        result.seconds,
    )
    notify(observer, "committed", result.to_dict())
    if not keep_staged:
        try:
            remove_staged(manifest)
        except OSError as error:
            log.warning("sync %s: could not remove staged files %s: %s", manifest.sync_id, manifest.staging_dir, error)
    return result


def _audit_entry(manifest: CdcManifest, run_id: str, result: CdcLoadResult, checksums: dict[str, str]) -> AuditEntry:
    return AuditEntry(
        sync_id=manifest.sync_id,
        run_id=run_id,
        manifest_id=manifest.manifest_id,
        mode=f"cdc-{manifest.kind}",
        status=result.status,
        source_table=", ".join(t.source_table for t in manifest.tables),
        target_table=", ".join(f"{t.target_schema}.{t.target_table}" for t in manifest.tables),
        range_low=int_to_lsn(manifest.applied_lsn),
        range_high=int_to_lsn(manifest.commit_lsn),
        rows_staged=manifest.rows,
        inserted=result.inserted,
        updated=result.updated,
        deleted=result.deleted,
        state_version=result.version,
        batch_checksum=", ".join(f"{k}={v}" for k, v in checksums.items()) or None,
        extract_seconds=manifest.extract_seconds,
        load_seconds=result.seconds,
        details={
            "tables": result.tables,
            "changes": manifest.changes,
            "transactions": manifest.transactions,
            "message": result.message,
        },
    )


def _skip_reason(
    manifest: CdcManifest, version: int, last_manifest_id: str | None, position: CdcPosition | None
) -> tuple[CdcLoadStatus, str] | None:
    if last_manifest_id == manifest.manifest_id:
        return "already_applied", f"manifest {manifest.manifest_id} is already committed (state version {version})"
    if manifest.kind == "snapshot":
        if version != manifest.base_version:
            return "stale", (
                f"stale snapshot {manifest.manifest_id} skipped: extracted at state version {manifest.base_version}, "
                f"but version {version} is committed"
            )
        return None
    if position is None:
        return "stale", f"change batch {manifest.manifest_id} skipped: the sync has no committed snapshot"
    if manifest.snapshot != position.snapshot:
        return "stale", (
            f"change batch {manifest.manifest_id} skipped: it was read for another initial snapshot than the "
            "committed one; the next run reads from the committed position"
        )
    if manifest.commit_lsn <= position.commit_lsn:
        if manifest.transactions == 0 and manifest.commit_lsn == manifest.applied_lsn:
            return "no_changes", f"no changes since {int_to_lsn(position.commit_lsn)}"
        return "already_applied", (
            f"change batch {manifest.manifest_id} (up to {int_to_lsn(manifest.commit_lsn)}) is already covered by "
            f"the committed position {int_to_lsn(position.commit_lsn)}; nothing to do"
        )
    return None


def _keys(manifest: Manifest, left: str, right: str) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(left, k), sql.Identifier(right, k)) for k in manifest.primary_key
    )


def apply_changes(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    truncates: list[TruncateEvent],
    applied_lsn: int,
    run_id: str,
    log: Logger,
) -> dict[str, int]:
    """Apply one table's staged changes inside the caller's transaction; returns the counts."""
    target = ensure_target_table(conn, manifest)
    if manifest.schema_drift == "freeze":  # evolve and discard keep a dropped column (new rows NULL)
        _refuse_dropped_columns(manifest, target)
    names = [c.name for c in manifest.columns]
    stage = sql.Identifier(f"_sync_cdc_{abs(hash((manifest.manifest_id, manifest.source_table))) % 10**12}")
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
            stage, sql.SQL(", ").join(map(sql.Identifier, names)), target.ident
        )
    )
    conn.execute(
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN {} text, ADD COLUMN {} bigint, ADD COLUMN {} bigint, ADD COLUMN {} int[], "
            "ADD COLUMN {} bigint"
        ).format(stage, *map(sql.Identifier, CHANGE_COLUMNS))
    )
    copy_files(conn, manifest, target, stage, log, names=[*names, *CHANGE_COLUMNS], what="staged changes")
    conn.execute(sql.SQL("DELETE FROM {} WHERE {} <= %s").format(stage, sql.Identifier(LSN_COLUMN)), (applied_lsn,))
    deleted = 0
    last_truncate = max((t.seq for t in truncates if t.lsn > applied_lsn), default=None)
    if last_truncate is not None:
        deleted += _delete_all(conn, manifest, target, run_id)
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE {} < %s").format(stage, sql.Identifier(SEQ_COLUMN)), (last_truncate,)
        )
    conn.execute(
        sql.SQL("CREATE INDEX ON {} ({}, {})").format(
            stage, sql.SQL(", ").join(map(sql.Identifier, manifest.primary_key)), sql.Identifier(SEQ_COLUMN)
        )
    )
    conn.execute(sql.SQL("ANALYZE {}").format(stage))
    _fill_unchanged_from_batch(conn, manifest, target, stage)
    final = sql.Identifier(f"{stage.as_string()[1:-1]}_last")
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT DISTINCT ON ({}) * FROM {} ORDER BY {}, {} DESC").format(
            final,
            sql.SQL(", ").join(map(sql.Identifier, manifest.primary_key)),
            stage,
            sql.SQL(", ").join(map(sql.Identifier, manifest.primary_key)),
            sql.Identifier(SEQ_COLUMN),
        )
    )
    _fill_unchanged_from_target(conn, manifest, target, final)
    deleted += _apply_deletes(conn, manifest, target, final, run_id)
    upserts = sql.SQL("s.{} <> 'D'").format(sql.Identifier(OP_COLUMN))
    if manifest.history_table:  # versions of the rows this batch leaves behind, in the same transaction
        if deleted:
            close_deleted(conn, manifest, param_identifier(target.schema, target.name), run_id)
        record_history(conn, manifest, final, run_id, upserts)
    inserted, updated = merge_stage(conn, manifest, target, final, run_id, where=upserts)
    return {"inserted": inserted, "updated": updated, "deleted": deleted}


def _refuse_dropped_columns(manifest: Manifest, target: TargetTable) -> None:
    expected = {c.name for c in manifest.columns} | {name for name, _ in metadata_columns(manifest)}
    extra = [c for c in target.column_types if c not in expected and not c.startswith("_sync_")]
    if extra:
        raise SchemaError(
            f"the target has column(s) {extra} that the source table no longer has (dropped or renamed at the "
            "source); drop or rename them in the target, then re-run",
            sync_id=manifest.sync_id,
            table=target.display,
            column=extra,
            rule="schema drift",
        )


def _unchanged_positions(conn: psycopg.Connection[Any], table: sql.Composable) -> list[int]:
    rows = conn.execute(
        sql.SQL("SELECT DISTINCT unnest({}) FROM {} WHERE {} IS NOT NULL").format(
            sql.Identifier(UNCHANGED_COLUMN), table, sql.Identifier(UNCHANGED_COLUMN)
        )
    ).fetchall()
    return sorted(int(r[0]) for r in rows)


def _fill_unchanged_from_batch(
    conn: psycopg.Connection[Any], manifest: Manifest, target: TargetTable, stage: sql.Identifier
) -> None:
    """An UPDATE leaves unchanged TOAST values out: take them from the latest earlier change of the key
    in this batch that carried the value, or (for a key change) from the row's old key."""
    unchanged, op, seq, moved = (
        sql.Identifier(c) for c in (UNCHANGED_COLUMN, OP_COLUMN, SEQ_COLUMN, MOVED_FROM_COLUMN)
    )
    for position in _unchanged_positions(conn, stage):
        column = sql.Identifier(manifest.columns[position - 1].name)
        carried = sql.SQL("p.{op} <> 'D' AND NOT (%(pos)s = ANY(coalesce(p.{unchanged}, '{{}}')))").format(
            op=op, unchanged=unchanged
        )
        conn.execute(
            sql.SQL(
                "UPDATE {stage} r SET {column} = v.value, {unchanged} = array_remove(r.{unchanged}, %(pos)s) "
                "FROM (SELECT r2.{seq} AS seq, p.{column} AS value FROM {stage} r2 CROSS JOIN LATERAL ("
                "  SELECT p.{column} FROM {stage} p WHERE {same_key} AND p.{seq} < r2.{seq} AND {carried}"
                "  ORDER BY p.{seq} DESC LIMIT 1) p WHERE %(pos)s = ANY(r2.{unchanged})) v "
                "WHERE r.{seq} = v.seq"
            ).format(
                stage=stage,
                column=column,
                unchanged=unchanged,
                seq=seq,
                carried=carried,
                same_key=_keys(manifest, "p", "r2"),
            ),
            {"pos": position},
        )
        # An update that moved the row to a new key: the value is the old key's.
        conn.execute(
            sql.SQL(
                "UPDATE {stage} r SET {column} = v.value, {unchanged} = array_remove(r.{unchanged}, %(pos)s) "
                "FROM {stage} d CROSS JOIN LATERAL ("
                "  SELECT x.value FROM ("
                "    SELECT p.{column} AS value, 1 AS pri, p.{seq} AS ord FROM {stage} p"
                "    WHERE {old_key} AND p.{seq} < d.{seq} AND {carried}"
                "    UNION ALL SELECT t.{column}, 0, 0 FROM {target} t WHERE {target_key}"
                "  ) x ORDER BY x.pri DESC, x.ord DESC LIMIT 1) v "
                "WHERE d.{seq} = r.{moved} AND %(pos)s = ANY(r.{unchanged})"
            ).format(
                stage=stage,
                column=column,
                unchanged=unchanged,
                seq=seq,
                moved=moved,
                carried=carried,
                old_key=_keys(manifest, "p", "d"),
                target=target.ident,
                target_key=_keys(manifest, "t", "d"),
            ),
            {"pos": position},
        )


def _fill_unchanged_from_target(
    conn: psycopg.Connection[Any], manifest: Manifest, target: TargetTable, final: sql.Identifier
) -> None:
    """What the batch could not supply is the value the target row already holds; never write NULL."""
    unchanged = sql.Identifier(UNCHANGED_COLUMN)
    positions = _unchanged_positions(conn, final)
    for position in positions:
        column = sql.Identifier(manifest.columns[position - 1].name)
        conn.execute(
            sql.SQL(
                "UPDATE {final} s SET {column} = t.{column}, {unchanged} = array_remove(s.{unchanged}, %(pos)s) "
                "FROM {target} t WHERE {same_key} AND %(pos)s = ANY(s.{unchanged})"
            ).format(
                final=final, column=column, unchanged=unchanged, target=target.ident, same_key=_keys(manifest, "t", "s")
            ),
            {"pos": position},
        )
    if not positions:
        return
    row = conn.execute(
        sql.SQL("SELECT {}, {} FROM {} WHERE {} <> 'D' AND cardinality({}) > 0 LIMIT 1").format(
            sql.SQL(", ").join(map(sql.Identifier, manifest.primary_key)),
            unchanged,
            final,
            sql.Identifier(OP_COLUMN),
            unchanged,
        )
    ).fetchone()
    if row is not None:
        columns = [manifest.columns[p - 1].name for p in row[-1]]
        raise DataError(
            "an update left TOASTed value(s) out as unchanged, but neither the batch nor the target holds the "
            "row to take them from (the target is missing a row the source has); writing NULL would lose data. "
            "Reset the sync to take a new initial snapshot",
            sync_id=manifest.sync_id,
            table=target.display,
            column=columns,
            key=dict(zip(manifest.primary_key, row[:-1], strict=True)),
            rule="unchanged TOAST value",
        )


def _apply_deletes(
    conn: psycopg.Connection[Any], manifest: Manifest, target: TargetTable, final: sql.Identifier, run_id: str
) -> int:
    deleting = sql.SQL("s.{} = 'D' AND {}").format(sql.Identifier(OP_COLUMN), _keys(manifest, "t", "s"))
    if manifest.delete_mode == "soft":
        statement = sql.SQL("UPDATE {} t SET {} = now(), {} = %s FROM {} s WHERE {} AND t.{} IS NULL").format(
            target.ident,
            sql.Identifier(DELETED_AT_COLUMN),
            sql.Identifier(RUN_ID_COLUMN),
            final,
            deleting,
            sql.Identifier(DELETED_AT_COLUMN),
        )
        return conn.execute(statement, (run_id,)).rowcount
    return conn.execute(sql.SQL("DELETE FROM {} t USING {} s WHERE {}").format(target.ident, final, deleting)).rowcount


def _delete_all(conn: psycopg.Connection[Any], manifest: Manifest, target: TargetTable, run_id: str) -> int:
    """A TRUNCATE at the source: remove (or mark) every target row, in this transaction."""
    if manifest.delete_mode == "soft":
        return conn.execute(
            sql.SQL("UPDATE {} SET {} = now(), {} = %s WHERE {} IS NULL").format(
                target.ident,
                sql.Identifier(DELETED_AT_COLUMN),
                sql.Identifier(RUN_ID_COLUMN),
                sql.Identifier(DELETED_AT_COLUMN),
            ),
            (run_id,),
        ).rowcount
    return conn.execute(sql.SQL("DELETE FROM {}").format(target.ident)).rowcount
