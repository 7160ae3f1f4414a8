"""What the target database's catalog says about a table, asked by name, and the lock around DDL.

Names are passed as values (``n.nspname = %s``), never quoted into the text, so a schema or
table may hold any character.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql


def ddl_lock(conn: psycopg.Connection[Any]) -> None:
    """Inside a transaction: serialise the engine's DDL (``CREATE ... IF NOT EXISTS`` can still race on
    the catalog when two first runs create the same schema or table)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('airflow_sync_provider:ddl'))")


def table_exists(conn: psycopg.Connection[Any], schema: str, table: str) -> bool:
    """Whether ``schema.table`` exists (names as they are, no quoting needed)."""
    row = conn.execute(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, table),
    ).fetchone()
    return row is not None


def ensure_table(conn: psycopg.Connection[Any], schema: str, table: str, columns: str) -> None:
    """Create ``schema`` and the engine's own table ``schema.table`` unless it exists (idempotent;
    outside a transaction: it opens its own, under :func:`ddl_lock`).

    ``columns``: the engine's constant column definitions (never user input), e.g.
    ``"sync_id text NOT NULL, ..."``; the names are quoted here.
    """
    if table_exists(conn, schema, table):
        return
    with conn.transaction():
        ddl_lock(conn)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(sql.Identifier(schema, table), sql.SQL(columns))
        )


def column_types(conn: psycopg.Connection[Any], schema: str, table: str) -> dict[str, str] | None:
    """``{column: format_type}`` of ``schema.table`` in column order, or None when it does not exist."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    return {r[0]: r[1] for r in rows} or None


def unique_keys(conn: psycopg.Connection[Any], schema: str, table: str) -> list[set[str]]:
    """The column sets of the table's plain unique indexes (no predicate, no expression)."""
    rows = conn.execute(
        "SELECT array_agg(a.attname::text) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey) "
        "WHERE n.nspname = %s AND c.relname = %s AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL "
        "GROUP BY i.indexrelid",
        (schema, table),
    ).fetchall()
    return [set(r[0]) for r in rows]


__all__ = ["column_types", "ddl_lock", "ensure_table", "table_exists", "unique_keys"]
