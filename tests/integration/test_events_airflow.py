"""The Airflow layer of event syncs: hooks over Airflow connections (``redis``, ``nats``, ``mqtt``),
the drain operator, and the AssetWatcher-ready trigger, against the real brokers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest
from airflow.sdk.exceptions import AirflowFailException
from airflow.triggers.base import TriggerEvent

from airflow_sync_provider.core.errors import SourceUnavailableError
from airflow_sync_provider.hooks.events import event_source
from airflow_sync_provider.operators.events import EventStreamToPostgresOperator
from airflow_sync_provider.triggers.events import EventStreamTrigger

from ..conftest import SyncEnv
from .test_events_brokers import (
    NATS,
    REDIS,
    Broker,
    MqttBroker,
    NatsBroker,
    RedisBroker,
    broker_fixture,  # noqa: F401  (fixture)
    mosquitto_fixture,  # noqa: F401  (fixture)
)
from .test_events_sync import MOVEMENTS, movement, rows

COLUMNS = [
    {"name": c.name, "type": c.type, "path": c.path, "required": c.required} for c in MOVEMENTS.columns
]  # as a DAG file writes them


def connect_airflow(monkeypatch: pytest.MonkeyPatch, env: SyncEnv, broker: Broker) -> str:
    """Airflow connections for the broker (``AIRFLOW_CONN_EVENTS``) and the target; returns the stream."""
    port = env.server.port
    monkeypatch.setenv("AIRFLOW_CONN_EVENTS_TARGET", f"postgres://postgres@127.0.0.1:{port}/{env.target_db}")
    monkeypatch.setenv("SYNC_STAGING_DIR", env.staging.base_uri.removeprefix("file://"))
    if isinstance(broker, RedisBroker):
        connection = {"conn_type": "redis", "host": REDIS[0], "port": REDIS[1], "extra": {"db": 0}}
        stream = broker.key
    elif isinstance(broker, NatsBroker):
        connection = {"conn_type": "nats", "host": NATS[0], "port": NATS[1]}
        stream = broker.stream
    else:
        assert isinstance(broker, MqttBroker)
        extra = {"client_id": broker.client_id}
        connection = {"conn_type": "mqtt", "host": broker.host, "port": broker.port, "extra": extra}
        stream = f"{broker.topic}/#"
    monkeypatch.setenv("AIRFLOW_CONN_EVENTS", json.dumps(connection))
    return stream


def operator(stream: str, **options: Any) -> EventStreamToPostgresOperator:
    return EventStreamToPostgresOperator(
        task_id="drain",
        sync_id="device_movements",
        source_conn_id="events",
        stream=stream,
        target_conn_id="events_target",
        target_table="movements",
        columns=COLUMNS,
        event_time="at",
        sequence="seq",
        wait_seconds=0.5,
        **options,
    )


def test_the_operator_drains_through_airflow_connections(
    env: SyncEnv, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = connect_airflow(monkeypatch, env, broker)
    broker.publish([movement(n) for n in range(250)] + [b"not json"])
    result = operator(stream, batch_events=100).execute({"run_id": "manual__1"})
    assert (result["events"], result["inserted"], result["quarantined"], result["batches"]) == (251, 250, 1, 3)
    assert rows(env, "SELECT count(*) FROM movements") == [(250,)]
    again = operator(stream).execute({"run_id": "manual__2"})
    assert again["events"] == 0 and again["version"] == 3


def test_the_trigger_fires_for_events_the_sync_has_not_loaded(
    env: SyncEnv, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = connect_airflow(monkeypatch, env, broker)
    trigger = EventStreamTrigger(
        source_conn_id="events", stream=stream, sync_id="device_movements", target_conn_id="events_target"
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_sync_provider.triggers.events.EventStreamTrigger"
    assert EventStreamTrigger(**kwargs).serialize() == (classpath, kwargs)
    try:
        assert trigger.poll() is None  # nothing published
        broker.publish([movement(n) for n in range(10)])
        if isinstance(broker, MqttBroker):  # the watcher sees what arrives while it is connected
            assert trigger.poll() is not None
        else:
            fired = asyncio.run(_first_event(trigger))
            assert fired["status"] == "events" and fired["position"] is None
            operator(stream).execute({"run_id": "manual__1"})
            assert trigger.poll() is None  # loaded: nothing pending after the committed position
            broker.publish([movement(10)])
            pending = trigger.poll()
            assert pending is not None and pending["position"] is not None
    finally:
        trigger._close_source()


async def _first_event(trigger: EventStreamTrigger) -> dict[str, Any]:
    runner = cast(AsyncGenerator[TriggerEvent, None], trigger.run())
    try:
        event = await asyncio.wait_for(runner.__anext__(), timeout=30)
    finally:
        await runner.aclose()
    return dict(event.payload)


def test_connection_errors_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SourceUnavailableError, match=r"'nowhere'.*not defined"):
        event_source("nowhere", "s")
    monkeypatch.setenv("AIRFLOW_CONN_FTP", json.dumps({"conn_type": "ftp", "host": "x"}))
    with pytest.raises(Exception, match="needs one of redis, nats, mqtt"):
        event_source("ftp", "s")
    monkeypatch.setenv("AIRFLOW_CONN_DEAD", json.dumps({"conn_type": "mqtt", "host": "127.0.0.1", "port": 1}))
    with pytest.raises(SourceUnavailableError, match=r"MQTT broker 127\.0\.0\.1:1"):
        event_source("dead", "t/#", sync_id="s").read(None, max_events=1, max_bytes=1, wait=0.1)


def test_a_bad_declaration_fails_the_task_without_retries(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_EVENTS", json.dumps({"conn_type": "redis", "host": REDIS[0], "port": REDIS[1]}))
    with pytest.raises(AirflowFailException, match="event_time must be a timestamptz"):
        EventStreamToPostgresOperator(
            task_id="bad",
            sync_id="bad",
            source_conn_id="events",
            stream="s",
            target_conn_id="events_target",
            target_table="t",
            columns=COLUMNS,
            event_time="qty",
        ).execute({"run_id": "manual__1"})
