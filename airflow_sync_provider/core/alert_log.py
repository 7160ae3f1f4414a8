"""``_sync_alerts``: the alerts a health check sent, so one run never sends the same open alert twice.

A health check that fails on a breach is retried by Airflow; each try reads the same breaches.  The
check therefore *claims* an alert in the target (a row keyed by the run and the alert's dedupe key)
before it sends it, sends only what it claimed, and releases the claim when the sending failed (so
the next try sends it).  The rows double as the record of what was sent, with the figures.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from airflow_sync_provider.core.alerts import Alert
from airflow_sync_provider.core.catalog import ensure_table, table_exists
from airflow_sync_provider.core.sqltext import execute

ALERT_TABLE = "_sync_alerts"


_ALERT_COLUMNS = (
    "run_scope text NOT NULL, "
    "dedupe_key text NOT NULL, "
    "sync_id text NOT NULL, "
    "rule text NOT NULL, "
    "severity text NOT NULL, "
    "observed text NOT NULL, "
    "threshold text NOT NULL, "
    "message text NOT NULL, "
    "sent_at timestamptz NOT NULL DEFAULT now(), "
    "PRIMARY KEY (run_scope, dedupe_key)"
)


def ensure_alert_table(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create ``_sync_alerts`` if missing (idempotent; outside a transaction)."""
    ensure_table(conn, schema, ALERT_TABLE, _ALERT_COLUMNS)


def claim_alert(conn: psycopg.Connection[Any], schema: str, run_scope: str, alert: Alert) -> bool:
    """Record that ``run_scope`` (e.g. ``dag_id/run_id``) sends ``alert``; False when it already did."""
    ensure_alert_table(conn, schema)
    row = execute(
        conn,
        sql.SQL(
            "INSERT INTO {} (run_scope, dedupe_key, sync_id, rule, severity, observed, threshold, message) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1"
        ).format(sql.Identifier(schema, ALERT_TABLE)),
        (
            run_scope,
            alert.dedupe_key,
            alert.sync_id,
            alert.rule,
            alert.severity,
            alert.observed_text,
            alert.threshold_text,
            alert.message,
        ),
    ).fetchone()
    return row is not None


def release_alert(conn: psycopg.Connection[Any], schema: str, run_scope: str, alert: Alert) -> None:
    """Forget a claim whose sending failed, so a retry of the run sends the alert."""
    execute(
        conn,
        sql.SQL("DELETE FROM {} WHERE run_scope = %s AND dedupe_key = %s").format(sql.Identifier(schema, ALERT_TABLE)),
        (run_scope, alert.dedupe_key),
    )


def sent_alerts(conn: psycopg.Connection[Any], schema: str, run_scope: str | None = None) -> list[tuple[str, str]]:
    """``(run_scope, dedupe_key)`` of the alerts sent (by ``run_scope``, or all), oldest first."""
    if not table_exists(conn, schema, ALERT_TABLE):
        return []
    rows = execute(
        conn,
        sql.SQL(
            "SELECT run_scope, dedupe_key FROM {} WHERE %(scope)s::text IS NULL OR run_scope = %(scope)s "
            "ORDER BY sent_at, dedupe_key"
        ).format(sql.Identifier(schema, ALERT_TABLE)),
        {"scope": run_scope},
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


__all__ = ["ALERT_TABLE", "claim_alert", "ensure_alert_table", "release_alert", "sent_alerts"]
