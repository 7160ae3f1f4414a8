"""Apply a staged CDC batch (or a snapshot) to PostgreSQL in one transaction with its LSN.

Per table: COPY the changes into a temp stage, drop those at or below the committed LSN (a replay
after a crash is a no-op), apply the last truncate, fill the values updates left out as unchanged
TOAST (never NULL them), keep the last change per key, delete, then merge the rest with the ordinary
set-based merge.  The state row (new commit LSN) is written in the same transaction; the slot is
confirmed afterwards.

Unchanged TOAST values follow the row, not the key (issue 13).  An update that leaves a TOASTed
value out means "the value this row had", and within one batch a row can change key (``1 -> 201``)
while another row takes its old key (``3 -> 1``).  So each change is placed on its row's identity
chain in commit order: a key's changes split into segments at its deletes, a key change links the
segment its delete half ends to the segment its upsert half begins, and chains of links are followed
set-based (``_identity_links``).  A left-out value is the one the same identity last carried in the
batch; if it carried none, the identity existed before the batch and the value is the target row at
the key the identity had then, read before anything is written.  Nothing else can be known (the
target lost that row): the load fails before writing, naming the table, key and column, and the
recovery is to re-snapshot that table alone (``resnapshot_tables``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from airflow_sync_provider.core.audit import AuditEntry, append_entry
from airflow_sync_provider.core.cdc.manifest import (
    CHANGE_COLUMNS,
    LSN_COLUMN,
    MOVED_FROM_COLUMN,
    OP_COLUMN,
    SEQ_COLUMN,
    UNCHANGED_COLUMN,
    CdcLoadStatus,
    CdcManifest,
    TruncateEvent,
    skip_reason,
)
from airflow_sync_provider.core.cdc.pgoutput import int_to_lsn
from airflow_sync_provider.core.cdc.position import CdcPosition
from airflow_sync_provider.core.cdc.watch import Watch
from airflow_sync_provider.core.errors import DataError, SchemaError
from airflow_sync_provider.core.history import close_deleted, record_history
from airflow_sync_provider.core.load import after_commit, apply_table_batch, copy_files, notify, prepare_load
from airflow_sync_provider.core.manifest import Manifest, StagedFile
from airflow_sync_provider.core.merge import key_match, merge_stage, rejected_by_target, remove_rows
from airflow_sync_provider.core.progress import LOG, Logger, PhaseObserver
from airflow_sync_provider.core.spec import DELETED_AT_COLUMN, RUN_ID_COLUMN, SYNCED_AT_COLUMN
from airflow_sync_provider.core.sqltext import execute
from airflow_sync_provider.core.staging import StagingArea, read_staged_table
from airflow_sync_provider.core.state import lock_state, write_state
from airflow_sync_provider.core.target import TargetTable, comparable, ensure_target_table, metadata_columns


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
    watch = Watch(log, f"sync {manifest.sync_id}: load of CDC {manifest.kind} {manifest.manifest_id}")
    with watch, conn.transaction():
        state = lock_state(conn, manifest.target_schema, manifest.state_table, manifest.sync_id)
        position = CdcPosition.from_state(state)
        skip = skip_reason(manifest, state.version, state.last_manifest_id, position)
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
        if manifest.kind in ("snapshot", "table_snapshot"):
            for table in manifest.tables:  # a copy: loaded like a full table sync
                watch.phase(f"loading the copy of {table.source_table}")
                applied = apply_table_batch(conn, table, run_id, log, observer)
                counts[table.source_table] = {
                    "inserted": applied.inserted,
                    "updated": applied.updated,
                    "deleted": applied.deleted,
                }
                checksums[table.source_table] = applied.checksum
            if manifest.kind == "snapshot":
                new_position = CdcPosition(
                    manifest.commit_lsn, manifest.end_lsn, manifest.snapshot, manifest.snapshot_lsn
                )
            else:  # those tables anew; the position stays, with their hand-off
                assert position is not None
                new_position = replace(
                    position, table_snapshots={**position.table_snapshots, **manifest.table_snapshots}
                )
        else:
            assert position is not None
            for table in manifest.tables:
                truncates = [t for t in manifest.truncates if t.table == table.source_table]
                if table.files or truncates:
                    counts[table.source_table] = apply_changes(
                        conn, table, truncates, position.commit_lsn, run_id, log, watch
                    )
            new_position = position.after(manifest.commit_lsn, manifest.end_lsn)
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
        watch.phase("writing the state and committing")
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
    after_commit(manifest, result.to_dict(), observer=observer, keep_staged=keep_staged, log=log)
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


def apply_changes(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    truncates: list[TruncateEvent],
    applied_lsn: int,
    run_id: str,
    log: Logger,
    watch: Watch | None = None,
) -> dict[str, int]:
    """Apply one table's staged changes inside the caller's transaction; returns the counts.

    Order matters: the unchanged TOAST values are resolved (from the batch, or from the target rows
    as they stand before the batch) before anything in the target is deleted or merged.
    """
    target = ensure_target_table(conn, manifest)
    if manifest.schema_drift == "freeze":  # evolve and discard keep a dropped column (new rows NULL)
        _refuse_dropped_columns(manifest, target)
    names = [c.name for c in manifest.columns]
    label = f"_sync_cdc_{abs(hash((manifest.manifest_id, manifest.source_table))) % 10**12}"
    stage = sql.Identifier(label)
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

    def phase(name: str) -> None:
        if watch is not None:
            watch.phase(f"{name} ({manifest.source_table})")

    last_truncate = max((t.seq for t in truncates if t.lsn > applied_lsn), default=None)
    deleted = 0
    if last_truncate is not None:
        deleted += _delete_all(conn, manifest, target, run_id)
    net = _net_files(manifest, applied_lsn, last_truncate)
    if net is not None:
        # The common case, done before the COPY: only the batch's net effect (the last change per key
        # past the committed LSN and the last truncate) is copied, so the stage needs no index, no
        # ANALYZE and no statement of its own before the deletes and the merge.
        phase(f"copying the net effect of {manifest.rows:,} staged changes")
        copy_files(conn, manifest, target, stage, log, files=net, names=[*names, *CHANGE_COLUMNS], what="net changes")
        _row_count_estimate(conn, manifest, stage)
    else:
        phase(f"copying {manifest.rows:,} staged changes")
        copy_files(conn, manifest, target, stage, log, names=[*names, *CHANGE_COLUMNS], what="staged changes")
        _net_effect_in_sql(conn, manifest, target, stage, label, applied_lsn, last_truncate, phase)
    if net is not None and manifest.delete_mode == "hard" and not manifest.history_table:
        phase("merging (inserts, updates and deletes in one statement)")
        merged = _merge_with_deletes(conn, manifest, target, stage, run_id)
        if merged is not None:
            return {"inserted": merged[0], "updated": merged[1], "deleted": deleted + merged[2]}
    phase("applying deletes")
    deleted += _apply_deletes(conn, manifest, target, stage, run_id)
    upserts = sql.SQL("s.{} <> 'D'").format(sql.Identifier(OP_COLUMN))
    if manifest.history_table:  # versions of the rows this batch leaves behind, in the same transaction
        if deleted:
            close_deleted(conn, manifest, target.ident, run_id)
        phase("recording history")
        record_history(conn, manifest, stage, run_id, upserts)
    phase("merging")
    inserted, updated = merge_stage(conn, manifest, target, stage, run_id, where=upserts)
    return {"inserted": inserted, "updated": updated, "deleted": deleted}


#: Key column types whose text (as pgoutput renders it) is equal exactly when the values are: keys of
#: these types are compared as staged text to find the last change per key before the COPY.  (Not,
#: e.g., an unconstrained numeric: 1.0 and 1.00 are one key but two texts.)
_TEXT_EXACT_KEY = re.compile(
    r"(SMALLINT|INTEGER|BIGINT|TEXT|UUID|DATE|BOOLEAN|CHARACTER VARYING(\(\d+\))?|NUMERIC\(\d+, ?\d+\))"
)


def _net_files(manifest: Manifest, applied_lsn: int, last_truncate: int | None) -> list[StagedFile] | None:
    """The staged files reduced to the batch's net effect, found in Arrow before the COPY; or None
    when it needs the SQL path (values left out as unchanged TOAST, or keys not comparable as text).

    Reads only the keys and change columns of every file (memory: keys, not rows).  A row stays if it
    is past the committed LSN and the last truncate and is its key's last change; a file that keeps
    every row is copied as it is, the others are rewritten next to it with the rows that stay.
    """
    types = {c.name: c.pg_type for c in manifest.columns}
    if not all(_TEXT_EXACT_KEY.fullmatch(types.get(k, "").upper()) for k in manifest.primary_key):
        return None
    wanted = [*manifest.primary_key, LSN_COLUMN, SEQ_COLUMN, UNCHANGED_COLUMN]
    parts = [_read(f.uri, wanted) for f in manifest.files]
    if not parts:
        return []
    changes = pa.concat_tables(parts)
    if changes.column(UNCHANGED_COLUMN).null_count != changes.num_rows:
        return None
    live = pc.greater(changes.column(LSN_COLUMN), applied_lsn)
    if last_truncate is not None:
        live = pc.and_(live, pc.greater(changes.column(SEQ_COLUMN), last_truncate))
    live_rows = pc.sum(live).as_py() or 0
    last = (
        changes.filter(live)
        .group_by(list(manifest.primary_key), use_threads=False)
        .aggregate([(SEQ_COLUMN, "max")])
        .column(f"{SEQ_COLUMN}_max")
    )
    if len(last) == live_rows == changes.num_rows:  # every change is its key's only one: copy the files as they are
        return list(manifest.files)
    net: list[StagedFile] = []
    for staged, part in zip(manifest.files, parts, strict=True):
        keep = pc.is_in(part.column(SEQ_COLUMN), value_set=last)
        kept = pc.sum(keep).as_py() or 0
        if kept == part.num_rows:
            net.append(staged)
        elif kept:
            uri = staged.uri.removesuffix(".parquet") + ".net.parquet"
            rows = _read(staged.uri).filter(keep)
            with StagingArea().open_writer(uri, rows.schema) as writer:
                writer.write_table(rows)
            net.append(StagedFile(uri=uri, rows=rows.num_rows))
    return net


def _read(uri: str, columns: list[str] | None = None) -> pa.Table:
    return read_staged_table(uri, columns)


def _row_count_estimate(conn: psycopg.Connection[Any], manifest: Manifest, stage: sql.Identifier) -> None:
    """Give the planner the stage's size (hash joins, not an index probe per row) at almost no cost.

    Without it a fresh temp table looks tiny; a full ANALYZE samples 30,000 rows of every column
    (~0.3 s for 100k changes).  A statistics target of 1 on the key and operation columns samples
    300 rows of those two alone (measured ~5 ms) and still counts the rows.
    """
    columns = [*manifest.primary_key, OP_COLUMN]
    conn.execute(
        sql.SQL("ALTER TABLE {} {}").format(
            stage,
            sql.SQL(", ").join(sql.SQL("ALTER COLUMN {} SET STATISTICS 1").format(sql.Identifier(c)) for c in columns),
        )
    )
    conn.execute(sql.SQL("ANALYZE {} ({})").format(stage, sql.SQL(", ").join(map(sql.Identifier, columns))))


def _net_effect_in_sql(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    target: TargetTable,
    stage: sql.Identifier,
    label: str,
    applied_lsn: int,
    last_truncate: int | None,
    phase: Callable[[str], None],
) -> None:
    """Reduce the copied stage to the batch's net effect in SQL, resolving unchanged TOAST values."""
    phase("ordering the changes")
    execute(conn, sql.SQL("DELETE FROM {} WHERE {} <= %s").format(stage, sql.Identifier(LSN_COLUMN)), (applied_lsn,))
    if last_truncate is not None:
        execute(
            conn, sql.SQL("DELETE FROM {} WHERE {} < %s").format(stage, sql.Identifier(SEQ_COLUMN)), (last_truncate,)
        )
    conn.execute(
        sql.SQL("CREATE INDEX ON {} ({}, {})").format(
            stage, sql.SQL(", ").join(map(sql.Identifier, manifest.primary_key)), sql.Identifier(SEQ_COLUMN)
        )
    )
    conn.execute(sql.SQL("CREATE INDEX ON {} ({})").format(stage, sql.Identifier(SEQ_COLUMN)))
    conn.execute(sql.SQL("ANALYZE {}").format(stage))
    positions = _unchanged_positions(conn, stage)
    if positions:
        phase("resolving values left out as unchanged TOAST")
        links = _identity_links(conn, manifest, stage, label)
        _resolve_unchanged(conn, manifest, target, stage, links, positions)
        conn.execute(
            sql.SQL("DELETE FROM {} s USING {} l WHERE l.{seq} = s.{seq} AND NOT l.{last}").format(
                stage, links, seq=sql.Identifier(SEQ_COLUMN), last=sql.Identifier(_LAST)
            )
        )
    else:  # keep the last change per key: the stage becomes the batch's net effect
        execute(
            conn,
            sql.SQL(
                "DELETE FROM {stage} s WHERE EXISTS (SELECT FROM {stage} n WHERE {same} AND n.{seq} > s.{seq})"
            ).format(stage=stage, same=key_match("n", "s", manifest.primary_key), seq=sql.Identifier(SEQ_COLUMN)),
            (),  # with parameters (a % in a column name reads as one)
        )


