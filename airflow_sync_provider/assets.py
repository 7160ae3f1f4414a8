"""Airflow Assets for the tables a sync writes, so downstream DAGs can be scheduled on them."""

from __future__ import annotations

from airflow.sdk import Asset


def table_asset(conn_id: str, schema: str, table: str) -> Asset:
    """The Asset of ``schema.table`` in the database of connection ``conn_id``.

    Named ``<conn id>.<schema>.<table>`` (stable, readable in the UI); the URI
    ``sync://<conn id>/<schema>/<table>`` is built from names only, so creating it at parse time
    never looks up the connection.
    """
    return Asset(name=f"{conn_id}.{schema}.{table}", uri=f"sync://{conn_id}/{schema}/{table}", group="sync")


__all__ = ["table_asset"]
