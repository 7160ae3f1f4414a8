"""SCD type 2 history of a synced table, kept in the same transaction as the merge.

A sync with ``history_table`` keeps two tables in the target: the current table (the usual merge)
and a history table holding every version of every row with its validity interval:

* ``_valid_from`` / ``_valid_to``: the load transaction's time when the version became / stopped
  being current (``_valid_to`` is NULL while it is current);
* ``_is_current``: true for exactly one version per key while the key exists (a partial unique
  index enforces it, so a bug can never leave two current versions);
* ``_sync_run_id`` / ``_sync_closed_run_id``: the runs that opened and closed the version;
* ``_sync_deleted``: the version was closed because the row was deleted at the source.

It is written from the same staged batch and in the same transaction as the merge and the
watermark, so the history has a version for a change exactly when the target has the change: a
retried or stale run adds nothing, and a rolled-back one leaves no trace.  Versions are compared
on the synced columns as the target stores them (after transforms and masking), so a change only
in a masked-away column does not open a version.
"""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg
from psycopg import sql

from airflow_sync_provider.core.errors import SchemaError
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.merge import key_match
from airflow_sync_provider.core.progress import LOG
from airflow_sync_provider.core.schema import validate_pg_type
from airflow_sync_provider.core.spec import DELETED_AT_COLUMN
from airflow_sync_provider.core.sqltext import execute
from airflow_sync_provider.core.target import TargetTable, comparable, target_table

VALID_FROM = "_valid_from"
VALID_TO = "_valid_to"
IS_CURRENT = "_is_current"
OPENED_BY = "_sync_run_id"
CLOSED_BY = "_sync_closed_run_id"
DELETED = "_sync_deleted"

HISTORY_COLUMNS: tuple[tuple[str, str], ...] = (
    (VALID_FROM, "TIMESTAMP WITH TIME ZONE NOT NULL"),
    (VALID_TO, "TIMESTAMP WITH TIME ZONE"),
    (IS_CURRENT, "BOOLEAN NOT NULL"),
    (OPENED_BY, "TEXT"),
    (CLOSED_BY, "TEXT"),
    (DELETED, "BOOLEAN NOT NULL DEFAULT false"),
)


def ensure_history_table(conn: psycopg.Connection[Any], manifest: Manifest) -> TargetTable:
    """Create the history table (from the manifest's columns) if missing, or check it has them.

    Returns it as a :class:`~.target.TargetTable` (its column types decide how values compare).
    """
    assert manifest.history_table
    schema, name = manifest.target_schema, manifest.history_table
    ident = sql.Identifier(schema, name)
    table = target_table(conn, schema, name)
    existing = table.column_types
    if existing:
        needed = [c.name for c in manifest.columns] + [c for c, _ in HISTORY_COLUMNS]
        missing = [c for c in needed if c not in existing]
        if missing:
            raise SchemaError(
                f"the history table lacks column(s) {missing}; add them (or rename the table so a new one is created)",
                sync_id=manifest.sync_id,
                table=f"{schema}.{name}",
                column=missing,
                rule="scd2 history",
            )
        return table
    keys = sql.SQL(", ").join(map(sql.Identifier, manifest.primary_key))
    definitions = [
        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(validate_pg_type(c.pg_type))) for c in manifest.columns
    ]
    definitions += [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in HISTORY_COLUMNS]
    definitions.append(sql.SQL("PRIMARY KEY ({}, {})").format(keys, sql.Identifier(VALID_FROM)))
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} ({})").format(ident, sql.SQL(", ").join(definitions)))
    conn.execute(
        sql.SQL("CREATE UNIQUE INDEX {} ON {} ({}) WHERE {}").format(
            sql.Identifier(_index_name(name)), ident, keys, sql.Identifier(IS_CURRENT)
        )
    )
    LOG.info("sync %s: created SCD2 history table %s.%s", manifest.sync_id, schema, name)
    return target_table(conn, schema, name)


def _index_name(table: str) -> str:
    """The partial unique index's name: unique per table, at most 63 bytes (PostgreSQL would cut a
    longer one, suffix included, so two long names sharing a prefix would collide)."""
    suffix = f"_{hashlib.sha256(table.encode()).hexdigest()[:8]}_one_current"
    return table.encode()[: 63 - len(suffix)].decode(errors="ignore") + suffix


