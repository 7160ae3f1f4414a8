"""Events/s into PostgreSQL per adapter, against the adapter's own read rate, with peak RSS.

    python -m benchmarks.events [--events 50000] [--batch 10000] [--only redis,nats,mqtt]

For each broker, the same N stock-movement messages (~230 bytes of JSON) are published, then two
runs each in a process of its own (so its peak RSS is its own): ``read``, the adapter reading every
message in batches and acknowledging them, nothing else (the broker and client's rate: the ceiling);
``drain``, the event sync proper: read, decode by the declared schema, newest per key, stage as
Parquet, COPY + one merge + the position in the state row, one commit per batch, then acknowledge.
Redis (127.0.0.1:6379) and NATS (127.0.0.1:4222) are the machine's; MQTT runs on a private
Mosquitto (``sync_dev.device_simulator``), on a PostgreSQL of its own (``sync_dev.local_postgres``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import resource
import subprocess
import sys
import time
import uuid
from typing import Any

from sync_dev.device_simulator import TOPIC_FILTER, Fleet, movement_columns, private_mosquitto, publish
from sync_dev.local_postgres import local_postgres

KINDS = ("redis", "nats", "mqtt")


def messages(count: int) -> list[tuple[str, bytes]]:
    fleet = Fleet(skus=5_000, seed=1)
    out: list[tuple[str, bytes]] = []
    while len(out) < count:
        device = fleet.random.choice(fleet.devices)
        out.append(fleet.movement(device, dt.datetime.now(dt.UTC)))
    return out


def open_source(config: dict[str, Any]) -> Any:
    kind = config["kind"]
    if kind == "redis":
        import redis

        from airflow_sync_provider.core.events.redis_streams import RedisStreamSource

        return RedisStreamSource(redis.Redis("127.0.0.1", 6379), config["name"])
    if kind == "nats":
        from airflow_sync_provider.core.events.nats_jetstream import NatsJetStreamSource

        return NatsJetStreamSource("nats://127.0.0.1:4222", config["name"])
    from airflow_sync_provider.core.events.mqtt import MqttSource

    return MqttSource(
        "127.0.0.1",
        config["port"],
        topic=config["name"],
        client_id=config["client_id"],
        receive_maximum=config["batch"],
    )


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """One measured run (in its own process)."""
    from airflow_sync_provider.core import StagingArea
    from airflow_sync_provider.core.events import EventSchema, EventSpec, drain_events

    source = open_source(config)
    started = time.perf_counter()
    events = 0
    try:
        if config["mode"] == "read":
            after = None
            while True:
                batch = source.read(after, max_events=config["batch"], max_bytes=1 << 30, wait=2.0)
                if not batch.events:
                    break
                events += len(batch.events)
                source.acknowledge(batch)
                after = batch.end
        else:
            import psycopg

            schema = EventSchema(columns=movement_columns(), event_time="at", sequence="seq")
            table = f"movements_{config['kind']}"
            spec = EventSpec(sync_id=table, target_table=table, schema=schema, batch_events=config["batch"])
            with psycopg.connect(config["dsn"], autocommit=True) as conn:
                result = drain_events(source, conn, spec, staging=StagingArea(config["staging"]), wait=2.0)
            events = result.events
            assert result.inserted == events, result
    finally:
        source.close()
    seconds = time.perf_counter() - started - 2.0  # the final empty read's wait
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"events": events, "seconds": round(seconds, 3), "peak_rss_mb": round(rss, 1)}


def run_worker(config: dict[str, Any]) -> dict[str, Any]:
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.events", "--worker", json.dumps(config)], capture_output=True, text=True
    )
    if process.returncode:
        raise RuntimeError(process.stderr[-3000:])
    return dict(json.loads(process.stdout.strip().splitlines()[-1]))


def prepare(kind: str, payloads: list[tuple[str, bytes]], mosquitto_port: int | None) -> list[dict[str, Any]]:
    """Publish the payloads once per run that needs its own copy; returns the runs' configs."""
    if kind == "redis":
        import redis

        key = f"bench-{uuid.uuid4().hex[:8]}"
        client = redis.Redis("127.0.0.1", 6379)
        for start in range(0, len(payloads), 5_000):
            with client.pipeline(transaction=False) as pipe:
                for _, payload in payloads[start : start + 5_000]:
                    pipe.xadd(key, {"payload": payload})
                pipe.execute()
        return [{"kind": kind, "name": key, "mode": m} for m in ("read", "drain")]
    if kind == "nats":
        import nats
        from nats.js.api import StreamConfig

        stream = f"BENCH{uuid.uuid4().hex[:8].upper()}"

        async def send() -> None:
            nc = await nats.connect("nats://127.0.0.1:4222")
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream.lower()}.>"]))
            for start in range(0, len(payloads), 5_000):
                futures = [await js.publish_async(f"{stream.lower()}.d", p) for _, p in payloads[start : start + 5_000]]
                await asyncio.gather(*futures)
            await nc.close()

        asyncio.run(send())
        return [{"kind": kind, "name": stream, "mode": m} for m in ("read", "drain")]
    assert mosquitto_port is not None
    from airflow_sync_provider.core.events.mqtt import MqttSource

    configs = []
    for mode in ("read", "drain"):
        client_id = f"bench-{mode}-{uuid.uuid4().hex[:6]}"
        config: dict[str, Any] = {"kind": kind, "name": TOPIC_FILTER, "mode": mode, "port": mosquitto_port}
        config["client_id"] = client_id
        session = MqttSource("127.0.0.1", mosquitto_port, topic=TOPIC_FILTER, client_id=client_id)
        session.connect()
        session.close()
        configs.append(config)
    publish(payloads, port=mosquitto_port)
    return configs


