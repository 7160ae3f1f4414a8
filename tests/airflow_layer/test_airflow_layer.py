"""The Airflow layer: provider registration, hooks, operators (executed against the real server),
templating, failure modes, the example DAGs parsing without database access, and one real
``dag.test()`` run end to end.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from airflow_sync_provider.core.errors import ConfigurationError, SourceUnavailableError, TargetUnavailableError

from ..conftest import SyncEnv, airflow_orders, source_columns, table_checksum

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def connections(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> SyncEnv:
    """``sync_source`` / ``sync_target`` Airflow connections pointing at the test databases."""
    return airflow_orders(env, monkeypatch, rows=3000)


def test_provider_is_registered_under_its_distribution_name() -> None:
    (entry,) = [e for e in entry_points(group="apache_airflow_provider") if e.value.startswith("airflow_sync_provider")]
    info = entry.load()()
    assert info["package-name"] == "airflow-sync-provider"
    assert entry.dist is not None and entry.dist.name == "airflow-sync-provider"

    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "airflow-sync-provider" in manager.providers
    assert manager.hooks["sync_sqlalchemy"].hook_class_name == "airflow_sync_provider.hooks.source.SyncSourceHook"


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
    from airflow_sync_provider.hooks.source import SyncSourceHook

    monkeypatch.setenv("AIRFLOW_CONN_SRC", uri)
    url = SyncSourceHook(source_conn_id="src").get_sqlalchemy_url()
    assert str(url) == expected  # the password is masked when the URL is rendered
    if "secret" in uri:
        assert url.password == "secret"


def test_source_hook_refuses_unknown_connection_types(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_sync_provider.hooks.source import SyncSourceHook

    monkeypatch.setenv("AIRFLOW_CONN_SRC", json.dumps({"conn_type": "ftp", "host": "x"}))
    with pytest.raises(ConfigurationError, match="sqlalchemy_drivername"):
        SyncSourceHook(source_conn_id="src").get_sqlalchemy_url()


def test_source_hook_old_name_is_a_deprecated_alias() -> None:
    from airflow.exceptions import AirflowProviderDeprecationWarning

    from airflow_sync_provider.hooks import source

    with pytest.warns(AirflowProviderDeprecationWarning, match="use airflow_sync_provider.hooks.source.SyncSourceHook"):
        from airflow_sync_provider.hooks.source import SqlSourceHook
    assert SqlSourceHook is source.SyncSourceHook
    with pytest.raises(AttributeError):
        source.NoSuchHook  # noqa: B018


def _postgres_connection(env: SyncEnv, **extra: str) -> str:
    return json.dumps(
        {
            "conn_type": "postgres",
            "host": "127.0.0.1",
            "port": env.server.port,
            "login": "postgres",
            "schema": env.source_db,
            "extra": extra,
        }
    )


def test_source_hook_delegates_to_the_postgres_provider_hook(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``postgres`` source gets its engine from PostgresHook, with the connection's extras:
    ``options`` and ``sslmode`` reach the driver (the SQLAlchemy engine and the CDC conninfo)."""
    import psycopg
    import sqlalchemy as sa
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    from airflow_sync_provider.hooks.cdc import PostgresCdcHook
    from airflow_sync_provider.hooks.source import SyncSourceHook

    options = "-c application_name=sync_extra_check -c statement_timeout=4321"
    monkeypatch.setenv("AIRFLOW_CONN_SRC_PG", _postgres_connection(env, sslmode="disable", options=options))
    hook = SyncSourceHook(source_conn_id="src_pg")
    assert isinstance(hook.get_provider_hook(), PostgresHook)
    assert hook.get_connect_args() == {"sslmode": "disable", "options": options}
    engine = hook.get_engine()
    try:
        assert engine.dialect.driver == "psycopg"
        with engine.connect() as conn:
            settings = conn.execute(
                sa.text("SELECT current_setting('application_name'), current_setting('statement_timeout')")
            ).one()
            parameters = conn.connection.driver_connection.info.get_parameters()  # type: ignore[union-attr]
    finally:
        engine.dispose()
    assert tuple(settings) == ("sync_extra_check", "4321ms")
    assert parameters["sslmode"] == "disable"

    with psycopg.connect(PostgresCdcHook(source_conn_id="src_pg").get_conninfo()) as conn:
        row = conn.execute("SELECT current_setting('application_name')").fetchone()
        assert row == ("sync_extra_check",) and conn.info.get_parameters()["sslmode"] == "disable"

    # The test server has no SSL: an extra demanding it must fail the connection, so it is not dropped.
    monkeypatch.setenv("AIRFLOW_CONN_SRC_SSL", _postgres_connection(env, sslmode="require"))
    engine = SyncSourceHook(source_conn_id="src_ssl").get_engine()
    try:
        with pytest.raises(sa.exc.OperationalError, match="SSL"), engine.connect():
            pass
    finally:
        engine.dispose()


