"""Example: keep ``public.orders`` of a source database in sync with a PostgreSQL target.

Connections (Admin -> Connections, or ``AIRFLOW_CONN_<ID>`` environment variables):
- ``sync_source``: the source database (postgres, mysql, sqlite or any SQLAlchemy URL);
- ``sync_target``: the PostgreSQL target (type ``postgres``).

Two ways to write the same sync:
- ``orders_sync``: one task (``SyncTableOperator``) for the simple case;
- ``orders_sync_split``: extract -> load as two tasks, so the UI shows where a run stopped, retries
  are cheap, and a quality gate or transform can sit between them.  Only a small manifest travels
  through XCom; the rows are staged as Parquet files.
No database is touched when this file is parsed.
"""

from __future__ import annotations

import datetime as dt

import pandas as pd
from airflow.sdk import DAG, Asset

from airflow_sync_provider.operators.sync import (
    ExtractToStagingOperator,
    LoadStagedToPostgresOperator,
    SyncTableOperator,
)

# Postgres asset URIs name host:port/database/schema/table; adjust them to your target.
ORDERS_TARGET = Asset(name="orders_synced", uri="postgres://warehouse:5432/analytics/public/orders")


def add_total(batch: pd.DataFrame) -> pd.DataFrame:
    """A pandas transform, applied batch by batch between extract and load."""
    batch["total"] = batch["quantity"] * batch["unit_price"]
    return batch


with DAG(
    dag_id="orders_sync",
    schedule=dt.timedelta(minutes=15),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["sync", "example"],
    doc_md=__doc__,
):
    SyncTableOperator(
        task_id="sync_orders",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        sync_id="orders",
        source_table="orders",
        cursor_column="updated_at",
        detect_deletes=True,  # also remove rows deleted at the source
        transform=add_total,
        outlets=[ORDERS_TARGET],
        retries=2,
        retry_delay=dt.timedelta(seconds=30),
    )

with DAG(
    dag_id="orders_sync_split",
    schedule=dt.timedelta(hours=1),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["sync", "example"],
    doc_md=__doc__,
):
    extract = ExtractToStagingOperator(
        task_id="extract_orders",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        sync_id="orders_full",
        source_table="orders",
        target_table="orders_full_copy",
        mode="full",
        delete_mode="soft",
        max_delete_fraction=0.2,
    )
    load = LoadStagedToPostgresOperator(
        task_id="load_orders",
        manifest=extract.output,
        target_conn_id="sync_target",
        outlets=[Asset(name="orders_full_copy", uri="postgres://warehouse:5432/analytics/public/orders_full_copy")],
    )
    extract >> load
