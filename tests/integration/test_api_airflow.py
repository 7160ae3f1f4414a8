"""The Airflow layer of API syncs, called directly: the hook builds the client from an ``http``
connection (base URL, bearer / basic / API key from the extras), the operators sync, stage for a
gate, backfill a window from the run's conf, and fail the task the right way (4xx: fail at once;
an outage after the retries: an error Airflow retries).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException
from psycopg import sql

from airflow_sync_provider.core.api import ApiUnavailableError
from airflow_sync_provider.hooks.api import ApiSourceHook
from airflow_sync_provider.operators.api import ApiToPostgresOperator, ApiToStagingOperator
from airflow_sync_provider.operators.sync import LoadStagedToPostgresOperator
from sync_dev.api_server import ApiAuthConfig, ApiServer, customer_records

from ..conftest import SyncEnv

COLUMNS = [
    {"name": "id", "type": "bigint"},
    {"name": "name", "type": "text"},
    {"name": "risk_score", "type": "integer", "required": False},
    {"name": "updated_at", "type": "timestamptz"},
]


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer({"customers": customer_records(120)}, auth=ApiAuthConfig("bearer", "t0ken")) as server:
        yield server


def connect(monkeypatch: pytest.MonkeyPatch, env: SyncEnv, api: ApiServer, **extra: Any) -> None:
    connection = {"conn_type": "http", "host": api.url, "password": "t0ken", "extra": {"auth_type": "bearer", **extra}}
    monkeypatch.setenv("AIRFLOW_CONN_BUREAU", json.dumps(connection))
    monkeypatch.setenv("AIRFLOW_CONN_API_TARGET", f"postgres://postgres@127.0.0.1:{env.server.port}/{env.target_db}")
    monkeypatch.setenv("SYNC_STAGING_DIR", env.staging.base_uri.removeprefix("file://"))


def options(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "task_id": "customers",
        "sync_id": "bureau_customers",
        "http_conn_id": "bureau",
        "endpoint": "/v1/cursor/customers",
        "target_conn_id": "api_target",
        "target_table": "customers",
        "primary_key": ["id"],
        "records_path": "items",
        "query_params": {"limit": 50},
        "paginator": {"type": "cursor", "cursor_path": "meta.next_cursor", "param": "cursor"},
        "columns": COLUMNS,
        "cursor_field": "updated_at",
        "cursor_param": "updated_since",
        "cursor_end_param": "updated_before",
        "http_retry": {"attempts": 3, "backoff": 0.05},
    }
    values.update(changes)
    return values


def count(env: SyncEnv, table: str = "customers") -> int:
    with env.target() as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
    return int(row[0]) if row else 0


def test_the_hook_reads_base_url_and_auth_from_the_connection(
    env: SyncEnv, api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect(monkeypatch, env, api, headers={"X-Tenant": "bank"})
    client = ApiSourceHook("bureau").api_client()
    assert client.base_url == api.url + "/"
    assert client.session.headers["Authorization"] == "Bearer t0ken"
    assert client.session.headers["X-Tenant"] == "bank"
    _, body = client.get("/v1/single/customers")
    assert len(body["data"]) == 120


def test_api_key_in_the_query_from_the_extras(env: SyncEnv, api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    api.auth = ApiAuthConfig("query", "k3y", name="apikey")
    connection = {
        "conn_type": "http",
        "host": "127.0.0.1",
        "port": api.port,
        "password": "k3y",
        "extra": {"auth_type": "api_key", "api_key_name": "apikey", "api_key_in": "query"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_BUREAU", json.dumps(connection))
    client = ApiSourceHook("bureau").api_client()
    _, body = client.get("/v1/single/customers")
    assert len(body["data"]) == 120
    assert "k3y" not in client.masked("/v1/single/customers")


def test_the_operator_syncs_and_returns_a_small_summary(
    env: SyncEnv, api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect(monkeypatch, env, api)
    operator = ApiToPostgresOperator(**options())
    assert set(operator.template_fields) >= {"endpoint", "query_params", "http_conn_id", "sync_id"}
    result = operator.execute({"run_id": "manual__1"})  # type: ignore[arg-type]
    assert result["load"]["inserted"] == 120 and count(env) == 120
    assert "files" not in result["manifest"] and len(json.dumps(result)) < 3000
    again = operator.execute({"run_id": "manual__2"})  # type: ignore[arg-type]
    assert again["load"]["inserted"] == again["load"]["updated"] == 0


def test_a_backfill_window_from_the_run_conf(env: SyncEnv, api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    connect(monkeypatch, env, api)
    ApiToPostgresOperator(**options()).execute({"run_id": "manual__1"})  # type: ignore[arg-type]
    with env.target() as conn:
        conn.execute("DELETE FROM customers WHERE id BETWEEN 10 AND 19")
    start = dt.datetime(2026, 1, 1, 0, 0, 10, tzinfo=dt.UTC)
    run = SimpleNamespace(
        conf={"window_start": start.isoformat(), "window_end": (start + dt.timedelta(seconds=10)).isoformat()},
        run_type="manual",
    )
    result = ApiToPostgresOperator(**options()).execute({"run_id": "manual__2", "dag_run": run})  # type: ignore[arg-type]
    assert result["load"]["status"] == "backfilled" and result["load"]["inserted"] == 10 and count(env) == 120


def test_stage_then_load_like_a_table_extract(env: SyncEnv, api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    connect(monkeypatch, env, api)
    manifest = ApiToStagingOperator(**options()).execute({"run_id": "manual__1"})  # type: ignore[arg-type]
    assert manifest["rows"] == 120 and count_tables(env) == 0
    load = LoadStagedToPostgresOperator(task_id="load", manifest=manifest, target_conn_id="api_target")
    assert load.execute({"run_id": "manual__1"})["inserted"] == 120  # type: ignore[arg-type]


def count_tables(env: SyncEnv) -> int:
    with env.target() as conn:
        row = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'customers'").fetchone()
    return int(row[0]) if row else 0


def test_a_4xx_fails_the_task_at_once(env: SyncEnv, api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    connect(monkeypatch, env, api)
    with pytest.raises(AirflowFailException, match="HTTP 404"):
        ApiToPostgresOperator(**options(endpoint="/v1/cursor/nothing_here")).execute({"run_id": "r"})  # type: ignore[arg-type]


def test_an_outage_is_left_to_airflow_retries(env: SyncEnv, api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    connect(monkeypatch, env, api)
    api.fail("status", status=503, times=5)
    with pytest.raises(ApiUnavailableError, match=r"HTTP 503 .*nothing was committed") as caught:
        ApiToPostgresOperator(**options()).execute({"run_id": "r"})  # type: ignore[arg-type]
    assert "t0ken" not in str(caught.value) and count_tables(env) == 0


def test_lineage_names_the_endpoint_and_the_target(
    env: SyncEnv, api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect(monkeypatch, env, api)
    operator = ApiToPostgresOperator(**options())
    declared = operator.get_openlineage_facets_on_complete(None)  # before a run: the declared datasets
    operator.execute({"run_id": "manual__1"})  # type: ignore[arg-type]
    facets = operator.get_openlineage_facets_on_complete(None)
    for found in (declared, facets):
        ((source,), (target,)) = found.inputs, found.outputs
        assert (source.namespace, source.name) == (f"http://127.0.0.1:{api.port}", "/v1/cursor/customers")
        assert target.name.endswith("public.customers")
    fields = facets.outputs[0].facets["columnLineage"].fields
    assert fields["risk_score"].inputFields[0].field == "risk_score"
