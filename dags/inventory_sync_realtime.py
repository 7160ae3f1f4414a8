"""Inventory in real time: one streaming task keeps every store's sellable quantity within about a
second of the warehouses (case study 1, third variant; see docs/realtime.md).

``stream_inventory`` runs micro-batches for ``stream_seconds`` (default 10 minutes), then ends; the
``@continuous`` schedule with ``max_active_runs=1`` starts the next run at once, so exactly one
stream runs at a time and a worker slot is held only while it streams.  Each micro-batch:

1. syncs the stores' orders incrementally and streams the warehouses' stock by CDC (pgoutput; a
   warehouse is read only when its slot holds changes: an idle poll writes nothing on the source);
2. recomputes available-to-promise only for the SKUs whose inputs changed (triggers on the central
   copies mark them in the same transaction as the apply), gates it with the Great Expectations
   suite of the batch DAGs, and writes it with an outbox entry per SKU in one transaction;
3. pushes the new allocations to every store exactly once and in order (each store records its
   outbox position in the same transaction), lowering everywhere before raising anywhere, minus what
   a store sold that the centre has not seen yet (and what the other stores sold unseen beyond their
   own share), so no store can sell what another was promised or already sold.

Cancelling the task (or marking it failed) stops the stream after the micro-batch in flight; a
killed stream loses nothing: every micro-batch committed with its position, and the next run
resumes there.  Unpause one of the three inventory DAGs.

Connections: ``warehouse_a``, ``warehouse_b`` (``wal_level=logical``), ``store_web``,
``store_app`` and ``inventory_central``.  No database is touched when this file is parsed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from typing import Any

from airflow.sdk import DAG, BaseHook, Param, task

from airflow_sync_provider.assets import table_asset
from case_studies.inventory import CENTRAL, STORES, WAREHOUSES

with DAG(
    dag_id="inventory_sync_realtime",
    schedule="@continuous",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["sync", "case-study", "inventory", "streaming"],
    description="inventory sync in real time: one streaming task, micro-batches for 10 minutes per run",
    doc_md=__doc__,
    params={
        # defaults from the environment of the dag-processor (a deployment's knob; read, never a database)
        "stream_seconds": Param(
            float(os.environ.get("SYNC_REALTIME_STREAM_SECONDS", "600")),
            type="number",
            minimum=0,
            description="how long one run streams",
        ),
        "poll_interval": Param(
            float(os.environ.get("SYNC_REALTIME_POLL_INTERVAL", "0.2")),
            type="number",
            minimum=0,
            description="seconds between polls when idle",
        ),
        "log_every": Param(30, type="number", minimum=1, description="seconds between throughput/lag lines"),
    },
    default_args={"retries": 3, "retry_delay": dt.timedelta(seconds=5)},
) as dag:

    @task(outlets=[table_asset(store, "public", "catalog_availability") for store in STORES])
    def stream_inventory(**context: Any) -> dict[str, Any]:
        """Micro-batches until ``stream_seconds`` elapsed or the task is stopped (SIGTERM)."""
        from airflow_sync_provider.core import StagingArea
        from airflow_sync_provider.core.streaming import StopFlag, run_stream, stop_on_signals
        from airflow_sync_provider.operators.common import default_staging_uri
        from case_studies.inventory import RealtimeInventory

        log = logging.getLogger("airflow.task")
        params = context["params"]
        uris = {c: BaseHook.get_connection(c).get_uri() for c in (CENTRAL, *WAREHOUSES, *STORES)}
        stop = StopFlag()
        with (
            stop_on_signals(stop),
            RealtimeInventory(uris, staging=StagingArea(default_staging_uri()), run_id=context["run_id"]) as stream,
        ):
            stats = run_stream(
                stream.step,
                stream_for=float(params["stream_seconds"]),
                poll_interval=float(params["poll_interval"]),
                stop=stop,
                logger=log,
                log_every=float(params["log_every"]),
                what="inventory stream",
            )
        result = stats.to_dict()
        from airflow_sync_provider.assets import emit_table_event

        for store in STORES:  # one event per store table for the whole run (its aliases fire)
            emit_table_event(
                context, store, "public", "catalog_availability", changes=result["changes"], batches=result["batches"]
            )
        log.info(
            "streamed %s changes in %s micro-batches; newest stock change -> every store: p50 %s s, p95 %s s",
            result["changes"],
            result["batches"],
            result.get("p50_lag_seconds"),
            result.get("p95_lag_seconds"),
        )
        return result

    stream_inventory()
