"""Event streams into PostgreSQL, on each real broker: the stream position commits with the rows,
duplicates and redeliveries are no-ops, bad payloads are quarantined with their bytes and reason
without blocking the stream, late and out-of-order events resolve by event time and sequence, a
backlog drains in bounded batches, and the target converges under a continuous publisher.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from typing import Any

import psycopg
import pytest

from airflow_sync_provider.core.events import EventColumn, EventSchema, EventSpec, drain_events
from airflow_sync_provider.core.events.load import DrainResult
from airflow_sync_provider.core.events.source import EventSource

from ..conftest import SyncEnv
from .test_events_brokers import Broker, broker_fixture, mosquitto_fixture  # noqa: F401  (fixtures)

T0 = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.UTC)

#: Stock movements as devices send them: one row per event (an append-only log keyed by event id).
MOVEMENTS = EventSchema(
    columns=(
        EventColumn("event_id", "text"),
        EventColumn("device", "text", path="device.id"),
        EventColumn("sku", "text"),
        EventColumn("qty", "integer"),
        EventColumn("seq", "bigint"),
        EventColumn("at", "timestamptz"),
        EventColumn("note", "text", required=False),
        EventColumn("attrs", "jsonb", required=False),
    ),
    event_id="event_id",
    event_time="at",
    sequence="seq",
)
#: The same stream kept as the latest reading per (device, sku): newest (at, seq) wins.
LATEST = EventSchema(
    columns=MOVEMENTS.columns, event_id="event_id", event_time="at", sequence="seq", key=("device", "sku")
)


def movement(n: int, *, device: str = "gate-1", sku: str | None = None, qty: int = 1, seq: int | None = None,
             at: dt.datetime | str | None = None, **extra: Any) -> bytes:  # fmt: skip
    moment = at or T0 + dt.timedelta(seconds=n)
    document = {
        "event_id": f"ev-{n}",
        "device": {"id": device},
        "sku": sku or f"sku-{n % 50}",
        "qty": qty,
        "seq": n if seq is None else seq,
        "at": moment.isoformat() if isinstance(moment, dt.datetime) else moment,
        **extra,
    }
    return json.dumps(document).encode()


def drain(env: SyncEnv, source: EventSource, spec: EventSpec, **options: Any) -> DrainResult:
    options.setdefault("wait", 0.5)
    with env.target() as conn:
        return drain_events(source, conn, spec, staging=env.staging, **options)


def spec_for(name: str, schema: EventSchema = MOVEMENTS, **options: Any) -> EventSpec:
    return EventSpec(sync_id=name, target_table=name, schema=schema, **options)


def rows(env: SyncEnv, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with env.target() as conn:
        return conn.execute(query, params).fetchall()


def state(env: SyncEnv, sync_id: str) -> tuple[int, Any]:
    found = env.state(sync_id)
    assert found is not None
    return found[0], found[1]


def run(env: SyncEnv, broker: Broker, spec: EventSpec, **options: Any) -> DrainResult:
    source = broker.source()
    try:
        return drain(env, source, spec, **options)
    finally:
        source.close()


def test_events_load_once_and_the_position_commits_with_them(env: SyncEnv, broker: Broker) -> None:
    spec = spec_for("movements", batch_events=400)
    broker.publish([movement(n) for n in range(1_000)])
    first = run(env, broker, spec)
    assert (first.events, first.inserted, first.quarantined) == (1_000, 1_000, 0)
    assert first.batches == 3  # 400 + 400 + 200
    assert rows(env, "SELECT count(*), count(DISTINCT event_id), sum(qty) FROM movements") == [(1_000, 1_000, 1_000)]
    version, watermark = state(env, "movements")
    assert version == 3
    if broker.kind == "redis":
        assert watermark[0]["redis"] and watermark[0]["id"].count("-") == 1
    elif broker.kind == "nats":
        assert watermark[0]["seq"] == 1_000
    else:
        assert watermark is None  # MQTT has no position: the broker's session is the memory
    # Nothing new: a run with nothing to do commits nothing.
    again = run(env, broker, spec)
    assert (again.batches, again.events) == (0, 0)
    assert state(env, "movements")[0] == 3
    # More events continue after the committed position.
    broker.publish([movement(n) for n in range(1_000, 1_100)])
    more = run(env, broker, spec)
    assert (more.events, more.inserted) == (100, 100)
    assert rows(env, "SELECT count(*) FROM movements") == [(1_100,)]
    ledger = rows(env, "SELECT count(*), sum(inserted) FROM _sync_audit WHERE sync_id = 'movements'")
    assert ledger == [(4, 1_100)]


def test_duplicates_and_republished_events_are_no_ops(env: SyncEnv, broker: Broker) -> None:
    spec = spec_for("dupes")
    events = [movement(n) for n in range(300)]
    broker.publish(events + events[:100])  # a device that resent its first 100 (same event ids)
    first = run(env, broker, spec)
    assert first.events == 400
    assert first.inserted == 300
    broker.publish(events[200:])  # resent again in a later batch
    second = run(env, broker, spec)
    assert (second.events, second.inserted, second.updated) == (100, 0, 0)
    assert second.superseded == 100  # the target already holds these versions
    assert rows(env, "SELECT count(*), count(DISTINCT event_id) FROM dupes") == [(300, 300)]


def test_malformed_payloads_are_quarantined_and_never_block_the_stream(env: SyncEnv, broker: Broker) -> None:
    spec = spec_for("bad")
    bad = {
        b"{not json": "not JSON",
        b"\xff\xfe\x00garbage": "not UTF-8",
        b'["an", "array"]': "not an object",
        movement(9001, qty="three"): "expected an integer",  # type: ignore[arg-type]
        movement(9002, qty=2**40): "out of range for integer",
        movement(9003, at="yesterday"): "not an ISO 8601 timestamp",
        json.dumps({"event_id": "ev-9004", "sku": "a", "qty": 1, "seq": 1, "at": T0.isoformat()}).encode(): "missing",
        movement(9005, note="nul \u0000 inside"): "NUL",
        movement(9006, attrs={"x": "\ud800"}): "surrogate",
        movement(9009)[:-1] + b', "attrs": {"big": 1e999}}': "not storable as jsonb",  # overflows to inf
        b'{"event_id": "ev-9007", "qty": NaN}': "not a JSON value",
        movement(9008, note="x" * 1_000_000): "exceeds max_payload_bytes",
    }
    good = [movement(n) for n in range(200)]
    stream = good[:100] + list(bad) + good[100:]
    broker.publish(stream)
    result = run(env, broker, spec)
    assert result.events == len(stream)
    assert (result.inserted, result.quarantined) == (200, len(bad))
    quarantined = {bytes(p): r for p, r in rows(env, "SELECT payload, reason FROM _sync_event_quarantine")}
    assert set(quarantined) == set(bad)  # the raw bytes, exactly as they came
    for payload, fragment in bad.items():
        assert fragment in quarantined[payload], (payload[:60], quarantined[payload])
    assert rows(env, "SELECT event_id FROM _sync_event_quarantine WHERE event_id = 'ev-9005'") == [("ev-9005",)]
    assert rows(env, "SELECT count(*) FROM bad") == [(200,)]
    # The stream moved on past them: new events load, the bad ones are not read (or recorded) again.
    broker.publish([movement(n) for n in range(200, 250)])
    later = run(env, broker, spec)
    assert (later.inserted, later.quarantined) == (50, 0)
    assert rows(env, "SELECT count(*) FROM _sync_event_quarantine") == [(len(bad),)]


def test_late_and_out_of_order_events_resolve_by_event_time_and_sequence(env: SyncEnv, broker: Broker) -> None:
    spec = spec_for("latest", LATEST, batch_events=3)
    newest = movement(3, device="g", sku="s", qty=30, seq=3, at=T0 + dt.timedelta(minutes=3))
    older = movement(2, device="g", sku="s", qty=20, seq=2, at=T0 + dt.timedelta(minutes=2))
    same_time_lower_seq = movement(1, device="g", sku="s", qty=10, seq=1, at=T0 + dt.timedelta(minutes=3))
    other = movement(4, device="g", sku="t", qty=5, seq=4, at=T0)
    # Arrival: newest first, then the older ones (in this batch and in later ones).
    broker.publish([older, newest, other])
    run(env, broker, spec)
    broker.publish([same_time_lower_seq, older])
    late = run(env, broker, spec)
    assert late.superseded == 2 and late.updated == 0
    assert rows(env, "SELECT sku, qty, seq FROM latest ORDER BY sku") == [("s", 30, 3), ("t", 5, 4)]
    # A genuinely newer event still wins.
    broker.publish([movement(5, device="g", sku="s", qty=50, seq=5, at=T0 + dt.timedelta(minutes=4))])
    assert run(env, broker, spec).updated == 1
    assert rows(env, "SELECT qty FROM latest WHERE sku = 's'") == [(50,)]


def test_a_backlog_drains_in_bounded_batches(env: SyncEnv, broker: Broker) -> None:
    spec = spec_for("backlog", batch_events=2_000, batch_bytes=256 * 1024)
    payloads = [movement(n, note="n" * 200) for n in range(12_000)]
    for start in range(0, len(payloads), 4_000):
        broker.publish(payloads[start : start + 4_000])
    result = run(env, broker, spec)
    assert result.events == 12_000 and result.inserted == 12_000
    # ~300 bytes per event: the byte bound (256 KiB) ends batches before the count bound does.
    assert result.batches >= 12_000 * 300 // (256 * 1024)
    assert rows(env, "SELECT max(length(note)), count(*) FROM backlog") == [(200, 12_000)]


def test_converges_under_a_continuous_publisher(env: SyncEnv, broker: Broker) -> None:
    spec = spec_for("continuous", LATEST, batch_events=500)
    stop = threading.Event()
    published: list[bytes] = []

    def publish() -> None:
        n = 0
        while not stop.is_set():
            chunk = [movement(n + i, device=f"d{(n + i) % 7}", sku=f"s{(n + i) % 13}", qty=n + i) for i in range(50)]
            broker.publish(chunk)
            published.extend(chunk)
            n += 50
            time.sleep(0.01)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            run(env, broker, spec, wait=0.2, max_batches=3)
    finally:
        stop.set()
        publisher.join()
    run(env, broker, spec, wait=1.0)  # the tail
    expected: dict[tuple[str, str], int] = {}
    for payload in published:
        document = json.loads(payload)
        expected[(document["device"]["id"], document["sku"])] = document["qty"]  # seq and time grow with n
    got = {(d, s): q for d, s, q in rows(env, "SELECT device, sku, qty FROM continuous")}
    assert len(published) > 1_000
    assert got == expected


def test_a_transform_shapes_the_decoded_rows(env: SyncEnv, broker: Broker) -> None:
    spec = spec_for("shaped")
    broker.publish([movement(n, sku=f" Sku-{n} ") for n in range(20)])

    def clean(frame: Any) -> Any:
        frame["sku"] = frame["sku"].str.strip().str.lower()
        return frame

    run(env, broker, spec, transform=clean)
    assert rows(env, "SELECT count(*) FROM shaped WHERE sku = lower(trim(sku))") == [(20,)]


def test_the_target_must_take_the_declared_columns(env: SyncEnv) -> None:
    with pytest.raises(Exception, match="key column 'nope'"):
        EventSchema(columns=MOVEMENTS.columns, key=("nope",))
    with pytest.raises(Exception, match="event_time must be a timestamptz"):
        EventSchema(columns=MOVEMENTS.columns, event_time="qty")
    with env.target() as conn:
        assert isinstance(conn, psycopg.Connection)
