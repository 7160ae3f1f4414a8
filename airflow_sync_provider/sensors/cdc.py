"""A sensor that waits until a CDC sync's replication slot holds data changes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from airflow.configuration import conf
from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException

from airflow_sync_provider.core import ConfigurationError, SyncError
from airflow_sync_provider.core.cdc import CdcSpec
from airflow_sync_provider.hooks.cdc import PostgresCdcHook, missing_publication_message, slot_spec
from airflow_sync_provider.hooks.source import source_connection_defined
from airflow_sync_provider.operators.common import as_task_error
from airflow_sync_provider.triggers.cdc import CdcChangesTrigger

_T = TypeVar("_T")


class CdcChangesSensor(BaseSensorOperator):
    """Succeed when the slot of a CDC sync holds data changes (insert, update, delete, truncate).

    Also succeeds when the slot does not exist yet, since the sync then has work to do: its initial
    snapshot.  Peeking consumes nothing.  Put it in front of a CDC sync task so that runs without
    changes end early; with ``deferrable=True`` the wait happens in the triggerer
    (:class:`~airflow_sync_provider.triggers.cdc.CdcChangesTrigger`, polling every ``poke_interval``).

    :param source_conn_id: the PostgreSQL source connection.
    :param sync_id: the CDC sync; names the slot and publication unless they are given.
    :param slot_name: replication slot (default: the sync's).
    :param publication: publication (default: the sync's).
    :param deferrable: wait in the triggerer instead of a worker slot; default
        ``[operators] default_deferrable``.

    XCom: ``{"status": "changes" | "no_slot", "slot": ..., ...}``.
    """

    template_fields: Sequence[str] = ("sync_id", "slot_name", "publication", "source_conn_id")
    ui_color = "#eef3fb"

    def __init__(
        self,
        *,
        source_conn_id: str,
        sync_id: str = "",
        slot_name: str = "",
        publication: str = "",
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source_conn_id = source_conn_id
        self.sync_id = sync_id
        self.slot_name = slot_name
        self.publication = publication
        self.deferrable = deferrable

    def _spec(self) -> CdcSpec:
        try:
            return slot_spec(self.sync_id, self.slot_name, self.publication)
        except SyncError as error:
            raise as_task_error(error) from error

    def _with_hook(self, spec: CdcSpec, call: Callable[[PostgresCdcHook], _T]) -> _T:
        try:
            with source_connection_defined(self.source_conn_id, spec.sync_id):
                return call(PostgresCdcHook(source_conn_id=self.source_conn_id))
        except SyncError as error:
            raise as_task_error(error.with_context(sync_id=spec.sync_id)) from error

    def poke(self, context: Context) -> PokeReturnValue:
        spec = self._spec()
        lag = self._with_hook(spec, lambda hook: hook.slot_lag(spec))
        self.log.info("sync %s: %s; pending data changes: %s", spec.sync_id, lag["description"], lag["pending"])
        if lag["exists"] and not lag["publication_exists"]:
            raise as_task_error(ConfigurationError(missing_publication_message(spec.publication), sync_id=spec.sync_id))
        status = "no_slot" if not lag["exists"] else "changes" if lag["pending"] else None
        if status is None:
            return PokeReturnValue(is_done=False)
        return PokeReturnValue(
            is_done=True,
            xcom_value={
                "status": status,
                "sync_id": spec.sync_id,
                "slot": spec.slot_name,
                "publication": spec.publication,
                "confirmed_flush_lsn": lag["confirmed_flush_lsn"],
                "retained_wal_bytes": lag["retained_wal_bytes"],
            },
        )

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        ready = self.poke(context)
        if ready.is_done:
            return ready.xcom_value
        spec = self._spec()
        conninfo = self._with_hook(spec, lambda hook: hook.get_conninfo())
        self.defer(
            trigger=CdcChangesTrigger(
                conninfo=conninfo,
                sync_id=spec.sync_id,
                slot_name=spec.slot_name,
                publication=spec.publication,
                poll_interval=self.poke_interval,
            ),
            method_name="execute_complete",
            timeout=dt.timedelta(seconds=self.timeout) if self.timeout is not None else None,
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        if not event or event.get("status") not in ("changes", "no_slot"):
            # The trigger retries what retrying fixes (connection failures, a busy slot); the rest fails fast.
            message = (event or {}).get("message", f"unexpected trigger event {event!r}")
            raise AirflowFailException(f"sync {self.sync_id or self.slot_name}: {message}")
        self.log.info("sync %s: %s on slot %s", event.get("sync_id"), event["status"], event.get("slot"))
        return event


__all__ = ["CdcChangesSensor"]
