"""Redis Streams: the entry ID is the position (``XREAD`` after the committed ID).

No consumer group is needed: the committed ID in the target says where the sync is, so a crash or
a second worker never needs the group's pending-entries list, and nothing is ever ``XACK``-ed twice
or forgotten.  ``trim_after_commit`` makes :meth:`acknowledge` remove the committed entries
(``XTRIM MINID``) when this sync is the stream's only reader; otherwise the stream's own length
limit (``MAXLEN`` on ``XADD``) bounds it: size it for the longest pause of the sync.  Entries
deleted with ``XDEL`` after the committed one before the sync read them are reported as a gap
(:class:`~..errors.DataError`); Redis 7 does not record entries ``MAXLEN``/``XTRIM`` removed, so
those cannot be told from no entries at all.
"""

from __future__ import annotations

from typing import Any

import redis

from airflow_sync_provider.core.errors import DataError, SourceUnavailableError, first_line
from airflow_sync_provider.core.events.source import EventBatch, Position, RawEvent

_PAGE = 5_000


def _next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


class RedisStreamSource:
    """Reads stream ``key``; each entry's payload is its field ``field`` (default ``payload``)."""

    kind = "redis"
    positioned = True

    def __init__(
        self, client: redis.Redis, key: str, *, field: str = "payload", trim_after_commit: bool = False
    ) -> None:
        self.client = client
        self.name = key
        self.field = field.encode()
        self.trim_after_commit = trim_after_commit

    def read(self, after: Position | None, *, max_events: int, max_bytes: int, wait: float) -> EventBatch:
        last = str(after["id"]) if after else "0-0"
        start = {"redis": self.name, "id": last}
        events: list[RawEvent] = []
        size = 0
        try:
            self._check_gap(last)
            block = max(int(wait * 1000), 1)
            while len(events) < max_events and size < max_bytes:
                count = min(_PAGE, max_events - len(events))
                reply: Any = self.client.xread({self.name: last}, count=count, block=None if events else block)
                entries = reply[0][1] if reply else []
                for entry_id, fields in entries:
                    entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                    payload = fields.get(self.field, b"")
                    events.append(RawEvent(payload, f"{self.name}/{entry}", self.name))
                    size += len(payload)
                    last = entry
                    if size >= max_bytes:
                        break
                if len(entries) < count:
                    break
        except redis.ConnectionError as error:
            raise SourceUnavailableError(f"Redis stream {self.name!r}: {first_line(error)}") from error
        return EventBatch(events, start if after else None, {"redis": self.name, "id": last})

    def _check_gap(self, last: str) -> None:
        """Entries after ``last`` deleted (``XDEL``) before they were read are a loss to report, not to
        skip: Redis records the newest deleted ID of a stream."""
        if last == "0-0":
            return
        try:
            info: Any = self.client.xinfo_stream(self.name)
        except redis.ResponseError:
            return  # no stream (yet): nothing to read, nothing lost
        deleted = info.get("max-deleted-entry-id")
        deleted = deleted.decode() if isinstance(deleted, bytes) else deleted
        if deleted and _id_tuple(str(deleted)) > _id_tuple(last):
            raise DataError(
                f"Redis stream {self.name!r} lost entries after the committed entry {last} before this sync read "
                f"them (entries up to {deleted} were deleted); raise the stream's MAXLEN or run the "
                "sync more often, then reset the sync's state to continue",
                rule="stream gap",
            )

    def acknowledge(self, batch: EventBatch) -> None:
        if self.trim_after_commit and batch.end and batch.events:
            self.client.xtrim(self.name, minid=_next_id(str(batch.end["id"])))

    def rewind(self) -> None:
        pass  # the next read starts after the committed ID

    def close(self) -> None:
        self.client.close()


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


__all__ = ["RedisStreamSource"]
