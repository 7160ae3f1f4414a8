"""The streaming mode in the Airflow layer: ``CdcSyncOperator(stream_for=...)`` (changes arrive while
it streams, ``on_kill`` stops it at once, a templated ``stream_for`` bounds it) and the
``inventory_sync_realtime`` DAG run with ``dag.test()`` while writers change the warehouses and
stores and a checker reads the stores: no oversell observed, the centre ends equal to the truth.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_sync_provider.core.cdc import slot as cdc_slot
from case_studies import databases, inventory
from case_studies.databases import connect
from sync_dev.airflow_sandbox import AirflowSandbox
from sync_dev.local_postgres import LocalPostgres

from ..conftest import SyncEnv, case_study_systems, source_columns, table_checksum
from ..integration.test_streaming_inventory import SCALE, Business, Checker

WHEN = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=1)


@pytest.fixture
def stock_sync(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    port = env.server.port
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_SOURCE", f"postgres://postgres@127.0.0.1:{port}/{env.source_db}")
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_TARGET", f"postgres://postgres@127.0.0.1:{port}/{env.target_db}")
    monkeypatch.setenv("SYNC_STAGING_DIR", str(Path(env.staging.base_uri.removeprefix("file://"))))
    with env.source() as conn:
        conn.execute("CREATE TABLE stock (sku text PRIMARY KEY, on_hand int)")
        conn.execute("INSERT INTO stock SELECT 'sku-' || g, g FROM generate_series(1, 300) g")
    yield f"stock_{uuid.uuid4().hex[:8]}"
    with env.source() as conn:
        for (name,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
        ).fetchall():
            cdc_slot.drop_slot(conn, name)


def _operator(sync_id: str, **kwargs: Any) -> Any:
    from airflow_sync_provider.operators.cdc import CdcSyncOperator

    return CdcSyncOperator(
        task_id="stream", source_conn_id="sync_source", target_conn_id="sync_target", sync_id=sync_id,
        tables=["stock"], **kwargs,
    )  # fmt: skip


def _converged(env: SyncEnv) -> bool:
    with env.source() as src, env.target() as tgt:
        exists = tgt.execute("SELECT to_regclass('public.stock')").fetchone()
        if not exists or exists[0] is None:
            return False
        columns = source_columns(src, "stock")
        return table_checksum(src, "stock", columns, ["sku"]) == table_checksum(tgt, "stock", columns, ["sku"])


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_operator_streams_until_on_kill_stops_it(env: SyncEnv, stock_sync: str) -> None:
    operator = _operator(stock_sync, stream_for=dt.timedelta(minutes=5), poll_interval=0.05)
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(result=operator.execute({"run_id": "stream__1"})))
    thread.start()
    try:
        _wait(lambda: _converged(env), 30, "snapshot")
        with env.source() as conn:
            for n in range(20):
                conn.execute("UPDATE stock SET on_hand = on_hand + 1 WHERE sku = %s", (f"sku-{n + 1}",))
                conn.execute("INSERT INTO stock VALUES (%s, 1)", (f"new-{n}",))
        _wait(lambda: _converged(env), 10, "changes made while streaming")
    finally:
        killed = time.monotonic()
        operator.on_kill()
        thread.join(30)
    assert time.monotonic() - killed < 3  # at once: not the 5 minutes
    stats = out["result"]["stream"]
    assert stats["ended"] == "task killed"
    assert stats["changes"] >= 40
    with env.source() as conn:
        slot = cdc_slot.slot_info(conn, f"sync_{stock_sync}")
    assert slot.exists and not slot.active


def test_a_templated_stream_for_bounds_the_task(env: SyncEnv, stock_sync: str) -> None:
    operator = _operator(stock_sync, stream_for="2", poll_interval="0.1")  # as Jinja renders them
    assert {"stream_for", "poll_interval"} <= set(operator.template_fields)
    started = time.monotonic()
    stats = operator.execute({"run_id": "stream__2"})["stream"]
    assert 2 <= time.monotonic() - started < 10
    assert stats["ended"] == "stream_for elapsed" and stats["idle_polls"] > 5
    assert _converged(env)
    one = _operator(stock_sync).execute({"run_id": "batch__3"})  # without stream_for: one batch, as before
    assert one["load"]["status"] == "no_changes"


def test_a_bad_stream_for_fails_the_task_at_once(stock_sync: str) -> None:
    """A ``stream_for`` that is no duration fails without retries (a retry renders the same value)."""
    from airflow.exceptions import AirflowFailException

    for bad in ("ten minutes", "-5"):
        with pytest.raises(AirflowFailException, match="stream_for must"):
            _operator(stock_sync, stream_for=bad).execute({"run_id": "bad__1"})


def test_the_realtime_dag_parses_as_a_continuous_single_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import BundleDagBag

    from sync_dev import DAGS_FOLDER

    for system in databases.ALL_SYSTEMS:  # connections that point nowhere: parsing must not try them
        monkeypatch.setenv(f"AIRFLOW_CONN_{system.upper()}", "postgres://nobody@127.0.0.1:1/nowhere")
    bag = BundleDagBag(dag_folder=str(DAGS_FOLDER), bundle_path=DAGS_FOLDER)
    assert bag.import_errors == {}
    dag = bag.dags["inventory_sync_realtime"]
    assert type(dag.timetable).__name__ == "ContinuousTimetable"
    assert dag.max_active_runs == 1
    assert [t.task_id for t in dag.tasks] == ["stream_inventory"]
    assert dag.params["stream_seconds"] == 600


@pytest.fixture
def systems(pg_server: LocalPostgres, tmp_path: Path) -> Iterator[tuple[AirflowSandbox, dict[str, str]]]:
    with case_study_systems(pg_server, tmp_path, prefix=f"rt{uuid.uuid4().hex[:6]}_", token_key="k") as sandbox:
        yield sandbox


@pytest.mark.airflow
def test_the_realtime_dag_never_lets_a_store_observe_an_oversell(
    systems: tuple[AirflowSandbox, dict[str, str]],
) -> None:
    box, uris = systems
    inventory.seed(uris, scale=SCALE)
    outcome: dict[str, Any] = {}
    # 12 s of streaming: the writers and the checker get ~11 s of it, about the 12 s the engine-level test
    # of the same claim gives them (tests/integration/test_streaming_inventory.py)
    conf = {"stream_seconds": 12, "poll_interval": 0.1, "log_every": 5}
    run = threading.Thread(target=lambda: outcome.update(run=box.run_dag("inventory_sync_realtime", WHEN, conf)))
    run.start()
    _wait(lambda: _pushed_once(uris) or not run.is_alive(), 240, "the stream's first push")
    checker = Checker(uris)
    business = Business(uris, seed=3)
    run.join(300)
    business.stop()
    checker.stop()
    result = outcome["run"]
    log = result.log_file.read_text() if result.log_file else ""
    assert result.ok, (result.state, result.failed_tasks(), log[-4000:])
    assert checker.observations > 10 and business.counts["sales"] > 10, (checker.observations, business.counts)
    assert checker.violations == [], checker.violations[:10]
    assert "inventory stream ended (stream_for elapsed)" in log
    assert "newest stock change -> every store" in log
    # after the writers stopped, the next run catches up: the centre equals the ground truth
    again = box.run_dag("inventory_sync_realtime", WHEN + dt.timedelta(minutes=1), {**conf, "stream_seconds": 1})
    assert again.ok
    with connect(uris[inventory.CENTRAL]) as conn:
        atp = dict(conn.execute("SELECT sku, available_to_sell FROM inventory.available_to_promise").fetchall())
    assert atp == inventory.true_available(uris)
    assert inventory.check_no_oversell(uris, against="sources").ok


def _pushed_once(uris: dict[str, str]) -> bool:
    for store in inventory.STORES:
        with connect(uris[store]) as conn:
            exists = conn.execute("SELECT to_regclass('public._allocation_position')").fetchone()
            if not exists or exists[0] is None:
                return False
            row = conn.execute("SELECT seq FROM _allocation_position").fetchone()
            if not row or not row[0]:
                return False
    return True
