"""Replay: merge quarantined rows (fixed in Python or SQL) once their batch committed, state untouched."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.ipc
from psycopg import sql
from psycopg.types.json import Jsonb

from airflow_sync_provider.core.audit import QUALITY_TABLE
from airflow_sync_provider.core.catalog import table_exists
from airflow_sync_provider.core.errors import ConfigurationError, DataError, SyncError, TargetUnavailableError
from airflow_sync_provider.core.load import apply_table_batch
from airflow_sync_provider.core.manifest import Manifest, ManifestColumn, StagedFile
from airflow_sync_provider.core.merge import key_match
from airflow_sync_provider.core.progress import LOG, Logger
from airflow_sync_provider.core.quality.engine import Check, GxEngine
from airflow_sync_provider.core.quality.evaluate import DEFAULT_CHUNK_ROWS, DEFAULT_EXAMPLES, MemorySource, evaluate
from airflow_sync_provider.core.quality.outcomes import QualityError
from airflow_sync_provider.core.quality.store import (
    QUARANTINE_TABLE,
    SCHEMA_META_KEY,
    abandon_unloaded,
    batch_committed,
    ensure_quality_tables,
)
from airflow_sync_provider.core.quality.suite import SuiteLike, check_columns, load_suite, plan_checks
from airflow_sync_provider.core.quality.values import KeyTuple, display, from_jsonable, jsonable, key_of, plain
from airflow_sync_provider.core.spec import SYNCED_AT_COLUMN
from airflow_sync_provider.core.sqltext import bindable, execute
from airflow_sync_provider.core.staging import StagingArea
from airflow_sync_provider.core.state import hold_state_row
from airflow_sync_provider.core.target import idle_autocommit

#: A fix for quarantined rows: their DataFrame in (ArrowDtype columns), the fixed one out.
RowFix = Callable[[pd.DataFrame], pd.DataFrame]


@dataclass(frozen=True)
class ReplayResult:
    """What a replay did: counts, and the keys it skipped or left pending (bounded in :meth:`to_dict`)."""

    sync_id: str
    run_id: str
    manifest_id: str
    pending: int = 0
    replayed: int = 0
    inserted: int = 0
    updated: int = 0
    #: Keys a later sync already updated in the target (their quarantined version is older): not replayed.
    skipped_newer: tuple[dict[str, Any], ...] = ()
    superseded: int = 0
    #: Rows the fix dropped or that still fail the suite: left pending in quarantine.
    still_pending: tuple[dict[str, Any], ...] = ()
    #: Rows whose batch has not committed (yet): not replayable, left as they are.
    awaiting_load: int = 0
    #: Rows whose batch can no longer load, marked ``abandoned`` by this replay.
    abandoned: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sync_id": self.sync_id,
            "run_id": self.run_id,
            "manifest_id": self.manifest_id,
            "pending": self.pending,
            "replayed": self.replayed,
            "inserted": self.inserted,
            "updated": self.updated,
            "skipped_newer": list(self.skipped_newer[:20]),
            "skipped_newer_count": len(self.skipped_newer),
            "superseded": self.superseded,
            "still_pending": list(self.still_pending[:20]),
            "still_pending_count": len(self.still_pending),
            "awaiting_load": self.awaiting_load,
            "abandoned": self.abandoned,
            "seconds": self.seconds,
        }


def _rows_to_table(rows: Sequence[tuple[int, dict[str, Any]]], schema: pa.Schema, sync_id: str) -> pa.Table:
    arrays = []
    for column in schema:
        values = []
        for quarantine_id, row in rows:
            try:
                values.append(from_jsonable(row.get(column.name), column.type))
            except (ValueError, TypeError, decimal.InvalidOperation) as error:
                raise DataError(
                    f"quarantined row {quarantine_id}: value {row.get(column.name)!r} cannot be read back as "
                    f"{column.type}: {error}; fix it in the row column of {QUARANTINE_TABLE}",
                    sync_id=sync_id,
                    column=column.name,
                    rule="replay",
                ) from error
        try:
            arrays.append(pa.array(values, type=column.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as error:
            raise DataError(
                f"quarantined rows cannot be read back as {column.type}: {error}",
                sync_id=sync_id,
                column=column.name,
                rule="replay",
            ) from error
    return pa.Table.from_arrays(arrays, schema=schema.remove_metadata())


def _apply_fix(fix: RowFix, table: pa.Table, schema: pa.Schema, sync_id: str) -> pa.Table:
    """Run the user's fix like a transform (ArrowDtype in, any frame out) and conform the result."""
    frame = table.to_pandas(types_mapper=pd.ArrowDtype)
    try:
        fixed = fix(frame)
    except Exception as error:
        raise SyncError(
            f"fix {getattr(fix, '__name__', fix)!r} failed: {type(error).__name__}: {error}", sync_id=sync_id
        ) from error
    if not isinstance(fixed, pd.DataFrame):
        raise ConfigurationError(f"fix must return a pandas DataFrame, got {type(fixed).__name__}", sync_id=sync_id)
    missing = [n for n in schema.names if n not in fixed.columns]
    if missing:
        raise ConfigurationError(f"fix dropped column(s) {missing}; it must keep every column", sync_id=sync_id)
    try:
        out = pa.Table.from_pandas(fixed[schema.names], preserve_index=False)
        return pa.Table.from_arrays(
            [out.column(n).cast(schema.field(n).type) for n in schema.names], schema=schema.remove_metadata()
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
        raise ConfigurationError(
            f"the fixed rows do not fit the staged column types: {error}", sync_id=sync_id, rule="replay"
        ) from error


def replay_quarantined(
    target_conn: psycopg.Connection[Any],
    sync_id: str,
    *,
    run_id: str,
    fix: RowFix | None = None,
    suite: SuiteLike | None = None,
    severities: Mapping[str, str] | None = None,
    quarantined_in_run: str | None = None,
    target_schema: str = "public",
    state_table: str = "_sync_state",
    staging: StagingArea | None = None,
    logger: Logger | None = None,
) -> ReplayResult:
    """Merge a sync's pending quarantined rows into the target (after fixing them), in one transaction.

    ``run_id`` is the replaying run (written to ``_sync_run_id`` of merged rows and to
    ``replay_run_id``); ``quarantined_in_run`` limits the replay to rows one run quarantined.
    ``fix`` gets the rows as a pandas DataFrame (ArrowDtype columns, like a transform) and returns
    them fixed; rows it drops stay pending.  With ``suite``, rows that still fail a row-level
    ``error`` expectation stay pending too.  Rows can also be fixed in SQL (``UPDATE
    _sync_quarantine SET row = jsonb_set(row, ...)``) before replaying.

    Only rows of batches that committed are replayed: the gate quarantines before the load, and
    a load that fails (or is refused as stale) leaves its batch out of the target.  Rows whose
    batch has not committed yet are left alone (``awaiting_load``); rows whose batch can no longer
    load (the sync committed past the version it was extracted at) are marked ``abandoned``,
    since later runs read those rows again from the source.  The load's ledger row in
    ``_sync_audit`` (written in the merge's transaction) says which batches committed.

    A row is not replayed when the target already holds a version merged after it was quarantined
    (``_sync_synced_at`` newer: a later sync brought the row again) - it is marked
    ``skipped_newer`` and reported - or when a later committed batch quarantined the same key
    again (``superseded``).  The merge is the load's own (:func:`apply_table_batch`) without
    deletes and without touching the sync state: the watermark does not move.
    """
    log = logger or LOG
    started = time.monotonic()
    staging = staging or StagingArea()
    manifest_id = f"replay-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    checks = plan_checks(load_suite(suite), severities) if suite is not None else []
    idle_autocommit(target_conn, step="the quality gate", sync_id=sync_id)
    quarantine = sql.Identifier(target_schema, QUARANTINE_TABLE)
    if not table_exists(target_conn, target_schema, QUARANTINE_TABLE):
        return ReplayResult(sync_id=sync_id, run_id=run_id, manifest_id=manifest_id)
    ensure_quality_tables(target_conn, target_schema)
    staged_dirs: list[str] = []
    pending = replayed = inserted = updated = superseded = awaiting = abandoned = 0
    skipped: list[dict[str, Any]] = []
    still: list[dict[str, Any]] = []
    try:
        with target_conn.transaction():
            hold_state_row(target_conn, target_schema, state_table, sync_id)  # serialize with loads of this sync
            abandoned = abandon_unloaded(target_conn, target_schema, sync_id, state_table, run_id)
            run_filter = sql.SQL(" AND q.run_id = %(run)s") if quarantined_in_run else sql.SQL("")
            params = {"sync": sync_id, "run": quarantined_in_run, "replay": run_id}
            superseded = execute(
                target_conn,
                sql.SQL(
                    "UPDATE {q} q SET replay_status = 'superseded', replay_run_id = %(replay)s, "
                    "replay_note = 'a later run quarantined this key again' "
                    "WHERE q.sync_id = %(sync)s AND q.replay_status IS NULL{run_filter} AND EXISTS ("
                    " SELECT 1 FROM {q} n WHERE n.sync_id = q.sync_id AND n.target_table = q.target_table"
                    " AND n.row_key = q.row_key AND (n.quarantined_at, n.quarantine_id) > "
                    "(q.quarantined_at, q.quarantine_id) AND {n_committed})"
                ).format(
                    q=quarantine, run_filter=run_filter, n_committed=batch_committed(target_conn, target_schema, "n")
                ),
                params,
            ).rowcount
            rows = execute(
                target_conn,
                sql.SQL(
                    "SELECT q.quarantine_id, q.target_table, q.row_key, q.row, q.batch_schema, {committed} "
                    "FROM {q} q WHERE q.sync_id = %(sync)s AND q.replay_status IS NULL{run_filter} "
                    "ORDER BY q.quarantine_id FOR UPDATE"
                ).format(
                    q=quarantine, run_filter=run_filter, committed=batch_committed(target_conn, target_schema, "q")
                ),
                params,
            ).fetchall()
            selected = [r[:5] for r in rows if r[5]]
            awaiting = len(rows) - len(selected)
            if awaiting:
                log.info("sync %s: %d quarantined row(s) wait for their batch to load; not replayed", sync_id, awaiting)
            pending = len(selected)
            groups: dict[tuple[str, bytes], list[tuple[int, dict[str, Any], dict[str, Any]]]] = {}
            for quarantine_id, target_table, row_key, row, blob in selected:
                groups.setdefault((target_table, bytes(blob)), []).append((quarantine_id, row_key, row))
            for (target_table, blob), members in groups.items():
                outcome = _replay_group(
                    target_conn,
                    sync_id,
                    run_id,
                    manifest_id,
                    target_table,
                    blob,
                    members,
                    fix=fix,
                    checks=checks,
                    staging=staging,
                    log=log,
                    target_schema=target_schema,
                )
                staged_dirs.extend(outcome["staged_dirs"])
                replayed += outcome["replayed"]
                inserted += outcome["inserted"]
                updated += outcome["updated"]
                skipped.extend(outcome["skipped"])
                still.extend(outcome["still"])
            result = ReplayResult(
                sync_id=sync_id,
                run_id=run_id,
                manifest_id=manifest_id,
                pending=pending,
                replayed=replayed,
                inserted=inserted,
                updated=updated,
                skipped_newer=tuple(skipped),
                superseded=superseded,
                still_pending=tuple(still),
                awaiting_load=awaiting,
                abandoned=abandoned,
                seconds=round(time.monotonic() - started, 3),
            )
            execute(
                target_conn,
                sql.SQL(
                    "INSERT INTO {} (sync_id, run_id, manifest_id, target_table, success, rows, quarantined_rows, "
                    "summary, details) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                ).format(sql.Identifier(target_schema, QUALITY_TABLE)),
                (
                    sync_id,
                    run_id,
                    manifest_id,
                    ", ".join(sorted({g[0] for g in groups})) or None,
                    True,
                    replayed,
                    len(still),
                    Jsonb(
                        {
                            "kind": "replay",
                            "pending": pending,
                            "replayed": replayed,
                            "inserted": inserted,
                            "updated": updated,
                            "skipped_newer": len(skipped),
                            "superseded": superseded,
                            "still_pending": len(still),
                            "awaiting_load": awaiting,
                            "abandoned": abandoned,
                        }
                    ),
                    Jsonb({"kind": "replay", **result.to_dict()}),
                ),
            )
    except psycopg.OperationalError as error:
        raise TargetUnavailableError(f"replay failed, nothing changed: {error}", sync_id=sync_id) from error
    finally:
        for uri in staged_dirs:
            staging.discard(uri, log)
    log.info(
        "sync %s: replayed %d of %d quarantined row(s) (%d inserted, %d updated); %d skipped (newer version in "
        "the target), %d superseded, %d left pending, %d waiting for their batch to load, %d abandoned (their "
        "batch never loaded)",
        sync_id,
        replayed,
        pending + superseded,
        inserted,
        updated,
        len(skipped),
        superseded,
        len(still),
        awaiting,
        abandoned,
    )
    return result


def _replay_group(
    conn: psycopg.Connection[Any],
    sync_id: str,
    run_id: str,
    manifest_id: str,
    target_table: str,
    blob: bytes,
    members: Sequence[tuple[int, dict[str, Any], dict[str, Any]]],
    *,
    fix: RowFix | None,
    checks: Sequence[Check],
    staging: StagingArea,
    log: Logger,
    target_schema: str,
) -> dict[str, Any]:
    schema = pyarrow.ipc.read_schema(pa.py_buffer(blob))
    batch = json.loads((schema.metadata or {})[SCHEMA_META_KEY])
    primary_key = list(batch["primary_key"])
    quarantine = sql.Identifier(target_schema, QUARANTINE_TABLE)
    target = sql.Identifier(batch["target_schema"], batch["target_table"])
    ids = [m[0] for m in members]
    done: dict[str, Any] = {"staged_dirs": [], "replayed": 0, "inserted": 0, "updated": 0, "skipped": [], "still": []}

    # 1. Rows a later sync already brought again: the target's version is newer, keep it.
    newer: dict[int, Any] = {}
    if table_exists(conn, batch["target_schema"], batch["target_table"]):
        match = key_match("t", "r", primary_key)
        newer = dict(
            execute(
                conn,
                sql.SQL(
                    "SELECT q.quarantine_id, t.{synced} FROM {q} q "
                    "CROSS JOIN LATERAL jsonb_populate_record(NULL::{t}, q.row_key) r "
                    "JOIN {t} t ON {match} WHERE q.quarantine_id = ANY(%s) AND t.{synced} > q.quarantined_at "
                    "FOR UPDATE OF t"
                ).format(q=quarantine, t=target, match=match, synced=sql.Identifier(SYNCED_AT_COLUMN)),
                (ids,),
            ).fetchall()
        )
    if newer:
        execute(
            conn,
            sql.SQL(
                "UPDATE {} SET replay_status = 'skipped_newer', replay_run_id = %s, "
                "replay_note = 'the target holds a version synced after the quarantine' WHERE quarantine_id = ANY(%s)"
            ).format(quarantine),
            (run_id, list(newer)),
        )
        done["skipped"] = [
            {"quarantine_id": qid, "key": key, "target_synced_at": newer[qid].isoformat()}
            for qid, key, _ in members
            if qid in newer
        ]
        log.warning(
            "sync %s: %d quarantined row(s) not replayed: a later sync already merged a newer version: %s",
            sync_id,
            len(newer),
            ", ".join(display(s["key"]) for s in done["skipped"][:5]),
        )
    candidates = [(qid, row) for qid, _, row in members if qid not in newer]
    if not candidates:
        return done

    # 2. Rebuild the staged rows, fix them, re-validate them.
    table = _rows_to_table(candidates, schema, sync_id)
    by_key = {key_of(row, primary_key): qid for qid, row in candidates}
    if fix is not None:
        table = _apply_fix(fix, table, schema, sync_id)
    fixed_keys = [
        tuple(plain(v) for v in key) for key in zip(*(table.column(k).to_pylist() for k in primary_key), strict=True)
    ]
    foreign = [k for k in fixed_keys if k not in by_key]
    if foreign:
        raise ConfigurationError(
            f"fix changed or added primary keys (e.g. {foreign[0]!r}); it may fix values, not keys", sync_id=sync_id
        )
    failing: dict[KeyTuple, list[str]] = {}
    row_checks = [c for c in checks if c.row_level]
    if checks and len(row_checks) < len(checks):
        log.info("sync %s: replay re-validates row-level expectations only", sync_id)
    if row_checks and table.num_rows:
        check_columns(row_checks, table.schema.names, primary_key)
        collect = {c.index for c in row_checks if c.severity == "error"}
        outcomes, keys = evaluate(
            GxEngine(),
            row_checks,
            MemorySource(table),
            primary_key,
            collect=collect,
            chunk_rows=DEFAULT_CHUNK_ROWS,
            examples=DEFAULT_EXAMPLES,
            log=log,
        )
        for outcome in outcomes:
            if outcome.error and outcome.severity == "error":
                raise QualityError(
                    f"replay: {outcome.describe(table.num_rows)}",
                    sync_id=sync_id,
                    table=target_table,
                    rule=outcome.type,
                )
            if outcome.unexpected_count and outcome.severity == "warn":
                log.warning("sync %s: replay warning [rule=%s] %s", sync_id, outcome.type, outcome.describe(0))
            for key in keys.get(outcome.index, {}):
                failing.setdefault(key, []).append(outcome.label)
    keep = [k not in failing for k in fixed_keys]
    dropped = set(by_key) - set(fixed_keys)
    done["still"] = [
        {"quarantine_id": by_key[k], "key": dict(zip(primary_key, map(jsonable, k), strict=True)), "reason": reason}
        for k, reason in [
            *((k, "dropped by the fix") for k in dropped),
            *((k, "; ".join(r)) for k, r in failing.items()),
        ]
    ]
    table = table.filter(pa.array(keep, type=pa.bool_()))
    if not table.num_rows:
        return done

    # 3. Merge with the load's own machinery (no deletes, no state change), mark the rows replayed.
    staging_dir = staging.batch_uri(sync_id, f"{manifest_id}-{uuid.uuid4().hex[:6]}")
    uri = f"{staging_dir}/part-00000.parquet"
    writer = staging.open_writer(uri, table.schema)
    try:
        writer.write_table(table)
    finally:
        writer.close()
    done["staged_dirs"].append(staging_dir)
    manifest = Manifest(
        sync_id=sync_id,
        run_id=run_id,
        manifest_id=manifest_id,
        mode="incremental",
        source_table=batch.get("source_table") or batch["target_table"],
        target_schema=batch["target_schema"],
        target_table=batch["target_table"],
        primary_key=tuple(primary_key),
        cursor_column=None,
        columns=tuple(ManifestColumn(**c) for c in batch["columns"]),
        files=(StagedFile(uri=uri, rows=table.num_rows),),
        rows=table.num_rows,
        base_version=0,
        watermark_low=None,
        watermark_high=None,
        staging_dir=staging_dir,
        delete_mode=batch.get("delete_mode", "hard"),
        detect_deletes=False,
    )
    applied = apply_table_batch(conn, manifest, run_id, log)
    replayed_rows = table.to_pylist()
    with conn.cursor() as cursor:
        cursor.executemany(
            bindable(
                sql.SQL(
                    "UPDATE {} SET replay_status = 'replayed', replayed_at = now(), replay_run_id = %s, "
                    "replayed_row = %s WHERE quarantine_id = %s"
                ).format(quarantine),
                cursor,
            ),
            [
                (run_id, Jsonb({k: jsonable(v) for k, v in row.items()}), by_key[key_of(row, primary_key)])
                for row in replayed_rows
            ],
        )
    done.update(replayed=len(replayed_rows), inserted=applied.inserted, updated=applied.updated)
    return done


__all__ = ["ReplayResult", "RowFix", "replay_quarantined"]
