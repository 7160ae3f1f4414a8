"""An ``AssetWatcher``-ready trigger: fire when an event stream holds events the sync has not loaded.

Redis Streams and NATS JetStream: every ``poll_interval`` seconds the trigger reads the sync's
committed position from the target and asks the broker for one event after it (a read after a
position consumes nothing: the position lives in the target).  MQTT has no position to ask about:
the trigger keeps a watcher connected under its own client id (``<client id>-watch``, a session that
ends with the connection, so it never takes the sync's session or holds messages) and fires when
one arrives.

It fires for the first pending event, then again only for a new first pending event (a run has
loaded the previous ones) or, if nothing loaded them, after ``refire_after`` seconds.  Use it as
``Asset(..., watchers=[AssetWatcher(name=..., trigger=EventStreamTrigger(...))])`` and schedule the
draining DAG on that asset.  Connections are resolved in the triggerer, so DAG files neither look
them up nor embed secrets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import closing
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from airflow_sync_provider.core.errors import SyncError
from airflow_sync_provider.core.events.load import committed_position
from airflow_sync_provider.core.events.source import EventSource
from airflow_sync_provider.core.state import read_state


class EventStreamTrigger(BaseEventTrigger):
    """Watch ``stream`` on ``source_conn_id`` for events sync ``sync_id`` has not loaded yet.

    :param source_conn_id: a ``redis``, ``nats`` or ``mqtt`` connection.
    :param stream: stream key, JetStream stream, or MQTT topic filter.
    :param sync_id: the event sync (its committed position is read from the target).
    :param target_conn_id: the target ``postgres`` connection holding the sync's state.
    :param target_schema: schema of the state table.  :param state_table: the state table.
    :param poll_interval: seconds between two looks.
    :param refire_after: fire again for the same pending event after this many seconds (None: never).

    Event payload: ``{"status": "events", "sync_id", "stream", "position", "first_message_id"}``.
    """

    def __init__(
        self,
        *,
        source_conn_id: str,
        stream: str,
        sync_id: str,
        target_conn_id: str,
        target_schema: str = "public",
        state_table: str = "_sync_state",
        poll_interval: float = 10.0,
        refire_after: float | None = 600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source_conn_id = source_conn_id
        self.stream = stream
        self.sync_id = sync_id
        self.target_conn_id = target_conn_id
        self.target_schema = target_schema
        self.state_table = state_table
        self.poll_interval = float(poll_interval)
        self.refire_after = float(refire_after) if refire_after is not None else None
        self._source: EventSource | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "source_conn_id": self.source_conn_id,
                "stream": self.stream,
                "sync_id": self.sync_id,
                "target_conn_id": self.target_conn_id,
                "target_schema": self.target_schema,
                "state_table": self.state_table,
                "poll_interval": self.poll_interval,
                "refire_after": self.refire_after,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        fired: str | None = None
        fired_at = 0.0
        try:
            while True:
                try:
                    payload = await asyncio.to_thread(self.poll)
                except SyncError as error:  # unreachable broker or target: look again later
                    self.log.warning("event sync %s: cannot look at %s: %s", self.sync_id, self.stream, error)
                    await asyncio.to_thread(self._close_source)
                    payload = None
                if payload is not None:
                    due = self.refire_after is not None and time.monotonic() - fired_at >= self.refire_after
                    if payload["first_message_id"] != fired or due:
                        fired, fired_at = payload["first_message_id"], time.monotonic()
                        yield TriggerEvent(payload)
                await asyncio.sleep(self.poll_interval)
        finally:
            # Off the event loop: the NATS source drives a loop of its own.
            await asyncio.to_thread(self._close_source)

    def poll(self) -> dict[str, Any] | None:
        """One look (blocking; the trigger runs it in a thread): a payload when events are pending."""
        source = self._open_source()
        position = None
        if source.positioned:
            from airflow_sync_provider.hooks.target import target_connection

            with closing(target_connection(self.target_conn_id, sync_id=self.sync_id)) as conn:
                position = committed_position(read_state(conn, self.target_schema, self.state_table, self.sync_id))
        batch = source.read(position, max_events=1, max_bytes=1, wait=0.0 if source.positioned else 0.5)
        if not batch.events:
            return None
        if not source.positioned:
            source.acknowledge(batch)  # the watcher's own session: let the next message through
        return {
            "status": "events",
            "sync_id": self.sync_id,
            "stream": self.stream,
            "position": position,
            "first_message_id": batch.events[0].message_id,
        }

    def _open_source(self) -> EventSource:
        if self._source is None:
            from airflow_sync_provider.hooks.events import EventSourceHook, event_source

            conn_type = (EventSourceHook(self.source_conn_id).connection().conn_type or "").lower()
            options: dict[str, Any] = {}
            if conn_type == "mqtt":
                # Its own short-lived session: the sync's persistent one stays the sync's.
                options = {"client_id": f"sync-{self.sync_id}-watch", "session_expiry": 0, "receive_maximum": 1}
            self._source = event_source(self.source_conn_id, self.stream, sync_id=self.sync_id, **options)
        return self._source

    def _close_source(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            source.close()


__all__ = ["EventStreamTrigger"]
