"""Inventory across warehouses and online stores, without overselling (case study 1).

Every few minutes (or on change, see the README):

1. ``prepare_central``: idempotent DDL of the central database (schemas, the ATP table, views).
2. Warehouse stock streams to the centre by **CDC** (``warehouse_a``, ``warehouse_b``: pgoutput
   logical decoding, exactly once, deletes included).
3. Store orders sync **incrementally** (``store_web``, ``store_app``: by ``updated_at`` with the
   order id as tie-break; purged orders detected by a key scan).
4. **Available-to-promise** per SKU (on hand - reserved - open orders, across warehouses and stores)
   is computed by a pandas transform, split between the stores by fixed shares (rounded down),
   checked by a Great Expectations **gate** (keys, non-negative quantities, and "the stores'
   allocations never exceed what is available"), and upserted centrally.
5. Each store's allocation is **pushed back** to its ``catalog_availability`` table: a store sells
   at most its allocation, so together they cannot oversell.
6. ``check_no_oversell`` re-checks the invariant across the systems and logs the run's latency.

Two DAGs run this pipeline: ``inventory_sync`` every five minutes, and ``inventory_sync_on_change``
when the triggerer sees committed changes in a warehouse's replication slot (an ``AssetWatcher``
with ``CdcChangesEventTrigger``).  Unpause one of them.

Connections: ``warehouse_a``, ``warehouse_b``, ``store_web``, ``store_app`` (PostgreSQL sources;
the warehouses need ``wal_level=logical``) and ``inventory_central`` (the target).  No database is
touched when this file is parsed.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from airflow.sdk import DAG, Asset, AssetWatcher, BaseHook, chain, task

from airflow_sync_provider.assets import table_asset
from airflow_sync_provider.operators.cdc import CdcSyncOperator
from airflow_sync_provider.operators.quality import DataQualityGateOperator
from airflow_sync_provider.operators.sync import (
    ExtractToStagingOperator,
    LoadStagedToPostgresOperator,
    SyncTableOperator,
)
from airflow_sync_provider.triggers.cdc import CdcChangesEventTrigger
from case_studies.inventory import ATP_EXPECTATIONS, STORES, WAREHOUSES, compute_atp

CENTRAL = "inventory_central"


def _uris(conn_ids: list[str]) -> dict[str, str]:
    return {conn_id: BaseHook.get_connection(conn_id).get_uri() for conn_id in conn_ids}


def inventory_dag(dag_id: str, schedule: Any, description: str) -> DAG:
    """The inventory pipeline; the two DAGs below differ only in what starts a run."""
    with DAG(
        dag_id=dag_id,
        schedule=schedule,
        start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        catchup=False,
        max_active_runs=1,
        tags=["sync", "case-study", "inventory"],
        description=description,
        doc_md=__doc__,
        default_args={"retries": 2, "retry_delay": dt.timedelta(seconds=20)},
    ) as dag:

        @task
        def prepare_central() -> None:
            from airflow_sync_provider.hooks.target import SyncTargetHook
            from case_studies.inventory import prepare_central as ddl

            with SyncTargetHook(postgres_conn_id=CENTRAL).get_sync_connection() as conn:
                conn.autocommit = True
                ddl(conn)

        prepare = prepare_central()

        stock = [
            CdcSyncOperator(
                task_id=f"cdc_{warehouse}",
                source_conn_id=warehouse,
                target_conn_id=CENTRAL,
                sync_id=f"{warehouse}_stock",
                tables=["stock"],
                target_schema=warehouse,
                outlets=[table_asset(CENTRAL, warehouse, "stock")],
            )
            for warehouse in WAREHOUSES
        ]
        orders = [
            SyncTableOperator(
                task_id=f"orders_{store}",
                source_conn_id=store,
                target_conn_id=CENTRAL,
                sync_id=f"{store}_orders",
                source_table="orders",
                target_schema=store,
                cursor_column="updated_at",
                detect_deletes=True,
                outlets=[table_asset(CENTRAL, store, "orders")],
            )
            for store in STORES
        ]

        extract_atp = ExtractToStagingOperator(
            task_id="compute_atp",
            source_conn_id=CENTRAL,
            target_conn_id=CENTRAL,
            sync_id="available_to_promise",
            source_schema="inventory",
            source_table="atp_inputs",
            target_schema="inventory",
            target_table="available_to_promise",
            mode="full",
            primary_key=["sku"],
            transform=compute_atp,
        )
        gate_atp = DataQualityGateOperator(
            task_id="gate_atp",
            manifest=extract_atp.output,
            target_conn_id=CENTRAL,
            expectations=ATP_EXPECTATIONS,
        )
        load_atp = LoadStagedToPostgresOperator(
            task_id="load_atp",
            manifest=gate_atp.output,
            target_conn_id=CENTRAL,
            outlets=[table_asset(CENTRAL, "inventory", "available_to_promise")],
        )
        push = [
            SyncTableOperator(
                task_id=f"push_{store}",
                source_conn_id=CENTRAL,
                target_conn_id=store,
                sync_id=f"{store}_availability",
                source_schema="inventory",
                source_table=f"allocation_{store}",
                target_table="catalog_availability",
                mode="full",
                primary_key=["sku"],
                outlets=[table_asset(store, "public", "catalog_availability")],
            )
            for store in STORES
        ]

        @task
        def check_no_oversell(**context: Any) -> dict[str, Any]:
            """The invariant across systems, and how fresh the stores' numbers are."""
            from airflow.sdk.exceptions import AirflowFailException

            from case_studies.inventory import check_no_oversell as check
            from case_studies.inventory import stock_freshness

            uris = _uris([CENTRAL, *STORES])
            result = check(uris)
            if not result.ok:
                raise AirflowFailException(
                    f"{len(result.violations)} SKU(s) could be oversold: " + "; ".join(result.violations[:10])
                )
            started = context["dag_run"].start_date
            run_seconds = (dt.datetime.now(dt.UTC) - started).total_seconds() if started else None
            freshness = stock_freshness(uris[CENTRAL])
            logging.getLogger(__name__).info(
                f"no oversell: {result.skus} SKUs, stores may sell {result.promised}; run latency "
                f"{run_seconds if run_seconds is None else round(run_seconds, 2)} s (start of run -> stores updated); "
                f"the newest warehouse change is in every store's sellable quantity {freshness} s after its commit"
            )
            return {
                "skus": result.skus,
                "promised": result.promised,
                "run_seconds": run_seconds,
                "freshness": freshness,
            }

        chain(prepare, [*stock, *orders], extract_atp, gate_atp, load_atp, push, check_no_oversell())

    return dag


#: Every five minutes: simple and predictable.
inventory_sync = inventory_dag("inventory_sync", dt.timedelta(minutes=5), "inventory sync every 5 minutes")

#: Or on change: the triggerer watches both warehouses' replication slots and starts a run as soon
#: as either has committed changes (no worker slot is held while waiting).  Unpause one of the two.
warehouse_changes = Asset(
    name="inventory_warehouse_changes",
    watchers=[
        AssetWatcher(
            name=f"{warehouse}_slot",
            trigger=CdcChangesEventTrigger(source_conn_id=warehouse, sync_id=f"{warehouse}_stock", poll_interval=5),
        )
        for warehouse in WAREHOUSES
    ],
)
inventory_sync_on_change = inventory_dag(
    "inventory_sync_on_change", [warehouse_changes], "inventory sync when a warehouse's stock changes"
)