def _merge_with_deletes(
    conn: psycopg.Connection[Any], manifest: Manifest, target: TargetTable, stage: sql.Identifier, run_id: str
) -> tuple[int, int, int] | None:
    """Apply a stage holding one change per key with one ``MERGE`` (PostgreSQL 17+): delete, update
    what changed, insert; returns (inserted, updated, deleted), or None to take the two-statement path.

    One join of the stage with the target instead of two (a DELETE, then :func:`~..merge.merge_stage`).
    Should a concurrent writer insert one of the keys first (a unique violation), the savepoint is
    rolled back and the two-statement path (which falls back to ON CONFLICT) applies the batch.
    """
    if conn.info.server_version < 170000:
        return None
    keys, names = list(manifest.primary_key), [c.name for c in manifest.columns]
    values = [n for n in names if n not in keys]
    op = sql.Identifier("s", OP_COLUMN)
    update: sql.Composable = sql.SQL("")
    if values:
        update = sql.SQL(" WHEN MATCHED AND ({}) IS DISTINCT FROM ({}) THEN UPDATE SET {}").format(
            sql.SQL(", ").join(comparable("t", c, target) for c in values),
            sql.SQL(", ").join(comparable("s", c, target) for c in values),
            sql.SQL(", ").join(
                [
                    *(sql.SQL("{} = {}").format(sql.Identifier(c), sql.Identifier("s", c)) for c in values),
                    sql.SQL("{} = %(run_id)s").format(sql.Identifier(RUN_ID_COLUMN)),
                    sql.SQL("{} = now()").format(sql.Identifier(SYNCED_AT_COLUMN)),
                ]
            ),
        )
    statement = sql.SQL(
        "WITH merged AS (MERGE INTO {target} AS t USING {stage} AS s ON {match}"
        " WHEN MATCHED AND {op} = 'D' THEN DELETE{update}"
        " WHEN NOT MATCHED AND {op} <> 'D' THEN INSERT ({columns}) VALUES ({values}, %(run_id)s, now())"
        " RETURNING merge_action() AS action)"
        " SELECT count(*) FILTER (WHERE action = 'INSERT'), count(*) FILTER (WHERE action = 'UPDATE'),"
        " count(*) FILTER (WHERE action = 'DELETE') FROM merged"
    ).format(
        target=target.ident,
        stage=stage,
        match=key_match("t", "s", manifest.primary_key),
        op=op,
        update=update,
        columns=sql.SQL(", ").join(map(sql.Identifier, [*names, RUN_ID_COLUMN, SYNCED_AT_COLUMN])),
        values=sql.SQL(", ").join(sql.Identifier("s", c) for c in names),
    )
    try:
        with conn.transaction():
            row = execute(conn, statement, {"run_id": run_id}).fetchone()
    except psycopg.errors.UniqueViolation:
        return None
    except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as error:
        raise rejected_by_target(error, manifest, target) from error
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


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


