"""Triggers that wait, in the triggerer, until a CDC replication slot holds data changes.

Both poll with an async psycopg connection: every ``poll_interval`` seconds they peek at the slot
(``pg_logical_slot_peek_binary_changes``: nothing is consumed) for an insert, update, delete or
truncate in the sync's publication.

- :class:`CdcChangesTrigger` fires once, for a deferred task (``CdcChangesSensor(deferrable=True)``).
- :class:`CdcChangesEventTrigger` keeps watching, for event-driven scheduling
  (``Asset(..., watchers=[AssetWatcher(name=..., trigger=CdcChangesEventTrigger(...))])``): it fires
  when changes appear, then again only when the first pending change is a new one (a DAG run has
  consumed the previous ones) or, if nothing consumed them, after ``refire_after`` seconds.

The source is given either as a libpq ``conninfo`` (built by the sensor from the Airflow connection;
it contains the password, which Airflow stores encrypted with the trigger and which is masked in
``repr``) or as ``source_conn_id``, resolved in the triggerer at run time (use this in DAG files, so
parsing neither looks up connections nor embeds passwords).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import psycopg
from airflow.sdk.exceptions import AirflowNotFoundException
from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from airflow_sync_provider.core.errors import SyncError
from airflow_sync_provider.hooks.cdc import missing_publication_message, slot_spec

_SLOT = (
    "SELECT active, confirmed_flush_lsn::text, wal_status, "
    "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint, "
    "EXISTS (SELECT 1 FROM pg_publication WHERE pubname = %s) "
    "FROM pg_replication_slots WHERE slot_name = %s"
)
# The query of core.cdc.slot.has_pending_changes, plus the LSN of each message.
_PEEK = (
    "SELECT lsn::text, get_byte(data, 0) FROM pg_logical_slot_peek_binary_changes("
    "%s, NULL, %s, 'proto_version', '1', 'publication_names', %s)"
)
_DATA_MESSAGES = frozenset(b"IUDT")


def mask_conninfo(conninfo: str) -> str:
    """The conninfo with its password replaced by ``***`` (for logs and ``repr``)."""
    if not conninfo:
        return conninfo
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "<unparseable conninfo>"
    if params.get("password"):
        params["password"] = "***"
    return make_conninfo("", **params)


class CdcChangesTrigger(BaseTrigger):
    """Fire once when the slot holds data changes (or does not exist yet: the sync needs its snapshot).

    :param conninfo: libpq connection string or URI of the source (secret); or
    :param source_conn_id: an Airflow connection, resolved in the triggerer.
    :param sync_id: the CDC sync; names the slot and publication unless they are given.
    :param slot_name: replication slot (default: the sync's, ``sync_<sync_id>``).
    :param publication: publication (default: the sync's; the slot name if only the slot is given).
    :param poll_interval: seconds between two peeks.
    :param peek_changes: how many changes one peek decodes at most.

    Events: ``{"status": "changes", "first_change_lsn": ..., ...}``, ``{"status": "no_slot", ...}``
    or ``{"status": "error", "message": ...}`` (a source error that retrying the poll does not fix).
    Connection failures and a slot busy in another session (a sync reading it) are retried.
    """

    def __init__(
        self,
        *,
        conninfo: str = "",
        source_conn_id: str | None = None,
        sync_id: str = "",
        slot_name: str = "",
        publication: str = "",
        poll_interval: float = 30.0,
        peek_changes: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if bool(conninfo) == bool(source_conn_id):
            raise ValueError("give exactly one of conninfo and source_conn_id")
        names = slot_spec(sync_id, slot_name, publication)
        self.conninfo = conninfo
        self.source_conn_id = source_conn_id
        self.sync_id = sync_id or names.sync_id
        self.slot_name = names.slot_name
        self.publication = names.publication
        self.poll_interval = float(poll_interval)
        self.peek_changes = int(peek_changes)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "conninfo": self.conninfo,
                "source_conn_id": self.source_conn_id,
                "sync_id": self.sync_id,
                "slot_name": self.slot_name,
                "publication": self.publication,
                "poll_interval": self.poll_interval,
                "peek_changes": self.peek_changes,
            },
        )

    def __repr__(self) -> str:
        classpath, kwargs = self.serialize()
        return self.repr(classpath, {**kwargs, "conninfo": mask_conninfo(kwargs["conninfo"])})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async with contextlib.aclosing(self.watch()) as polls:
            async for payload in polls:
                yield TriggerEvent(payload)
                return

    # ------------------------------------------------------------------ the poll loop

    async def watch(self) -> AsyncGenerator[dict[str, Any], None]:
        """Poll forever; yield a payload at every poll that finds changes, no slot, or an error."""
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(await self._conninfo(), autocommit=True)
                    payload = await self._poll(conn)
                except psycopg.OperationalError as error:
                    # Unreachable source, restart, dropped connection: try again at the next poll.
                    self.log.warning("slot %s: cannot poll the source, retrying: %s", self.slot_name, error)
                    if conn is not None:
                        await conn.close()
                    conn = None
                    payload = None
                except psycopg.Error as error:
                    payload = self._payload("error", message=f"cannot peek at slot {self.slot_name!r}: {error}")
                except (SyncError, AirflowNotFoundException) as error:  # source_conn_id missing or not PostgreSQL
                    payload = self._payload("error", message=f"cannot connect to the source: {error}")
                if payload is not None:
                    yield payload
                await asyncio.sleep(self.poll_interval)
        finally:
            if conn is not None:
                await conn.close()

    async def _conninfo(self) -> str:
        if self.conninfo:
            return self.conninfo
        from airflow_sync_provider.hooks.cdc import PostgresCdcHook

        hook = PostgresCdcHook(source_conn_id=self.source_conn_id or "")
        # Synchronous connection lookup, off the event loop (the triggerer serves it from a thread).
        return await asyncio.to_thread(hook.get_conninfo)

    async def _poll(self, conn: psycopg.AsyncConnection[Any]) -> dict[str, Any] | None:
        cursor = await conn.execute(_SLOT, (self.publication, self.slot_name))
        slot = await cursor.fetchone()
        if slot is None:
            return self._payload("no_slot", message="the slot does not exist: the sync needs its initial snapshot")
        active, confirmed, wal_status, retained, published = slot
        if wal_status == "lost":
            return self._payload("error", message=f"replication slot {self.slot_name!r} was invalidated")
        if not published:
            return self._payload("error", message=missing_publication_message(self.publication))
        if active:
            self.log.debug("slot %s is in use by another session (a sync is reading it)", self.slot_name)
            return None
        try:
            cursor = await conn.execute(_PEEK, (self.slot_name, self.peek_changes, self.publication))
            rows = await cursor.fetchall()
        except psycopg.errors.ObjectInUse:
            return None  # a sync started reading it between the two queries
        first = next((lsn for lsn, kind in rows if kind in _DATA_MESSAGES), None)
        if first is None:
            return None
        return self._payload(
            "changes", first_change_lsn=first, confirmed_flush_lsn=confirmed, retained_wal_bytes=int(retained)
        )

    def _payload(self, status: str, **details: Any) -> dict[str, Any]:
        return {
            "status": status,
            "sync_id": self.sync_id,
            "slot": self.slot_name,
            "publication": self.publication,
            **details,
        }


class CdcChangesEventTrigger(CdcChangesTrigger, BaseEventTrigger):
    """Watch a slot for event-driven scheduling (``AssetWatcher``): fire per new batch of changes.

    Takes the arguments of :class:`CdcChangesTrigger` plus ``refire_after`` (seconds; ``None``: never):
    fire again for the same pending changes when no run has consumed them for that long (e.g. the
    run that should have failed).  Errors are logged and polling goes on; they fire nothing.
    """

    def __init__(self, *, refire_after: float | None = 600.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refire_after = float(refire_after) if refire_after is not None else None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        classpath, kwargs = super().serialize()
        return classpath, {**kwargs, "refire_after": self.refire_after}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        fired: tuple[str, Any] | None = None
        fired_at = 0.0
        async with contextlib.aclosing(self.watch()) as polls:
            async for payload in polls:
                if payload["status"] == "error":
                    self.log.error("slot %s: %s", self.slot_name, payload["message"])
                    continue
                key = (payload["status"], payload.get("first_change_lsn"))
                due = self.refire_after is not None and time.monotonic() - fired_at >= self.refire_after
                if key != fired or due:
                    fired, fired_at = key, time.monotonic()
                    yield TriggerEvent(payload)


__all__ = ["CdcChangesEventTrigger", "CdcChangesTrigger", "mask_conninfo"]
