"""Event-stream sources over Airflow connections: Redis Streams, NATS JetStream, MQTT.

- ``redis`` connections (the type of apache-airflow-providers-redis; that provider is not needed):
  host, port, login (ACL user), password, extras ``db`` and ``ssl``.
- ``nats`` connections (this provider's): host, port (4222), login/password or extra ``token``,
  extra ``servers`` (a list of URLs, for a cluster) and ``tls``.
- ``mqtt`` connections (this provider's): host, port (1883), login/password, extras ``client_id``
  (the persistent session's id; default: ``sync-<sync id>``) and ``tls``.

:func:`event_source` picks the adapter from the connection's type, so one operator serves all three.
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

from airflow_sync_provider.core.errors import ConfigurationError, SourceUnavailableError
from airflow_sync_provider.core.events.source import EventSource


class EventSourceHook(BaseHook):
    """Base of the event-source hooks: a connection id and :meth:`event_source`."""

    conn_name_attr = "conn_id"
    default_conn_name: ClassVar[str] = ""
    default_port: ClassVar[int] = 0

    def __init__(self, conn_id: str | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id or self.default_conn_name

    def connection(self) -> Any:
        try:
            return self.get_connection(self.conn_id)
        except AirflowNotFoundException:
            raise SourceUnavailableError(f"Airflow connection {self.conn_id!r} (event source) is not defined") from None

    def event_source(
        self, stream: str, *, sync_id: str = "", batch_events: int | None = None, **options: Any
    ) -> EventSource:
        """The adapter reading ``stream`` (a stream key, a JetStream stream, an MQTT topic filter).

        ``batch_events`` is the drain's batch size (an MQTT session's receive maximum follows it).
        """
        raise NotImplementedError

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {"hidden_fields": ["schema"], "relabeling": {}, "placeholders": {"port": str(cls.default_port)}}


class RedisStreamHook(EventSourceHook):
    """Redis Streams over a ``redis`` connection."""

    conn_type = "redis"
    hook_name = "Redis Streams (Database Sync)"
    default_conn_name = "redis_default"
    default_port = 6379

    def get_conn(self) -> Any:
        import redis

        conn = self.connection()
        extra = conn.extra_dejson
        return redis.Redis(
            host=conn.host or "localhost",
            port=int(conn.port or self.default_port),
            username=conn.login or None,
            password=conn.password or None,
            db=int(extra.get("db", 0)),
            ssl=bool(extra.get("ssl", False)),
        )

    def event_source(
        self, stream: str, *, sync_id: str = "", batch_events: int | None = None, **options: Any
    ) -> EventSource:
        from airflow_sync_provider.core.events.redis_streams import RedisStreamSource

        return RedisStreamSource(self.get_conn(), stream, **options)


class NatsJetStreamHook(EventSourceHook):
    """NATS JetStream over a ``nats`` connection."""

    conn_type = "nats"
    hook_name = "NATS JetStream (Database Sync)"
    default_conn_name = "nats_default"
    default_port = 4222

    def servers(self) -> list[str]:
        conn = self.connection()
        listed = conn.extra_dejson.get("servers")
        if listed:
            return [str(s) for s in listed]
        scheme = "tls" if conn.extra_dejson.get("tls") else "nats"
        return [f"{scheme}://{conn.host or 'localhost'}:{int(conn.port or self.default_port)}"]

    def event_source(
        self, stream: str, *, sync_id: str = "", batch_events: int | None = None, **options: Any
    ) -> EventSource:
        from airflow_sync_provider.core.events.nats_jetstream import NatsJetStreamSource

        conn = self.connection()
        credentials: dict[str, Any] = {}
        if conn.login:
            credentials.update(user=conn.login, password=conn.password)
        elif conn.extra_dejson.get("token") or conn.password:
            credentials["token"] = conn.extra_dejson.get("token") or conn.password
        return NatsJetStreamSource(self.servers(), stream, **credentials, **options)


class MqttHook(EventSourceHook):
    """MQTT v5 over an ``mqtt`` connection."""

    conn_type = "mqtt"
    hook_name = "MQTT (Database Sync)"
    default_conn_name = "mqtt_default"
    default_port = 1883

    def event_source(
        self, stream: str, *, sync_id: str = "", batch_events: int | None = None, **options: Any
    ) -> EventSource:
        from airflow_sync_provider.core.events.mqtt import MqttSource

        conn = self.connection()
        extra = conn.extra_dejson
        client_id = options.pop("client_id", None) or extra.get("client_id") or (f"sync-{sync_id}" if sync_id else "")
        if batch_events:
            options.setdefault("receive_maximum", batch_events)
        return MqttSource(
            conn.host or "localhost",
            int(conn.port or self.default_port),
            topic=stream,
            client_id=client_id,
            username=conn.login or None,
            password=conn.password or None,
            tls=bool(extra.get("tls", False)),
            **options,
        )


HOOKS: dict[str, type[EventSourceHook]] = {h.conn_type: h for h in (RedisStreamHook, NatsJetStreamHook, MqttHook)}


def event_source(
    conn_id: str, stream: str, *, sync_id: str = "", batch_events: int | None = None, **options: Any
) -> EventSource:
    """The adapter for connection ``conn_id``, chosen by its type (``redis``, ``nats``, ``mqtt``)."""
    conn = EventSourceHook(conn_id).connection()
    hook = HOOKS.get((conn.conn_type or "").lower())
    if hook is None:
        raise ConfigurationError(
            f"connection {conn_id!r} has type {conn.conn_type!r}; an event source needs one of {', '.join(HOOKS)}",
            sync_id=sync_id or None,
        )
    return hook(conn_id).event_source(stream, sync_id=sync_id, batch_events=batch_events, **options)


__all__ = ["HOOKS", "EventSourceHook", "MqttHook", "NatsJetStreamHook", "RedisStreamHook", "event_source"]
