"""The sync state table in the target database: the single source of truth for where a sync is.

One row per sync.  ``version`` increases by one with every committed load; a manifest records the
version it was extracted against, and the load applies it only if the state is still at that
version.  That makes retries, stale manifests and concurrent runs safe without comparing watermark
values (which would need the source's collation to order text keys).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg import sql

from airflow_sync_provider.core.catalog import ddl_lock, table_exists
from airflow_sync_provider.core.sqltext import execute

STATE_COLUMNS = (
    "sync_id",
    "version",
    "mode",
    "source_table",
    "target_table",
    "watermark",
    "last_manifest_id",
    "last_run_id",
    "rows_inserted",
    "rows_updated",
    "rows_deleted",
    "extracted_at",
    "committed_at",
)


@dataclass(frozen=True)
class SyncState:
    sync_id: str
    version: int = 0
    mode: str | None = None
    source_table: str | None = None
    target_table: str | None = None
    #: ``[cursor, *key]`` for table syncs; a dict with the LSN position for CDC syncs.
    watermark: list[Any] | dict[str, Any] | None = None
    last_manifest_id: str | None = None
    last_run_id: str | None = None
    rows_inserted: int = 0
    rows_updated: int = 0
    rows_deleted: int = 0
    extracted_at: dt.datetime | None = None
    committed_at: dt.datetime | None = None


def ensure_state_table(conn: psycopg.Connection[Any], schema: str, table: str) -> None:
    """Create the schema and state table if missing (idempotent, safe under concurrency)."""
    with conn.transaction():
        # Serialise concurrent first runs: CREATE ... IF NOT EXISTS can still race on the catalog.
        ddl_lock(conn)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {} (
                    sync_id text PRIMARY KEY,
                    version bigint NOT NULL DEFAULT 0,
                    mode text,
                    source_table text,
                    target_table text,
                    watermark jsonb,
                    last_manifest_id text,
                    last_run_id text,
                    rows_inserted bigint NOT NULL DEFAULT 0,
                    rows_updated bigint NOT NULL DEFAULT 0,
                    rows_deleted bigint NOT NULL DEFAULT 0,
                    extracted_at timestamptz,
                    committed_at timestamptz,
                    source_schema jsonb
                )"""
            ).format(sql.Identifier(schema, table))
        )
        # State tables created before the schema-drift record: add its column (catalog check first,
        # so the usual case takes no ACCESS EXCLUSIVE lock on a table concurrent loads are using).
        present = conn.execute(
            "SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND a.attname = 'source_schema' AND NOT a.attisdropped",
            (schema, table),
        ).fetchone()
        if present is None:
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS source_schema jsonb").format(
                    sql.Identifier(schema, table)
                )
            )


def _row_to_state(row: tuple[Any, ...]) -> SyncState:
    values = dict(zip(STATE_COLUMNS, row, strict=True))
    if isinstance(values["watermark"], str):
        values["watermark"] = json.loads(values["watermark"])
    return SyncState(**values)


def _select_state(schema: str, table: str, lock: bool) -> sql.Composed:
    query = sql.SQL("SELECT {} FROM {} WHERE sync_id = %s").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in STATE_COLUMNS), sql.Identifier(schema, table)
    )
    return query + sql.SQL(" FOR UPDATE") if lock else query


class StateOwner(Protocol):
    """What names a sync's state row: a :class:`~.spec.SyncSpec` or a :class:`~.cdc.spec.CdcSpec`."""

    @property
    def sync_id(self) -> str: ...

    @property
    def target_schema(self) -> str: ...

    @property
    def state_table(self) -> str: ...


def read_state(conn: psycopg.Connection[Any], schema: str, table: str, sync_id: str) -> SyncState | None:
    """Committed state of a sync, or None if it never ran (or the state table does not exist)."""
    if not table_exists(conn, schema, table):
        return None
    row = execute(conn, _select_state(schema, table, lock=False), (sync_id,)).fetchone()
    return _row_to_state(row) if row else None


