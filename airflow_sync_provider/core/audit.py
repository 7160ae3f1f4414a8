"""The sync audit ledger: one append-only row per load (applied, stale or already applied).

Written inside the load's transaction, so a ledger row exists exactly when its data committed (and
for the no-ops the load decided on).  A trigger refuses UPDATE and DELETE: the ledger is evidence,
not state.  Quality-gate results (``_sync_quality_results``) and reconciliations
(``_sync_reconciliations``) are appended to tables of their own by the steps that produce them;
:func:`read_ledger` joins all three per run, so runs that failed before loading show too.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from airflow_sync_provider.core.catalog import ddl_lock, table_exists
from airflow_sync_provider.core.sqltext import bindable, insert_row

AUDIT_TABLE = "_sync_audit"
QUALITY_TABLE = "_sync_quality_results"
RECONCILE_TABLE = "_sync_reconciliations"

_AUDIT_COLUMNS = (
    "entry_id bigserial PRIMARY KEY, "
    "recorded_at timestamptz NOT NULL DEFAULT now(), "
    "sync_id text NOT NULL, "
    "run_id text NOT NULL, "
    "manifest_id text NOT NULL, "
    "mode text NOT NULL, "
    "status text NOT NULL, "
    "source_table text, "
    "target_table text, "
    "range_low jsonb, "
    "range_high jsonb, "
    "rows_staged bigint NOT NULL, "
    "inserted bigint NOT NULL, "
    "updated bigint NOT NULL, "
    "deleted bigint NOT NULL, "
    "state_version bigint NOT NULL, "
    "batch_checksum text, "
    "extract_seconds double precision, "
    "load_seconds double precision, "
    "details jsonb, "
    "recorded_by text NOT NULL DEFAULT current_user"
)


@dataclass(frozen=True)
class AuditEntry:
    sync_id: str
    run_id: str
    manifest_id: str
    mode: str
    status: str
    source_table: str
    target_table: str
    range_low: Any = None
    range_high: Any = None
    rows_staged: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    state_version: int = 0
    batch_checksum: str | None = None
    extract_seconds: float = 0.0
    load_seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def ensure_audit_table(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create the ledger and its append-only guard (idempotent; call outside the load transaction)."""
    with conn.transaction():
        ddl_lock(conn)
        create_evidence_table(conn, schema, AUDIT_TABLE, _AUDIT_COLUMNS, "the sync audit ledger is")


def create_evidence_table(conn: psycopg.Connection[Any], schema: str, table: str, columns: str, what: str) -> None:
    """Create the append-only table ``schema.table`` unless it exists (inside the caller's transaction,
    which holds :func:`~.catalog.ddl_lock`).

    ``columns``: the engine's own column definitions; the table gets an index on ``(sync_id,
    run_id)`` and a trigger that refuses UPDATE, DELETE and TRUNCATE (its message names ``what``).
    """
    if table_exists(conn, schema, table):
        return
    ident = sql.Identifier(schema, table)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} ({})").format(ident, sql.SQL(columns)))
    conn.execute(sql.SQL("CREATE INDEX ON {} (sync_id, run_id)").format(ident))
    _make_append_only(conn, schema, table, what)


def _make_append_only(conn: psycopg.Connection[Any], schema: str, table: str, what: str) -> None:
    """A statement trigger that refuses UPDATE, DELETE and TRUNCATE on an evidence table."""
    guard = sql.Identifier(schema, f"{table}_append_only")
    conn.execute(
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION '{} append-only (% refused)', TG_OP; END $$"
        ).format(guard, sql.SQL(what.replace("'", "")))
    )
    conn.execute(
        sql.SQL(
            "CREATE TRIGGER append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {} "
            "FOR EACH STATEMENT EXECUTE FUNCTION {}()"
        ).format(sql.Identifier(schema, table), guard)
    )


def append_entry(conn: psycopg.Connection[Any], schema: str, entry: AuditEntry) -> None:
    """Append one ledger row (inside the caller's transaction)."""
    values = {
        **entry.__dict__,
        "range_low": json.dumps(entry.range_low),
        "range_high": json.dumps(entry.range_high),
        "details": json.dumps(entry.details, default=str),
    }
    insert_row(conn, sql.Identifier(schema, AUDIT_TABLE), values)


def stage_checksum(conn: psycopg.Connection[Any], stage: sql.Composable, columns: list[str]) -> str:
    """Order-independent checksum of a staged batch: row count and the sum of 64-bit row hashes."""
    row = conn.execute(
        sql.SQL("SELECT count(*), coalesce(sum(hashtextextended(({})::text, 0)::numeric), 0) FROM {} s").format(
            sql.SQL(", ").join(sql.Identifier("s", c) for c in columns), stage
        )
    ).fetchone()
    assert row is not None
    return f"{int(row[0])}:{int(row[1]) % 2**64:016x}"


def read_ledger(
    conn: psycopg.Connection[Any], schema: str = "public", sync_id: str | None = None
) -> list[dict[str, Any]]:
    """One dict per (sync, run): its loads, quality results and reconciliations, oldest first."""
    parts = []
    for table in (AUDIT_TABLE, QUALITY_TABLE, RECONCILE_TABLE):
        if table_exists(conn, schema, table):
            parts.append(table)
    if not parts:
        return []
    runs = sql.SQL(" UNION ").join(
        sql.SQL("SELECT sync_id, run_id FROM {}").format(sql.Identifier(schema, t)) for t in parts
    )

    def aggregate(table: str, order: str) -> sql.Composable:
        if table not in parts:
            return sql.SQL("'[]'::jsonb")
        return sql.SQL(
            "(SELECT coalesce(jsonb_agg(to_jsonb(x) ORDER BY x.{order}), '[]') FROM {t} x "
            "WHERE x.sync_id = r.sync_id AND x.run_id = r.run_id)"
        ).format(t=sql.Identifier(schema, table), order=sql.Identifier(order))

    query = sql.SQL(
        "SELECT r.sync_id, r.run_id, {loads} AS loads, {quality} AS quality, {recon} AS reconciliations "
        "FROM ({runs}) r WHERE %(sync)s::text IS NULL OR r.sync_id = %(sync)s"
    ).format(
        loads=aggregate(AUDIT_TABLE, "entry_id"),
        quality=aggregate(QUALITY_TABLE, "validated_at"),
        recon=aggregate(RECONCILE_TABLE, "reconciled_at"),
        runs=runs,
    )
    with conn.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(bindable(query, cursor), {"sync": sync_id}).fetchall()

    def first_time(row: dict[str, Any]) -> str:
        times = [
            e.get("recorded_at") or e.get("validated_at") or e.get("reconciled_at") or ""
            for e in (*row["loads"], *row["quality"], *row["reconciliations"])
        ]
        return min((str(t) for t in times if t), default=dt.datetime.max.isoformat())

    return sorted(rows, key=first_time)
