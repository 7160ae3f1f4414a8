"""Event streams and IoT devices as sources: Redis Streams, NATS JetStream, MQTT (see docs/events.md).

The broker adapters import their client libraries (``redis``, ``nats-py``, ``paho-mqtt``) only
when imported themselves: ``core.events.redis_streams``, ``.nats_jetstream``, ``.mqtt``.
"""

from airflow_sync_provider.core.events.load import DrainResult, committed_position, drain_events
from airflow_sync_provider.core.events.quarantine import EVENT_QUARANTINE_TABLE
from airflow_sync_provider.core.events.schema import EventColumn, EventSchema, decode_events
from airflow_sync_provider.core.events.source import EventBatch, EventSource, Position, RawEvent
from airflow_sync_provider.core.events.spec import EventSpec

__all__ = [
    "EVENT_QUARANTINE_TABLE",
    "DrainResult",
    "EventBatch",
    "EventColumn",
    "EventSchema",
    "EventSource",
    "EventSpec",
    "Position",
    "RawEvent",
    "committed_position",
    "decode_events",
    "drain_events",
]
