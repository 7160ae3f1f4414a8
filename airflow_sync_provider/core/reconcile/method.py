"""Which hashing a run uses: ``"sql"`` (both PostgreSQL servers hash and aggregate) when it provably agrees
with itself on both sides, else ``"python"``; and the session settings that make text output comparable.
"""

from __future__ import annotations

from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.progress import Logger
from airflow_sync_provider.core.reconcile.results import Method
from airflow_sync_provider.core.reconcile.sides import TargetInfo
from airflow_sync_provider.core.source import SourceTable
from airflow_sync_provider.core.spec import SyncSpec

#: Session settings pinned on both PostgreSQL sides (``SET LOCAL``) while comparing.
SETTINGS = (
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
)
# Base types whose text output is exact and (with SETTINGS pinned) the same on every server.
_SQL_SAFE_TYPES = {
    "smallint",
    "integer",
    "bigint",
    "numeric",
    "real",
    "double precision",
    "text",
    "character varying",
    "character",
    "boolean",
    "date",
    "timestamp without time zone",
    "timestamp with time zone",
    "time without time zone",
    "uuid",
    "json",
    "jsonb",
    "bytea",
    "interval",
}


def pin_target_settings(conn: psycopg.Connection[Any]) -> None:
    """Inside the comparing transaction: the :data:`SETTINGS` that make the target's text output comparable."""
    for name, value in SETTINGS:
        conn.execute(sql.SQL(f"SET LOCAL {name} = '{value}'"))


def pin_source_settings(conn: sa.Connection, source: SourceTable) -> None:
    """Inside the comparing transaction: the same :data:`SETTINGS` on a PostgreSQL source."""
    if source.dialect == "postgresql":
        for name, value in SETTINGS:
            conn.exec_driver_sql(f"SET LOCAL {name} = '{value}'")


def choose_method(
    method: Method,
    source_conn: sa.Connection,
    target_conn: psycopg.Connection[Any],
    source: SourceTable,
    target: TargetInfo,
    spec: SyncSpec,
    log: Logger,
) -> str:
    """The hashing this run uses: ``method``; for ``"auto"``, ``"sql"`` when server-side hashing cannot
    disagree for equal values, else ``"python"`` (the reason is logged)."""
    if method == "python":
        return method
    reason = _sql_unsuitable(source_conn, target_conn, source, target)
    if reason is None:
        return "sql"
    if method == "sql":
        raise ConfigurationError(f"method='sql' is not possible here: {reason}", sync_id=spec.sync_id)
    log.info("reconcile %s: hashing in Python (%s)", spec.sync_id, reason)
    return "python"


def _sql_unsuitable(
    source_conn: sa.Connection, target_conn: psycopg.Connection[Any], source: SourceTable, target: TargetInfo
) -> str | None:
    """Why server-side hashing could disagree for equal values (None: it cannot)."""
    if source.dialect != "postgresql":
        return f"the source is {source.dialect}, not PostgreSQL"
    probe = "SELECT hashtextextended('airflow-sync-provider reconcile probe', 0), current_setting('server_encoding'), current_setting('server_version_num')::int"  # noqa: E501
    source_probe = tuple(source_conn.exec_driver_sql(probe).one())
    target_probe = target_conn.execute(probe).fetchone()
    assert target_probe is not None
    if source_probe[:2] != tuple(target_probe[:2]):
        return "the servers hash or encode text differently"
    if min(source_probe[2], target_probe[2]) < 120000:
        return "a server is older than PostgreSQL 12"
    if not target.exists:
        return None
    # Quoted by PostgreSQL's rules only: SQLAlchemy's preparer doubles '%' for its paramstyle, which
    # is right inside a statement but not in a value bound to it.
    relation = sql.Identifier(*(p for p in (source.table.schema, source.table.name) if p)).as_string(None)
    source_types: dict[str, str] = dict(
        source_conn.execute(
            sa.text(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = CAST(:relation AS regclass) AND attnum > 0 AND NOT attisdropped"
            ),
            {"relation": relation},
        ).all()
    )
    for plan in source.plans:
        source_type, target_type = source_types.get(plan.name), target.column_types.get(plan.name)
        if source_type != target_type:
            return f"column {plan.name!r} is {source_type} in the source but {target_type} in the target"
        base = str(source_type).split("(")[0].removesuffix("[]").strip()
        if base not in _SQL_SAFE_TYPES:
            return f"column {plan.name!r} has type {source_type}"
    return None


__all__ = [
    "SETTINGS",
    "choose_method",
    "pin_source_settings",
    "pin_target_settings",
]