# Columns of the identity-link table (one narrow row per staged change, no values).
_SEGNO = "_cdc_segno"  # deletes of the key before this change: a key's rows split into segments at deletes
_SEG = "_cdc_seg"  # seq of the first change of this change's segment
_LAST = "_cdc_last"  # the key's last change in the batch (its net effect)
_CHAIN = "_cdc_chain"  # seq of the first change of the row identity this change belongs to


def _identity_links(
    conn: psycopg.Connection[Any], manifest: Manifest, stage: sql.Identifier, label: str
) -> sql.Identifier:
    """Follow each row's identity through the batch in commit order; returns the link table.

    A key's changes split into *segments* at its deletes: a segment is one row identity living at
    that key (a delete, or the delete half of a key change, ends it).  A segment begins with an
    insert (a new identity), with the upsert half of a key change (the identity of the segment whose
    delete it is: ``_cdc_moved_from``), or, as the key's first segment, with an update or delete of
    a row that existed before the batch.  Chaining segments through the key changes (pointer
    jumping: one set-based UPDATE per doubling of the longest chain) gives every change the first
    change of its identity, ``_cdc_chain``; an identity's changes are that chain in ``_cdc_seq`` order.
    """
    keys = sql.SQL(", ").join(map(sql.Identifier, manifest.primary_key))
    seq, op, moved, unchanged = (
        sql.Identifier(c) for c in (SEQ_COLUMN, OP_COLUMN, MOVED_FROM_COLUMN, UNCHANGED_COLUMN)
    )
    segno, seg, last, chain = (sql.Identifier(c) for c in (_SEGNO, _SEG, _LAST, _CHAIN))
    links, moves = sql.Identifier(f"{label}_links"), sql.Identifier(f"{label}_moves")
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE {links} ON COMMIT DROP AS "
            "SELECT {keys}, {seq}, {op}, {moved}, {unchanged}, {segno}, {last}, "
            "  min({seq}) OVER s AS {seg}, min({seq}) OVER s AS {chain} "
            "FROM (SELECT {keys}, {seq}, {op}, {moved}, {unchanged}, "
            "  count(*) FILTER (WHERE {op} = 'D') OVER w AS {segno}, "
            "  lead({seq}) OVER (PARTITION BY {keys} ORDER BY {seq}) IS NULL AS {last} "
            "  FROM {stage} WINDOW w AS (PARTITION BY {keys} ORDER BY {seq} "
            "  ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)) a WINDOW s AS (PARTITION BY {keys}, {segno})"
        ).format(
            links=links,
            keys=keys,
            seq=seq,
            op=op,
            moved=moved,
            unchanged=unchanged,
            segno=segno,
            last=last,
            seg=seg,
            chain=chain,
            stage=stage,
        )
    )
    conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} ({})").format(links, seq))
    # A segment that a key change began continues the segment its old key's delete ended.
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE {moves} ON COMMIT DROP AS SELECT DISTINCT l.{seg} AS seg, d.{seg} AS root "
            "FROM {links} l JOIN {links} d ON d.{seq} = l.{moved} WHERE l.{moved} IS NOT NULL"
        ).format(moves=moves, links=links, seg=seg, seq=seq, moved=moved)
    )
    conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} (seg)").format(moves))
    conn.execute(sql.SQL("ANALYZE {}").format(moves))
    while conn.execute(
        sql.SQL("UPDATE {moves} m SET root = p.root FROM {moves} p WHERE m.root = p.seg").format(moves=moves)
    ).rowcount:
        pass  # every round doubles how far each segment's pointer reaches; chains run forward, so it ends
    conn.execute(
        sql.SQL("UPDATE {links} l SET {chain} = m.root FROM {moves} m WHERE m.seg = l.{seg}").format(
            links=links, chain=chain, moves=moves, seg=seg
        )
    )
    conn.execute(sql.SQL("ANALYZE {}").format(links))
    return links