def test_source_hook_falls_back_to_its_driver_map_without_a_provider_hook(
    connections: SyncEnv, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``sqlite`` has no provider installed here: the engine comes from the built-in driver map,
    and the one-task operator syncs from it."""
    import sqlite3

    from airflow_sync_provider.hooks.source import SyncSourceHook
    from airflow_sync_provider.operators.sync import SyncTableOperator

    database = tmp_path / "shop.db"
    with sqlite3.connect(database) as lite:
        lite.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, updated_at TEXT)")
        lite.executemany(
            "INSERT INTO items VALUES (?, ?, ?)", [(i, f"item {i}", f"2026-01-01 00:00:{i:02d}") for i in range(1, 41)]
        )
    monkeypatch.setenv("AIRFLOW_CONN_LITE", json.dumps({"conn_type": "sqlite", "host": str(database)}))
    hook = SyncSourceHook(source_conn_id="lite")
    assert hook.get_provider_hook() is None and hook.get_connect_args() == {}
    assert str(hook.get_sqlalchemy_url()) == f"sqlite:///{database}"

    output = SyncTableOperator(
        task_id="sync",
        source_conn_id="lite",
        target_conn_id="sync_target",
        source_table="items",
        cursor_column="updated_at",
        keep_staged=True,
    ).execute({"run_id": "manual__lite"})  # type: ignore[arg-type]
    assert (output["load"]["status"], output["load"]["inserted"]) == ("applied", 40)
    with connections.target() as conn:
        assert conn.execute("SELECT count(*), max(name) FROM items").fetchone() == (40, "item 9")
    staged = Path(connections.staging.base_uri.removeprefix("file://")) / "items"
    assert any(staged.rglob("*.parquet"))  # keep_staged reached the load


def _equal(env: SyncEnv, target_table: str = "orders") -> None:
    with env.source() as src, env.target() as tgt:
        columns = source_columns(src, "orders")
        assert table_checksum(tgt, target_table, columns, ["id"]) == table_checksum(src, "orders", columns, ["id"])


def test_split_operators_refuse_local_staging_on_celery_before_reading_anything(
    connections: SyncEnv, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On a non-local executor a split extract with a local staging folder fails at its start, with
    what to set; the load of a manifest staged locally fails the same way; nothing is staged or loaded."""
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_sync_provider.operators.sync import ExtractToStagingOperator, LoadStagedToPostgresOperator

    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    staging = tmp_path / "staging"
    extract = ExtractToStagingOperator(
        task_id="extract",
        source_conn_id="sync_source",
        target_conn_id="sync_target",
        sync_id="orders",
        source_table="orders",
        cursor_column="updated_at",
        staging_uri=str(staging),
    )
    with pytest.raises(AirflowFailException, match=r"CeleryExecutor.*set \[sync\] staging_uri"):
        extract.execute({"run_id": "manual__celery"})  # type: ignore[arg-type]
    assert not staging.exists() or not any(staging.rglob("*.parquet"))

    extract.executor = "LocalExecutor"  # the task's own executor decides: this one may stage locally
    manifest = extract.execute({"run_id": "manual__celery"})  # type: ignore[arg-type]
    load = LoadStagedToPostgresOperator(task_id="load", manifest=manifest, target_conn_id="sync_target")
    with pytest.raises(AirflowFailException, match=r"the load of orders .*CeleryExecutor"):
        load.execute({"run_id": "manual__celery"})  # type: ignore[arg-type]
    with connections.target() as conn:
        assert conn.execute("SELECT to_regclass('public.orders')").fetchone() == (None,)


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
        transform="tests.airflow_layer.test_airflow_layer:add_total",
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


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_missing_connection_is_named(connections: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> None:
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

    # The target side says it is the target; both are UnavailableErrors, which Airflow retries.
    operator.source_conn_id, operator.target_conn_id = "sync_source", "no_such_target"
    with pytest.raises(TargetUnavailableError, match=r"no_such_target.*\(target\) is not defined"):
        operator.execute({"run_id": "manual__4"})  # type: ignore[arg-type]
    monkeypatch.setenv("AIRFLOW_CONN_CLOSED_TARGET", f"postgres://postgres@127.0.0.1:{_free_port()}/nowhere")
    operator.target_conn_id = "closed_target"
    with pytest.raises(TargetUnavailableError, match="cannot reach the target database of connection 'closed_target'"):
        operator.execute({"run_id": "manual__4"})  # type: ignore[arg-type]


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


@pytest.mark.airflow
def test_example_dag_runs_end_to_end_with_dag_test(connections: SyncEnv, tmp_path: Path) -> None:
    from sync_dev.airflow_sandbox import AirflowSandbox

    with AirflowSandbox(tmp_path / "airflow", {}) as box:  # the connections fixture's AIRFLOW_CONN_* variables
        box.migrate()
        run = box.run_dag("orders_sync", dt.datetime(2026, 5, 1, tzinfo=dt.UTC))
    assert run.state == "success", (run.state, run.tasks, run.log_file.read_text()[-5000:] if run.log_file else "")
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


def test_operator_arguments_are_explicit_and_match_the_specs() -> None:
    """Every SyncSpec/CdcSpec field is an explicit, typed, keyword-only argument of each operator
    that declares a sync, with the spec's default and a ``:param`` line (IDEs, docs, type checkers)."""
    import dataclasses
    import inspect

    from airflow_sync_provider.core import SyncSpec
    from airflow_sync_provider.core.cdc import CdcSpec
    from airflow_sync_provider.operators.cdc import (
        CdcExtractOperator,
        CdcLoadOperator,
        CdcResnapshotOperator,
        CdcSyncOperator,
    )
    from airflow_sync_provider.operators.quality import (
        DataQualityGateOperator,
        ReferentialIntegrityGateOperator,
        ReplayQuarantinedRowsOperator,
    )
    from airflow_sync_provider.operators.reconcile import ReconcileOperator
    from airflow_sync_provider.operators.sync import (
        ExtractToStagingOperator,
        LoadStagedToPostgresOperator,
        SyncTableOperator,
    )
    from airflow_sync_provider.sensors.cdc import CdcChangesSensor

    # Where the operator's default differs from the spec's: None means "the spec decides".
    own_defaults = {"sync_id": None, "target_table": None, "tables": inspect.Parameter.empty}
    declaring = {
        SyncSpec: (ExtractToStagingOperator, SyncTableOperator, ReconcileOperator),
        CdcSpec: (CdcExtractOperator, CdcSyncOperator, CdcResnapshotOperator),
    }
    for spec, operators in declaring.items():
        for operator in operators:
            parameters = inspect.signature(operator.__init__).parameters
            for field in dataclasses.fields(spec):
                if field.name == "extra":
                    continue
                parameter = parameters[field.name]
                assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, (operator.__name__, field.name)
                expected = own_defaults.get(field.name, field.default)
                if field.name == "source_table":
                    expected = inspect.Parameter.empty
                assert parameter.default == expected, (operator.__name__, field.name)
    every = [
        *declaring[SyncSpec],
        *declaring[CdcSpec],
        LoadStagedToPostgresOperator,
        CdcLoadOperator,
        DataQualityGateOperator,
        ReplayQuarantinedRowsOperator,
        ReferentialIntegrityGateOperator,
        CdcChangesSensor,
    ]
    for operator in every:
        parameters = inspect.signature(operator.__init__).parameters
        names = [n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert [p.kind for p in parameters.values()][-1] is inspect.Parameter.VAR_KEYWORD, operator.__name__
        assert all(parameters[n].annotation is not inspect.Parameter.empty for n in names), operator.__name__
        documented = set(re.findall(r":param (\w+):", operator.__doc__ or ""))
        assert set(names) <= documented, (operator.__name__, set(names) - documented)
