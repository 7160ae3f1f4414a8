"""OpenLineage and asset events of the sync operators, against the real PostgreSQL of the suite.

The operators run for real (``execute``), then give their OpenLineage facets the way the
OpenLineage listener asks for them; the asset events go to Airflow's own outlet-event accessors.
One ``dag.test()`` run (the sandbox) checks the whole path: the OpenLineage provider's file
transport receives the events, and the metadata database holds the ``postgres://`` asset events
with their ``extra``.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from airflow.sdk import Asset, AssetAlias
from airflow.sdk.exceptions import AirflowFailException
from airflow.sdk.execution_time.context import OutletEventAccessors
from openlineage.client.serde import Serde

from airflow_sync_provider.assets import table_asset
from airflow_sync_provider.lineage import DatasetName, column_lineage, database_dataset, staging_dataset

from ..conftest import CdcEnv, SyncEnv, airflow_orders

ROWS = 300


@pytest.fixture
def orders(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> SyncEnv:
    """``sync_source`` / ``sync_target`` connections and a source ``orders`` table."""
    return airflow_orders(env, monkeypatch, rows=ROWS)


def add_total(batch: pd.DataFrame) -> pd.DataFrame:
    batch["total"] = batch["quantity"] * batch["unit_price"]
    return batch.drop(columns=["customer"])


add_total.column_lineage = {"total": (("quantity", "unit_price"), "quantity * unit_price")}  # type: ignore[attr-defined]


def as_json(value: Any) -> Any:
    """An OpenLineage object as the transport writes it."""
    return json.loads(Serde.to_json(value))


def names(datasets: list[Any]) -> list[tuple[str, str]]:
    return [(d.namespace, d.name) for d in datasets]


def run(operator: Any, run_id: str, events: OutletEventAccessors | None = None) -> Any:
    return operator.execute({"run_id": run_id, "outlet_events": OutletEventAccessors() if events is None else events})


# --------------------------------------------------------------------------- the pure mapping


def test_dataset_names_follow_the_openlineage_conventions() -> None:
    import sqlalchemy as sa

    pg = sa.make_url("postgresql+psycopg://u:p@db.example/shop")
    assert database_dataset(pg, "sales.orders") == DatasetName("postgres://db.example:5432", "shop.sales.orders")
    assert database_dataset(pg, "orders") == DatasetName("postgres://db.example:5432", "shop.public.orders")
    mysql = sa.make_url("mysql+pymysql://root@127.0.0.1:3307/erp")
    assert database_dataset(mysql, "orders") == DatasetName("mysql://127.0.0.1:3307", "erp.orders")
    assert database_dataset(sa.make_url("sqlite:////data/shop.db"), "orders") == DatasetName(
        "sqlite:///data/shop.db", "main.orders"
    )
    # one dataset per sync, not one per batch folder
    assert staging_dataset("file:///var/sync/orders/20261130T010203-abc") == DatasetName("file", "/var/sync/orders")
    assert staging_dataset("s3://bucket/stage/orders/20261130T010203-abc") == DatasetName("s3://bucket", "stage/orders")


def test_column_lineage_never_guesses_a_column_a_transform_made() -> None:
    source = DatasetName("postgres://h:5432", "db.public.orders")
    lineage = column_lineage(
        ["id", "quantity", "total", "_sync_run_id"],
        source,
        source_columns=["id", "quantity", "unit_price"],
        declared=None,
    )
    assert set(lineage) == {"id", "quantity"}  # total: unknown origin; _sync_*: ours
    declared = column_lineage(["total"], source, source_columns=["quantity"], declared=add_total.column_lineage)  # type: ignore[attr-defined]
    assert [(s.column, s.transformation) for s in declared["total"]] == [
        ("quantity", "quantity * unit_price"),
        ("unit_price", "quantity * unit_price"),
    ]


def test_table_asset_is_a_parse_time_alias() -> None:
    alias = table_asset("warehouse", "public", "orders")
    assert isinstance(alias, AssetAlias) and alias.name == "warehouse.public.orders"


# --------------------------------------------------------------------------- operators


def test_one_task_sync_reports_datasets_columns_counts_and_an_asset_event(orders: SyncEnv) -> None:
    from airflow_sync_provider.operators.sync import SyncTableOperator

    alias = table_asset("sync_target", "public", "orders")
    operator = SyncTableOperator(
        task_id="sync",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        source_table="orders",
        cursor_column="updated_at",
        transform=add_total,
        outlets=[alias],
    )
    port = orders.server.port
    namespace = f"postgres://127.0.0.1:{port}"
    started = operator.get_openlineage_facets_on_start()  # names only, from the declaration
    assert names(started.inputs) == [(namespace, f"{orders.source_db}.public.orders")]
    assert names(started.outputs) == [(namespace, f"{orders.target_db}.public.orders")]
    events = OutletEventAccessors()
    run(operator, "manual__1", events)
    lineage = operator.get_openlineage_facets_on_complete(None)
    assert names(lineage.inputs) == [(namespace, f"{orders.source_db}.public.orders")]
    assert names(lineage.outputs) == [(namespace, f"{orders.target_db}.public.orders")]
    (output,) = [as_json(o) for o in lineage.outputs]
    fields = output["facets"]["columnLineage"]["fields"]
    assert set(fields) == {"id", "quantity", "unit_price", "updated_at", "total"}  # customer dropped
    assert fields["id"]["inputFields"] == [
        {
            "namespace": namespace,
            "name": f"{orders.source_db}.public.orders",
            "field": "id",
            "transformations": [{"type": "DIRECT", "subtype": "IDENTITY"}],
        }
    ]
    assert [f["field"] for f in fields["total"]["inputFields"]] == ["quantity", "unit_price"]
    assert fields["total"]["transformationDescription"] == "quantity * unit_price"
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == ROWS
    assert (
        output["outputFacets"]["syncStatistics"]["inserted"],
        output["outputFacets"]["syncStatistics"]["updated"],
    ) == (ROWS, 0)
    assert "total" in [f["name"] for f in output["facets"]["schema"]["fields"]]

    (event,) = events[alias].asset_alias_events
    assert event.dest_asset_key.uri == f"postgres://127.0.0.1:{port}/{orders.target_db}/public/orders"
    assert event.extra["inserted"] == ROWS and event.extra["status"] == "applied"
    assert event.extra["watermark_low"] is None and event.extra["watermark_high"]  # the range synced
    assert event.extra["state_version"] == 1
    json.dumps(event.extra)  # JSON-safe, as Airflow stores it

    # The same run again: nothing to do, still a committed version; its counts say so.
    with orders.source() as conn:
        conn.execute("UPDATE orders SET quantity = quantity + 1, updated_at = now() WHERE id <= 10")
    again = OutletEventAccessors()
    run(operator, "manual__2", again)
    (event,) = again[alias].asset_alias_events
    assert (event.extra["inserted"], event.extra["updated"], event.extra["state_version"]) == (0, 10, 2)
    assert event.extra["watermark_low"] is not None
    output = as_json(operator.get_openlineage_facets_on_complete(None).outputs[0])
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == 10


def test_split_sync_and_gate_report_staging_quality_assertions_and_counts(orders: SyncEnv, tmp_path: Path) -> None:
    import great_expectations.expectations as E

    from airflow_sync_provider.operators.quality import DataQualityGateOperator
    from airflow_sync_provider.operators.sync import ExtractToStagingOperator, LoadStagedToPostgresOperator

    extract = ExtractToStagingOperator(
        task_id="extract",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        source_table="orders",
        cursor_column="updated_at",
    )
    manifest = run(extract, "manual__1")
    staged = staging_dataset(manifest["staging_dir"])
    extracted = extract.get_openlineage_facets_on_complete(None)
    assert names(extracted.outputs) == [(staged.namespace, staged.name)]
    assert staged.name.endswith("/orders")
    assert set(as_json(extracted.outputs[0])["facets"]["columnLineage"]["fields"]) == {
        "id",
        "customer",
        "quantity",
        "unit_price",
        "updated_at",
    }

    suite = [
        E.ExpectColumnValuesToNotBeNull(column="id"),
        E.ExpectColumnValuesToBeBetween(column="quantity", min_value=1, meta={"severity": "warn"}),  # 0s: fails
    ]
    gate = DataQualityGateOperator(task_id="gate", manifest=manifest, target_conn_id="sync_target", expectations=suite)
    gated = run(gate, "manual__1")
    (checked,) = gate.get_openlineage_facets_on_complete(None).inputs
    assert (checked.namespace, checked.name) == (staged.namespace, staged.name)
    assertions = as_json(checked)["inputFacets"]["dataQualityAssertions"]["assertions"]
    assert [(a["assertion"], a["success"], a["column"]) for a in assertions] == [
        ("expect_column_values_to_not_be_null", True, "id"),
        ("expect_column_values_to_be_between", False, "quantity"),
    ]
    assert assertions[1]["severity"] == "warn" and assertions[1]["actual"] == str(ROWS // 7)

    # A gate that fails reports its assertions on failure too (the listener asks on_failure).
    blocking = DataQualityGateOperator(
        task_id="gate2",
        manifest=manifest,
        target_conn_id="sync_target",
        expectations=[E.ExpectColumnValuesToBeBetween(column="quantity", max_value=3)],
    )
    with pytest.raises(AirflowFailException, match="quantity"):
        run(blocking, "manual__2")
    (failed,) = as_json(blocking.get_openlineage_facets_on_failure(None).inputs[0])["inputFacets"][
        "dataQualityAssertions"
    ]["assertions"]
    assert (failed["success"], failed["column"], failed["severity"]) == (False, "quantity", "error")

    alias = table_asset("sync_target", "public", "orders")
    load = LoadStagedToPostgresOperator(task_id="load", manifest=gated, target_conn_id="sync_target", outlets=[alias])
    events = OutletEventAccessors()
    run(load, "manual__1", events)
    loaded = load.get_openlineage_facets_on_complete(None)
    assert names(loaded.inputs) == [(staged.namespace, staged.name)]
    output = as_json(loaded.outputs[0])
    assert output["name"] == f"{orders.target_db}.public.orders"
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == ROWS
    assert len(events[alias].asset_alias_events) == 1

    # The retry of a committed load: no new rows, the event says so (Airflow still records it).
    retry = LoadStagedToPostgresOperator(task_id="load", manifest=gated, target_conn_id="sync_target", outlets=[alias])
    again = OutletEventAccessors()
    run(retry, "manual__1", again)
    (event,) = again[alias].asset_alias_events
    assert (event.extra["status"], event.extra["inserted"]) == ("already_applied", 0)


def test_a_plain_postgres_asset_outlet_gets_the_extra_and_a_stale_load_emits_nothing(orders: SyncEnv) -> None:
    from airflow_sync_provider.operators.sync import ExtractToStagingOperator, LoadStagedToPostgresOperator

    port = orders.server.port
    asset = Asset(uri=f"postgres://127.0.0.1:{port}/{orders.target_db}/public/orders")
    first = run(
        ExtractToStagingOperator(
            task_id="e", source_conn_id="sync_source", target_conn_id="sync_target", source_table="orders", mode="full"
        ),
        "r1",
    )
    overtaken = run(
        ExtractToStagingOperator(
            task_id="e", source_conn_id="sync_source", target_conn_id="sync_target", source_table="orders", mode="full"
        ),
        "r2",
    )
    events = OutletEventAccessors()
    run(
        LoadStagedToPostgresOperator(task_id="l", manifest=first, target_conn_id="sync_target", outlets=[asset]),
        "r1",
        events,
    )
    assert events[asset].extra["inserted"] == ROWS
    stale = OutletEventAccessors()
    result = run(
        LoadStagedToPostgresOperator(task_id="l", manifest=overtaken, target_conn_id="sync_target", outlets=[asset]),
        "r2",
        stale,
    )
    assert result["status"] == "stale" and stale[asset].extra == {}


def test_cdc_sync_reports_every_table_with_its_counts_and_lsn_range(
    cdc: CdcEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_sync_provider.operators.cdc import CdcSyncOperator

    env = cdc.env
    port = env.server.port
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_SOURCE", f"postgres://postgres@127.0.0.1:{port}/{env.source_db}")
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_TARGET", f"postgres://postgres@127.0.0.1:{port}/{env.target_db}")
    monkeypatch.setenv("SYNC_STAGING_DIR", str(Path(env.staging.base_uri.removeprefix("file://"))))
    with env.source() as conn:
        conn.execute("CREATE TABLE stock (sku text PRIMARY KEY, on_hand int)")
        conn.execute("CREATE TABLE moves (id int PRIMARY KEY, sku text)")
        conn.execute("INSERT INTO stock SELECT 'sku-' || g, g FROM generate_series(1, 50) g")
    aliases = [table_asset("sync_target", "cdc", t) for t in ("stock", "moves")]
    operator = CdcSyncOperator(
        task_id="cdc",
        sync_id=f"lineage_{uuid.uuid4().hex[:8]}",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        tables=["public.stock", "public.moves"],
        target_schema="cdc",
        outlets=aliases,
    )
    run(operator, "r1")
    with env.source() as conn:
        conn.execute("UPDATE stock SET on_hand = on_hand + 1 WHERE sku IN ('sku-1', 'sku-2')")
        conn.execute("INSERT INTO moves VALUES (1, 'sku-1')")
        conn.execute("DELETE FROM stock WHERE sku = 'sku-3'")
    events = OutletEventAccessors()
    run(operator, "r2", events)
    lineage = operator.get_openlineage_facets_on_complete(None)
    namespace = f"postgres://127.0.0.1:{port}"
    assert sorted(names(lineage.inputs)) == [
        (namespace, f"{env.source_db}.public.moves"),
        (namespace, f"{env.source_db}.public.stock"),
    ]
    outputs = {o["name"]: o for o in map(as_json, lineage.outputs)}
    stock = outputs[f"{env.target_db}.cdc.stock"]
    statistics = stock["outputFacets"]["syncStatistics"]
    assert (statistics["inserted"], statistics["updated"], statistics["deleted"]) == (0, 2, 1)
    assert set(stock["facets"]["columnLineage"]["fields"]) == {"sku", "on_hand"}  # no _cdc_* column
    assert outputs[f"{env.target_db}.cdc.moves"]["outputFacets"]["outputStatistics"]["rowCount"] == 1
    stock_event, moves_event = (events[a].asset_alias_events[0] for a in aliases)
    assert stock_event.dest_asset_key.uri == f"postgres://127.0.0.1:{port}/{env.target_db}/cdc/stock"
    assert (stock_event.extra["updated"], stock_event.extra["deleted"], moves_event.extra["inserted"]) == (2, 1, 1)
    assert "/" in stock_event.extra["lsn_high"] and stock_event.extra["lsn_low"] != stock_event.extra["lsn_high"]
    assert stock_event.extra["kind"] == "changes"

    # Nothing new: no event, so nothing downstream runs for nothing.
    quiet = OutletEventAccessors()
    run(operator, "r3", quiet)
    assert all(not quiet[a].asset_alias_events for a in aliases)


# --------------------------------------------------------------------------- end to end: dag.test()

LINEAGE_DAG = """
import datetime as dt

