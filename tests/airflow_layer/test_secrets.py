"""Connection passwords never appear in logs, XCom values, staged manifests or error messages.

The source and target connections use a role with a distinctive password (the test server trusts
local connections, so the password is carried everywhere but never needed).  The test runs
successful syncs and forces failures -- wrong port, wrong database, a row the target cannot hold,
an unreachable CDC source -- through the core API and through the Airflow operators, with every
logger at DEBUG, and then searches the captured log, the exceptions (with their chained causes and
tracebacks), every XCom value and every file left in the staging area for the password, raw and
URL-encoded.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
import sqlalchemy as sa

from airflow_sync_provider.core import SyncSpec, run_sync
from airflow_sync_provider.core.cdc import CdcSpec, run_cdc_sync
from sync_dev.local_postgres import free_port

from ..conftest import SyncEnv

PASSWORD = "Hunter2-zq!7%Xy_s3cr3t"
USER = "sync_secret_user"
FORMS = (PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD))


@pytest.fixture
def secret_env(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> SyncEnv:
    with env.server.connect() as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (USER,)).fetchone() is None:
            conn.execute(f"CREATE ROLE {USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, sku text, updated_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("INSERT INTO orders (id, sku) SELECT g, 'sku-' || g FROM generate_series(1, 500) g")
    port, secret = env.server.port, quote(PASSWORD, safe="")
    for name, db, p in [
        ("SECRET_SOURCE", env.source_db, port),
        ("SECRET_TARGET", env.target_db, port),
        ("SECRET_WRONG_PORT", env.source_db, free_port()),
        ("SECRET_WRONG_DB", "no_such_database", port),
    ]:
        monkeypatch.setenv(f"AIRFLOW_CONN_{name}", f"postgres://{USER}:{secret}@127.0.0.1:{p}/{db}")
    monkeypatch.setenv("SYNC_STAGING_DIR", str(Path(env.staging.base_uri.removeprefix("file://"))))
    return env


def _engine(env: SyncEnv, db: str, port: int | None = None) -> sa.Engine:
    url = sa.URL.create(
        "postgresql+psycopg",
        username=USER,
        password=PASSWORD,
        host="127.0.0.1",
        port=port or env.server.port,
        database=db,
    )
    return sa.create_engine(url, poolclass=sa.NullPool)


def _target(env: SyncEnv) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host="127.0.0.1", port=env.server.port, user=USER, password=PASSWORD, dbname=env.target_db, autocommit=True
    )


def _leaks(text: str) -> list[str]:
    return [form for form in FORMS if form in text]


class Evidence:
    """Everything a user or an operator could see of a run."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self.failures = 0

    def outcome(self, name: str, call: Callable[[], Any]) -> Any:
        try:
            value = call()
        except Exception as error:
            self.failures += 1
            self.texts[f"{name}: exception"] = "".join(traceback.format_exception(error)) + repr(error)
            return None
        self.texts[f"{name}: result"] = json.dumps(value, default=repr)
        return value


