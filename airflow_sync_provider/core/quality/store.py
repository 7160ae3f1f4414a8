"""The gate's tables in the target: ``_sync_quality_results`` (append-only) and ``_sync_quarantine``.

A quarantined row records its batch (manifest) and the state version that batch loads at; the
load's ledger row in ``_sync_audit`` says whether the batch committed, so SQL here decides which
rows are replayable, still waiting, or abandoned.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql

from airflow_sync_provider.core.audit import AUDIT_TABLE, QUALITY_TABLE, create_evidence_table
from airflow_sync_provider.core.catalog import column_types, ddl_lock, table_exists
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.sqltext import execute

QUARANTINE_TABLE = "_sync_quarantine"
#: Key of the Arrow schema metadata in ``batch_schema`` that holds what a replay needs to rebuild a manifest.
SCHEMA_META_KEY = b"airflow_sync_provider.batch"

_RESULTS_COLUMNS = (
    "result_id bigserial PRIMARY KEY, "
    "sync_id text NOT NULL, "
    "run_id text NOT NULL, "
    "manifest_id text NOT NULL, "
    "target_table text, "
    "validated_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
    "success boolean NOT NULL, "
    "rows bigint NOT NULL DEFAULT 0, "
    "quarantined_rows bigint NOT NULL DEFAULT 0, "
    "summary jsonb NOT NULL, "
    "details jsonb NOT NULL"
)


def ensure_quality_tables(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create ``_sync_quality_results`` (append-only) and ``_sync_quarantine`` if missing."""
    with conn.transaction():
        ddl_lock(conn)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        create_evidence_table(conn, schema, QUALITY_TABLE, _RESULTS_COLUMNS, "the sync quality results are")
        if not table_exists(conn, schema, QUARANTINE_TABLE):
            quarantine = sql.Identifier(schema, QUARANTINE_TABLE)
            conn.execute(
                sql.SQL(
                    """CREATE TABLE {} (
                        quarantine_id bigserial PRIMARY KEY,
                        sync_id text NOT NULL,
                        run_id text NOT NULL,
                        manifest_id text NOT NULL,
                        target_table text NOT NULL,
                        row_key jsonb NOT NULL,
                        failed_rules text[] NOT NULL,
                        row jsonb NOT NULL,
                        batch_schema bytea NOT NULL,
                        quarantined_at timestamptz NOT NULL DEFAULT now(),
                        replayed_at timestamptz,
                        replay_status text,
                        replay_run_id text,
                        replay_note text,
                        replayed_row jsonb,
                        base_version bigint,
                        UNIQUE (sync_id, manifest_id, row_key)
                    )"""
                ).format(quarantine)
            )
            conn.execute(
                sql.SQL("CREATE INDEX ON {} (sync_id, target_table, row_key)").format(quarantine),
            )
            _comment_replay_status(conn, schema)
        elif "base_version" not in (column_types(conn, schema, QUARANTINE_TABLE) or {}):
            # A table from before quarantined rows were tied to their batch's state version.
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN base_version bigint").format(
                    sql.Identifier(schema, QUARANTINE_TABLE)
                )
            )
            _comment_replay_status(conn, schema)


def _comment_replay_status(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(
        sql.SQL("COMMENT ON COLUMN {} IS {}").format(
            sql.Identifier(schema, QUARANTINE_TABLE, "replay_status"),
            sql.Literal(
                "NULL = pending: replayable once its batch (manifest_id) committed, per _sync_audit, else waiting "
                "for that load; replayed; skipped_newer (a later sync merged a newer version); superseded (a later "
                "committed batch quarantined the key again); abandoned (its batch can no longer load: the sync "
                "committed past base_version without it, and later runs read the rows again)"
            ),
        )
    )


def batch_committed(conn: psycopg.Connection[Any], schema: str, alias: str) -> sql.Composable:
    """SQL: the batch of quarantined row ``alias`` committed.

    The load appends its ledger row (``_sync_audit``, status ``applied`` or ``backfilled``) in the
    transaction that merges the batch, so the ledger says exactly which batches are in the target.
    """
    if not table_exists(conn, schema, AUDIT_TABLE):
        return sql.SQL("false")
    return sql.SQL(
        "EXISTS (SELECT 1 FROM {audit} a WHERE a.sync_id = {q}.sync_id AND a.manifest_id = {q}.manifest_id "
        "AND a.status IN ('applied', 'backfilled'))"
    ).format(audit=sql.Identifier(schema, AUDIT_TABLE), q=sql.Identifier(alias))


def abandon_unloaded(conn: psycopg.Connection[Any], schema: str, sync_id: str, state_table: str, run_id: str) -> int:
    """Mark pending rows of batches that can no longer load ``abandoned``; return how many.

    A batch loads only while the sync's state is at the version it was extracted against (its
    ``base_version``; a backfill window has none and may load any time).  Once the state moved past
    that version without the batch's ledger row, the batch never will: it failed, was dropped, or
    was refused as stale.  Its watermark never committed, so the rows it quarantined are read
    again by later runs (and gated again); replaying the old versions could resurrect a row
    deleted at the source since.  The test is monotonic (versions only grow), so no lock is needed.
    """
    if not table_exists(conn, schema, state_table):
        return 0
    row = execute(
        conn,
        sql.SQL("SELECT version FROM {} WHERE sync_id = %s").format(sql.Identifier(schema, state_table)),
        (sync_id,),
    ).fetchone()
    if row is None:
        return 0
    return execute(
        conn,
        sql.SQL(
            "UPDATE {q} q SET replay_status = 'abandoned', replay_run_id = %(run)s, replay_note = "
            "'its batch never loaded: the sync committed state version ' || %(version)s::text || ' without it; "
            "later runs read these rows again from the source' "
            "WHERE q.sync_id = %(sync)s AND q.replay_status IS NULL AND q.base_version < %(version)s "
            "AND NOT {committed}"
        ).format(q=sql.Identifier(schema, QUARANTINE_TABLE), committed=batch_committed(conn, schema, "q")),
        {"run": run_id, "version": int(row[0]), "sync": sync_id},
    ).rowcount


def batch_schema(schema: pa.Schema, manifest: Manifest) -> bytes:
    """The staged Arrow schema plus what a replay needs to rebuild a manifest (one blob per row)."""
    batch = {
        "columns": [{"name": c.name, "pg_type": c.pg_type, "nullable": c.nullable} for c in manifest.columns],
        "primary_key": list(manifest.primary_key),
        "target_schema": manifest.target_schema,
        "target_table": manifest.target_table,
        "source_table": manifest.source_table,
        "delete_mode": manifest.delete_mode,
    }
    return bytes(schema.with_metadata({SCHEMA_META_KEY: json.dumps(batch).encode()}).serialize().to_pybytes())


__all__ = [
    "QUARANTINE_TABLE",
    "SCHEMA_META_KEY",
    "abandon_unloaded",
    "batch_committed",
    "batch_schema",
    "ensure_quality_tables",
]
