"""``_sync_run_context``: which Airflow DAG and task ran a sync, recorded next to its evidence.

The ledger names runs by Airflow's ``run_id``, which is unique only within one DAG (every hourly DAG
has a ``scheduled__2026-01-01T01:00:00+00:00``).  The status view filters syncs by the DAGs a user
may read, so the operators record ``(sync_id, run_id, dag_id, task_id)`` here when they start,
with the source connection and CDC slot the status view needs to read slot lag.  One row per
(sync, run, dag, task); a retry records nothing new.  Not evidence of data: a plain table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from airflow_sync_provider.core.catalog import ensure_table, table_exists
from airflow_sync_provider.core.sqltext import execute

CONTEXT_TABLE = "_sync_run_context"


@dataclass(frozen=True)
class RunContext:
    """Who ran one run of a sync."""

    sync_id: str
    run_id: str
    dag_id: str
    task_id: str
    source_conn_id: str | None = None
    slot_name: str | None = None


_CONTEXT_COLUMNS = (
    "sync_id text NOT NULL, "
    "run_id text NOT NULL, "
    "dag_id text NOT NULL, "
    "task_id text NOT NULL, "
    "source_conn_id text, "
    "slot_name text, "
    "recorded_at timestamptz NOT NULL DEFAULT now(), "
    "PRIMARY KEY (sync_id, run_id, dag_id, task_id)"
)


def ensure_context_table(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create ``_sync_run_context`` if missing (idempotent; outside a transaction)."""
    ensure_table(conn, schema, CONTEXT_TABLE, _CONTEXT_COLUMNS)


def record_run_context(conn: psycopg.Connection[Any], schema: str, context: RunContext) -> None:
    """Record who runs ``context.sync_id`` now (creates the table on first use; autocommit)."""
    ensure_context_table(conn, schema)
    execute(
        conn,
        sql.SQL(
            "INSERT INTO {} (sync_id, run_id, dag_id, task_id, source_conn_id, slot_name) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
        ).format(sql.Identifier(schema, CONTEXT_TABLE)),
        (
            context.sync_id,
            context.run_id,
            context.dag_id,
            context.task_id,
            context.source_conn_id,
            context.slot_name,
        ),
    )


def read_run_contexts(conn: psycopg.Connection[Any], schema: str, sync_id: str | None = None) -> list[RunContext]:
    """Every recorded run context (of ``sync_id``, or of all syncs), oldest first."""
    if not table_exists(conn, schema, CONTEXT_TABLE):
        return []
    rows = execute(
        conn,
        sql.SQL(
            "SELECT sync_id, run_id, dag_id, task_id, source_conn_id, slot_name FROM {} "
            "WHERE %(sync)s::text IS NULL OR sync_id = %(sync)s ORDER BY recorded_at, sync_id"
        ).format(sql.Identifier(schema, CONTEXT_TABLE)),
        {"sync": sync_id},
    ).fetchall()
    return [RunContext(*row) for row in rows]


def dag_of_run(conn: psycopg.Connection[Any], schema: str, sync_id: str, run_id: str) -> str | None:
    """The DAG that recorded run ``run_id`` of ``sync_id`` (None if none did, or several did)."""
    if not table_exists(conn, schema, CONTEXT_TABLE):
        return None
    rows = execute(
        conn,
        sql.SQL("SELECT DISTINCT dag_id FROM {} WHERE sync_id = %s AND run_id = %s").format(
            sql.Identifier(schema, CONTEXT_TABLE)
        ),
        (sync_id, run_id),
    ).fetchall()
    return rows[0][0] if len(rows) == 1 else None


@dataclass(frozen=True)
class SyncOwner:
    """What the run contexts of one sync say: its DAGs, and its newest source connection and slot."""

    sync_id: str
    dag_ids: tuple[str, ...]
    source_conn_id: str | None
    slot_name: str | None


def read_sync_owners(conn: psycopg.Connection[Any], schema: str) -> dict[str, SyncOwner]:
    """Per sync: the DAGs that ran it and the newest recorded source connection and slot."""
    if not table_exists(conn, schema, CONTEXT_TABLE):
        return {}
    rows = execute(
        conn,
        sql.SQL(
            "SELECT sync_id, array_agg(DISTINCT dag_id ORDER BY dag_id), "
            "(array_agg(source_conn_id ORDER BY recorded_at DESC) FILTER (WHERE source_conn_id IS NOT NULL))[1], "
            "(array_agg(slot_name ORDER BY recorded_at DESC) FILTER (WHERE slot_name IS NOT NULL))[1] "
            "FROM {} GROUP BY sync_id"
        ).format(sql.Identifier(schema, CONTEXT_TABLE)),
    ).fetchall()
    return {r[0]: SyncOwner(r[0], tuple(r[1]), r[2], r[3]) for r in rows}


__all__ = [
    "CONTEXT_TABLE",
    "RunContext",
    "SyncOwner",
    "dag_of_run",
    "ensure_context_table",
    "read_run_contexts",
    "read_sync_owners",
    "record_run_context",
]
