"""The event-source abstraction: read a bounded batch after a position, acknowledge after the commit.

Two kinds of brokers fit one interface:

* **Logs with positions** (Redis Streams: entry ID; NATS JetStream: stream sequence; Kafka: one
  offset per partition).  ``positioned`` is true: the position after a batch is committed in the
  target's ``_sync_state`` row in the same transaction as the rows, and the next run reads after the
  *committed* position, whatever the broker remembers.  ``acknowledge`` only tidies up (trims,
  reports progress); it is not needed for correctness.
* **Brokers that redeliver until acknowledged** (MQTT QoS 1 with a persistent session).
  ``positioned`` is false: there is no position to resume from, so ``acknowledge`` must come only
  after the target commit; a crash before it makes the broker redeliver, and the merge keyed by the
  event's id makes the redelivery a no-op.

A position is a small JSON-safe dict (it is stored as JSON); its shape is the adapter's own, e.g.
``{"redis": "orders", "id": "1718000000000-3"}``, ``{"nats": "DEVICES", "seq": 42}``, or for a Kafka
adapter ``{"kafka": "topic", "offsets": {"0": 1200, "1": 877}}`` (the next offset per partition).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

#: An adapter's position in its stream (JSON-safe); ``None`` = the beginning.
Position = dict[str, Any]


@dataclass(frozen=True)
class RawEvent:
    """One message as the broker delivered it: bytes, never decoded here."""

    payload: bytes
    #: Unique and stable per message within the source (entry ID, stream sequence; for MQTT, which
    #: has none, the topic and a digest of the payload): the quarantine's idempotency key.
    message_id: str
    #: Stream key, subject or topic.
    subject: str = ""
    #: The broker says it delivered this message before (MQTT DUP, NATS redelivery count > 1).
    redelivered: bool = False
    received_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


@dataclass
class EventBatch:
    """A bounded batch read after ``start``; committing it moves the sync to ``end``.

    ``receipt`` is the adapter's own handle for :meth:`EventSource.acknowledge` (e.g. MQTT packet ids).
    """

    events: Sequence[RawEvent]
    start: Position | None
    end: Position | None
    receipt: Any = None

    @property
    def bytes(self) -> int:
        return sum(len(e.payload) for e in self.events)


class EventSource(Protocol):
    """What the drain needs of a broker adapter.  Not thread-safe; one per drain."""

    #: ``"redis"``, ``"nats"``, ``"mqtt"`` (``"kafka"`` for an adapter of your own).
    kind: str
    #: True for logs: the committed position decides where the next read starts.
    positioned: bool
    #: The stream, subject filter or topic filter read (for the ledger and messages).
    name: str

    def read(self, after: Position | None, *, max_events: int, max_bytes: int, wait: float) -> EventBatch:
        """Up to ``max_events`` messages (stopping early past ``max_bytes``) after ``after``.

        Waits up to ``wait`` seconds for the first message; returns an empty batch when none came.
        Never loses a message it does not return: the next read after the same position sees it.
        """
        ...

    def acknowledge(self, batch: EventBatch) -> None:
        """After the target committed ``batch``: let the broker forget it."""
        ...

    def rewind(self) -> None:
        """A read batch was not committed (stale, failed): deliver its messages again next time."""
        ...

    def close(self) -> None: ...


def payload_id(subject: str, payload: bytes) -> str:
    """A message id for brokers without one: the subject and a digest of the bytes (identical
    payloads on one subject share it, which is what a redelivery looks like)."""
    return f"{subject}#{hashlib.sha256(payload).hexdigest()[:32]}"


__all__ = ["EventBatch", "EventSource", "Position", "RawEvent", "payload_id"]
