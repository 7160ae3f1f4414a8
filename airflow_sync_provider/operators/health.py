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
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import psycopg
from airflow.sdk import BaseNotifier, BaseOperator, Context

from airflow_sync_provider.core import ConfigurationError, SyncError
from airflow_sync_provider.core.alert_log import claim_alert, release_alert
from airflow_sync_provider.core.alerts import Alert, AlertThresholds, evaluate, thresholds_for
from airflow_sync_provider.core.errors import TargetUnavailableError
from airflow_sync_provider.core.status import SyncStatus, evidence_schemas, read_slot_status, read_sync_statuses
from airflow_sync_provider.hooks.cdc import PostgresCdcHook
from airflow_sync_provider.hooks.source import source_connection_defined
from airflow_sync_provider.hooks.target import target_connection
from airflow_sync_provider.notifications.sync_alert import SyncAlertNotifier, fresh
from airflow_sync_provider.operators.common import as_task_error


@dataclass
class _CheckRun:
    """What one execution of the check has found and opened so far."""

    scope: str
    alerts: list[Alert] = field(default_factory=list)
    undelivered: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    found: set[str] = field(default_factory=set)
    sources: dict[str, psycopg.Connection[Any]] = field(default_factory=dict)
    stack: ExitStack = field(default_factory=ExitStack)


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
        run = _CheckRun(scope=f"{getattr(context.get('dag'), 'dag_id', None) or 'dag'}/{context.get('run_id', '')}")
        with run.stack:
            for conn_id in conn_ids:
                try:
                    target = run.stack.enter_context(closing(target_connection(conn_id, sync_id=None)))
                except SyncError as error:  # check the other targets, then fail (a retry checks it again)
                    self.log.error("target %s not checked: %s", conn_id, error)
                    run.unreachable.append(str(error))
                    continue
                self._check_target(conn_id, target, default, run, context)
        missing = sorted(set(self.sync_ids or ()) - run.found)
        if missing:
            self.log.warning("sync(s) %s not found on %s: nothing to check for them", missing, ", ".join(conn_ids))
        if run.unreachable:
            raise TargetUnavailableError("health check could not read: " + "; ".join(run.unreachable))
        if run.undelivered:
            raise SyncHealthBreachedError(
                f"{len(run.undelivered)} sync alert(s) not delivered (a retry sends them): {', '.join(run.undelivered)}"
            )
        if not run.alerts:
            self.log.info("%d sync(s) on %s healthy", len(run.found), ", ".join(conn_ids))
            return []
        if self.on_breach == "fail":
            raise SyncHealthBreachedError(
                f"{len(run.alerts)} sync alert(s) on {len(run.found)} sync(s): "
                + "; ".join(a.subject for a in run.alerts)
            )
        return [a.as_dict() for a in run.alerts]

    def _check_target(
        self,
        conn_id: str,
        target: psycopg.Connection[Any],
        default: AlertThresholds,
        run: _CheckRun,
        context: Context,
    ) -> None:
        """Evaluate every sync of one target and send its new alerts."""
        for schema in list(self.schemas or ()) or evidence_schemas(target, self.state_table):
            statuses = read_sync_statuses(
                target, schema, state_table=self.state_table, sync_ids=list(self.sync_ids) if self.sync_ids else None
            )
            for status in statuses:
                run.found.add(status.sync_id)
                limits = thresholds_for(status.sync_id, default, self.sync_thresholds)
                status = self._with_slot(status, limits, run)
                seen = {a.dedupe_key for a in run.alerts}  # a target listed twice alerts once
                for alert in evaluate(status, limits, target=conn_id):
                    if alert.dedupe_key in seen:
                        continue
                    self.log.warning("%s", alert.message)
                    run.alerts.append(alert)
                    if not self._send(target, schema, run.scope, alert, context):
                        run.undelivered.append(alert.dedupe_key)

    def _with_slot(self, status: SyncStatus, limits: AlertThresholds, run: _CheckRun) -> SyncStatus:
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
        if conn_id not in run.sources:
            try:
                with source_connection_defined(conn_id, status.sync_id):
                    hook = PostgresCdcHook(source_conn_id=conn_id)
                    run.sources[conn_id] = run.stack.enter_context(closing(hook.get_cdc_connection(status.sync_id)))
            except SyncError as error:
                raise as_task_error(error) from error
        return replace(status, slot=read_slot_status(run.sources[conn_id], status.slot_name))

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