def _resolve_unchanged(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    target: TargetTable,
    stage: sql.Identifier,
    links: sql.Identifier,
    positions: list[int],
) -> None:
    """Give every last change per key the TOASTed values its update left out as unchanged.

    The value is the one its row identity last carried in this batch (an insert or an update that
    sent it, whatever key the row had then); if the identity carried none, it began before the batch,
    and the value is the target row at the key the identity had then (read before any write).
    Anything else cannot be known: the load fails before writing (see ``_unknown_value``).
    """
    p_seq, p_op, p_unchanged = (sql.Identifier(c) for c in (SEQ_COLUMN, OP_COLUMN, UNCHANGED_COLUMN))
    p_segno, p_last, p_chain, p_moved = (sql.Identifier(c) for c in (_SEGNO, _LAST, _CHAIN, MOVED_FROM_COLUMN))
    fill = sql.Identifier(f"{links.as_string()[1:-1]}_fill")
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} (seq bigint PRIMARY KEY, carrier bigint, chain bigint) ON COMMIT DROP").format(
            fill
        )
    )
    live: sql.Composable = sql.SQL("")
    if manifest.delete_mode == "soft":
        live = sql.SQL(" AND t.{} IS NULL").format(sql.Identifier(DELETED_AT_COLUMN))
    for position in positions:
        column = sql.Identifier(manifest.columns[position - 1].name)
        conn.execute(sql.SQL("TRUNCATE {}").format(fill))
        # Per identity, in commit order (seq grows along it): the latest change so far that carried the value.
        execute(
            conn,
            sql.SQL(
                "INSERT INTO {fill} (seq, carrier, chain) SELECT {seq}, carrier, {chain} FROM ("
                "  SELECT {seq}, {chain}, {last}, {op}, {unchanged}, max({seq}) FILTER (WHERE {op} <> 'D' AND "
                "  NOT %(pos)s = ANY(coalesce({unchanged}, '{{}}'))) OVER (PARTITION BY {chain} ORDER BY {seq}) "
                "  AS carrier FROM {links} WHERE {chain} IN (SELECT {chain} FROM {links} WHERE {last} AND {op} <> 'D' "
                "  AND %(pos)s = ANY({unchanged}))) c "
                "WHERE {last} AND {op} <> 'D' AND %(pos)s = ANY({unchanged})"
            ).format(fill=fill, seq=p_seq, chain=p_chain, last=p_last, op=p_op, unchanged=p_unchanged, links=links),
            {"pos": position},
        )
        # Carried in the batch...
        execute(
            conn,
            sql.SQL(
                "UPDATE {stage} r SET {column} = c.{column}, {unchanged} = array_remove(r.{unchanged}, %(pos)s) "
                "FROM {fill} f JOIN {stage} c ON c.{seq} = f.carrier WHERE r.{seq} = f.seq"
            ).format(stage=stage, column=column, unchanged=p_unchanged, fill=fill, seq=p_seq),
            {"pos": position},
        )
        # ...or held by the target row at the key where an identity that began before the batch started.
        execute(
            conn,
            sql.SQL(
                "UPDATE {stage} r SET {column} = t.{column}, {unchanged} = array_remove(r.{unchanged}, %(pos)s) "
                "FROM {fill} f JOIN {links} o ON o.{seq} = f.chain JOIN {target} t ON {origin_key} "
                "WHERE r.{seq} = f.seq AND f.carrier IS NULL AND o.{op} <> 'I' AND o.{moved} IS NULL "
                "AND o.{segno} = 0{live}"
            ).format(
                stage=stage,
                column=column,
                unchanged=p_unchanged,
                fill=fill,
                links=links,
                seq=p_seq,
                target=target.ident,
                origin_key=key_match("t", "o", manifest.primary_key),
                op=p_op,
                moved=p_moved,
                segno=p_segno,
                live=live,
            ),
            {"pos": position},
        )
    _unknown_value(conn, manifest, target, stage, links)


