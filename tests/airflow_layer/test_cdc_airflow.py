"""The Airflow layer of CDC against the real PostgreSQL the suite starts: hook, operators, sensor,
triggers (task and asset-watcher), provider registration, and the commit-to-target latency.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airflow_sync_provider.core.cdc import CdcSpec
from airflow_sync_provider.core.cdc import slot as cdc_slot
from airflow_sync_provider.core.cdc.pgoutput import lsn_to_int
from airflow_sync_provider.core.errors import ConfigurationError, SchemaError, SourceUnavailableError

from ..conftest import SyncEnv, source_columns, table_checksum

ROWS = 500


@dataclass
class Stock:
    """The ``stock`` source table of one test, its sync id, and the Airflow connections to it."""

    env: SyncEnv
    sync_id: str

    @property
    def spec(self) -> CdcSpec:
        return CdcSpec(sync_id=self.sync_id, tables=("stock",))

    def execute(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        with self.env.source() as conn:
            conn.execute(statement, params)

    def change(self) -> None:
        """One insert, one update and one delete, each its own transaction."""
        self.execute("INSERT INTO stock VALUES ('sku-new', 'wh-9', 7)")
        self.execute("UPDATE stock SET on_hand = on_hand + 100 WHERE sku = 'sku-2'")
        self.execute("DELETE FROM stock WHERE sku = 'sku-3'")

    def assert_converged(self) -> int:
        with self.env.source() as src, self.env.target() as tgt:
            columns = source_columns(src, "stock")
            source = table_checksum(src, "stock", columns, ["sku", "warehouse"])
            target = table_checksum(tgt, "stock", columns, ["sku", "warehouse"])
        assert target == source
        return source[0]

    def slot(self) -> cdc_slot.SlotInfo:
        with self.env.source() as conn:
            return cdc_slot.slot_info(conn, self.spec.slot_name)

    def sync_operator(self, **kwargs: Any) -> Any:
        from airflow_sync_provider.operators.cdc import CdcSyncOperator

        return CdcSyncOperator(
            task_id="cdc_sync",
            source_conn_id="sync_source",
            target_conn_id="sync_target",
            sync_id=self.sync_id,
            tables=["stock"],
            **kwargs,
        )


@pytest.fixture
def stock(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stock]:
    port = env.server.port
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_SOURCE", f"postgres://postgres@127.0.0.1:{port}/{env.source_db}")
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_TARGET", f"postgres://postgres@127.0.0.1:{port}/{env.target_db}")
    monkeypatch.setenv("SYNC_STAGING_DIR", str(Path(env.staging.base_uri.removeprefix("file://"))))
    with env.source() as conn:
        conn.execute("CREATE TABLE stock (sku text, warehouse text, on_hand int, PRIMARY KEY (sku, warehouse))")
        conn.execute(
            "INSERT INTO stock SELECT 'sku-' || g, 'wh-' || (g %% 3), g FROM generate_series(1, %s) g", (ROWS,)
        )
    yield Stock(env, f"stock_{uuid.uuid4().hex[:10]}")
    # Slots are cluster-wide and block DROP DATABASE: drop this database's slots first.
    with env.source() as conn:
        names = conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
        ).fetchall()
        for (name,) in names:
            cdc_slot.drop_slot(conn, name)


def context(run_id: str) -> Any:
    return {"run_id": run_id}


def fire_after_commit(
    trigger: Any, commit: Callable[[], None], delay: float = 0.4, timeout: float = 15.0
) -> tuple[Any, float, float, float]:
    """Start ``trigger.run()``, run ``commit`` from a thread ``delay`` seconds later; return the first
    event and the monotonic times at which the commit started, returned, and the event arrived."""
    times: dict[str, float] = {}

    def writer() -> None:
        time.sleep(delay)
        times["commit_started"] = time.monotonic()
        commit()
        times["committed"] = time.monotonic()

    async def first_event() -> Any:
        event = await asyncio.wait_for(trigger.run().__anext__(), timeout=timeout)
        times["fired"] = time.monotonic()
        return event

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        event = asyncio.run(first_event())
    finally:
        thread.join()
    return event, times["commit_started"], times["committed"], times["fired"]


# --------------------------------------------------------------------------- operators


def test_sync_operator_snapshots_then_applies_changes(stock: Stock) -> None:
    from airflow_sync_provider.operators.cdc import CdcSyncOperator

    operator = CdcSyncOperator(
        task_id="cdc_sync",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        sync_id="{{ params.sync_id }}",
        tables="{{ params.table }}",
    )
    assert {"sync_id", "tables", "slot_name", "publication", "target_schema", "staging_uri"} <= set(
        operator.template_fields
    )
    operator.render_template_fields({"params": {"sync_id": stock.sync_id, "table": "stock"}})  # type: ignore[arg-type]
    assert (operator.sync_id, operator.tables) == (stock.sync_id, "stock")

    first = operator.execute(context("manual__1"))
    assert (first["manifest"]["kind"], first["load"]["status"], first["load"]["inserted"]) == (
        "snapshot",
        "applied",
        ROWS,
    )
    assert sum(first["manifest"]["tables"].values()) == ROWS
    assert len(json.dumps(first)) < 4_000  # XCom: a summary, never rows or file lists
    assert stock.assert_converged() == ROWS

    stock.change()
    second = operator.execute(context("manual__2"))
    assert second["manifest"]["kind"] == "changes"
    assert (second["manifest"]["transactions"], second["manifest"]["changes"]) == (3, 3)
    load = second["load"]
    assert (load["status"], load["inserted"], load["updated"], load["deleted"]) == ("applied", 1, 1, 1)
    assert stock.assert_converged() == ROWS
    # run_cdc_sync confirmed the slot after the commit.
    assert stock.slot().confirmed_flush_lsn == lsn_to_int(load["end_lsn"])

    third = operator.execute(context("manual__3"))
    assert third["load"]["status"] == "no_changes"
    assert third["load"]["version"] == load["version"]


def test_split_extract_then_load_confirms_the_slot(stock: Stock) -> None:
    from airflow_sync_provider.hooks.cdc import PostgresCdcHook
    from airflow_sync_provider.operators.cdc import CdcExtractOperator, CdcLoadOperator

    extract = CdcExtractOperator(
        task_id="extract",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        sync_id=stock.sync_id,
        tables=["stock"],
        batch_rows=200,
    )
    snapshot = extract.execute(context("manual__1"))
    assert snapshot["kind"] == "snapshot" and snapshot["format"] == "cdc-1"
    assert sum(len(t["files"]) for t in snapshot["tables"]) == 3  # 500 rows in pages of 200
    loaded = CdcLoadOperator(
        task_id="load", manifest=snapshot, target_conn_id="sync_target", source_conn_id="sync_source"
    ).execute(context("manual__1"))
    assert (loaded["status"], loaded["inserted"], loaded["version"]) == ("applied", ROWS, 1)
    stock.assert_converged()

    stock.change()
    before = stock.slot().confirmed_flush_lsn
    assert before is not None
    manifest = extract.execute(context("manual__2"))
    assert (manifest["kind"], manifest["changes"]) == ("changes", 3)
    assert stock.slot().confirmed_flush_lsn == before  # extracting consumes nothing

    load = CdcLoadOperator(
        task_id="load", manifest=json.dumps(manifest), target_conn_id="sync_target", source_conn_id="sync_source"
    )
    result = load.execute(context("manual__2"))
    assert (result["status"], result["inserted"], result["updated"], result["deleted"]) == ("applied", 1, 1, 1)
    assert result["confirmed_lsn"] == result["end_lsn"]
    confirmed = stock.slot().confirmed_flush_lsn
    assert confirmed == lsn_to_int(result["end_lsn"]) and confirmed > before
    assert PostgresCdcHook(source_conn_id="sync_source").has_pending_changes(stock.spec) is False
    stock.assert_converged()

    # The Airflow retry of a load whose first try committed: a no-op that still confirms.
    again = load.execute(context("manual__2"))
    assert again["status"] == "already_applied" and again["confirmed_lsn"] == result["end_lsn"]

    from airflow.sdk.exceptions import AirflowFailException

    bad = CdcLoadOperator(task_id="load", manifest={"format": "v1", "rows": 1}, target_conn_id="sync_target")
    with pytest.raises(AirflowFailException, match="not a CDC manifest"):
        bad.execute(context("manual__3"))


def test_errors_name_the_problem_and_fail_fast(stock: Stock) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_sync_provider.operators.cdc import CdcSyncOperator

    missing_table = CdcSyncOperator(
        task_id="cdc", source_conn_id="sync_source", target_conn_id="sync_target", tables=["stock", "no_such"]
    )
    with pytest.raises(AirflowFailException, match="explicit sync_id"):
        missing_table.execute(context("manual__1"))
    missing_table.sync_id = stock.sync_id
    with pytest.raises(AirflowFailException, match=r"table='public\.no_such'.*does not exist"):
        missing_table.execute(context("manual__1"))

    with pytest.raises(SourceUnavailableError, match="no_such_connection"):
        CdcSyncOperator(
            task_id="cdc", source_conn_id="no_such_connection", target_conn_id="sync_target", tables=["stock"]
        ).execute(context("manual__1"))

    stock.sync_operator().execute(context("manual__1"))
    stock.change()
    guarded = stock.sync_operator(max_retained_wal_bytes=1)
    with pytest.raises(AirflowFailException, match="max_retained_wal_bytes"):
        guarded.execute(context("manual__2"))
    assert stock.env.state(stock.sync_id) is not None
    with stock.env.target() as conn:
        row = conn.execute("SELECT count(*) FROM stock WHERE sku = 'sku-new'").fetchone()
    assert row == (0,)  # the guard changed nothing


# --------------------------------------------------------------------------- hook and sensor


def test_hook_prepares_inspects_and_drops_the_slot(stock: Stock, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_sync_provider.hooks.cdc import PostgresCdcHook

    hook = PostgresCdcHook(source_conn_id="sync_source")
    assert hook.slot_lag(stock.spec)["exists"] is False
    info = hook.ensure_ready(stock.spec)
    assert info.exists and info.confirmed_flush_lsn is not None
    lag = hook.slot_lag(stock.spec)
    assert (lag["exists"], lag["pending"], lag["slot"]) == (True, False, stock.spec.slot_name)
    stock.execute("UPDATE stock SET on_hand = 0 WHERE sku = 'sku-1'")
    lag = hook.slot_lag(stock.spec)
    assert lag["pending"] is True and lag["retained_wal_bytes"] > 0
    assert hook.has_pending_changes(stock.spec) is True

    assert hook.drop_slot(stock.spec) is True
    assert hook.drop_slot(stock.spec) is False
    with pytest.raises(SchemaError, match="slot missing"):
        hook.has_pending_changes(stock.spec)

    monkeypatch.setenv("AIRFLOW_CONN_SQLITE_SOURCE", "sqlite://%2Ftmp%2Fnothing.db")
    with pytest.raises(ConfigurationError, match="CDC needs PostgreSQL"):
        PostgresCdcHook(source_conn_id="sqlite_source").get_conninfo()


def first_event(stock: Stock) -> dict[str, Any]:
    from airflow_sync_provider.triggers.cdc import CdcChangesTrigger

    trigger = CdcChangesTrigger(source_conn_id="sync_source", sync_id=stock.sync_id, poll_interval=0.1)
    return dict(asyncio.run(asyncio.wait_for(trigger.run().__anext__(), timeout=10)).payload)


def test_sensor_pokes_false_until_a_change(stock: Stock) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_sync_provider.sensors.cdc import CdcChangesSensor

    sensor = CdcChangesSensor(task_id="wait", source_conn_id="sync_source", sync_id=stock.sync_id)
    first = sensor.poke(context("manual__1"))
    assert first.is_done and first.xcom_value["status"] == "no_slot"  # the sync needs its snapshot
    assert first_event(stock)["status"] == "no_slot"  # and so does the trigger

    stock.sync_operator().execute(context("manual__1"))
    assert not sensor.poke(context("manual__2"))

    # Changes to a table outside the publication are not changes of this sync.
    stock.execute("CREATE TABLE audit (id int PRIMARY KEY)")
    stock.execute("INSERT INTO audit VALUES (1)")
    assert not sensor.poke(context("manual__2"))

    stock.execute("UPDATE stock SET on_hand = -1 WHERE sku = 'sku-10'")
    ready = sensor.poke(context("manual__2"))
    assert ready.is_done
    assert ready.xcom_value["status"] == "changes" and ready.xcom_value["slot"] == stock.spec.slot_name

    stock.sync_operator().execute(context("manual__3"))
    assert not sensor.poke(context("manual__4"))

    # Without its publication the slot decodes nothing at all (PostgreSQL 18 only warns): fail, never wait.
    stock.execute(f"DROP PUBLICATION {stock.spec.publication}")
    stock.execute("UPDATE stock SET on_hand = -2 WHERE sku = 'sku-10'")
    with pytest.raises(AirflowFailException, match="does not exist"):
        sensor.poke(context("manual__5"))
    event = first_event(stock)
    assert event["status"] == "error" and stock.spec.publication in event["message"]


def test_deferrable_sensor_defers_and_its_trigger_fires_on_commit(stock: Stock) -> None:
    from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

    from airflow_sync_provider.sensors.cdc import CdcChangesSensor
    from airflow_sync_provider.triggers.cdc import CdcChangesTrigger

    stock.sync_operator().execute(context("manual__1"))
    sensor = CdcChangesSensor(
        task_id="wait",
        source_conn_id="sync_source",
        sync_id=stock.sync_id,
        deferrable=True,
        poke_interval=0.2,
        timeout=120,
    )
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context("manual__2"))
    trigger = deferred.value.trigger
    assert isinstance(trigger, CdcChangesTrigger)
    assert deferred.value.method_name == "execute_complete"
    assert deferred.value.timeout == dt.timedelta(seconds=120)
    assert (trigger.slot_name, trigger.publication, trigger.poll_interval) == (
        stock.spec.slot_name,
        stock.spec.publication,
        0.2,
    )

    stock.execute("CREATE TABLE audit (id int PRIMARY KEY)")

    def commit() -> None:
        stock.execute("INSERT INTO audit VALUES (1)")  # not in the publication: no event
        time.sleep(0.6)
        marks["stock_change"] = time.monotonic()
        stock.execute("DELETE FROM stock WHERE sku = 'sku-20'")

    marks: dict[str, float] = {}
    event, _, _, fired = fire_after_commit(trigger, commit)
    assert fired > marks["stock_change"]  # it waited for a change of this sync, not any commit
    assert event.payload["status"] == "changes" and event.payload["first_change_lsn"]

    result = sensor.execute_complete(context("manual__2"), event.payload)
    assert result["status"] == "changes" and result["slot"] == stock.spec.slot_name
    with pytest.raises(AirflowFailException, match="slot was invalidated"):
        sensor.execute_complete(context("manual__2"), {"status": "error", "message": "slot was invalidated"})


# --------------------------------------------------------------------------- triggers


def test_event_trigger_fires_once_per_batch_of_changes(stock: Stock) -> None:
    from airflow.sdk import Asset, AssetWatcher
    from airflow.triggers.base import BaseEventTrigger

    from airflow_sync_provider.triggers.cdc import CdcChangesEventTrigger, CdcChangesTrigger

    stock.sync_operator().execute(context("manual__1"))
    trigger = CdcChangesEventTrigger(source_conn_id="sync_source", sync_id=stock.sync_id, poll_interval=0.2)
    asset = Asset(name="stock_changes", watchers=[AssetWatcher(name="stock_slot", trigger=trigger)])
    assert asset.watchers[0].trigger is trigger
    assert isinstance(BaseEventTrigger.hash(*trigger.serialize()), int)  # what the scheduler stores
    with pytest.raises(ValueError, match="BaseEventTrigger"):
        AssetWatcher(name="task_trigger", trigger=CdcChangesTrigger(source_conn_id="x", sync_id="y"))  # type: ignore[arg-type]

    async def scenario() -> tuple[dict[str, Any], bool, dict[str, Any]]:
        events = trigger.run()
        writer = asyncio.create_task(
            asyncio.to_thread(lambda: (time.sleep(0.3), stock.execute("INSERT INTO stock VALUES ('a', 'b', 1)")))
        )
        first = await asyncio.wait_for(events.__anext__(), timeout=10)
        await writer
        # Nobody consumed the change yet: the same pending change does not fire again.
        pending = asyncio.ensure_future(events.__anext__())
        done, _ = await asyncio.wait({pending}, timeout=1.2)
        refired = bool(done)
        # A DAG run consumes it; the next change fires again.
        await asyncio.to_thread(stock.sync_operator().execute, context("manual__2"))
        await asyncio.to_thread(stock.execute, "UPDATE stock SET on_hand = 5 WHERE sku = 'a'")
        second = await asyncio.wait_for(pending, timeout=10)
        await events.aclose()  # type: ignore[attr-defined]
        return first.payload, refired, second.payload

    first, refired, second = asyncio.run(scenario())
    assert first["status"] == "changes" and first["slot"] == stock.spec.slot_name
    assert not refired
    assert second["status"] == "changes"
    assert lsn_to_int(second["first_change_lsn"]) > lsn_to_int(first["first_change_lsn"])


def test_trigger_serializes_round_trip_and_hides_the_password() -> None:
    from airflow.triggers.base import BaseEventTrigger

    from airflow_sync_provider.triggers.cdc import CdcChangesEventTrigger, CdcChangesTrigger

    conninfo = "postgresql://sync:s3cret@db.example:5432/shop?sslmode=require"
    trigger = CdcChangesTrigger(conninfo=conninfo, sync_id="Stock Sync", poll_interval=5)
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_sync_provider.triggers.cdc.CdcChangesTrigger"
    assert kwargs["slot_name"] == kwargs["publication"] == CdcSpec("Stock Sync", ("stock",)).slot_name
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))
    assert rebuilt.serialize() == (classpath, kwargs)
    assert rebuilt.conninfo == conninfo  # the triggerer can connect
    assert "s3cret" not in repr(trigger) and "***" in repr(trigger)

    event_trigger = CdcChangesEventTrigger(source_conn_id="sync_source", slot_name="orders_slot", refire_after=None)
    classpath, kwargs = event_trigger.serialize()
    assert (kwargs["conninfo"], kwargs["publication"], kwargs["refire_after"]) == ("", "orders_slot", None)
    rebuilt_event = CdcChangesEventTrigger(**kwargs)
    assert rebuilt_event.serialize() == (classpath, kwargs)
    assert BaseEventTrigger.hash(classpath, kwargs) == BaseEventTrigger.hash(*rebuilt_event.serialize())

    # A DAG scheduled on an asset watched by the trigger serializes (what the dag processor stores).
    from airflow.sdk import DAG, Asset, AssetWatcher
    from airflow.serialization.serialized_objects import DagSerialization

    asset = Asset(name="orders_changes", watchers=[AssetWatcher(name="orders_slot", trigger=event_trigger)])
    with DAG("cdc_on_change", schedule=[asset], start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)) as dag:
        pass
    serialized = json.dumps(DagSerialization.to_dict(dag))
    assert '"classpath": "airflow_sync_provider.triggers.cdc.CdcChangesEventTrigger"' in serialized
    assert '"slot_name": "orders_slot"' in serialized

    unknown = CdcChangesTrigger(source_conn_id="no_such_connection", sync_id="x", poll_interval=0.1)
    event = asyncio.run(asyncio.wait_for(unknown.run().__anext__(), timeout=10))
    assert event.payload["status"] == "error" and "no_such_connection" in event.payload["message"]

    with pytest.raises(ValueError, match="exactly one"):
        CdcChangesTrigger(conninfo=conninfo, source_conn_id="sync_source", sync_id="x")
    with pytest.raises(ConfigurationError, match="sync_id or slot_name"):
        CdcChangesTrigger(source_conn_id="sync_source")


def test_provider_registers_the_cdc_modules() -> None:
    from airflow.providers_manager import ProvidersManager

    from airflow_sync_provider.get_provider_info import get_provider_info

    info = get_provider_info()
    modules = {
        key: {m for group in info[key] for m in group["python-modules"]}
        for key in ("hooks", "operators", "sensors", "triggers")
    }
    assert "airflow_sync_provider.hooks.cdc" in modules["hooks"]
    assert "airflow_sync_provider.operators.cdc" in modules["operators"]
    assert modules["sensors"] == {"airflow_sync_provider.sensors.cdc"}
    assert modules["triggers"] == {"airflow_sync_provider.triggers.cdc", "airflow_sync_provider.triggers.events"}
    for names in modules.values():
        for name in names:
            importlib.import_module(name)

    manager = ProvidersManager()
    provider = manager.providers["airflow-sync-provider"]
    assert provider.data["sensors"] == info["sensors"]
    ours = {t.trigger_class_name for t in manager.trigger if t.package_name == "airflow-sync-provider"}
    assert ours == {"airflow_sync_provider.triggers.cdc", "airflow_sync_provider.triggers.events"}


# --------------------------------------------------------------------------- latency


def test_latency_from_source_commit_to_target(stock: Stock) -> None:
    from airflow_sync_provider.hooks.cdc import PostgresCdcHook
    from airflow_sync_provider.triggers.cdc import CdcChangesTrigger

    operator = stock.sync_operator()
    operator.execute(context("manual__1"))
    trigger = CdcChangesTrigger(
        conninfo=PostgresCdcHook(source_conn_id="sync_source").get_conninfo(), sync_id=stock.sync_id, poll_interval=0.2
    )
    event, _, committed, fired = fire_after_commit(
        # Committed about halfway between two polls: the average case, not the lucky one.
        trigger,
        lambda: stock.execute("INSERT INTO stock VALUES ('sku-latency', 'wh-1', 1)"),
        delay=0.5,
    )
    assert event.payload["status"] == "changes"
    result = operator.execute(context("manual__2"))
    with stock.env.target() as conn:
        row = conn.execute("SELECT on_hand FROM stock WHERE sku = 'sku-latency'").fetchone()
    visible = time.monotonic()
    assert row == (1,) and result["load"]["inserted"] == 1
    latency = visible - committed
    print(
        f"latency source commit -> target row: {latency:.2f} s "
        f"(trigger fired after {fired - committed:.2f} s with poll_interval=0.2 s, sync task {visible - fired:.2f} s)"
    )
    assert latency < 10
