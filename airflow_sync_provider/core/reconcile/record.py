"""The append-only reconciliation log ``_sync_reconciliations``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

from airflow_sync_provider.core.audit import RECONCILE_TABLE, create_evidence_table
from airflow_sync_provider.core.catalog import ddl_lock
from airflow_sync_provider.core.reconcile.results import ReconcileResult
from airflow_sync_provider.core.sqltext import insert_row

_COLUMNS = (
    "reconciliation_id bigserial PRIMARY KEY, "
    "sync_id text NOT NULL, "
    "run_id text NOT NULL, "
    "reconciled_at timestamptz NOT NULL DEFAULT now(), "
    "source_table text, "
    "target_table text, "
    "scope jsonb, "
    "method text, "
    "buckets integer, "
    "source_count bigint NOT NULL, "
    "target_count bigint NOT NULL, "
    "differing_buckets integer NOT NULL, "
    "missing_in_target bigint NOT NULL, "
    "extra_in_target bigint NOT NULL, "
    "different bigint NOT NULL, "
    "differing_keys jsonb NOT NULL, "
    "repaired boolean NOT NULL DEFAULT false, "
    "seconds double precision, "
    "details jsonb, "
    "recorded_by text NOT NULL DEFAULT current_user"
)


def ensure_reconcile_table(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create the append-only reconciliation log if missing (idempotent; outside a transaction)."""
    with conn.transaction():
        ddl_lock(conn)
        create_evidence_table(conn, schema, RECONCILE_TABLE, _COLUMNS, "the reconciliation log is")


def record_reconciliation(
    conn: psycopg.Connection[Any],
    schema: str,
    result: ReconcileResult,
    *,
    run_id: str,
    repaired: bool = False,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Append one row for ``result`` (inside the caller's transaction, or on its own in autocommit)."""
    values = {
        "sync_id": result.sync_id,
        "run_id": run_id,
        "source_table": result.source_table,
        "target_table": result.target_table,
        "scope": json.dumps(result.window),
        "method": result.method,
        "buckets": result.buckets,
        "source_count": result.source_count,
        "target_count": result.target_count,
        "differing_buckets": result.differing_buckets,
        "missing_in_target": result.missing_count,
        "extra_in_target": result.extra_count,
        "different": result.different_count,
        "differing_keys": json.dumps(result.examples(), default=str),
        "repaired": repaired,
        "seconds": result.seconds,
        "details": json.dumps(dict(details or {}), default=str),
    }
    insert_row(conn, sql.Identifier(schema, RECONCILE_TABLE), values)


__all__ = [
    "ensure_reconcile_table",
    "record_reconciliation",
]