def _unknown_value(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    target: TargetTable,
    stage: sql.Identifier,
    links: sql.Identifier,
) -> None:
    """Fail (before anything is written) if a last change still lacks a value it left out."""
    keys = manifest.primary_key
    row = conn.execute(
        sql.SQL(
            "SELECT {keys}, s.{unchanged}, {origin_keys} FROM {stage} s "
            "JOIN {links} l ON l.{seq} = s.{seq} JOIN {links} o ON o.{seq} = l.{chain} "
            "WHERE l.{last} AND s.{op} <> 'D' AND cardinality(s.{unchanged}) > 0 ORDER BY s.{seq} LIMIT 1"
        ).format(
            keys=sql.SQL(", ").join(sql.Identifier("s", k) for k in keys),
            origin_keys=sql.SQL(", ").join(sql.Identifier("o", k) for k in keys),
            unchanged=sql.Identifier(UNCHANGED_COLUMN),
            op=sql.Identifier(OP_COLUMN),
            stage=stage,
            links=links,
            seq=sql.Identifier(SEQ_COLUMN),
            chain=sql.Identifier(_CHAIN),
            last=sql.Identifier(_LAST),
        )
    ).fetchone()
    if row is None:
        return
    n = len(keys)
    key = dict(zip(keys, row[:n], strict=True))
    origin = dict(zip(keys, row[n + 1 : 2 * n + 1], strict=True))
    columns = [manifest.columns[p - 1].name for p in row[n]]
    where = (
        "" if origin == key else " (where the row was at " + ", ".join(f"{k}={v!r}" for k, v in origin.items()) + ")"
    )
    raise DataError(
        f"an update left TOASTed value(s) out as unchanged, and they cannot be known: the row existed before "
        f"this batch, but the target does not hold it{where}, so the target has diverged from the source. "
        "Writing NULL or a stale value would lose data, so nothing was written. Recover without resetting the "
        f"sync: re-snapshot just this table, resnapshot_tables(source, target, spec, [{manifest.source_table!r}]) "
        "from airflow_sync_provider.core.cdc (the other tables keep streaming); REPLICA IDENTITY FULL at the "
        "source makes updates carry the whole old row, so such values never depend on the target",
        sync_id=manifest.sync_id,
        table=target.display,
        column=columns,
        key=key,
        rule="unchanged TOAST value",
    )


def _apply_deletes(
    conn: psycopg.Connection[Any], manifest: Manifest, target: TargetTable, final: sql.Identifier, run_id: str
) -> int:
    """Delete (or mark) the keys whose last change is a delete."""
    deleting = sql.SQL("s.{} = 'D' AND {}").format(sql.Identifier(OP_COLUMN), key_match("t", "s", manifest.primary_key))
    return remove_rows(conn, manifest, target, run_id, where=deleting, using=final)


def _delete_all(conn: psycopg.Connection[Any], manifest: Manifest, target: TargetTable, run_id: str) -> int:
    """A TRUNCATE at the source: remove (or mark) every target row, in this transaction."""
    return remove_rows(conn, manifest, target, run_id)
