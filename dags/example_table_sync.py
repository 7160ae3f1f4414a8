"""Example: keep ``public.orders`` of a source database in sync with a PostgreSQL target.

Connections (Admin -> Connections, or ``AIRFLOW_CONN_<ID>`` environment variables):
- ``sync_source``: the source database (postgres, mysql, sqlite or any SQLAlchemy URL);
- ``sync_target``: the PostgreSQL target (type ``postgres``).

Two ways to write the same sync:
- ``orders_sync``: one task (``SyncTableOperator``) for the simple case;
- ``orders_sync_split``: extract -> load as two tasks, so the UI shows where a run stopped, retries
  are cheap, and a quality gate or transform can sit between them.  Only a small manifest travels
  through XCom; the rows are staged as Parquet files.
``orders_after_sync`` runs after every sync of the target table: the sync emits the table's asset
(``postgres://host:port/database/public/orders``) through the alias ``table_asset(...)`` names, with
the counts and the watermark range in the event's ``extra`` (see docs/lineage.md).
No database (and no connection) is touched when this file is parsed.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd
from airflow.sdk import DAG, task

from airflow_sync_provider.assets import table_asset
from airflow_sync_provider.operators.sync import (
    ExtractToStagingOperator,
    LoadStagedToPostgresOperator,
    SyncTableOperator,
)

# An alias named from the connection id: the task emits the real postgres:// asset at run time.
ORDERS_TARGET = table_asset("sync_target", "public", "orders")


def add_total(batch: pd.DataFrame) -> pd.DataFrame:
    """A pandas transform, applied batch by batch between extract and load."""
    batch["total"] = batch["quantity"] * batch["unit_price"]
    return batch


# What the transform computes, for OpenLineage's column lineage (the other columns pass through).
add_total.column_lineage = {"total": (("quantity", "unit_price"), "quantity * unit_price")}  # type: ignore[attr-defined]


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
        outlets=[table_asset("sync_target", "public", "orders_full_copy")],
    )
    extract >> load

with DAG(
    dag_id="orders_after_sync",
    schedule=ORDERS_TARGET,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    tags=["sync", "example"],
    doc_md=__doc__,
):

    @task
    def report(**context: Any) -> dict[str, Any]:
        """What the sync that triggered this run changed (the asset event's ``extra``)."""
        changed: dict[str, Any] = {}
        for asset, events in context["triggering_asset_events"].items():
            for event in events:
                changed[asset.uri] = {k: event.extra.get(k) for k in ("inserted", "updated", "deleted")}
        return changed

    report()