def test_passwords_never_leak(
    secret_env: SyncEnv, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    env = secret_env
    from airflow_sync_provider.operators.cdc import CdcSyncOperator
    from airflow_sync_provider.operators.sync import (
        ExtractToStagingOperator,
        LoadStagedToPostgresOperator,
        SyncTableOperator,
    )

    seen = Evidence()
    spec = SyncSpec(sync_id="orders", source_table="orders", cursor_column="updated_at", batch_rows=100)
    caplog.set_level("DEBUG")

    def core_sync(source: sa.Engine, spec: SyncSpec = spec) -> Any:
        with _target(env) as target:
            manifest, result = run_sync(source, target, spec, staging=env.staging, run_id="core")
        return {"manifest": manifest.to_dict(), "result": result.to_dict()}

    # ---- core API
    seen.outcome("core sync", lambda: core_sync(_engine(env, env.source_db)))
    seen.outcome("core wrong port", lambda: core_sync(_engine(env, env.source_db, free_port())))
    seen.outcome("core wrong database", lambda: core_sync(_engine(env, "no_such_database")))
    with env.target() as conn:
        conn.execute("CREATE TABLE narrow (id bigint PRIMARY KEY, sku varchar(3), updated_at timestamptz)")
    narrow = spec.with_options(sync_id="narrow", target_table="narrow")
    seen.outcome("core bad data", lambda: core_sync(_engine(env, env.source_db), narrow))

    def cdc(source: sa.Engine) -> Any:
        with _target(env) as target:
            manifest, result = run_cdc_sync(
                source, target, CdcSpec(sync_id="orders_cdc", tables=("orders",), target_schema="cdc"), run_id="cdc"
            )
        return {"manifest": manifest.to_dict(), "result": result.to_dict()}

    seen.outcome("core cdc", lambda: cdc(_engine(env, env.source_db)))
    seen.outcome("core cdc wrong port", lambda: cdc(_engine(env, env.source_db, free_port())))

    # ---- operators (their return values are the XCom values)
    def table_operator(source: str, target: str = "secret_target", **options: Any) -> Any:
        operator = SyncTableOperator(
            task_id="sync",
            source_conn_id=source,
            target_conn_id=target,
            sync_id="orders_op",
            source_table="orders",
            target_schema="ops",
            cursor_column="updated_at",
            **options,
        )
        return operator.execute({"run_id": "op"})  # type: ignore[arg-type]

    seen.outcome("operator sync", lambda: table_operator("secret_source"))
    seen.outcome("operator wrong port", lambda: table_operator("secret_wrong_port"))
    seen.outcome("operator wrong database", lambda: table_operator("secret_wrong_db"))
    seen.outcome("operator wrong target", lambda: table_operator("secret_source", "secret_wrong_port"))
    seen.outcome("operator bad declaration", lambda: table_operator("secret_source", cursor_column="nope"))

    def split() -> Any:
        extract = ExtractToStagingOperator(
            task_id="extract",
            source_conn_id="secret_source",
            target_conn_id="secret_target",
            sync_id="orders_split",
            source_table="orders",
            target_schema="split",
            cursor_column="updated_at",
        )
        manifest = extract.execute({"run_id": "split"})  # type: ignore[arg-type]
        load = LoadStagedToPostgresOperator(task_id="load", manifest=manifest, target_conn_id="secret_target")
        return {"extract": manifest, "load": load.execute({"run_id": "split"})}  # type: ignore[arg-type]

    seen.outcome("operators extract + load", split)

    def cdc_operator(source: str) -> Any:
        operator = CdcSyncOperator(
            task_id="cdc",
            source_conn_id=source,
            target_conn_id="secret_target",
            sync_id="orders_cdc_op",
            tables="orders",
            target_schema="cdc_op",
        )
        return operator.execute({"run_id": "cdc"})  # type: ignore[arg-type]

    seen.outcome("cdc operator", lambda: cdc_operator("secret_source"))
    seen.outcome("cdc operator wrong port", lambda: cdc_operator("secret_wrong_port"))

    # The successes really ran and the failures really failed: the search below is not vacuous.
    failed = sorted(k.removesuffix(": exception") for k in seen.texts if k.endswith("exception"))
    assert failed == [
        "cdc operator wrong port",
        "core bad data",
        "core cdc wrong port",
        "core wrong database",
        "core wrong port",
        "operator bad declaration",
        "operator wrong database",
        "operator wrong port",
        "operator wrong target",
    ]
    assert seen.failures == len(failed)
    assert json.loads(seen.texts["operator sync: result"])["load"]["inserted"] == 500
    assert "public.narrow" in seen.texts["core bad data: exception"]
    assert "no_such_database" in seen.texts["operator wrong database: exception"]
    staged = [p for p in Path(env.staging.base_uri.removeprefix("file://")).rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in staged)  # the failed load kept its batch and manifest
    for path in staged:
        seen.texts[f"staged file {path.name}"] = path.read_bytes().decode("utf-8", errors="replace")
    # Airflow routes log records through structlog to stderr: search the captured streams as well.
    captured = capfd.readouterr()
    seen.texts["log"] = "\n".join([caplog.text, captured.out, captured.err])
    assert "committed version 1 into ops.orders" in seen.texts["log"]
    assert "committed CDC snapshot version 1" in seen.texts["log"]

    leaks = {name: _leaks(text) for name, text in seen.texts.items() if _leaks(text)}
    assert not leaks, leaks
