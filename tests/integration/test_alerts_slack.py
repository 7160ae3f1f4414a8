"""Alerts through Slack: ``SyncHealthCheckOperator`` forwards a real breach (a stale sync on the test
PostgreSQL) to Airflow's ``SlackWebhookNotifier``, which posts to a real local HTTP server standing in
for Slack's incoming webhook (an Airflow ``slackwebhook`` connection whose host points to it).  The
posted JSON is checked; a healthy check posts nothing; the same DAG run twice posts nothing new; a
webhook answering 500 leaves the alert unsent so the retry posts it (as the SMTP tests do for mail).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk import DAG, BaseNotifier

from airflow_sync_provider.core.alert_log import sent_alerts
from airflow_sync_provider.notifications import SyncAlertNotifier
from airflow_sync_provider.operators.health import SyncHealthBreachedError, SyncHealthCheckOperator

from ..conftest import SyncEnv
from .test_alerts_smtp import ARCHIVE, _await, _tables

slack_webhook = pytest.importorskip(
    "airflow.providers.slack.notifications.slack_webhook",
    reason="apache-airflow-providers-slack is not installed (pip install apache-airflow-providers-slack)",
)

#: The webhook token: the path Slack's URL ends with (``https://hooks.slack.com/services/<token>``).
TOKEN = "T0000/B0000/not-a-secret"


@dataclass
class Post:
    path: str
    content_type: str
    body: dict[str, Any]


@dataclass
class WebhookSink:
    """A real HTTP server on a free local port that keeps every POST and answers ``status``."""

    server: ThreadingHTTPServer
    posts: list[Post] = field(default_factory=list)
    status: int = 200
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def take(self) -> list[Post]:
        """The POSTs received so far, forgotten afterwards."""
        with self.lock:
            taken, self.posts[:] = list(self.posts), []
        return taken

    def connection(self) -> str:
        """A ``slackwebhook`` Airflow connection (JSON): URL = host + "/" + the token in the password."""
        return json.dumps(
            {
                "conn_type": "slackwebhook",
                "host": f"http://127.0.0.1:{self.port}",
                "password": TOKEN,
                "extra": {"timeout": 5},
            }
        )


def _handler(sink: WebhookSink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with sink.lock:
                sink.posts.append(Post(self.path, self.headers.get("Content-Type", ""), json.loads(raw)))
                status = sink.status
            reply = b"ok" if status == 200 else b"internal_error"  # what Slack answers
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest's output clean
            return

    return Handler


@pytest.fixture
def slack() -> Iterator[WebhookSink]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)  # port 0: a free one
    sink = WebhookSink(server)
    server.RequestHandlerClass = _handler(sink)
    thread = threading.Thread(target=server.serve_forever, name="slack-webhook-sink", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def connections(env: SyncEnv, slack: WebhookSink, monkeypatch: pytest.MonkeyPatch) -> SyncEnv:
    monkeypatch.setenv("AIRFLOW_CONN_ALERT_SLACK", slack.connection())
    monkeypatch.setenv("AIRFLOW_CONN_HEALTH_TARGET", f"postgres://postgres@127.0.0.1:{env.server.port}/{env.target_db}")
    return env


def slack_notifier() -> Any:
    """Airflow's notifier with ``text`` left None: the health check fills it with the alert."""
    return slack_webhook.SlackWebhookNotifier(slack_webhook_conn_id="alert_slack", text=None)


def check(run_id: str, **kwargs: Any) -> list[dict[str, Any]]:
    """One health-check task run in DAG run ``run_id`` (freshness over 1 h, ``on_breach="notify"``)."""
    operator = SyncHealthCheckOperator(
        task_id="health",
        notifiers=[slack_notifier()],
        **{
            "target_conn_ids": ["health_target"],
            "thresholds": {"freshness_older_than": "1h"},
            "on_breach": "notify",
            **kwargs,
        },
    )
    context = {"run_id": run_id, "dag": DAG("sync_health", schedule=None), "ti": SimpleNamespace(try_number=1)}
    return operator.execute(context)  # type: ignore[arg-type]


