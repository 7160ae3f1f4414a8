"""The Airflow layer: provider registration, hooks, operators (executed against the real server),
templating, failure modes, the example DAGs parsing without database access, and one real
``dag.test()`` run end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from airflow_sync_provider.core.errors import ConfigurationError, SourceUnavailableError

from .conftest import SyncEnv, source_columns, table_checksum

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def connections(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> SyncEnv:
    """``sync_source`` / ``sync_target`` Airflow connections pointing at the test databases."""
    port = env.server.port
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_SOURCE", f"postgres://postgres@127.0.0.1:{port}/{env.source_db}")
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_TARGET", f"postgres://postgres@127.0.0.1:{port}/{env.target_db}")
    monkeypatch.setenv("SYNC_STAGING_DIR", str(Path(env.staging.base_uri.removeprefix("file://"))))
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text, quantity int, unit_price numeric(10,2), "
            "updated_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO orders (id, customer, quantity, unit_price) "
            "SELECT g, 'customer ' || g, g % 7, 9.99 FROM generate_series(1, 3000) g"
        )
    return env


def test_provider_is_registered_under_its_distribution_name() -> None:
    (entry,) = [e for e in entry_points(group="apache_airflow_provider") if e.value.startswith("airflow_sync_provider")]
    info = entry.load()()
    assert info["package-name"] == "airflow-sync-provider"
    assert entry.dist is not None and entry.dist.name == "airflow-sync-provider"

    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "airflow-sync-provider" in manager.providers
    assert manager.hooks["sync_sqlalchemy"].hook_class_name == "airflow_sync_provider.hooks.source.SqlSourceHook"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("postgres://u:secret@db.example:5433/shop", "postgresql+psycopg://u:***@db.example:5433/shop"),
        ("mysql://root@127.0.0.1:3306/shop", "mysql+pymysql://root@127.0.0.1:3306/shop"),
        ("sqlite://%2Ftmp%2Fshop.db", "sqlite:////tmp/shop.db"),
        (
            json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": "duckdb:///x.db"}}),
            "duckdb:///x.db",
        ),
    ],
)
def test_source_hook_builds_sqlalchemy_urls(monkeypatch: pytest.MonkeyPatch, uri: str, expected: str) -> None:
    from airflow_sync_provider.hooks.source import SqlSourceHook

    monkeypatch.setenv("AIRFLOW_CONN_SRC", uri)
    url = SqlSourceHook(source_conn_id="src").get_sqlalchemy_url()
    assert str(url) == expected  # the password is masked when the URL is rendered
    if "secret" in uri:
        assert url.password == "secret"


def test_source_hook_refuses_unknown_connection_types(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_sync_provider.hooks.source import SqlSourceHook

    monkeypatch.setenv("AIRFLOW_CONN_SRC", json.dumps({"conn_type": "ftp", "host": "x"}))
    with pytest.raises(ConfigurationError, match="sqlalchemy_drivername"):
        SqlSourceHook(source_conn_id="src").get_sqlalchemy_url()


def _equal(env: SyncEnv, target_table: str = "orders") -> None:
    with env.source() as src, env.target() as tgt:
        columns = source_columns(src, "orders")
        assert table_checksum(tgt, target_table, columns, ["id"]) == table_checksum(src, "orders", columns, ["id"])


def test_split_operators_extract_then_load(connections: SyncEnv) -> None:
    from airflow_sync_provider.operators.sync import ExtractToStagingOperator, LoadStagedToPostgresOperator

    extract = ExtractToStagingOperator(
        task_id="extract",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        sync_id="orders",
        source_table="orders",
        cursor_column="updated_at",
        batch_rows=1_000,
    )
    manifest = extract.execute({"run_id": "manual__1"})  # type: ignore[arg-type]
    assert manifest["rows"] == 3_000 and len(manifest["files"]) == 3
    assert len(json.dumps(manifest)) < 5_000  # XCom gets the manifest, never the rows

    load = LoadStagedToPostgresOperator(task_id="load", manifest=manifest, target_conn_id="sync_target")
    result = load.execute({"run_id": "manual__1"})  # type: ignore[arg-type]
    assert (result["status"], result["inserted"], result["version"]) == ("applied", 3_000, 1)
    _equal(connections)

    # The Airflow retry of a load whose first try committed: a no-op.
    again = LoadStagedToPostgresOperator(task_id="load", manifest=json.dumps(manifest), target_conn_id="sync_target")
    assert again.execute({"run_id": "manual__1"})["status"] == "already_applied"  # type: ignore[arg-type]


def add_total(batch: pd.DataFrame) -> pd.DataFrame:
    batch["total"] = batch["quantity"] * batch["unit_price"]
    return batch


def test_table_sync_operator_with_a_pandas_transform(connections: SyncEnv) -> None:
    from airflow_sync_provider.operators.sync import SyncTableOperator

    operator = SyncTableOperator(
        task_id="sync",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        source_table="orders",
        target_table="orders_with_total",
        cursor_column="updated_at",
        transform="tests.test_airflow_layer:add_total",
    )
    output = operator.execute({"run_id": "manual__2"})  # type: ignore[arg-type]
    assert output["load"]["inserted"] == 3_000
    assert "files" not in output["manifest"]
    with connections.target() as conn:
        wrong = conn.execute(
            "SELECT count(*) FROM orders_with_total WHERE total IS DISTINCT FROM quantity * unit_price"
        )
        row = wrong.fetchone()
        total_type = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'orders_with_total'::regclass AND attname = 'total'"
        ).fetchone()
    assert row == (0,)
    assert total_type is not None and total_type[0].startswith("numeric")


def test_templated_fields_render(connections: SyncEnv) -> None:
    from airflow_sync_provider.operators.sync import SyncTableOperator

    operator = SyncTableOperator(
        task_id="sync",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        sync_id="{{ params.table }}_sync",
        source_table="{{ params.table }}",
        target_table="{{ params.table }}_copy",
        cursor_column="updated_at",
    )
    assert {"sync_id", "source_table", "target_table", "cursor_column", "staging_uri"} <= set(operator.template_fields)
    operator.render_template_fields({"params": {"table": "orders"}})  # type: ignore[arg-type]
    assert (operator.sync_id, operator.source_table, operator.target_table) == ("orders_sync", "orders", "orders_copy")
    operator.execute({"run_id": "manual__3"})  # type: ignore[arg-type]
    _equal(connections, "orders_copy")


def test_missing_connection_is_named(connections: SyncEnv) -> None:
    from airflow_sync_provider.operators.sync import SyncTableOperator

    operator = SyncTableOperator(
        task_id="sync",
        source_conn_id="no_such_connection",
        target_conn_id="sync_target",
        source_table="orders",
        cursor_column="updated_at",
    )
    with pytest.raises(SourceUnavailableError, match="no_such_connection"):
        operator.execute({"run_id": "manual__4"})  # type: ignore[arg-type]
    assert connections.state("orders") is None


def test_bad_declaration_fails_without_retry(connections: SyncEnv) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_sync_provider.operators.sync import SyncTableOperator

    operator = SyncTableOperator(
        task_id="sync",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        source_table="orders",
        cursor_column="changed_on",
    )
    with pytest.raises(AirflowFailException, match=r"sync='orders'.*column='changed_on'.*does not exist"):
        operator.execute({"run_id": "manual__5"})  # type: ignore[arg-type]


def test_example_dags_parse_without_touching_a_database(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag

    # Connections that point nowhere: parsing must not try them.
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_SOURCE", "postgres://nobody@127.0.0.1:1/nowhere")
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_TARGET", "postgres://nobody@127.0.0.1:1/nowhere")
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    assert {"orders_sync", "orders_sync_split"} <= set(bag.dag_ids)
    assert [t.task_id for t in bag.dags["orders_sync_split"].topological_sort()] == ["extract_orders", "load_orders"]


DAG_TEST_SCRIPT = textwrap.dedent(
    """
    import datetime as dt, json, sys
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=sys.argv[1])
    dag = bag.get_dag("orders_sync")
    run = dag.test(logical_date=dt.datetime(2026, 5, 1, tzinfo=dt.UTC))
    print("STATE=" + str(run.state))
    """
)


@pytest.mark.airflow
def test_example_dag_runs_end_to_end_with_dag_test(connections: SyncEnv, tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow.db'}",
    }
    migrate = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=environment, capture_output=True, text=True, timeout=300
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    run = subprocess.run(
        [sys.executable, "-c", DAG_TEST_SCRIPT, str(REPO / "dags")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "STATE=success" in run.stdout, (run.stdout[-3000:], run.stderr[-5000:])
    with connections.target() as conn:
        rows: Any = conn.execute("SELECT count(*), count(total) FROM orders").fetchone()
        state = conn.execute("SELECT version, last_run_id FROM _sync_state WHERE sync_id = 'orders'").fetchone()
    assert rows == (3_000, 3_000)
    assert state is not None and state[0] == 1 and state[1].startswith("manual__")


def test_operators_pass_schema_drift_and_history_to_the_spec() -> None:
    from airflow_sync_provider.operators.sync import ExtractToStagingOperator

    operator = ExtractToStagingOperator(
        task_id="x",
        source_conn_id="s",
        target_conn_id="t",
        source_table="orders",
        cursor_column="updated_at",
        schema_drift="evolve",
        history_table="orders_history",
    )
    spec = operator.build_spec()
    assert (spec.schema_drift, spec.history_table) == ("evolve", "orders_history")
    operator.schema_drift = "ignore"
    with pytest.raises(ConfigurationError, match="schema_drift must be one of"):
        operator.build_spec()
