"""Alerts end to end: real syncs on the test PostgreSQL breach each threshold, ``SyncHealthCheckOperator``
reads their status and sends each breach through Airflow's ``SmtpNotifier`` to a real local SMTP
server (aiosmtpd); the e-mails are parsed and checked.  Also: a healthy check sends nothing, a
check run twice in one DAG run (a retry) sends nothing new, ``on_breach="fail"`` fails the task,
an SMTP server that is down leaves the alert unsent so the retry sends it, and the notifier used
as an ``on_failure_callback`` reports which sync task failed and why.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import great_expectations as gx
import pytest
from aiosmtpd.controller import Controller
from airflow.sdk import DAG, BaseNotifier

from airflow_sync_provider.core import SyncSpec, extract_for, load_manifest
from airflow_sync_provider.core.alert_log import sent_alerts
from airflow_sync_provider.core.cdc import CdcSpec
from airflow_sync_provider.core.errors import TargetUnavailableError
from airflow_sync_provider.core.quality import validate_manifest
from airflow_sync_provider.core.reconcile import reconcile
from airflow_sync_provider.core.status import RunContext, record_run_context
from airflow_sync_provider.notifications import SyncAlertError, SyncAlertNotifier
from airflow_sync_provider.operators.health import SyncHealthBreachedError, SyncHealthCheckOperator

from ..conftest import CdcEnv, SyncEnv

E = gx.expectations
ORDERS = SyncSpec(sync_id="orders", source_table="orders", cursor_column="updated_at")
ARCHIVE = SyncSpec(sync_id="archive", source_table="archive", cursor_column="updated_at")
EVERY_RULE = {
    "freshness_older_than": "1h",
    "quarantine_above": 0,
    "reconciliation_differences": 0,
    "watermark_held_back_longer_than": 0,
}


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    subject: str
    html: str


@dataclass
class SmtpSink:
    """A real SMTP server on a free local port that keeps every message it receives."""

    port: int
    messages: list[Mail] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = message.get_body(("html", "plain"))
        assert body is not None
        with self.lock:
            self.messages.append(
                Mail(envelope.mail_from, list(envelope.rcpt_tos), str(message["Subject"]), body.get_content())
            )
        return "250 OK"

    def take(self) -> list[Mail]:
        """The messages received so far (sorted by subject), forgotten afterwards."""
        with self.lock:
            taken, self.messages[:] = sorted(self.messages, key=lambda m: m.subject), []
        return taken

    def connection(self) -> str:
        """An ``smtp`` Airflow connection (JSON) for this server: no TLS, no login, no retries."""
        extra = {"disable_tls": True, "disable_ssl": True, "from_email": "airflow@example.com", "retry_limit": 0}
        return json.dumps(
            {"conn_type": "smtp", "host": "127.0.0.1", "port": self.port, "extra": {**extra, "timeout": 5}}
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink(free_port())
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()


@pytest.fixture
def connections(env: SyncEnv, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch) -> SyncEnv:
    port = env.server.port
    monkeypatch.setenv("AIRFLOW_CONN_ALERT_SMTP", smtp.connection())
    monkeypatch.setenv("AIRFLOW_CONN_HEALTH_TARGET", f"postgres://postgres@127.0.0.1:{port}/{env.target_db}")
    monkeypatch.setenv("AIRFLOW_CONN_HEALTH_SOURCE", f"postgres://postgres@127.0.0.1:{port}/{env.source_db}")
    return env


def smtp_notifier() -> Any:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    return SmtpNotifier(to="ops@example.com", smtp_conn_id="alert_smtp")


def check(run_id: str, **kwargs: Any) -> list[dict[str, Any]]:
    """One health-check task run in DAG run ``run_id`` (``on_breach="notify"`` unless given)."""
    operator = SyncHealthCheckOperator(
        task_id="health",
        notifiers=[smtp_notifier()],
        **{"target_conn_ids": ["health_target"], "thresholds": EVERY_RULE, "on_breach": "notify", **kwargs},
    )
    context = {"run_id": run_id, "dag": DAG("sync_health", schedule=None), "ti": SimpleNamespace(try_number=1)}
    return operator.execute(context)  # type: ignore[arg-type]


def _tables(env: SyncEnv) -> None:
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text, quantity int, "
            "updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        conn.execute(
            "INSERT INTO orders (id, customer, quantity) "
            "SELECT g, 'customer ' || g, g % 7 FROM generate_series(1, 300) g"
        )
        conn.execute("UPDATE orders SET quantity = -5 WHERE id IN (17, 250)")
        conn.execute("CREATE TABLE archive (id bigint PRIMARY KEY, note text, updated_at timestamptz NOT NULL)")
        conn.execute(
            "INSERT INTO archive SELECT g, 'old ' || g, now() - interval '5 hours' - g * interval '1 second' "
            "FROM generate_series(1, 50) g"
        )


def _gated_orders(env: SyncEnv, run_id: str) -> None:
    """Orders through a gate that quarantines the two negative quantities (298 of 300 rows load)."""
    engine = env.source_engine
    suite = [E.ExpectColumnValuesToBeBetween(column="quantity", min_value=0, max_value=10000)]
    try:
        with env.target() as target:
            manifest = extract_for(engine, target, ORDERS, staging=env.staging, run_id=run_id)
            result = validate_manifest(
                manifest,
                suite,
                target_conn=target,
                staging=env.staging,
                run_id=run_id,
                quarantine=True,
                max_quarantine_fraction=0.05,
            )
            assert load_manifest(target, result.manifest, run_id=run_id).inserted == 298
            reconcile(engine, target, ORDERS, staging=env.staging, run_id=f"{run_id}-check")
    finally:
        engine.dispose()


def test_each_table_breach_arrives_by_email_once_per_run(connections: SyncEnv, smtp: SmtpSink) -> None:
    env = connections
    assert check("empty") == [] and smtp.take() == []  # nothing synced yet: nothing to say

    _tables(env)
    env.sync(ARCHIVE, run_id="a1")
    # Healthy: the archive's 5-hour-old rows are within its own 1-day threshold.
    assert check("healthy", sync_thresholds={"archive": {"freshness_older_than": "1d"}}) == []
    assert smtp.take() == []

    _gated_orders(env, "o1")
    holder = env.source(autocommit=False)  # an open source transaction holds the orders' watermark back
    try:
        holder.execute("INSERT INTO orders (id, customer, quantity) VALUES (1000, 'late', 1)")
        with env.source() as conn:
            conn.execute("UPDATE orders SET customer = 'changed', updated_at = clock_timestamp() WHERE id = 5")
        env.sync(ORDERS, run_id="o2")
    finally:
        holder.rollback()
        holder.close()
    time.sleep(1.1)  # held back for a second by the time the check reads it

    alerts = check("scheduled__1")
    assert [(a["sync_id"], a["rule"]) for a in alerts] == [
        ("archive", "freshness"),
        ("orders", "watermark_held_back"),
        ("orders", "quarantine"),
        ("orders", "reconciliation_differences"),
    ]
    mails = smtp.take()
    assert len(mails) == 4 and all(m.recipients == ["ops@example.com"] for m in mails)
    assert all(m.sender == "airflow@example.com" for m in mails)
    fresh = next(m for m in mails if "freshness" in m.subject)
    assert fresh.subject.startswith("[sync alert: critical] archive: freshness 5 h ") and fresh.subject.endswith(
        "> 1 h"
    )
    assert "sync archive (target health_target, table public.archive, source archive)" in fresh.html
    assert "older than the threshold 1 h" in fresh.html
    quarantine = next(m for m in mails if "quarantine" in m.subject)
    assert quarantine.subject == "[sync alert: critical] orders: quarantine 2 rows > 0 rows"
    assert "2 rows wait in quarantine" in quarantine.html
    assert "expect_column_values_to_be_between(quantity)" in quarantine.html
    recon = next(m for m in mails if "reconciliation" in m.subject)
    assert recon.subject == "[sync alert: critical] orders: reconciliation differences 2 rows > 0 rows"
    assert "reconciliation o1-check" in recon.html and "2 missing, 0 extra, 0 changed" in recon.html
    held = next(m for m in mails if "held back" in m.subject)
    assert held.subject.startswith("[sync alert: critical] orders: watermark held back ")
    assert "open transaction pid" in held.html and "1 run since" in held.html
    assert "health_target/public/orders:quarantine" in quarantine.html  # the dedupe key is shown
    print("EXAMPLE ALERT MAIL", fresh.subject, fresh.html, sep="\n")

    # The same DAG run again (a retry): every alert is still open, none is sent twice.
    assert len(check("scheduled__1")) == 4
    assert smtp.take() == []
    with env.target() as conn:
        assert len(sent_alerts(conn, "public", "sync_health/scheduled__1")) == 4
    # The next DAG run sends what is still open; a fixed rule (the sync ran again without the
    # open transaction) is not sent.
    env.sync(ORDERS, run_id="o3")
    assert [a["rule"] for a in check("scheduled__2")] == ["freshness", "quarantine", "reconciliation_differences"]
    assert len(smtp.take()) == 3

    # on_breach="fail": the task fails naming the alerts, after sending them (once per run).
    for _ in range(2):
        with pytest.raises(SyncHealthBreachedError, match=r"3 sync alert\(s\) on 2 sync\(s\): .*archive: freshness"):
            check("scheduled__3", on_breach="fail")
    assert len(smtp.take()) == 3


def test_an_undelivered_alert_is_sent_by_the_retry(
    connections: SyncEnv, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = connections
    _tables(env)
    env.sync(ARCHIVE, run_id="a1")
    down = SmtpSink(free_port())  # nothing listens there
    monkeypatch.setenv("AIRFLOW_CONN_ALERT_SMTP", down.connection())
    with pytest.raises(
        SyncHealthBreachedError, match=r"1 sync alert\(s\) not delivered .*health_target/public/archive:freshness"
    ):
        check("scheduled__1")
    with env.target() as conn:
        assert sent_alerts(conn, "public") == []  # the claim was released
    monkeypatch.setenv("AIRFLOW_CONN_ALERT_SMTP", smtp.connection())
    assert [a["rule"] for a in check("scheduled__1")] == ["freshness"]
    (mail,) = smtp.take()
    assert mail.subject.startswith("[sync alert: critical] archive: freshness 5 h ")

    # A target that cannot be reached does not blind the check to the others: they are checked and
    # alerted, then the task fails naming it (so Airflow retries).
    monkeypatch.setenv("AIRFLOW_CONN_DOWN_TARGET", "postgres://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(TargetUnavailableError, match=r"health check could not read: .*'down_target'"):
        check("scheduled__2", target_conn_ids=["down_target", "health_target"])
    assert [m.subject.split(" 5 h ")[0] for m in smtp.take()] == ["[sync alert: critical] archive: freshness"]


def test_cdc_slot_retaining_wal_alerts(cdc: CdcEnv, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch) -> None:
    env = cdc.env
    monkeypatch.setenv("AIRFLOW_CONN_ALERT_SMTP", smtp.connection())
    monkeypatch.setenv("AIRFLOW_CONN_HEALTH_TARGET", f"postgres://postgres@127.0.0.1:{env.server.port}/{env.target_db}")
    monkeypatch.setenv("AIRFLOW_CONN_HEALTH_SOURCE", f"postgres://postgres@127.0.0.1:{env.server.port}/{env.source_db}")
    with env.source() as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, qty int)")
        conn.execute("INSERT INTO items SELECT g, g FROM generate_series(1, 100) g")
    spec = CdcSpec(sync_id="items_cdc", tables=("items",))
    cdc.run(spec, run_id="r1")
    limits = {"slot_retained_wal_over": "8MB"}
    assert check("c1", thresholds=limits, source_conn_id="health_source") == []
    assert smtp.take() == []

    with env.source() as conn:  # 16 MB of WAL the stopped sync never confirms (committed: flushed)
        for _ in range(16):
            conn.execute("SELECT pg_logical_emit_message(true, 'alerts-test', repeat('x', 1000000))")
    # Without a source connection (none recorded, none given) the slot is not read: no alert.
    assert check("c2", thresholds=limits) == []
    assert smtp.take() == []
    # The source connection the CDC operators record for the sync is used (here recorded by hand).
    with env.target() as conn:
        record_run_context(conn, "public", RunContext("items_cdc", "r1", "items_dag", "cdc", "health_source"))
    (alert,) = check("c3", thresholds=limits)
    assert (alert["rule"], alert["threshold"], alert["severity"]) == ("slot_retained_wal", 8_000_000, "critical")
    assert alert["observed"] > 16_000_000
    (mail,) = smtp.take()
    assert mail.subject.startswith("[sync alert: critical] items_cdc: slot retained wal ")
    assert mail.subject.endswith(" MB > 8 MB")
    assert f"replication slot {spec.slot_name} retains" in mail.html and "not active" in mail.html


def test_notifier_as_failure_callback_names_the_sync_task_and_error(
    connections: SyncEnv, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_sync_provider.operators.sync import SyncTableOperator

    env = connections
    monkeypatch.setenv("SYNC_STAGING_DIR", env.staging.base_uri.removeprefix("file://"))
    operator = SyncTableOperator(
        task_id="sync_orders",
        sync_id="orders",
        source_table="no_such_table",
        cursor_column="updated_at",
        source_conn_id="health_source",
        target_conn_id="health_target",
    )
    ti = SimpleNamespace(dag_id="orders_hourly", task_id="sync_orders", try_number=2)
    context: dict[str, Any] = {"run_id": "scheduled__7", "ti": ti, "task": operator}
    with pytest.raises(Exception) as raised:
        operator.execute(context)  # type: ignore[arg-type]
    context["exception"] = raised.value
    notifier = SyncAlertNotifier(notifiers=[smtp_notifier()], title="[test]")
    notifier(context)  # as Airflow calls an on_failure_callback
    (mail,) = smtp.take()
    assert mail.subject.startswith("[test] [sync failed] sync orders: task orders_hourly.sync_orders failed: ")
    assert "no_such_table" in mail.subject
    assert mail.html.startswith("<p>[test] [sync failed] sync orders: ")
    assert "scheduled__7" in mail.html and "health_target" in mail.html
    assert "<th align='left'>try</th><td>2</td>" in mail.html

    # The same notifier object sends again (templates are rendered on a copy), and asynchronously too:
    # SmtpNotifier is awaited, a notifier without async_notify runs in a thread, and a broken
    # channel fails the send, naming it, without silencing the others.
    notifier(context)
    kept = Recorder(text=None)
    awaited = SyncAlertNotifier(notifiers=[smtp_notifier(), kept, Broken()], title="[test]")
    awaited.context = context  # type: ignore[assignment]
    with pytest.raises(SyncAlertError, match="sync alert not delivered by Broken: no route to the pager"):
        asyncio.run(_await(awaited))
    assert [m.subject for m in smtp.take()] == [mail.subject, mail.subject]
    assert kept.sent == [mail.subject.split(" failed: ")[0]]
    # Nothing to say (no alert, no error, e.g. an on_success_callback): nothing is sent.
    SyncAlertNotifier(notifiers=[smtp_notifier()])({"run_id": "x"})
    assert smtp.take() == []


async def _await(notifier: SyncAlertNotifier) -> None:
    await notifier


class Recorder(BaseNotifier):
    """A notifier without async support that keeps the first line of each ``text`` it is given."""

    template_fields = ("text",)

    def __init__(self, text: str | None) -> None:
        super().__init__()
        self.text = text
        self.sent: list[str] = []

    def notify(self, context: Any) -> None:
        self.sent.append(str(self.text).split(" failed: ")[0])


class Broken(BaseNotifier):
    def notify(self, context: Any) -> None:
        raise ConnectionError("no route to the pager")