def test_a_breach_is_posted_to_the_webhook_once_per_run(connections: SyncEnv, slack: WebhookSink) -> None:
    env = connections
    assert check("empty") == [] and slack.take() == []  # nothing synced yet: nothing to say
    _tables(env)
    env.sync(ARCHIVE, run_id="a1")  # the archive's newest row is 5 hours old
    assert check("healthy", thresholds={"freshness_older_than": "1d"}) == []
    assert slack.take() == []

    (alert,) = check("scheduled__1")
    assert (alert["sync_id"], alert["rule"], alert["severity"]) == ("archive", "freshness", "critical")
    (post,) = slack.take()
    assert post.path == f"/{TOKEN}" and post.content_type.startswith("application/json")
    assert set(post.body) == {"text"}  # no blocks, attachments or legacy fields
    text = post.body["text"]
    first, _, rest = text.partition("\n")
    assert first.startswith("[sync alert: critical] archive: freshness 5 h ")  # the sync, the rule, the figure
    assert first.endswith(" &gt; 1 h")  # the threshold; '>' escaped as Slack's mrkdwn asks
    assert "sync archive (target health_target, table public.archive, source archive)" in rest
    assert "older than the threshold 1 h" in rest
    assert "dedupe key: health_target/public/archive:freshness" in rest
    assert "<" not in text and ">" not in text  # plain text, no HTML and no raw control character
    print("EXAMPLE SLACK POST", json.dumps(post.body, indent=2), sep="\n")

    # The same DAG run again (a retry): the alert is still open but is not posted twice.
    assert [a["rule"] for a in check("scheduled__1")] == ["freshness"]
    assert slack.take() == []
    with env.target() as conn:
        assert len(sent_alerts(conn, "public", "sync_health/scheduled__1")) == 1
    # The next DAG run posts what is still open.
    check("scheduled__2")
    assert [p.body["text"].partition("\n")[0] for p in slack.take()] == [first]


def test_a_webhook_answering_500_leaves_the_alert_for_the_retry(connections: SyncEnv, slack: WebhookSink) -> None:
    env = connections
    _tables(env)
    env.sync(ARCHIVE, run_id="a1")
    slack.status = 500
    with pytest.raises(
        SyncHealthBreachedError, match=r"1 sync alert\(s\) not delivered .*health_target/public/archive:freshness"
    ):
        check("scheduled__1")
    (refused,) = slack.take()  # it was tried once (the client retries connection errors only)
    with env.target() as conn:
        assert sent_alerts(conn, "public") == []  # the claim was released
    slack.status = 200
    assert [a["rule"] for a in check("scheduled__1")] == ["freshness"]  # the retry of the same DAG run
    (post,) = slack.take()
    assert post.body["text"].partition("\n")[0] == refused.body["text"].partition("\n")[0]  # the same alert
    with env.target() as conn:
        assert len(sent_alerts(conn, "public", "sync_health/scheduled__1")) == 1


class TextKeeper(BaseNotifier):
    """A notifier that is not Slack's, with a ``text`` field: it keeps what it is given."""

    template_fields = ("text",)

    def __init__(self) -> None:
        super().__init__()
        self.text: str | None = None
        self.sent: list[str] = []

    def notify(self, context: Any) -> None:
        self.sent.append(str(self.text))


def test_a_failed_sync_task_is_posted_escaped_for_slack(slack: WebhookSink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_ALERT_SLACK", slack.connection())
    error = RuntimeError("lost <psycopg.Connection [BAD] at 0x7f> & paged <!channel>")
    context: dict[str, Any] = {
        "run_id": "scheduled__7",
        "ti": SimpleNamespace(dag_id="orders_hourly", task_id="sync_orders", try_number=2),
        "task": SimpleNamespace(sync_id="orders", target_conn_id="warehouse"),
        "exception": error,
    }
    kept = TextKeeper()
    notifier = SyncAlertNotifier(notifiers=[slack_notifier(), kept], title="[prod]")
    notifier(context)  # as Airflow calls an on_failure_callback
    awaited = SyncAlertNotifier(notifiers=[slack_notifier()], title="[prod]")
    awaited.context = context  # type: ignore[assignment]
    asyncio.run(_await(awaited))  # SlackWebhookNotifier.async_notify, through aiohttp
    posts = slack.take()
    assert len(posts) == 2 and posts[0].body == posts[1].body
    text = posts[0].body["text"]
    assert text.startswith("[prod] [sync failed] sync orders: task orders_hourly.sync_orders failed: lost &lt;psycopg")
    # Slack would swallow "<...>" as a link and ping the channel for "<!channel>": escaped, both show as text.
    assert "&lt;!channel&gt;" in text and "at 0x7f&gt; &amp; paged" in text and "<" not in text
    assert "run: scheduled__7" in text and "try: 2" in text and "target: warehouse" in text
    # A notifier that is not Slack's gets the plain text, unescaped.
    (plain,) = kept.sent
    assert plain.startswith("[prod] [sync failed] sync orders: ") and "paged <!channel>" in plain
