"""Event syncs under faults, on the real brokers: a process SIGKILLed between the target commit and
the acknowledgement (and before the commit), and a broker restarted between runs.  Every event ends
up in the target exactly once.

The restart runs on brokers of the suite's own (a private Mosquitto, NATS server and Redis on free
ports, from the machine's binaries): the shared servers are not the tests' to stop.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sync_dev.device_simulator import LocalServer, PrivateMosquitto

from ..conftest import SyncEnv
from ..integration.test_events_brokers import (
    Broker,
    MqttBroker,
    NatsBroker,
    RedisBroker,
    broker_fixture,  # noqa: F401  (fixture)
    mosquitto_fixture,  # noqa: F401  (fixture)
)
from ..integration.test_events_sync import movement, rows, run, spec_for

KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import psycopg
    from airflow_sync_provider.core import StagingArea
    from airflow_sync_provider.core.events import drain_events
    from tests.integration.test_events_sync import spec_for

    config = json.loads(sys.argv[1])
    kind = config["kind"]
    if kind == "redis":
        import redis
        from airflow_sync_provider.core.events.redis_streams import RedisStreamSource
        source = RedisStreamSource(redis.Redis("127.0.0.1", config["port"]), config["name"])
    elif kind == "nats":
        from airflow_sync_provider.core.events.nats_jetstream import NatsJetStreamSource
        source = NatsJetStreamSource(config["url"], config["name"])
    else:
        from airflow_sync_provider.core.events.mqtt import MqttSource
        source = MqttSource("127.0.0.1", config["port"], topic=config["name"], client_id=config["client_id"])
    phases = []

    def observer(phase, facts):
        phases.append(phase)
        if phase == config["phase"] and phases.count(phase) == config["batch"]:
            print("killed at", phase, facts, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no rollback, no acknowledgement, no disconnect

    spec = spec_for("killed", batch_events=config["batch_events"])
    with psycopg.connect(config["target"], autocommit=True) as target:
        drain_events(source, target, spec, staging=StagingArea(config["staging"]), observer=observer, wait=1.0)
    print("not killed", phases, flush=True)
    """
)


def source_config(broker: Broker) -> dict[str, Any]:
    if isinstance(broker, RedisBroker):
        return {"kind": "redis", "port": broker.client.connection_pool.connection_kwargs["port"], "name": broker.key}
    if isinstance(broker, NatsBroker):
        return {"kind": "nats", "url": broker.url, "name": broker.stream}
    assert isinstance(broker, MqttBroker)
    return {"kind": "mqtt", "port": broker.port, "name": f"{broker.topic}/#", "client_id": broker.client_id}


def kill_drain(env: SyncEnv, broker: Broker, *, phase: str, batch: int, batch_events: int) -> str:
    config = {
        **source_config(broker),
        "target": env.server.dsn(env.target_db),
        "staging": env.staging.base_uri,
        "phase": phase,
        "batch": batch,
        "batch_events": batch_events,
    }
    process = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert process.returncode == -signal.SIGKILL, process.stdout[-2000:] + process.stderr[-2000:]
    return process.stdout


def test_sigkill_between_the_target_commit_and_the_acknowledgement(env: SyncEnv, broker: Broker) -> None:
    broker.publish([movement(n) for n in range(600)])
    kill_drain(env, broker, phase="committed", batch=2, batch_events=200)
    # Two batches committed (rows and position together); the second was never acknowledged.
    assert rows(env, "SELECT count(*) FROM killed") == [(400,)]
    assert env.state("killed") is not None and env.state("killed")[0] == 2  # type: ignore[index]
    result = run(env, broker, spec_for("killed", batch_events=200), wait=1.0)
    if broker.kind == "mqtt":
        # No position: the broker redelivers the unacknowledged batch; the merge makes it a no-op.
        assert (result.events, result.superseded, result.inserted) == (400, 200, 200)
    else:
        # The next read starts after the committed position: the killed batch is not read again.
        assert (result.events, result.superseded, result.inserted) == (200, 0, 200)
    assert rows(env, "SELECT count(*), count(DISTINCT event_id), sum(qty) FROM killed") == [(600, 600, 600)]
    # Each batch of the rerun is one applied load after the two killed-run ones (MQTT: the redelivered
    # batch is one more, a no-op); how the rerun cuts its batches depends on arrival times (a loaded
    # machine cut 179 + 21), so count them from its result.
    assert result.batches >= (2 if broker.kind == "mqtt" else 1) and result.stale_batches == 0
    applied = rows(env, "SELECT count(*) FROM _sync_audit WHERE sync_id = 'killed' AND status = 'applied'")
    assert applied == [(2 + result.batches,)]


