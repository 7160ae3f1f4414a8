"""``SyncHealthCheckOperator``: check every sync of the listed targets against alert thresholds.

It reads the status read model of each target (and, for CDC syncs, the slot on their source),
evaluates the thresholds (:mod:`..core.alerts`) and sends one message per breach through the
notifiers given (any Airflow notifier; plain ones are wrapped in :class:`SyncAlertNotifier`).
Each open alert is sent once per DAG run: the check claims it in the target's ``_sync_alerts``
before sending, so a retried check does not send it again (see :mod:`..core.alert_log`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import replace
from typing import Any, Literal

import psycopg
from airflow.sdk import BaseNotifier, BaseOperator, Context

from airflow_sync_provider.core import ConfigurationError, SyncError
from airflow_sync_provider.core.alert_log import claim_alert, release_alert
from airflow_sync_provider.core.alerts import Alert, AlertThresholds, evaluate, thresholds_for
from airflow_sync_provider.core.status import SyncStatus, evidence_schemas, read_slot_status, read_sync_statuses
from airflow_sync_provider.hooks.cdc import PostgresCdcHook
from airflow_sync_provider.hooks.source import source_connection_defined
from airflow_sync_provider.hooks.target import target_connection
from airflow_sync_provider.notifications.sync_alert import SyncAlertNotifier, fresh
from airflow_sync_provider.operators.common import as_task_error


class SyncHealthBreachedError(Exception):
    """Raised (``on_breach="fail"``) when a sync breached a threshold; the message lists the alerts."""


class SyncHealthCheckOperator(BaseOperator):
    """Evaluate alert thresholds for the syncs of one or more targets and notify on each breach.

    Succeeds silently when every sync is healthy.  On a breach it sends each alert (once per DAG
    run, even across retries) and then fails (``on_breach="fail"``, the default: the run shows
    red) or succeeds (``"notify"``).  Returns the alerts as small dicts (XCom).

    :param target_conn_ids: the Airflow connection ids of the target PostgreSQL databases.
    :param thresholds: the thresholds of every sync (:class:`AlertThresholds` or a dict of its
        fields, e.g. ``{"freshness_older_than": "2h", "quarantine_above": 0}``).
    :param sync_thresholds: per sync id, thresholds that override ``thresholds`` (a dict may set one
        to None to turn it off for that sync).
    :param notifiers: the notifiers that deliver alerts (``SmtpNotifier``, ``SlackNotifier``,
        ``SyncAlertNotifier``...); none: alerts are only logged (and fail the task per ``on_breach``).
    :param schemas: target schemas to check; default: every schema holding sync state or a ledger.
    :param sync_ids: check only these syncs; default: all.
    :param source_conn_id: the CDC source to read slots from; default: the source connection each
        CDC sync's operators recorded.  A CDC sync with neither is checked without its slot.
    :param on_breach: ``"fail"`` or ``"notify"`` (see above).
    :param state_table: the sync state table's name in the target schemas.
    """

    template_fields: Sequence[str] = ("target_conn_ids", "schemas", "sync_ids", "source_conn_id", "on_breach")
    ui_color = "#fde2e2"

    def __init__(
        self,
        *,
        target_conn_ids: str | Sequence[str],
        thresholds: AlertThresholds | Mapping[str, Any] | None = None,
        sync_thresholds: Mapping[str, AlertThresholds | Mapping[str, Any] | None] | None = None,
        notifiers: Sequence[BaseNotifier] = (),
        schemas: Sequence[str] | None = None,
        sync_ids: Sequence[str] | None = None,
        source_conn_id: str | None = None,
        on_breach: Literal["fail", "notify"] = "fail",
        state_table: str = "_sync_state",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.target_conn_ids = target_conn_ids
        self.thresholds = thresholds
        self.sync_thresholds = sync_thresholds
        self.notifiers = list(notifiers)
        self.schemas = schemas
        self.sync_ids = sync_ids
        self.source_conn_id = source_conn_id
        self.on_breach = on_breach
        self.state_table = state_table

    def execute(self, context: Context) -> list[dict[str, Any]]:
        if self.on_breach not in ("fail", "notify"):
            raise as_task_error(ConfigurationError(f"on_breach must be 'fail' or 'notify', got {self.on_breach!r}"))
        try:
            default = AlertThresholds.of(self.thresholds)
            for sync_id, override in (self.sync_thresholds or {}).items():
                thresholds_for(sync_id, default, {sync_id: override})  # validate every override now
        except SyncError as error:
            raise as_task_error(error) from error
        conn_ids = [self.target_conn_ids] if isinstance(self.target_conn_ids, str) else list(self.target_conn_ids)
        scope = f"{getattr(context.get('dag'), 'dag_id', None) or 'dag'}/{context.get('run_id', 'manual')}"
        alerts: list[Alert] = []
        undelivered: list[str] = []
        checked = 0
        found_ids: set[str] = set()
        with ExitStack() as sources:
            source_conns: dict[str, psycopg.Connection[Any]] = {}
            for conn_id in conn_ids:
                try:
                    target = sources.enter_context(closing(target_connection(conn_id, sync_id=None)))
                except SyncError as error:
                    raise as_task_error(error) from error
                for schema in list(self.schemas or ()) or evidence_schemas(target, self.state_table):
                    statuses = read_sync_statuses(
                        target,
                        schema,
                        state_table=self.state_table,
                        sync_ids=list(self.sync_ids) if self.sync_ids else None,
                    )
                    for status in statuses:
                        checked += 1
                        found_ids.add(status.sync_id)
                        limits = thresholds_for(status.sync_id, default, self.sync_thresholds)
                        status = self._with_slot(status, limits, source_conns, sources)
                        seen = {a.dedupe_key for a in alerts}  # a target listed twice alerts once
                        found = [a for a in evaluate(status, limits, target=conn_id) if a.dedupe_key not in seen]
                        for alert in found:
                            self.log.warning("%s", alert.message)
                            if not self._send(target, schema, scope, alert, context):
                                undelivered.append(alert.dedupe_key)
                        alerts.extend(found)
        missing = sorted(set(self.sync_ids or ()) - found_ids)
        if missing:
            self.log.warning("sync(s) %s not found on %s: nothing to check for them", missing, ", ".join(conn_ids))
        if undelivered:
            raise SyncHealthBreachedError(
                f"{len(undelivered)} sync alert(s) not delivered (a retry sends them): {', '.join(undelivered)}"
            )
        if not alerts:
            self.log.info("%d sync(s) on %s healthy", checked, ", ".join(conn_ids))
            return []
        if self.on_breach == "fail":
            raise SyncHealthBreachedError(
                f"{len(alerts)} sync alert(s) on {checked} sync(s): " + "; ".join(a.subject for a in alerts)
            )
        return [a.as_dict() for a in alerts]

    def _with_slot(
        self,
        status: SyncStatus,
        limits: AlertThresholds,
        source_conns: dict[str, psycopg.Connection[Any]],
        stack: ExitStack,
    ) -> SyncStatus:
        """``status`` with its slot read from the source, when the slot rule needs it and a source is known."""
        if status.kind != "cdc" or not status.slot_name or limits.slot_retained_wal_over is None:
            return status
        conn_id = self.source_conn_id or status.source_conn_id
        if not conn_id:
            self.log.warning(
                "sync %s: no source connection recorded or given; its slot %s is not checked",
                status.sync_id,
                status.slot_name,
            )
            return status
        if conn_id not in source_conns:
            try:
                with source_connection_defined(conn_id, status.sync_id):
                    hook = PostgresCdcHook(source_conn_id=conn_id)
                    source_conns[conn_id] = stack.enter_context(closing(hook.get_cdc_connection(status.sync_id)))
            except SyncError as error:
                raise as_task_error(error) from error
        return replace(status, slot=read_slot_status(source_conns[conn_id], status.slot_name))

    def _send(self, target: psycopg.Connection[Any], schema: str, scope: str, alert: Alert, context: Context) -> bool:
        """Claim and send ``alert``; True when it was sent now or earlier in this run."""
        try:
            claimed = claim_alert(target, schema, scope, alert)
        except psycopg.Error as error:  # a read-only target: dedupe within this try only
            self.log.warning("could not record alert %s in %s._sync_alerts: %s", alert.dedupe_key, schema, error)
            claimed = True
        if not claimed:
            self.log.info("alert %s already sent in %s", alert.dedupe_key, scope)
            return True
        forwarded: dict[str, Any] = {**context, "sync_alerts": [alert]}
        try:
            for notifier in self._notifiers():
                fresh(notifier)(forwarded)
        except Exception as error:
            self.log.error("alert %s not delivered: %s", alert.dedupe_key, error)
            try:
                release_alert(target, schema, scope, alert)
            except psycopg.Error:
                self.log.warning("could not release the claim of alert %s", alert.dedupe_key)
            return False
        return True

    def _notifiers(self) -> list[BaseNotifier]:
        """Ours as given; the others wrapped in one :class:`SyncAlertNotifier` (which formats for them)."""
        ours = [n for n in self.notifiers if isinstance(n, SyncAlertNotifier)]
        plain = [n for n in self.notifiers if not isinstance(n, SyncAlertNotifier)]
        return [*ours, *([SyncAlertNotifier(notifiers=plain)] if plain else [])]


__all__ = ["SyncHealthBreachedError", "SyncHealthCheckOperator"]
