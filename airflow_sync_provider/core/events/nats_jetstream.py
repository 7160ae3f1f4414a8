"""NATS JetStream: the stream sequence is the position.

Each read opens (or keeps) an ephemeral pull consumer that starts at the sequence after the
committed one (``DeliverPolicy.BY_START_SEQUENCE``, no acknowledgements: the committed sequence in
the target is the sync's only memory of where it is, so a crash, a retry or another worker just
starts again from there).  A committed sequence older than the stream's first message (removed by
the stream's limits before the sync read it) is reported as a gap, never skipped silently.

nats-py is asyncio-only: the source runs its own event loop, so it is called like the other
sources from synchronous code (operators, the drain); do not call it from inside a running loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from airflow_sync_provider.core.errors import DataError, SourceUnavailableError, first_line
from airflow_sync_provider.core.events.source import EventBatch, Position, RawEvent

_PAGE = 2_000
_TAIL_WAIT = 0.05


class NatsJetStreamSource:
    """Reads JetStream ``stream`` (optionally only ``subject``, a filter within it)."""

    kind = "nats"
    positioned = True

    def __init__(self, servers: str | list[str], stream: str, *, subject: str | None = None, **options: Any) -> None:
        self.name = stream
        self.subject = subject
        self._loop = asyncio.new_event_loop()
        try:
            self._nc: Any = self._run(nats.connect(servers, allow_reconnect=False, **options))
        except (OSError, NatsError) as error:
            close_loop(self._loop)
            raise SourceUnavailableError(f"NATS {servers!r}: {first_line(error)}") from error
        self._js = self._nc.jetstream()
        self._subscription: Any = None
        self._next_seq: int | None = None
        #: Messages fetched but not yet returned (a page cut short by max_bytes or max_events).
        self._pending: list[Any] = []

    def _run(self, coroutine: Any) -> Any:
        return self._loop.run_until_complete(coroutine)

    def read(self, after: Position | None, *, max_events: int, max_bytes: int, wait: float) -> EventBatch:
        last = int(after["seq"]) if after else 0
        try:
            return self._run(self._read(last, max_events, max_bytes, wait, after))
        except (OSError, NatsError) as error:
            self._drop_subscription()
            raise SourceUnavailableError(f"NATS JetStream stream {self.name!r}: {first_line(error)}") from error

    async def _read(
        self, last: int, max_events: int, max_bytes: int, wait: float, after: Position | None
    ) -> EventBatch:
        info = await self._js.stream_info(self.name)
        if last and info.state.first_seq > last + 1 and info.state.messages:
            raise DataError(
                f"NATS stream {self.name!r} starts at sequence {info.state.first_seq} but this sync committed "
                f"{last}: messages {last + 1}..{info.state.first_seq - 1} were removed (stream limits) before it "
                "read them; raise the stream's limits or run the sync more often, then reset its state",
                rule="stream gap",
            )
        if self._subscription is None or self._next_seq != last + 1:
            await self._subscribe(last + 1)  # fetched messages the consumer moved past are in _pending
        events: list[RawEvent] = []
        size = 0
        while len(events) < max_events and size < max_bytes:
            if not self._pending:
                want = min(_PAGE, max_events - len(events))
                try:
                    fetched = await self._subscription.fetch(
                        want, timeout=max(wait, _TAIL_WAIT) if not events else _TAIL_WAIT
                    )
                except (TimeoutError, NatsTimeout):
                    break
                self._pending.extend(fetched)
            message = self._pending.pop(0)
            sequence = message.metadata.sequence.stream
            if sequence <= last:
                continue  # delivered twice (a pull request that outlived its fetch): already in this batch
            events.append(
                RawEvent(
                    message.data,
                    f"{self.name}/{sequence}",
                    message.subject,
                    redelivered=message.metadata.num_delivered > 1,
                )
            )
            size += len(message.data)
            last = sequence
            self._next_seq = last + 1
        return EventBatch(events, after, {"nats": self.name, "seq": last})

    async def _subscribe(self, start: int) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start > 1 else DeliverPolicy.ALL,
            opt_start_seq=start if start > 1 else None,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=300.0,
        )
        subject = self.subject or ""
        if not subject:
            subjects = (await self._js.stream_info(self.name)).config.subjects or []
            subject = subjects[0] if len(subjects) == 1 else ">"
        self._subscription = await self._js.pull_subscribe(subject, durable=None, stream=self.name, config=config)
        self._next_seq = start
        self._pending = []

    def _drop_subscription(self) -> None:
        self._subscription = None
        self._next_seq = None
        self._pending = []

    def acknowledge(self, batch: EventBatch) -> None:
        pass  # the committed sequence in the target is the position; nothing to tell the server

    def rewind(self) -> None:
        # The consumer has moved past the uncommitted batch: the next read opens a new one at the
        # committed sequence.
        self._next_seq = None

    def close(self) -> None:
        try:
            if self._subscription is not None:
                self._run(self._subscription.unsubscribe())
            self._run(self._nc.close())
        except (OSError, NatsError):
            pass  # closing a lost connection: nothing left to release
        finally:
            close_loop(self._loop)


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what the client left running on ``loop`` (readers, flushers of a lost connection), then close it."""

    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    loop.run_until_complete(cancel_all())
    loop.close()


__all__ = ["NatsJetStreamSource", "close_loop"]