def cleanup(kind: str, configs: list[dict[str, Any]]) -> None:
    if kind == "redis":
        import redis

        redis.Redis("127.0.0.1", 6379).delete(configs[0]["name"])
    elif kind == "nats":
        import nats

        async def drop() -> None:
            nc = await nats.connect("nats://127.0.0.1:4222")
            await nc.jetstream().delete_stream(configs[0]["name"])
            await nc.close()

        asyncio.run(drop())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--only", default=",".join(KINDS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import tempfile

    payloads = messages(args.events)
    size = sum(len(p) for _, p in payloads) / len(payloads)
    print(f"{args.events:,} stock movements of {size:.0f} bytes on average, batches of {args.batch:,}")
    print(f"{'adapter':8} {'read only':>14} {'into PostgreSQL':>16} {'ratio':>6} {'RSS read':>9} {'RSS drain':>10}")
    results: dict[str, Any] = {}
    with local_postgres() as pg, private_mosquitto() as mosquitto, tempfile.TemporaryDirectory() as staging:
        pg.create_database("events_bench")
        for kind in args.only.split(","):
            configs = prepare(kind, payloads, mosquitto.port)
            runs = {}
            for config in configs:
                config.update(batch=args.batch, dsn=pg.dsn("events_bench"), staging=staging)
                runs[config["mode"]] = run_worker(config)
                assert runs[config["mode"]]["events"] == args.events, runs
            cleanup(kind, configs)
            read, drain = runs["read"], runs["drain"]
            read_rate, drain_rate = args.events / read["seconds"], args.events / drain["seconds"]
            results[kind] = {"read": read, "drain": drain, "read_per_s": read_rate, "drain_per_s": drain_rate}
            print(
                f"{kind:8} {read_rate:>10,.0f} ev/s {drain_rate:>11,.0f} ev/s {drain_rate / read_rate:>6.2f} "
                f"{read['peak_rss_mb']:>6.0f} MB {drain['peak_rss_mb']:>7.0f} MB"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