from airflow.sdk import DAG

from airflow_sync_provider.assets import table_asset
from airflow_sync_provider.operators.quality import DataQualityGateOperator
from airflow_sync_provider.operators.sync import ExtractToStagingOperator, LoadStagedToPostgresOperator

with DAG("lineage_sync", schedule=None, start_date=dt.datetime(2026, 1, 1), catchup=False):
    extract = ExtractToStagingOperator(
        task_id="extract",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        source_table="orders",
        cursor_column="updated_at",
    )
    gate = DataQualityGateOperator(
        task_id="gate", manifest=extract.output, target_conn_id="sync_target", suite_path=SUITE_PATH
    )
    load = LoadStagedToPostgresOperator(
        task_id="load",
        manifest=gate.output,
        target_conn_id="sync_target",
        outlets=[table_asset("sync_target", "public", "orders")],
    )
"""


@pytest.mark.airflow
def test_dag_run_emits_openlineage_events_and_postgres_asset_events(orders: SyncEnv, tmp_path: Path) -> None:
    import great_expectations as gx
    import great_expectations.expectations as E

    from sync_dev.airflow_sandbox import AirflowSandbox

    suite = tmp_path / "suite.json"
    expectations = [
        E.ExpectColumnValuesToNotBeNull(column="id"),
        E.ExpectColumnValuesToBeBetween(column="quantity", min_value=1, meta={"severity": "warn"}),
    ]
    suite.write_text(json.dumps(gx.ExpectationSuite(name="orders", expectations=expectations).to_json_dict()))
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "lineage_dag.py").write_text(f"SUITE_PATH = {str(suite)!r}\n" + textwrap.dedent(LINEAGE_DAG))
    events_file = tmp_path / "openlineage.jsonl"
    transport = {"type": "file", "log_file_path": str(events_file), "append": True}
    environment = {
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(transport),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "sync",
        # The listener emits a task's event from a forked process and kills it after execution_timeout
        # (10 s by default): on a loaded CI machine that dropped every task event (failed in CI once).
        "AIRFLOW__OPENLINEAGE__EXECUTION_TIMEOUT": "120",
    }
    with AirflowSandbox(tmp_path / "airflow", environment, dags_folder=dags) as box:
        box.migrate()
        outcome = box.run_dag("lineage_sync", dt.datetime(2026, 5, 1, tzinfo=dt.UTC))
    assert outcome.ok, (outcome.tasks, outcome.log_file.read_text()[-4000:] if outcome.log_file else "")

    port = orders.server.port
    sent = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    complete = {e["job"]["name"]: e for e in sent if e["eventType"] == "COMPLETE"}
    assert {"lineage_sync.extract", "lineage_sync.gate", "lineage_sync.load"} <= set(complete)
    (source,) = complete["lineage_sync.extract"]["inputs"]
    assert (source["namespace"], source["name"]) == (
        f"postgres://127.0.0.1:{port}",
        f"{orders.source_db}.public.orders",
    )
    (staged,) = complete["lineage_sync.extract"]["outputs"]
    assert staged["namespace"] == "file" and staged["name"].endswith("/orders")
    (checked,) = complete["lineage_sync.gate"]["inputs"]
    assertions = checked["inputFacets"]["dataQualityAssertions"]["assertions"]
    assert [(a["column"], a["success"]) for a in assertions] == [("id", True), ("quantity", False)]
    (written,) = complete["lineage_sync.load"]["outputs"]
    assert written["name"] == f"{orders.target_db}.public.orders"
    assert written["outputFacets"]["outputStatistics"]["rowCount"] == ROWS
    assert set(written["facets"]["columnLineage"]["fields"]) == {
        "id",
        "customer",
        "quantity",
        "unit_price",
        "updated_at",
    }

    # The asset event, as the metadata database holds it: the postgres:// asset, reached through the alias.
    with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as db:
        rows = db.execute("SELECT a.uri, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id").fetchall()
        aliases = db.execute(
            "SELECT al.name, a.uri FROM asset_alias al JOIN asset_alias_asset aa ON aa.alias_id = al.id "
            "JOIN asset a ON a.id = aa.asset_id"
        ).fetchall()
    uri = f"postgres://127.0.0.1:{port}/{orders.target_db}/public/orders"
    ((event_uri, extra),) = rows
    assert event_uri == uri
    extra = json.loads(extra)
    assert (extra["inserted"], extra["status"], extra["state_version"]) == (ROWS, "applied", 1)
    assert extra["watermark_high"] is not None
    assert aliases == [("sync_target.public.orders", uri)]


def test_a_python_task_emits_its_tables_event_through_its_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from airflow_sync_provider.assets import emit_table_event, emit_table_events
    from airflow_sync_provider.lineage import TableWrite

    monkeypatch.setenv("AIRFLOW_CONN_CENTRAL", "postgres://u:secret@db.example:5433/central")
    alias = table_asset("central", "devices", "on_hand_delta")
    events = OutletEventAccessors()
    context = {"task": SimpleNamespace(outlets=[alias], log=None), "outlet_events": events}
    assert emit_table_event(context, "central", "devices", "on_hand_delta", updated=4) == [
        "postgres://db.example:5433/central/devices/on_hand_delta"
    ]
    (event,) = events[alias].asset_alias_events
    assert event.extra == {"inserted": 0, "updated": 4, "deleted": 0}

    # An alias that names none of several written tables gets nothing (rather than a wrong table).
    other = AssetAlias(name="somewhere_else")
    more = OutletEventAccessors()
    writes = [TableWrite("devices", "a"), TableWrite("devices", "b")]
    assert emit_table_events({"outlet_events": more}, [other], "central", writes) == []
    assert more[other].asset_alias_events == []


def test_event_drain_reports_the_stream_payload_paths_and_its_position(
    env: SyncEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_sync_provider.operators.events import EventStreamToPostgresOperator

    from ..integration.test_events_brokers import REDIS, RedisBroker
    from ..integration.test_events_sync import MOVEMENTS, movement

    broker = RedisBroker()
    try:
        port = env.server.port
        monkeypatch.setenv("AIRFLOW_CONN_EVENTS_TARGET", f"postgres://postgres@127.0.0.1:{port}/{env.target_db}")
        monkeypatch.setenv(
            "AIRFLOW_CONN_EVENTS", json.dumps({"conn_type": "redis", "host": REDIS[0], "port": REDIS[1]})
        )
        monkeypatch.setenv("SYNC_STAGING_DIR", env.staging.base_uri.removeprefix("file://"))
        broker.publish([movement(n) for n in range(20)])
        alias = table_asset("events_target", "public", "movements")
        operator = EventStreamToPostgresOperator(
            task_id="drain",
            sync_id="movements",
            source_conn_id="events",
            stream=broker.key,
            target_conn_id="events_target",
            target_table="movements",
            columns=[
                {"name": c.name, "type": c.type, "path": c.path, "required": c.required} for c in MOVEMENTS.columns
            ],
            event_time="at",
            sequence="seq",
            wait_seconds=0.2,
            outlets=[alias],
        )
        events = OutletEventAccessors()
        run(operator, "r1", events)
        lineage = operator.get_openlineage_facets_on_complete(None)
        assert names(lineage.inputs) == [(f"redis://{REDIS[0]}:{REDIS[1]}", broker.key)]
        output = as_json(lineage.outputs[0])
        assert output["name"] == f"{env.target_db}.public.movements"
        assert output["facets"]["columnLineage"]["fields"]["device"]["inputFields"][0]["field"] == "device.id"
        assert output["outputFacets"]["outputStatistics"]["rowCount"] == 20
        (event,) = events[alias].asset_alias_events
        assert (event.extra["inserted"], event.extra["events"]) == (20, 20)
        assert event.extra["position"]  # the stream position committed with the rows
        quiet = OutletEventAccessors()
        run(operator, "r2", quiet)  # nothing new: no batch, no event
        assert quiet[alias].asset_alias_events == []
    finally:
        broker.cleanup()


def test_reconcile_reports_both_tables_and_the_comparison_as_an_assertion(orders: SyncEnv) -> None:
    from airflow_sync_provider.operators.reconcile import ReconcileOperator
    from airflow_sync_provider.operators.sync import SyncTableOperator

    declaration = {
        "source_conn_id": "sync_source",
        "target_conn_id": "sync_target",
        "source_table": "orders",
        "mode": "full",
    }
    run(SyncTableOperator(task_id="sync", **declaration), "r1")
    equal = ReconcileOperator(task_id="reconcile", **declaration)
    run(equal, "r1")
    port = orders.server.port
    lineage = equal.get_openlineage_facets_on_complete(None)
    assert names(lineage.inputs) == [
        (f"postgres://127.0.0.1:{port}", f"{orders.source_db}.public.orders"),
        (f"postgres://127.0.0.1:{port}", f"{orders.target_db}.public.orders"),
    ]
    (check,) = as_json(lineage.inputs[1])["inputFacets"]["dataQualityAssertions"]["assertions"]
    assert (check["success"], check["actual"]) == (True, "0")

    with orders.target() as conn:
        conn.execute("DELETE FROM orders WHERE id <= 3")
    differs = ReconcileOperator(task_id="reconcile", **declaration)
    with pytest.raises(AirflowFailException, match="differences"):
        run(differs, "r2")
    (check,) = as_json(differs.get_openlineage_facets_on_failure(None).inputs[1])["inputFacets"][
        "dataQualityAssertions"
    ]["assertions"]
    assert (check["success"], check["actual"]) == (False, "3")
