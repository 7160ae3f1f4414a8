"""The status read model against real syncs: a table sync through a quarantining gate, a failing gate,
a reconciliation with differences, a watermark held back by an open transaction, and a CDC sync
with its slot; plus the empty target, the DAG record and the history the detail page charts.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import great_expectations as gx
import pytest

from airflow_sync_provider.core import SyncSpec, extract_for, load_manifest
from airflow_sync_provider.core.cdc import CdcSpec
from airflow_sync_provider.core.quality import QualityError, validate_manifest
from airflow_sync_provider.core.reconcile import reconcile
from airflow_sync_provider.core.status import (
    RunContext,
    read_run_contexts,
    read_sync_history,
    read_sync_status,
    read_sync_statuses,
    record_run_context,
    sync_kind,
)

from ..conftest import CdcEnv, SyncEnv

E = gx.expectations
SPEC = SyncSpec(sync_id="orders", source_table="orders", cursor_column="updated_at")
SUITE = [
    E.ExpectColumnValuesToBeBetween(column="quantity", min_value=0, max_value=10000),
    E.ExpectColumnValuesToNotBeNull(column="customer"),
]


def _orders(env: SyncEnv) -> None:
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text, quantity int, "
            "updated_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO orders (id, customer, quantity) SELECT g, 'customer ' || g, g % 7 "
            "FROM generate_series(1, 500) g"
        )
        conn.execute("UPDATE orders SET quantity = -5 WHERE id IN (17, 250)")


def _gated_run(env: SyncEnv, run_id: str, **gate: Any) -> Any:
    """Extract, gate and load one run as the split operators do (raises QualityError when the gate fails)."""
    engine = env.source_engine
    try:
        with env.target() as target:
            manifest = extract_for(engine, target, SPEC, staging=env.staging, run_id=run_id)
            result = validate_manifest(manifest, SUITE, target_conn=target, staging=env.staging, run_id=run_id, **gate)
            return load_manifest(target, result.manifest, run_id=run_id)
    finally:
        engine.dispose()


def _status(env: SyncEnv, sync_id: str = "orders", **kwargs: Any) -> Any:
    with env.target() as conn:
        status = read_sync_status(conn, "public", sync_id, **kwargs)
    assert status is not None
    return status


def test_nothing_synced_yet_reads_as_no_syncs(env: SyncEnv) -> None:
    with env.target() as conn:
        assert read_sync_statuses(conn, "public") == []
        assert read_sync_status(conn, "public", "orders") is None
        history = read_sync_history(conn, "public", "orders", dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    assert history.entries == () and history.runs == ()


def test_table_sync_gate_quarantine_reconciliation_and_held_back_watermark(env: SyncEnv) -> None:
    _orders(env)
    with env.target() as conn:
        for _ in range(2):  # a retried task records its run once
            record_run_context(conn, "public", RunContext("orders", "run1", "orders_dag", "load", "src_conn"))

    # Run 1: two rows fail the range rule and are quarantined, the other 498 load.
    loaded = _gated_run(env, "run1", quarantine=True, max_quarantine_fraction=0.05)
    assert loaded.inserted == 498
    with env.source() as conn:
        newest = conn.execute("SELECT max(updated_at) FROM orders").fetchone()[0]  # type: ignore[index]
    status = _status(env)
    assert (status.kind, status.mode, status.state_version) == ("table", "incremental", 1)
    assert status.dag_ids == ("orders_dag",) and status.source_conn_id == "src_conn"
    run = status.last_run
    assert (run.run_id, run.status, run.inserted, run.updated, run.deleted, run.dag_id) == (
        "run1",
        "applied",
        498,
        0,
        0,
        "orders_dag",
    )
    assert status.cursor_time == newest and status.position.startswith(newest.isoformat())
    assert status.position.endswith("(key 500)")
    assert dt.timedelta(0) <= status.freshness == status.read_at - newest < dt.timedelta(minutes=5)
    assert status.quarantine_open == 2
    assert status.gate.success and status.gate.quarantined_rows == 2
    (rule,) = status.gate.failing_rules
    assert (rule.label, rule.status, rule.unexpected_count) == (
        "expect_column_values_to_be_between(quantity)",
        "quarantined",
        2,
    )
    today = status.read_at.astimezone(dt.UTC).date()
    assert [(d.day, d.inserted, d.loads) for d in status.rows_per_day] == [(today, 498, 1)]
    assert status.reconciliation is None and status.held_back is None and status.slot is None

    # Run 2: a NULL customer with the gate blocking (no quarantine): nothing loads, the status says why.
    with env.source() as conn:
        conn.execute("UPDATE orders SET customer = NULL, updated_at = clock_timestamp() WHERE id = 3")
    with pytest.raises(QualityError):
        _gated_run(env, "run2")
    status = _status(env)
    assert (status.last_run.run_id, status.last_run.status) == ("run2", "gate_failed")
    assert status.state_version == 1 and status.cursor_time == newest  # the watermark did not move
    assert not status.gate.success
    assert [r.label for r in status.gate.failing_rules] == ["expect_column_values_to_not_be_null(customer)"]

    # A reconciliation finds the two quarantined rows (plus the NULL customer's change) missing or different.
    engine = env.source_engine
    try:
        with env.target() as target:
            found = reconcile(engine, target, SPEC, staging=env.staging, run_id="check1")
    finally:
        engine.dispose()
    status = _status(env)
    recon = status.reconciliation
    assert recon.run_id == "check1" and recon.result == "differences"
    assert (recon.missing_in_target, recon.different) == (found.missing_count, found.different_count)
    assert recon.differences == found.missing_count + found.extra_count + found.different_count >= 2
    assert (status.last_run.run_id, status.last_run.status) == ("check1", "reconciled")

    # Run 3 and 4 while a source transaction stays open: the watermark is held back, and the status says by whom.
    with env.source() as conn:
        conn.execute("UPDATE orders SET customer = 'fixed', updated_at = clock_timestamp() WHERE id = 3")
    holder = env.source(autocommit=False)
    try:
        holder.execute("INSERT INTO orders (id, customer, quantity) VALUES (1000, 'late', 1)")
        opened = holder.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        env.sync(SPEC, run_id="run3")
        env.sync(SPEC, run_id="run4")
    finally:
        holder.rollback()
        holder.close()
    status = _status(env)
    held = status.held_back
    assert held is not None and held.runs == 2 and "open transaction pid " in held.reason
    assert held.bound == opened
    history = read_sync_history_since_start(env)
    run3 = next(e for e in history.entries if e.run_id == "run3")
    assert held.since == run3.at
    assert any("open transaction" in n for n in status.notes)
    env.sync(SPEC, run_id="run5")  # the transaction is gone: no longer held back
    assert _status(env).held_back is None

    # The history: newest first, every kind of evidence; the runs (oldest first) are the chart's points.
    history = read_sync_history_since_start(env)
    assert [(e.event, e.run_id, e.status) for e in history.entries if e.event != "load"] == [
        ("reconciliation", "check1", "differences"),
        ("gate", "run2", "failed"),
        ("gate", "run1", "passed"),
    ]
    assert [r.run_id for r in history.runs] == ["run1", "run3", "run4", "run5"]
    assert history.runs[0].inserted == 498 and all(r.seconds > 0 for r in history.runs)
    assert history.entries == tuple(sorted(history.entries, key=lambda e: e.at, reverse=True))
    later = read_sync_history_since(env, history.runs[-1].at)
    assert [r.run_id for r in later.runs] == ["run5"]
    with env.target() as conn:
        assert len(read_run_contexts(conn, "public", "orders")) == 1


def read_sync_history_since_start(env: SyncEnv) -> Any:
    return read_sync_history_since(env, dt.datetime(2000, 1, 1, tzinfo=dt.UTC))


def read_sync_history_since(env: SyncEnv, since: dt.datetime) -> Any:
    with env.target() as conn:
        return read_sync_history(conn, "public", "orders", since)


def test_cdc_sync_reports_its_lsn_and_slot(cdc: CdcEnv) -> None:
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, qty int)")
        conn.execute("INSERT INTO items SELECT g, g FROM generate_series(1, 200) g")
    spec = CdcSpec(sync_id="items_cdc", tables=("items",))
    cdc.run(spec, run_id="r1")
    with cdc.env.source() as conn:
        conn.execute("UPDATE items SET qty = 0 WHERE id <= 10")
        conn.execute("DELETE FROM items WHERE id > 190")
    _, result = cdc.run(spec, run_id="r2")

    with cdc.env.target() as target, cdc.env.source() as source:
        status = read_sync_status(target, "public", "items_cdc", source=source)
        without_source = read_sync_status(target, "public", "items_cdc")
    assert status is not None and without_source is not None
    assert (status.kind, status.mode, status.slot_name) == ("cdc", "cdc-changes", spec.slot_name)
    assert status.position == f"LSN {result.commit_lsn}"
    assert status.freshness is None and status.cursor_time is None
    run = status.last_run
    assert (run.run_id, run.updated, run.deleted) == ("r2", 10, 10)
    slot = status.slot
    assert slot is not None and slot.exists and not slot.active
    assert slot.retained_bytes is not None and slot.retained_bytes > 0
    assert slot.lag_bytes is not None and slot.lag_bytes < 1_000_000
    assert without_source.slot is None

    # Changes the sync has not read yet show as slot lag.
    with cdc.env.source() as conn:
        conn.execute("INSERT INTO items SELECT g, g FROM generate_series(1001, 3000) g")
    with cdc.env.target() as target, cdc.env.source() as source:
        behind = read_sync_status(target, "public", "items_cdc", source=source)
    assert behind is not None and behind.slot is not None and behind.slot.lag_bytes is not None
    assert behind.slot.lag_bytes > slot.lag_bytes + 50_000


def test_sync_kind_from_mode() -> None:
    assert [sync_kind(m) for m in ("incremental", "full", "backfill", "cdc-snapshot", "cdc-changes", "events")] == [
        "table",
        "table",
        "table",
        "cdc",
        "cdc",
        "stream",
    ]
    assert sync_kind("api") == sync_kind("incremental", "https://api.example.com/orders") == "api"
    assert sync_kind(None) == "table"


def test_operators_record_the_dag_of_each_run(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from airflow_sync_provider.operators.sync import SyncTableOperator

    port = env.server.port
    monkeypatch.setenv("AIRFLOW_CONN_STATUS_SOURCE", f"postgres://postgres@127.0.0.1:{port}/{env.source_db}")
    monkeypatch.setenv("AIRFLOW_CONN_STATUS_TARGET", f"postgres://postgres@127.0.0.1:{port}/{env.target_db}")
    monkeypatch.setenv("SYNC_STAGING_DIR", env.staging.base_uri.removeprefix("file://"))
    _orders(env)
    operator = SyncTableOperator(
        task_id="sync_orders",
        sync_id="orders",
        source_table="orders",
        cursor_column="updated_at",
        source_conn_id="status_source",
        target_conn_id="status_target",
    )
    for dag_id, run_id in (("orders_hourly", "scheduled__1"), ("orders_hourly", "scheduled__1"), ("orders_fix", "m1")):
        ti = SimpleNamespace(dag_id=dag_id, task_id="sync_orders")
        operator.execute({"run_id": run_id, "ti": ti})  # type: ignore[arg-type]
    status = _status(env)
    assert status.dag_ids == ("orders_fix", "orders_hourly") and status.source_conn_id == "status_source"
    assert (status.last_run.run_id, status.last_run.dag_id) == ("m1", "orders_fix")
    with env.target() as conn:
        contexts = read_run_contexts(conn, "public", "orders")
    assert [(c.dag_id, c.run_id, c.task_id) for c in contexts] == [
        ("orders_hourly", "scheduled__1", "sync_orders"),
        ("orders_fix", "m1", "sync_orders"),
    ]
    # Run outside Airflow (no task instance in the context): nothing recorded, the sync still runs.
    operator.execute({"run_id": "plain"})  # type: ignore[arg-type]
    assert _status(env).last_run.dag_id is None


def test_the_plugin_registers_its_app_view_and_links() -> None:
    from airflow._shared.plugins_manager import is_valid_plugin
    from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse

    from airflow_sync_provider.plugins.status_plugin import SyncStatusPlugin

    assert is_valid_plugin(SyncStatusPlugin)
    SyncStatusPlugin.on_load()
    ((app,),) = [[a for a in SyncStatusPlugin.fastapi_apps if a["url_prefix"] == "/sync-status"]]
    paths = {route.path for route in app["app"].routes}  # type: ignore[attr-defined]
    assert {"/", "/syncs/{conn_id}/{schema}/{sync_id:path}", "/api/syncs"} <= paths
    (view,) = SyncStatusPlugin.external_views
    parsed = ExternalViewResponse(**view)
    assert (parsed.href, parsed.url_route, parsed.destination, parsed.category) == (
        "/sync-status/",
        "sync-status",
        "nav",
        "browse",
    )


def test_extra_links_name_the_sync_of_any_sync_operator() -> None:
    import json

    from airflow_sync_provider.operators.cdc import CdcLoadOperator, CdcSyncOperator
    from airflow_sync_provider.operators.events import EventStreamToPostgresOperator
    from airflow_sync_provider.operators.quality import DataQualityGateOperator
    from airflow_sync_provider.operators.sync import LoadStagedToPostgresOperator, SyncTableOperator
    from airflow_sync_provider.plugins.links import QualityReportLink, SyncStatusLink

    for operator_class in (
        SyncTableOperator,
        LoadStagedToPostgresOperator,
        CdcSyncOperator,
        CdcLoadOperator,
        EventStreamToPostgresOperator,
        DataQualityGateOperator,
    ):
        assert [type(link) for link in operator_class.operator_extra_links] == [SyncStatusLink, QualityReportLink]
    table = SyncTableOperator(
        task_id="t", sync_id="a b/c", source_table="x", target_schema="mart", source_conn_id="s", target_conn_id="wh"
    )
    assert SyncStatusLink().get_link(table, ti_key=None) == "/sync-status/syncs/wh/mart/a%20b%2Fc"  # type: ignore[arg-type]
    # Operators that load or gate a manifest take the sync from it (a dict, or JSON as Jinja renders it).
    manifest = json.dumps({"sync_id": "orders", "target_schema": "sales"})
    gate = DataQualityGateOperator(task_id="g", manifest=manifest, target_conn_id="wh", suite_path="s.json")
    assert QualityReportLink().get_link(gate, ti_key=None) == "/sync-status/syncs/wh/sales/orders#quality"  # type: ignore[arg-type]
    unrendered = LoadStagedToPostgresOperator(task_id="l", manifest="not a manifest", target_conn_id="wh")
    assert SyncStatusLink().get_link(unrendered, ti_key=None) == ""  # type: ignore[arg-type]


def test_charts_are_inline_svg_with_a_tooltip_per_mark() -> None:
    from airflow_sync_provider.core.status import RunSummary
    from airflow_sync_provider.plugins.charts import latency_chart, rows_chart

    at = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    runs = [
        RunSummary("r<1>", at, "applied", inserted=90, updated=10, extract_seconds=0.5, load_seconds=1.0),
        RunSummary("r2", at + dt.timedelta(hours=1), "applied", deleted=5, load_seconds=0.25),
    ]
    rows = rows_chart(runs)
    assert rows.startswith("<svg") and rows.endswith("</svg>") and rows.count("<rect") == 3
    assert "<title>r&lt;1&gt;: 90 inserted</title>" in rows and "<title>r2: 5 deleted</title>" in rows
    latency = latency_chart(runs)
    assert latency.count("<circle") == 2 and "<title>r&lt;1&gt;: 1.50 s</title>" in latency
    assert "no loads yet" in rows_chart([])