def record_history(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    stage: sql.Identifier,
    run_id: str,
    where: sql.Composable | None = None,
) -> tuple[int, int]:
    """Inside the load transaction: close changed current versions and open new ones from ``stage``.

    ``where`` filters the stage rows (alias ``s``) like the merge's.  Returns (opened, closed).
    These statements run with parameters, so they go through :func:`~.sqltext.execute` (a ``%`` in
    any name must not read as a placeholder).
    """
    table = ensure_history_table(conn, manifest)
    history = sql.Identifier(manifest.target_schema, manifest.history_table or "")
    keys = list(manifest.primary_key)
    columns = [c.name for c in manifest.columns]
    values = [c for c in columns if c not in keys]
    stage_filter = sql.SQL(" AND ({})").format(where) if where is not None else sql.SQL("")
    differs: sql.Composable = sql.SQL("false")
    if values:
        differs = sql.SQL("({}) IS DISTINCT FROM ({})").format(
            sql.SQL(", ").join(comparable("h", c, table) for c in values),
            sql.SQL(", ").join(comparable("s", c, table) for c in values),
        )
    closed = _close_versions(
        conn,
        history,
        run_id,
        sql.SQL("FROM {} s WHERE {} AND h.{}{} AND {}").format(
            stage, key_match("h", "s", keys), sql.Identifier(IS_CURRENT), stage_filter, differs
        ),
    )
    opened = execute(
        conn,
        sql.SQL(
            "INSERT INTO {history} ({columns}, {valid_from}, {current}, {opened_by}) "
            "SELECT {selected}, now(), true, %(run_id)s FROM {stage} s "
            "WHERE NOT EXISTS (SELECT 1 FROM {history} h WHERE {match} AND h.{current}){stage_filter}"
        ).format(
            history=history,
            columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
            valid_from=sql.Identifier(VALID_FROM),
            current=sql.Identifier(IS_CURRENT),
            opened_by=sql.Identifier(OPENED_BY),
            selected=sql.SQL(", ").join(sql.Identifier("s", c) for c in columns),
            stage=stage,
            match=key_match("h", "s", keys),
            stage_filter=stage_filter,
        ),
        {"run_id": run_id},
    ).rowcount
    return opened, closed


def close_deleted(conn: psycopg.Connection[Any], manifest: Manifest, target: sql.Composable, run_id: str) -> int:
    """After deletes: close the current versions of keys the target no longer has (or soft-deleted).

    ``target``: the target table (an ``sql.Identifier``).
    """
    ensure_history_table(conn, manifest)
    history = sql.Identifier(manifest.target_schema, manifest.history_table or "")
    live: sql.Composable = sql.SQL("")
    if manifest.delete_mode == "soft":
        live = sql.SQL(" AND {} IS NULL").format(sql.Identifier("t", DELETED_AT_COLUMN))
    return _close_versions(
        conn,
        history,
        run_id,
        sql.SQL("WHERE h.{} AND NOT EXISTS (SELECT 1 FROM {} t WHERE {}{})").format(
            sql.Identifier(IS_CURRENT), target, key_match("t", "h", manifest.primary_key), live
        ),
        deleted=True,
    )


def _close_versions(
    conn: psycopg.Connection[Any],
    history: sql.Composable,
    run_id: str,
    which: sql.Composable,
    deleted: bool = False,
) -> int:
    """Close the versions ``which`` selects (alias ``h``): valid until now, no longer current."""
    return execute(
        conn,
        sql.SQL("UPDATE {} h SET {} = now(), {} = false, {} = %s, {} = {} OR %s {}").format(
            history,
            sql.Identifier(VALID_TO),
            sql.Identifier(IS_CURRENT),
            sql.Identifier(CLOSED_BY),
            sql.Identifier(DELETED),
            sql.Identifier("h", DELETED),
            which,
        ),
        (run_id, deleted),
    ).rowcount


__all__ = [
    "CLOSED_BY",
    "DELETED",
    "HISTORY_COLUMNS",
    "IS_CURRENT",
    "OPENED_BY",
    "VALID_FROM",
    "VALID_TO",
    "close_deleted",
    "ensure_history_table",
    "record_history",
]
