"""The device case study end to end: simulated RFID gates and scanners publish stock movements over
MQTT (with resends, late buffered sends and garbage), the reference DAG's tasks drain them into the
central inventory, and the net movement per warehouse and SKU equals what the devices did.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from sync_dev.device_simulator import Fleet, PrivateMosquitto, movement_columns, publish

from ..conftest import SyncEnv
from .test_events_brokers import mosquitto_fixture  # noqa: F401  (fixture)
from .test_events_sync import rows

DAGS = Path(__file__).resolve().parents[2] / "dags"


def atp_on_hand(env: SyncEnv) -> dict[str, tuple[int, int]]:
    """(on_hand, reserved) per SKU as available-to-promise reads them."""
    return {
        sku: (on_hand, reserved)
        for sku, on_hand, reserved in rows(env, "SELECT sku, on_hand, reserved FROM inventory.atp_inputs")
    }


@pytest.fixture
def device_dag(monkeypatch: pytest.MonkeyPatch, env: SyncEnv, mosquitto: PrivateMosquitto) -> Any:
    pytest.importorskip("paho.mqtt")
    monkeypatch.syspath_prepend(str(DAGS))
    sys.modules.pop("device_inventory_sync", None)
    import device_inventory_sync

    client_id = f"central-{env.target_db}"
    connection = {"conn_type": "mqtt", "host": "127.0.0.1", "port": mosquitto.port, "extra": {"client_id": client_id}}
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEVICES", json.dumps(connection))
    monkeypatch.setenv(
        "AIRFLOW_CONN_INVENTORY_CENTRAL", f"postgres://postgres@127.0.0.1:{env.server.port}/{env.target_db}"
    )
    monkeypatch.setenv("SYNC_STAGING_DIR", env.staging.base_uri.removeprefix("file://"))
    return device_inventory_sync


def run_dag_tasks(module: Any, env: SyncEnv, run_id: str) -> dict[str, Any]:
    dag = module.device_inventory_sync
    result = dag.get_task("drain_movements").execute({"run_id": run_id})
    with env.target() as conn:
        module.refresh_net_on_hand(conn)
    return dict(result)


def test_device_movements_reach_the_central_inventory_exactly_once(
    env: SyncEnv, device_dag: Any, mosquitto: PrivateMosquitto
) -> None:
    assert {t.task_id for t in device_dag.device_inventory_sync.tasks} == {"drain_movements", "net_on_hand"}
    assert movement_columns() == device_dag.MOVEMENT_COLUMNS  # what the simulator sends is what the DAG declares
    fleet = Fleet(skus=60, seed=11)
    run_dag_tasks(device_dag, env, "manual__0")  # the first run creates the persistent session
    for round_number in range(1, 4):
        publish(fleet.round(1_500), port=mosquitto.port)
        result = run_dag_tasks(device_dag, env, f"manual__{round_number}")
        assert result["inserted"] > 0
    assert fleet.duplicates > 0 and fleet.late > 0 and fleet.garbage > 0  # the traffic had all three
    net = {(w, s): d for w, s, d in rows(env, "SELECT warehouse, sku, delta FROM devices.on_hand_delta")}
    expected = {key: delta for key, delta in fleet.expected.items()}
    assert net == expected
    assert rows(env, "SELECT count(*), count(DISTINCT event_id) FROM devices.stock_movements") == [
        (fleet.sent_events, fleet.sent_events)
    ]
    quarantined = rows(env, "SELECT count(*), count(*) FILTER (WHERE reason <> '') FROM devices._sync_event_quarantine")
    assert 0 < quarantined[0][0] <= fleet.garbage and quarantined[0][0] == quarantined[0][1]


def test_device_movements_count_in_available_to_promise(
    env: SyncEnv, device_dag: Any, mosquitto: PrivateMosquitto
) -> None:
    """ATP inputs per SKU move by exactly the devices' net movement; without devices they are unchanged."""
    from case_studies.inventory import WAREHOUSES, prepare_central

    fleet = Fleet(skus=40, seed=5)
    stocked = [f"SKU-{n:05d}" for n in range(0, 40, 2)]  # half the SKUs are in the warehouses' stock too
    with env.target() as conn:
        prepare_central(conn)  # before any device: the view is the warehouses' stock only
        for warehouse in WAREHOUSES:
            conn.execute(
                sql.SQL("INSERT INTO {} SELECT sku, 500, 7, now() FROM unnest(%s::text[]) sku").format(
                    sql.Identifier(warehouse, "stock")
                ),
                (stocked,),
            )
    before = atp_on_hand(env)
    assert before == {sku: (500 * len(WAREHOUSES), 7 * len(WAREHOUSES)) for sku in stocked}
    run_dag_tasks(device_dag, env, "manual__0")  # creates devices.on_hand_delta (empty) and the session
    with env.target() as conn:
        prepare_central(conn)  # the inventory DAG's first task: now the view reads the devices too
    assert atp_on_hand(env) == before  # no movement yet: nothing changes
    for round_number in (1, 2):
        publish(fleet.round(800), port=mosquitto.port)
        run_dag_tasks(device_dag, env, f"manual__{round_number}")
    net: dict[str, int] = {}
    for (_, sku), delta in fleet.expected.items():
        net[sku] = net.get(sku, 0) + delta
    after = atp_on_hand(env)
    assert set(after) == set(before) | set(net)
    for sku, (on_hand, reserved) in after.items():
        assert on_hand - before.get(sku, (0, 0))[0] == net.get(sku, 0), sku
        assert reserved == before.get(sku, (0, 0))[1], sku  # movements change on-hand, never reservations
