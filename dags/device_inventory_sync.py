"""Warehouse devices into the central inventory (the device case study).

RFID gates and handheld scanners publish stock movements over MQTT (``warehouse/<warehouse>/<kind>/
<device>``, QoS 1; see ``sync_dev/device_simulator.py`` for the message shape).  This DAG:

1. ``drain_movements``: drains the devices' topic into ``inventory_central.devices.stock_movements``,
   one row per movement keyed by its ``event_id``, exactly once in effect: the MQTT session is
   persistent and acknowledged only after each batch's target commit, so a crash redelivers and the
   merge keyed by the event id makes the redelivery (and a device's own resends) a no-op.  Garbage
   from a flaky firmware goes to ``devices._sync_event_quarantine`` with its bytes and the reason.
2. ``net_on_hand``: recomputes ``devices.on_hand_delta`` (net movement per warehouse and SKU) from
   every movement, set-based and idempotent, so late and out-of-order movements count wherever they
   land in time.  Added to the warehouses' on-hand stock in ``inventory.atp_inputs``, the movements
   count in available-to-promise (the inventory case study; docs/events.md shows the view).

Two DAGs run it: ``device_inventory_sync`` every minute, and ``device_inventory_sync_on_event``
started by an ``AssetWatcher`` (``EventStreamTrigger``) when a device publishes.  Unpause one.

Connections: ``warehouse_devices`` (type ``mqtt``; extra ``client_id`` names the persistent session)
and ``inventory_central`` (the PostgreSQL target).  Nothing is contacted when this file is parsed.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import DAG, Asset, AssetWatcher, task

from airflow_sync_provider.assets import table_asset
from airflow_sync_provider.core.events import EventColumn
from airflow_sync_provider.operators.events import EventStreamToPostgresOperator
from airflow_sync_provider.triggers.events import EventStreamTrigger

DEVICES = "warehouse_devices"
CENTRAL = "inventory_central"
SCHEMA = "devices"
TOPIC = "warehouse/+/+/+"
SYNC_ID = "device_movements"

MOVEMENT_COLUMNS = (
    EventColumn("event_id", "text"),
    EventColumn("device_id", "text", path="device.id"),
    EventColumn("device_kind", "text", path="device.kind"),
    EventColumn("warehouse", "text"),
    EventColumn("sku", "text"),
    EventColumn("delta", "integer"),
    EventColumn("reason", "text"),
    EventColumn("seq", "bigint"),
    EventColumn("at", "timestamptz"),
)

#: Net movement per (warehouse, sku), recomputed from every movement (idempotent, order-free).
NET_ON_HAND = """
CREATE SCHEMA IF NOT EXISTS devices;
CREATE TABLE IF NOT EXISTS devices.on_hand_delta (
    warehouse text NOT NULL, sku text NOT NULL, delta bigint NOT NULL, movements bigint NOT NULL,
    last_at timestamptz NOT NULL, PRIMARY KEY (warehouse, sku));
INSERT INTO devices.on_hand_delta AS d (warehouse, sku, delta, movements, last_at)
SELECT warehouse, sku, sum(delta), count(*), max(at) FROM devices.stock_movements GROUP BY warehouse, sku
ON CONFLICT (warehouse, sku) DO UPDATE SET delta = excluded.delta, movements = excluded.movements,
    last_at = excluded.last_at
WHERE (d.delta, d.movements, d.last_at) IS DISTINCT FROM (excluded.delta, excluded.movements, excluded.last_at);
"""


def refresh_net_on_hand(conn: Any) -> int:
    """Recompute ``devices.on_hand_delta`` in one transaction; returns the rows it changed."""
    from airflow_sync_provider.core.catalog import table_exists

    *create, upsert = (statement for statement in NET_ON_HAND.split(";") if statement.strip())
    with conn.transaction():
        for statement in create:
            conn.execute(statement)
        if not table_exists(conn, SCHEMA, "stock_movements"):
            return 0  # no device has published yet
        return int(conn.execute(upsert).rowcount)


def device_dag(dag_id: str, schedule: Any, description: str) -> DAG:
    with DAG(
        dag_id=dag_id,
        schedule=schedule,
        start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        catchup=False,
        max_active_runs=1,
        tags=["sync", "case-study", "inventory", "events"],
        description=description,
        doc_md=__doc__,
        default_args={"retries": 2, "retry_delay": dt.timedelta(seconds=10)},
    ) as dag:
        drain = EventStreamToPostgresOperator(
            task_id="drain_movements",
            sync_id=SYNC_ID,
            source_conn_id=DEVICES,
            stream=TOPIC,
            target_conn_id=CENTRAL,
            target_schema=SCHEMA,
            target_table="stock_movements",
            columns=MOVEMENT_COLUMNS,
            event_id="event_id",
            event_time="at",
            sequence="seq",
            batch_events=5_000,
            max_seconds=50,  # a run ends; the next one goes on from the session
            wait_seconds=2.0,
            outlets=[table_asset(CENTRAL, SCHEMA, "stock_movements")],
        )

        @task(outlets=[table_asset(CENTRAL, SCHEMA, "on_hand_delta")])
        def net_on_hand(**context: Any) -> int:
            from airflow_sync_provider.assets import emit_table_event
            from airflow_sync_provider.hooks.target import SyncTargetHook

            with SyncTargetHook(postgres_conn_id=CENTRAL).get_sync_connection() as conn:
                changed = refresh_net_on_hand(conn)
            emit_table_event(context, CENTRAL, SCHEMA, "on_hand_delta", updated=changed)
            return changed

        drain >> net_on_hand()
    return dag


#: Every minute: simple and predictable.
device_inventory_sync = device_dag("device_inventory_sync", dt.timedelta(minutes=1), "device movements every minute")

#: Or when a device publishes: the triggerer keeps a watcher session on the topic (its own, so the
#: sync's persistent session keeps its messages) and starts a run (no worker slot held meanwhile).
device_events = Asset(
    name="warehouse_device_events",
    watchers=[
        AssetWatcher(
            name="device_topic",
            trigger=EventStreamTrigger(
                source_conn_id=DEVICES, stream=TOPIC, sync_id=SYNC_ID, target_conn_id=CENTRAL, target_schema=SCHEMA
            ),
        )
    ],
)
device_inventory_sync_on_event = device_dag(
    "device_inventory_sync_on_event", [device_events], "device movements when a device publishes"
)
