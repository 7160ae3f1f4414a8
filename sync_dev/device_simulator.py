"""Warehouse devices for the device case study: RFID gates and handheld scanners publishing stock
movements over MQTT, and a Mosquitto of our own configured the way an event sync needs it.

A movement is one JSON message on ``warehouse/<warehouse>/<device kind>/<device id>``::

    {"event_id": "gate-a1-000042", "device": {"id": "gate-a1", "kind": "rfid_gate"},
     "warehouse": "warehouse_a", "sku": "SKU-00017", "delta": -3, "reason": "shipped",
     "seq": 42, "at": "2026-11-29T22:00:01.123456+00:00"}

``delta`` is signed (received +, shipped/picked -, counted corrections either way); ``seq`` is the
device's own counter and ``at`` its clock.  Devices resend what they are not sure went out
(duplicates), buffer while offline and publish late (out of order), and now and then send garbage
(a flaky firmware): the sync must count each movement once and quarantine the garbage.

Run ``python -m sync_dev.device_simulator --port 1883 --events 1000`` to publish a round.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOPIC_FILTER = "warehouse/+/+/+"


def movement_columns() -> tuple[Any, ...]:
    """The declared columns of a movement (the reference DAG declares the same; a test keeps them equal)."""
    from airflow_sync_provider.core.events import EventColumn

    return (
        EventColumn("event_id", "text"),
        EventColumn("device_id", "text", path="device.id"),
        EventColumn("device_kind", "text", path="device.kind"),
        EventColumn("warehouse", "text"),
        EventColumn("sku", "text"),
        EventColumn("delta", "integer"),
        EventColumn("reason", "text"),
        EventColumn("seq", "bigint"),
        EventColumn("at", "timestamptz"),
    )


REASONS = {"rfid_gate": ("received", "shipped"), "scanner": ("picked", "counted", "returned")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    return found or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)


class LocalServer:
    """A broker process of our own on a free local port: started, stopped with SIGTERM (brokers
    save their state on it), restarted.  Subclasses set ``command``."""

    name = "server"
    command: list[str]

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not reachable("127.0.0.1", self.port):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"private {self.name} did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=15)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class PrivateMosquitto(LocalServer):
    """A Mosquitto configured for event syncs.

    ``max_queued_messages 0``: Mosquitto's default (1,000 per session) drops QoS 1 messages of a
    session past that while a sync holds its acknowledgements until the target commit.  Persistent
    (sessions and queued messages survive a restart: saved on SIGTERM and every minute).
    """

    name = "mosquitto"

    def __init__(self, directory: Path) -> None:
        super().__init__()
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("the mosquitto binary is not installed (Debian package mosquitto)")
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {directory}/\nmax_queued_messages 0\nautosave_interval 60\n"
            # As root, Mosquitto switches to user "mosquitto", who cannot write a private folder.
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.command = [binary, "-c", str(self.config)]
        self.start()


@contextmanager
def private_mosquitto(directory: Path | None = None) -> Iterator[PrivateMosquitto]:
    with tempfile.TemporaryDirectory(prefix="sync-mosquitto-") as scratch:
        server = PrivateMosquitto(directory or Path(scratch))
        try:
            yield server
        finally:
            server.stop()


# --------------------------------------------------------------------------------- the devices


@dataclass
class Device:
    device_id: str
    kind: str
    warehouse: str
    seq: int = 0


@dataclass
class Fleet:
    """The devices of some warehouses and what they have sent (to check the central against)."""

    warehouses: tuple[str, ...] = ("warehouse_a", "warehouse_b")
    gates_per_warehouse: int = 2
    scanners_per_warehouse: int = 3
    skus: int = 500
    seed: int = 7
    devices: list[Device] = field(default_factory=list)
    #: Net movement per (warehouse, sku) of every distinct event sent (duplicates and garbage excluded).
    expected: dict[tuple[str, str], int] = field(default_factory=dict)
    sent_events: int = 0
    duplicates: int = 0
    late: int = 0
    garbage: int = 0

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)
        for warehouse in self.warehouses:
            suffix = warehouse.rsplit("_", 1)[-1]
            for i in range(1, self.gates_per_warehouse + 1):
                self.devices.append(Device(f"gate-{suffix}{i}", "rfid_gate", warehouse))
            for i in range(1, self.scanners_per_warehouse + 1):
                self.devices.append(Device(f"scan-{suffix}{i}", "scanner", warehouse))

    def movement(self, device: Device, now: dt.datetime) -> tuple[str, bytes]:
        device.seq += 1
        reason = self.random.choice(REASONS[device.kind])
        magnitude = self.random.randint(1, 12)
        delta = magnitude if reason in ("received", "returned") else -magnitude
        if reason == "counted":
            delta = self.random.randint(-3, 3) or 1
        sku = f"SKU-{self.random.randrange(self.skus):05d}"
        document = {
            "event_id": f"{device.device_id}-{device.seq:06d}",
            "device": {"id": device.device_id, "kind": device.kind},
            "warehouse": device.warehouse,
            "sku": sku,
            "delta": delta,
            "reason": reason,
            "seq": device.seq,
            "at": now.isoformat(),
        }
        key = (device.warehouse, sku)
        self.expected[key] = self.expected.get(key, 0) + delta
        self.sent_events += 1
        topic = f"warehouse/{device.warehouse}/{device.kind}/{device.device_id}"
        return topic, json.dumps(document).encode()

    def round(
        self, events: int, *, duplicate_rate: float = 0.03, late_rate: float = 0.02, garbage_rate: float = 0.005
    ) -> list[tuple[str, bytes]]:
        """One round of traffic: movements, resent duplicates, late (buffered) ones, and garbage."""
        now = dt.datetime.now(dt.UTC)
        messages: list[tuple[str, bytes]] = []
        buffered: list[tuple[str, bytes]] = []
        for n in range(events):
            device = self.random.choice(self.devices)
            message = self.movement(device, now + dt.timedelta(milliseconds=n))
            if self.random.random() < late_rate:
                buffered.append(message)  # offline: goes out at the end, after newer ones
                self.late += 1
            else:
                messages.append(message)
            if self.random.random() < duplicate_rate:
                messages.append(message)  # no PUBACK seen: the device resends
                self.duplicates += 1
            if self.random.random() < garbage_rate:
                topic = message[0]
                messages.append((topic, self.random.choice([b"\x00\xffRFID-ERR", b'{"event_id": ', b'{"sku": 1}'])))
                self.garbage += 1
        return messages + buffered


def publish(messages: list[tuple[str, bytes]], host: str = "127.0.0.1", port: int = 1883) -> None:
    """Publish at QoS 1 and wait for every PUBACK (a device that knows its movements arrived)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(1_000)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=60)
            if not info.is_published():
                raise RuntimeError("the broker did not acknowledge a movement")
    finally:
        client.disconnect()
        client.loop_stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--events", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    fleet = Fleet(seed=args.seed)
    messages = fleet.round(args.events)
    publish(messages, args.host, args.port)
    summary: dict[str, Any] = {
        "devices": len(fleet.devices),
        "movements": fleet.sent_events,
        "messages": len(messages),
        "duplicates": fleet.duplicates,
        "late": fleet.late,
        "garbage": fleet.garbage,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
