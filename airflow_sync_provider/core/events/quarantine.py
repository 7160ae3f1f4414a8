"""Quarantined events: the raw bytes of every message that did not decode, with the reason.

``_sync_event_quarantine`` in the target schema, one row per message (unique per sync and message
id), so a redelivered or re-read bad message is recorded once.  Rows are written and committed
*before* the batch's load: a crash in between re-reads the batch and finds them already there; the
stream position never moves past a message that is neither loaded nor quarantined.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from airflow_sync_provider.core.catalog import ensure_table
from airflow_sync_provider.core.events.schema import Rejected
from airflow_sync_provider.core.sqltext import bindable

EVENT_QUARANTINE_TABLE = "_sync_event_quarantine"


_EVENT_QUARANTINE_COLUMNS = (
    "quarantine_id bigserial PRIMARY KEY, "
    "sync_id text NOT NULL, "
    "message_id text NOT NULL, "
    "subject text NOT NULL, "
    "event_id text, "
    "reason text NOT NULL, "
    "payload bytea NOT NULL, "
    "payload_bytes integer NOT NULL, "
    "redelivered boolean NOT NULL, "
    "received_at timestamptz NOT NULL, "
    "run_id text NOT NULL, "
    "quarantined_at timestamptz NOT NULL DEFAULT now(), "
    "UNIQUE (sync_id, message_id)"
)


def ensure_event_quarantine(conn: psycopg.Connection[Any], schema: str) -> None:
    ensure_table(conn, schema, EVENT_QUARANTINE_TABLE, _EVENT_QUARANTINE_COLUMNS)


def quarantine_events(
    conn: psycopg.Connection[Any], schema: str, sync_id: str, rejected: Sequence[Rejected], run_id: str
) -> int:
    """Record ``rejected`` (committed before returning); returns how many were new."""
    if not rejected:
        return 0
    ensure_event_quarantine(conn, schema)
    query = bindable(
        sql.SQL(
            "INSERT INTO {} (sync_id, message_id, subject, event_id, reason, payload, payload_bytes, redelivered, "
            "received_at, run_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (sync_id, message_id) DO NOTHING"
        ).format(sql.Identifier(schema, EVENT_QUARANTINE_TABLE)),
        conn,
    )
    rows = [
        (
            sync_id,
            r.event.message_id,
            r.event.subject,
            r.event_id,
            r.reason,
            r.event.payload,
            len(r.event.payload),
            r.event.redelivered,
            r.event.received_at,
            run_id,
        )
        for r in rejected
    ]
    with conn.transaction(), conn.cursor() as cursor:
        cursor.executemany(query, rows, returning=False)
        return max(cursor.rowcount, 0)


__all__ = ["EVENT_QUARANTINE_TABLE", "ensure_event_quarantine", "quarantine_events"]
