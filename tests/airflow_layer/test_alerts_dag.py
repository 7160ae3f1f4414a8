"""The reference ``sync_health`` DAG through Airflow (``dag.test()`` in the sandbox): a stale sync on the
inventory target makes ``check_inventory`` send one e-mail through ``SmtpNotifier`` and the
``smtp_default`` connection to a real local SMTP server, and fail; the bank targets are healthy
and their check sends nothing and succeeds."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from airflow_sync_provider.core import SyncSpec
from airflow_sync_provider.core.alert_log import sent_alerts

from ..conftest import SyncEnv
from ..integration.test_alerts_smtp import SmtpSink, smtp  # noqa: F401 (the fixture)

pytestmark = pytest.mark.airflow


def test_sync_health_dag_emails_the_stale_sync_and_fails(env: SyncEnv, smtp: SmtpSink, tmp_path: Path) -> None:  # noqa: F811
    from sync_dev.airflow_sandbox import AirflowSandbox

    with env.source() as conn:
        conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, note text, updated_at timestamptz NOT NULL)")
        conn.execute(
            "INSERT INTO orders SELECT g, 'order ' || g, now() - interval '8 hours' - g * interval '1 minute' "
            "FROM generate_series(1, 20) g"
        )
    env.sync(
        SyncSpec(
            sync_id="store_web_orders", source_table="orders", cursor_column="updated_at", target_schema="store_web"
        )
    )

    port = env.server.port
    environment = {
        "AIRFLOW_CONN_INVENTORY_CENTRAL": f"postgres://postgres@127.0.0.1:{port}/{env.target_db}",
        # The bank targets: a database without syncs (healthy: nothing to check).
        **{
            f"AIRFLOW_CONN_{name.upper()}": f"postgres://postgres@127.0.0.1:{port}/{env.source_db}"
            for name in ("loan_management", "credit_scoring", "fraud_detection")
        },
        "AIRFLOW_CONN_SMTP_DEFAULT": smtp.connection(),
        "AIRFLOW_VAR_SYNC_ALERT_EMAIL_TO": "oncall@example.com, dba@example.com",
    }
    with AirflowSandbox(tmp_path / "airflow", environment) as box:
        box.migrate()
        run = box.run_dag("sync_health", dt.datetime(2026, 11, 1, 10, tzinfo=dt.UTC))
    log = run.log_file.read_text()[-6000:] if run.log_file else ""
    assert (run.state, run.tasks) == ("failed", {"check_inventory": "failed", "check_bank": "success"}), log

    (mail,) = smtp.take()
    assert sorted(mail.recipients) == ["dba@example.com", "oncall@example.com"]
    assert mail.subject.startswith("[sync alert: warning] store_web_orders: freshness 8 h ") and mail.subject.endswith(
        " > 6 h"
    )
    assert "sync store_web_orders (target inventory_central, table store_web.orders, source orders)" in mail.html
    with env.target() as conn:
        ((scope, key),) = sent_alerts(conn, "store_web")
    assert scope.startswith("sync_health/") and key == "inventory_central/store_web/store_web_orders:freshness"
