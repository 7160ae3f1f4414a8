"""MQTT (v5, QoS 1, persistent session): acknowledged only after the target commit.

MQTT has no position to resume from, so the broker's redelivery is the safety net: the client
connects with a fixed client id, ``clean_start=False`` and a session expiry, subscribes at QoS 1,
and acknowledges nothing on arrival (paho's ``manual_ack``).  A batch's PUBACKs are sent, in
arrival order, only after the target committed it; a crash before that makes the broker redeliver
the batch on the next connection, and the merge keyed by the event id makes the redelivery a
no-op.  That is the exactly-once *effect*; delivery itself is at least once.

Bounds: the client's MQTT 5 *Receive Maximum* is the batch size, so the broker never has more
unacknowledged messages in flight to it than one batch.  Messages beyond that wait in the broker's
queue for the session, which a broker caps (Mosquitto: ``max_queued_messages``, default 1000, and
``max_queued_bytes``): past the cap it drops QoS 1 messages, so size it for the longest pause.
The session exists only from the first subscription on: create it (run the sync once, or
:meth:`MqttSource.connect`) before devices publish.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from airflow_sync_provider.core.errors import ConfigurationError, SourceUnavailableError
from airflow_sync_provider.core.events.source import EventBatch, Position, RawEvent, payload_id

DEFAULT_SESSION_EXPIRY = 7 * 24 * 3600
_TAIL_WAIT = 0.05
_MAX_RECEIVE = 65_535


class MqttSource:
    """Subscribes ``topic`` (a filter, ``+``/``#`` allowed) as ``client_id`` with a persistent session."""

    kind = "mqtt"
    positioned = False

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        topic: str,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        receive_maximum: int = 1_000,
        session_expiry: int = DEFAULT_SESSION_EXPIRY,
        tls: bool = False,
        connect_timeout: float = 10.0,
    ) -> None:
        if not client_id:
            raise ConfigurationError("an MQTT source needs a fixed client_id (its persistent session is keyed by it)")
        self.name = topic
        self.host, self.port = host, port
        self.client_id = client_id
        self.receive_maximum = max(1, min(receive_maximum, _MAX_RECEIVE))
        self.session_expiry = session_expiry
        self.connect_timeout = connect_timeout
        self._username, self._password, self._tls = username, password, tls
        self._inbox: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self._client: paho.Client | None = None
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._connect_error: str | None = None

    # ----------------------------------------------------------------------------------- session

    def connect(self) -> None:
        """Connect (resuming the session) and subscribe; the broker then redelivers what it holds."""
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5, manual_ack=True
        )
        if self._username:
            client.username_pw_set(self._username, self._password)
        if self._tls:
            client.tls_set()
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.session_expiry
        properties.ReceiveMaximum = self.receive_maximum
        self._connected.clear()
        self._disconnected.clear()
        self._connect_error = None
        try:
            client.connect(self.host, self.port, keepalive=30, clean_start=False, properties=properties)
        except OSError as error:
            raise SourceUnavailableError(f"MQTT broker {self.host}:{self.port}: {error}") from error
        client.loop_start()
        self._client = client
        if not self._connected.wait(self.connect_timeout) or self._connect_error:
            self.close()
            raise SourceUnavailableError(
                f"MQTT broker {self.host}:{self.port} did not accept client {self.client_id!r}: "
                f"{self._connect_error or 'no CONNACK'}"
            )

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
        else:
            client.subscribe(self.name, qos=1)
        self._connected.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._disconnected.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._inbox.put(message)

    # ------------------------------------------------------------------------------------- batches

    def read(self, after: Position | None, *, max_events: int, max_bytes: int, wait: float) -> EventBatch:
        if self._client is None:
            self.connect()
        messages: list[paho.MQTTMessage] = []
        size = 0
        deadline = time.monotonic() + wait
        while len(messages) < max_events and size < max_bytes:
            timeout = max(deadline - time.monotonic(), 0.0) if not messages else _TAIL_WAIT
            try:
                message = self._inbox.get(timeout=timeout)
            except queue.Empty:
                break
            messages.append(message)
            size += len(message.payload)
        events = [
            RawEvent(bytes(m.payload), payload_id(m.topic, bytes(m.payload)), m.topic, redelivered=bool(m.dup))
            for m in messages
        ]
        return EventBatch(events, None, None, receipt=[(m.mid, m.qos) for m in messages])

    def acknowledge(self, batch: EventBatch) -> None:
        assert self._client is not None
        for mid, qos in batch.receipt or ():
            if qos > 0:
                self._client.ack(mid, qos)

    def rewind(self) -> None:
        """Unacknowledged messages come back only on a new connection: the next read reconnects."""
        self.close()

    def close(self) -> None:
        """Disconnect; what was received but not acknowledged is redelivered on the next connection."""
        client, self._client = self._client, None
        if client is not None:
            # The PUBACKs just queued go out before the DISCONNECT: wait for it to be sent.
            if client.disconnect() == paho.MQTT_ERR_SUCCESS:
                self._disconnected.wait(self.connect_timeout)
            client.loop_stop()
        self._inbox = queue.Queue()  # packet ids belong to the closed connection


__all__ = ["DEFAULT_SESSION_EXPIRY", "MqttSource"]
