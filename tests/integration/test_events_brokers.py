"""The three brokers as the event tests use them, and the adapters' read contract on each: bounded
batches, reads after a position, nothing lost between reads.

Redis (127.0.0.1:6379) and NATS JetStream (127.0.0.1:4222) are the machine's servers; a test skips
with the reason when one is not there.  MQTT runs on a Mosquitto of the suite's own (the machine's
binary, a free port): the shared one on 1883 keeps Mosquitto's default ``max_queued_messages 1000``,
which drops the QoS 1 messages of a session past 1,000 while the sync holds its acknowledgements,
and it must not be restarted; the private one is configured as docs/events.md says and can be.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import pytest

from airflow_sync_provider.core.events.source import EventSource
from sync_dev.device_simulator import PrivateMosquitto, mosquitto_binary, reachable

REDIS = ("127.0.0.1", 6379)
NATS = ("127.0.0.1", 4222)
MQTT = ("127.0.0.1", 1883)


class Broker(Protocol):
    """One stream (or topic) of one broker, created for a test and removed after it."""

    kind: str

    def source(self) -> EventSource: ...

    def publish(self, payloads: Sequence[bytes]) -> None: ...

    def cleanup(self) -> None: ...


class RedisBroker:
    kind = "redis"

    def __init__(self, host: str = REDIS[0], port: int = REDIS[1]) -> None:
        import redis

        self.address = (host, port)
        self.client = redis.Redis(host, port)
        self.key = f"events-test-{uuid.uuid4().hex[:10]}"

    def source(self, **options: Any) -> EventSource:
        import redis

        from airflow_sync_provider.core.events.redis_streams import RedisStreamSource

        return RedisStreamSource(redis.Redis(*self.address), self.key, **options)

    def publish(self, payloads: Sequence[bytes]) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            for payload in payloads:
                pipe.xadd(self.key, {"payload": payload})
            pipe.execute()

    def cleanup(self) -> None:
        self.client.delete(self.key)
        self.client.close()


class NatsBroker:
    kind = "nats"

    def __init__(self, url: str = f"nats://{NATS[0]}:{NATS[1]}") -> None:
        import nats
        from nats.js.api import StreamConfig

        self.url = url
        self.stream = f"EVT{uuid.uuid4().hex[:10].upper()}"
        self.subject = f"evt.{self.stream.lower()}"
        self.loop = asyncio.new_event_loop()
        self.nc: Any = self.loop.run_until_complete(nats.connect(url))
        self.js = self.nc.jetstream()
        self.loop.run_until_complete(
            self.js.add_stream(StreamConfig(name=self.stream, subjects=[f"{self.subject}.>"], max_msg_size=2 << 20))
        )

    def source(self, **options: Any) -> EventSource:
        from airflow_sync_provider.core.events.nats_jetstream import NatsJetStreamSource

        return NatsJetStreamSource(self.url, self.stream, **options)

    def publish(self, payloads: Sequence[bytes]) -> None:
        async def send() -> None:
            futures = [await self.js.publish_async(f"{self.subject}.d", p) for p in payloads]
            await asyncio.gather(*futures)

        self.loop.run_until_complete(send())

    def cleanup(self) -> None:
        from airflow_sync_provider.core.events.nats_jetstream import close_loop

        self.loop.run_until_complete(self.js.delete_stream(self.stream))
        self.loop.run_until_complete(self.nc.close())
        close_loop(self.loop)


class MqttBroker:
    kind = "mqtt"

    def __init__(self, host: str = MQTT[0], port: int = MQTT[1], receive_maximum: int = 1_000) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.host, self.port = host, port
        self.topic = f"events-test/{uuid.uuid4().hex[:10]}"
        self.client_id = f"sync-{uuid.uuid4().hex[:12]}"
        self.receive_maximum = receive_maximum
        self.publisher = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.publisher.max_inflight_messages_set(1_000)
        self.publisher.max_queued_messages_set(0)
        self.publisher.connect(host, port)
        self.publisher.loop_start()
        # The persistent session exists from the first subscription on: create it now.
        first = self.source()
        first.connect()  # type: ignore[attr-defined]
        first.close()

    def source(self, **options: Any) -> EventSource:
        from airflow_sync_provider.core.events.mqtt import MqttSource

        options.setdefault("receive_maximum", self.receive_maximum)
        return MqttSource(self.host, self.port, topic=f"{self.topic}/#", client_id=self.client_id, **options)

    def publish(self, payloads: Sequence[bytes]) -> None:
        infos = [self.publisher.publish(f"{self.topic}/d", p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published()

    def cleanup(self) -> None:
        self.publisher.loop_stop()
        self.publisher.disconnect()
        # End the persistent session: connect once with clean_start and no expiry.
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        closer = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        closer.connect(self.host, self.port, clean_start=True)
        closer.disconnect()


BROKERS = {"redis": REDIS, "nats": NATS}
KINDS = ("mqtt", "nats", "redis")


def open_broker(kind: str, mosquitto: PrivateMosquitto | None = None) -> Broker:
    module = {"redis": "redis", "nats": "nats", "mqtt": "paho.mqtt"}[kind]
    pytest.importorskip(module, reason=f"the {kind} client library ({module}) is not installed")
    if kind == "mqtt":
        assert mosquitto is not None
        return MqttBroker(port=mosquitto.port)
    address = BROKERS[kind]
    if not reachable(*address):
        pytest.skip(f"{kind} broker not reachable on {address[0]}:{address[1]}")
    return RedisBroker() if kind == "redis" else NatsBroker()


@pytest.fixture(scope="session", name="mosquitto")
def mosquitto_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateMosquitto]:
    if mosquitto_binary() is None:
        pytest.skip("the mosquitto binary is not installed (Debian package mosquitto)")
    server = PrivateMosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield server
    server.stop()


@pytest.fixture(params=KINDS, name="broker")
def broker_fixture(request: pytest.FixtureRequest) -> Iterator[Broker]:
    opened = open_broker(request.param, request.getfixturevalue("mosquitto") if request.param == "mqtt" else None)
    yield opened
    opened.cleanup()


def read_all(source: EventSource, *, max_events: int, wait: float = 0.5) -> list[list[bytes]]:
    """Every batch until an empty read, acknowledging each (what a drain with a perfect target does)."""
    after = None
    batches: list[list[bytes]] = []
    while True:
        batch = source.read(after, max_events=max_events, max_bytes=1 << 30, wait=wait)
        if not batch.events:
            return batches
        batches.append([e.payload for e in batch.events])
        source.acknowledge(batch)
        after = batch.end


def test_reads_in_bounded_batches_after_the_position(broker: Broker) -> None:
    payloads = [f'{{"n": {i}}}'.encode() for i in range(2_500)]
    broker.publish(payloads)
    source = broker.source()
    try:
        batches = read_all(source, max_events=700)
    finally:
        source.close()
    assert all(len(b) <= 700 for b in batches)
    assert [p for b in batches for p in b] == payloads  # every message once, in order


def test_max_bytes_ends_a_batch_early_and_loses_nothing(broker: Broker) -> None:
    payloads = [b"x" * 10_000 for _ in range(30)]
    broker.publish(payloads)
    source = broker.source()
    try:
        first = source.read(None, max_events=1_000, max_bytes=50_000, wait=1.0)
        assert 5 <= len(first.events) <= 6
        source.acknowledge(first)
        rest = source.read(first.end, max_events=1_000, max_bytes=1 << 30, wait=1.0)
        while len(first.events) + len(rest.events) < 30:
            more = source.read(rest.end, max_events=1_000, max_bytes=1 << 30, wait=1.0)
            assert more.events, "messages were lost between reads"
            rest.events = [*rest.events, *more.events]
            rest.end = more.end
    finally:
        source.close()
    assert len(first.events) + len(rest.events) == 30


def test_an_empty_stream_reads_nothing_and_keeps_the_position(broker: Broker) -> None:
    source = broker.source()
    try:
        batch = source.read(None, max_events=10, max_bytes=1 << 20, wait=0.2)
    finally:
        source.close()
    assert list(batch.events) == []