def committed_state(conn: psycopg.Connection[Any], spec: StateOwner) -> SyncState | None:
    """The state of ``spec``'s sync as committed now.

    Ends any transaction the connection has open (rolled back) and leaves it in autocommit: a
    read must not leave a transaction open.
    """
    if not conn.autocommit:
        conn.rollback()
        conn.autocommit = True
    return read_state(conn, spec.target_schema, spec.state_table, spec.sync_id)


def hold_state_row(conn: psycopg.Connection[Any], schema: str, table: str, sync_id: str) -> None:
    """Inside a transaction: lock the sync's state row (if there is one) without writing it.

    A step that changes the target outside a load (a repair, a replay of quarantined rows)
    serialises this way with the loads of the sync, which lock the same row.
    """
    if table_exists(conn, schema, table):
        execute(
            conn,
            sql.SQL("SELECT 1 FROM {} WHERE sync_id = %s FOR UPDATE").format(sql.Identifier(schema, table)),
            (sync_id,),
        )


def lock_state(conn: psycopg.Connection[Any], schema: str, table: str, sync_id: str) -> SyncState:
    """Inside the load transaction: create the state row if needed and lock it.

    The row lock serialises concurrent loads of one sync; the second waits for the first to commit
    and then sees its new version (and turns its own manifest into a logged no-op).
    """
    execute(
        conn,
        sql.SQL("INSERT INTO {} (sync_id) VALUES (%s) ON CONFLICT (sync_id) DO NOTHING").format(
            sql.Identifier(schema, table)
        ),
        (sync_id,),
    )
    row = execute(conn, _select_state(schema, table, lock=True), (sync_id,)).fetchone()
    assert row is not None
    return _row_to_state(row)


def write_state(conn: psycopg.Connection[Any], schema: str, table: str, state: SyncState) -> None:
    """Write the new state (inside the same transaction as the data)."""
    columns = [c for c in STATE_COLUMNS if c not in ("sync_id", "committed_at")]
    assignments = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in columns)
    values = [getattr(state, c) for c in columns]
    values[columns.index("watermark")] = None if state.watermark is None else json.dumps(state.watermark)
    execute(
        conn,
        sql.SQL("UPDATE {} SET {}, committed_at = now() WHERE sync_id = %s").format(
            sql.Identifier(schema, table), assignments
        ),
        [*values, state.sync_id],
    )


@dataclass(frozen=True)
class SourceSchema:
    """The source columns the last committed load of a target table synced (see :mod:`.drift`).

    ``kind`` says who described them: ``"table"`` (the extraction's reflected column plan, also used
    by CDC snapshots) or ``"cdc"`` (pgoutput relation messages).  The two name some types
    differently (a type SQLAlchemy does not know is planned as text; pgoutput names it), so types
    are only compared between descriptions of the same kind.
    """

    kind: str
    columns: tuple[tuple[str, str], ...]


def read_source_schema(
    conn: psycopg.Connection[Any], schema: str, table: str, sync_id: str, target_table: str
) -> SourceSchema | None:
    """The recorded source columns of ``target_table`` in the sync's state row, or None."""
    if not table_exists(conn, schema, table):
        return None
    row = execute(
        conn,
        sql.SQL("SELECT to_jsonb(s) -> 'source_schema' -> %s FROM {} s WHERE sync_id = %s").format(
            sql.Identifier(schema, table)
        ),
        (target_table, sync_id),
    ).fetchone()
    if row is None or row[0] is None:
        return None
    value = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    return SourceSchema(str(value["kind"]), tuple((str(n), str(t)) for n, t in value["columns"]))


def write_source_schema(
    conn: psycopg.Connection[Any], schema: str, table: str, sync_id: str, target_table: str, record: SourceSchema
) -> None:
    """Record the synced source columns of ``target_table`` (inside the load's transaction)."""
    value = {"kind": record.kind, "columns": [list(c) for c in record.columns]}
    execute(
        conn,
        sql.SQL(
            "UPDATE {} SET source_schema = jsonb_set(coalesce(source_schema, '{{}}'::jsonb), ARRAY[%s], %s::jsonb) "
            "WHERE sync_id = %s"
        ).format(sql.Identifier(schema, table)),
        (target_table, json.dumps(value), sync_id),
    )