def test_sigkill_before_the_target_commit_changes_nothing(env: SyncEnv, broker: Broker) -> None:
    broker.publish([movement(n) for n in range(500)])
    kill_drain(env, broker, phase="merged", batch=1, batch_events=500)  # inside the load's transaction
    assert env.state("killed") is None or env.state("killed")[0] == 0  # type: ignore[index]
    result = run(env, broker, spec_for("killed", batch_events=500), wait=1.0)
    assert (result.events, result.inserted) == (500, 500)
    assert rows(env, "SELECT count(*), count(DISTINCT event_id) FROM killed") == [(500, 500)]


# ------------------------------------------------------------------------------ broker restarts


class PrivateServer(LocalServer):
    """A NATS (JetStream, file storage) or Redis (append-only file, fsync always) of the test's own."""

    def __init__(self, kind: str, directory: Path) -> None:
        super().__init__()
        binary = shutil.which(f"{kind}-server") or next(
            (p for p in (f"/usr/sbin/{kind}-server", f"/usr/bin/{kind}-server") if Path(p).exists()), None
        )
        if binary is None:
            pytest.skip(f"the {kind}-server binary is not installed")
        self.name = kind
        directory.mkdir(parents=True, exist_ok=True)
        if kind == "nats":
            self.command = [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(directory)]
        else:
            self.command = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(directory),
                            "--appendonly", "yes", "--appendfsync", "always", "--save", ""]  # fmt: skip
        self.start()

    def start(self) -> None:
        super().start()
        if self.name == "nats":
            time.sleep(0.3)  # JetStream recovers its streams after it listens


@pytest.fixture(params=["mqtt", "nats", "redis"])
def restartable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Broker, Any]]:
    kind = request.param
    pytest.importorskip({"redis": "redis", "nats": "nats", "mqtt": "paho.mqtt"}[kind])
    server: Any
    opened: Broker
    if kind == "mqtt":
        server = PrivateMosquitto(tmp_path / "mosquitto")
        opened = MqttBroker(port=server.port)
    elif kind == "nats":
        server = PrivateServer("nats", tmp_path / "nats")
        opened = NatsBroker(f"nats://127.0.0.1:{server.port}")
    else:
        server = PrivateServer("redis", tmp_path / "redis")
        opened = RedisBroker(port=server.port)
    yield opened, server
    try:
        opened.cleanup()  # stops the publisher's threads too
    finally:
        server.stop()


def test_a_broker_restart_between_and_during_runs_loses_and_duplicates_nothing(
    env: SyncEnv, restartable: tuple[Broker, Any]
) -> None:
    broker, server = restartable
    broker.publish([movement(n) for n in range(300)])
    spec = spec_for("restarted", batch_events=100)
    first = run(env, broker, spec, max_batches=1)
    assert 0 < first.inserted <= 100  # MQTT ends a batch early when delivery pauses for 50 ms
    server.restart()
    reconnect(broker, server)
    broker.publish([movement(n) for n in range(300, 400)])
    run(env, broker, spec, wait=1.0)
    assert rows(env, "SELECT count(*), count(DISTINCT event_id) FROM restarted") == [(400, 400)]


def reconnect(broker: Broker, server: Any) -> None:
    """The test's publisher reconnects after the restart (the sync's sources connect per run)."""
    if isinstance(broker, NatsBroker):
        import nats

        broker.loop.run_until_complete(broker.nc.close())
        broker.nc = broker.loop.run_until_complete(nats.connect(broker.url))
        broker.js = broker.nc.jetstream()
    elif isinstance(broker, RedisBroker):
        import redis

        broker.client = redis.Redis("127.0.0.1", server.port)
    else:
        assert isinstance(broker, MqttBroker)
        deadline = time.monotonic() + 10
        while not broker.publisher.is_connected():  # paho's loop reconnects by itself
            assert time.monotonic() < deadline, "the MQTT publisher did not reconnect"
            time.sleep(0.05)
