"""Where the case studies' databases live: one database per system, one Airflow connection each.

The connection ids are the contract between the DAGs and a deployment (docker-compose registers
them as ``AIRFLOW_CONN_*`` variables; the demo and the tests point them at an embedded server).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

INVENTORY_SOURCES = ("warehouse_a", "warehouse_b", "store_web", "store_app")
INVENTORY_TARGET = "inventory_central"
BANK_SOURCE = "core_banking"
BANK_TARGETS = ("loan_management", "credit_scoring", "fraud_detection")
ALL_SYSTEMS = (*INVENTORY_SOURCES, INVENTORY_TARGET, BANK_SOURCE, *BANK_TARGETS)


def create_databases(
    admin: psycopg.Connection[Any], prefix: str = "", systems: tuple[str, ...] = ALL_SYSTEMS, recreate: bool = True
) -> list[str]:
    """Create one database per system, named ``<prefix><system>``; returns those created.

    ``recreate``: drop and create them empty; otherwise keep the ones that exist.
    """
    admin.autocommit = True
    created = []
    for system in systems:
        name = sql.Identifier(prefix + system)
        if recreate:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        elif admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (prefix + system,)).fetchone():
            continue
        admin.execute(sql.SQL("CREATE DATABASE {}").format(name))
        created.append(system)
    return created


def is_seeded(uri: str, table: str) -> bool:
    """Whether a source system already has its tables (seeding is not repeated)."""
    with connect(uri) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
    return row is not None and row[0] is not None


def connection_uris(host: str, port: int, user: str = "postgres", prefix: str = "") -> dict[str, str]:
    """``{conn_id: uri}`` for every system (Airflow reads them from ``AIRFLOW_CONN_<CONN_ID>``)."""
    return {system: f"postgres://{user}@{host}:{port}/{prefix}{system}" for system in ALL_SYSTEMS}


def airflow_environment(uris: Mapping[str, str]) -> dict[str, str]:
    return {f"AIRFLOW_CONN_{conn_id.upper()}": uri for conn_id, uri in uris.items()}


def connect(uri: str) -> psycopg.Connection[Any]:
    """A psycopg connection from an Airflow-style ``postgres://`` URI (autocommit)."""
    return psycopg.connect(uri.replace("postgres://", "postgresql://", 1), autocommit=True)


def copy_rows(conn: psycopg.Connection[Any], table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """Bulk-insert generated rows with COPY (fast enough for millions of rows)."""
    schema, _, name = table.rpartition(".")
    ident = sql.Identifier(schema, name) if schema else sql.Identifier(name)
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(ident, sql.SQL(", ").join(map(sql.Identifier, columns)))
    with conn.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
