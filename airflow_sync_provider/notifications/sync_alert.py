"""``SyncAlertNotifier``: sync alerts (or a failed sync task) formatted once, delivered by any Airflow notifiers.

Airflow already delivers messages (``SmtpNotifier``, ``SlackNotifier``, ``SlackWebhookNotifier``...);
this notifier only says what to deliver.  It formats the :class:`~..core.alerts.Alert` objects of
the context (``context["sync_alerts"]``, put there by ``SyncHealthCheckOperator``) or, used as a
task's ``on_failure_callback``, which sync task failed and why, and forwards the message to each
notifier it was given with these context keys for their templates:

* ``sync_alert_subject`` -- one line (``[sync alert: warning] orders: freshness 3 h 2 min > 1 h``);
* ``sync_alert_text`` -- the plain-text body; ``sync_alert_html`` -- the same as HTML;
* ``sync_alert_slack`` -- the plain text escaped for Slack's ``text`` (``&``, ``<``, ``>`` as entities, so
  an error's ``<...>`` is neither swallowed as a link nor a ``<!channel>`` mention);
* ``sync_alerts`` -- the alerts as dicts (:meth:`Alert.as_dict`).

Fields a forwarded notifier leaves unset (None) are filled with these by name (``fill_fields``;
by default SMTP's ``subject`` and ``html_content`` and ``text``: ``sync_alert_slack`` on Slack's
notifiers, ``sync_alert_text`` on others), so ``SmtpNotifier(to="ops@example.com")`` and
``SlackWebhookNotifier(text=None)`` need nothing more.
"""

from __future__ import annotations

import asyncio
import copy
import html
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseNotifier

from airflow_sync_provider.core.alerts import Alert

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Attributes of common notifiers filled with our message when left None: attribute -> context key.
DEFAULT_FILL_FIELDS: Mapping[str, str] = {
    "subject": "sync_alert_subject",
    "html_content": "sync_alert_html",
    "text": "sync_alert_text",
    "message": "sync_alert_text",
}

#: The defaults for Slack's notifiers (``SlackNotifier``, ``SlackWebhookNotifier``): ``text`` is mrkdwn there.
SLACK_FILL_FIELDS: Mapping[str, str] = {**DEFAULT_FILL_FIELDS, "text": "sync_alert_slack"}


class SyncAlertError(Exception):
    """A forwarded notifier failed to send (the others were still tried)."""


def fresh(notifier: BaseNotifier) -> BaseNotifier:
    """A copy to send one message with: rendering a notifier's templates overwrites them in place."""
    return copy.copy(notifier)


class SyncAlertNotifier(BaseNotifier):
    """Format the sync alerts of a context (or a failed sync task) and forward them to ``notifiers``.

    :param notifiers: the Airflow notifiers that deliver the message (``SmtpNotifier``,
        ``SlackNotifier``...); each is copied per message, so one instance serves many sends.
    :param subject: a Jinja template for the subject instead of ours (the context keys above work).
    :param title: words put before our subject (e.g. the environment: ``"[prod]"``).
    :param fill_fields: forwarded notifiers' attributes to fill with our message when they are None
        (attribute name -> context key); default :data:`DEFAULT_FILL_FIELDS` (:data:`SLACK_FILL_FIELDS`
        for Slack's notifiers).
    """

    template_fields: Sequence[str] = ("subject", "title")

    def __init__(
        self,
        *,
        notifiers: Sequence[BaseNotifier] = (),
        subject: str | None = None,
        title: str = "",
        fill_fields: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.notifiers = list(notifiers)
        self.subject = subject
        self.title = title
        self.fill_fields = dict(DEFAULT_FILL_FIELDS if fill_fields is None else fill_fields)
        self._default_fields = fill_fields is None

    # ------------------------------------------------------------------ message

    def message(self, context: Mapping[str, Any]) -> dict[str, Any] | None:
        """The context keys of our message (see the module doc), or None when there is nothing to say."""
        alerts = [_alert_dict(a) for a in context.get("sync_alerts") or ()]
        if alerts:
            subject, text, body_html = _alerts_message(alerts)
        elif context.get("exception") is not None:
            subject, text, body_html = _failure_message(context)
        else:
            return None
        if self.subject:
            subject = self.subject
        if self.title:
            subject = f"{self.title} {subject}"
        return {
            "sync_alerts": alerts,
            "sync_alert_subject": subject,
            "sync_alert_text": f"{subject}\n\n{text}",
            "sync_alert_html": f"<p>{html.escape(subject)}</p>{body_html}",
            "sync_alert_slack": slack_escape(f"{subject}\n\n{text}"),
        }

    def fields_for(self, notifier: BaseNotifier) -> Mapping[str, str]:
        """The attributes of ``notifier`` to fill (attribute -> context key): Slack's get escaped text."""
        if self._default_fields and type(notifier).__module__.startswith("airflow.providers.slack."):
            return SLACK_FILL_FIELDS
        return self.fill_fields

    def _forwarded(self, context: Context) -> list[tuple[BaseNotifier, dict[str, Any]]] | None:
        message = self.message(context)
        if message is None:
            self.log.info("no sync alert and no failure in the context: nothing to send")
            return None
        if not self.notifiers:
            self.log.warning("sync alert not forwarded (no notifiers given): %s", message["sync_alert_subject"])
            return []
        self.log.info("sending sync alert to %d notifier(s): %s", len(self.notifiers), message["sync_alert_subject"])
        out = []
        for notifier in self.notifiers:
            clone = fresh(notifier)
            for attribute, key in self.fields_for(clone).items():
                if hasattr(clone, attribute) and getattr(clone, attribute) is None:
                    setattr(clone, attribute, "{{ " + key + " }}")
            out.append((clone, {**context, **message}))
        return out

    # ------------------------------------------------------------------ delivery

    def notify(self, context: Context) -> None:
        """Send through every forwarded notifier; raise :class:`SyncAlertError` naming those that failed."""
        failures = []
        for template, forwarded in self._forwarded(context) or ():
            try:
                fresh(template)(forwarded)
            except Exception as error:  # one broken channel must not silence the others
                failures.append(f"{type(template).__name__}: {error}")
        if failures:
            raise SyncAlertError("sync alert not delivered by " + "; ".join(failures))

    async def async_notify(self, context: Context) -> None:
        """As :meth:`notify`, awaiting notifiers that send asynchronously (others run in a thread)."""
        failures = []
        for template, forwarded in self._forwarded(context) or ():
            try:
                attempt = fresh(template)
                attempt.context = forwarded  # type: ignore[assignment]
                try:
                    await attempt
                except NotImplementedError:  # no async_notify: its templates were rendered, start afresh
                    await asyncio.to_thread(fresh(template), forwarded)
            except Exception as error:
                failures.append(f"{type(template).__name__}: {error}")
        if failures:
            raise SyncAlertError("sync alert not delivered by " + "; ".join(failures))


def slack_escape(text: str) -> str:
    """``text`` for Slack's mrkdwn: only ``&``, ``<`` and ``>`` are control characters there (Slack's rule)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _alert_dict(value: Alert | Mapping[str, Any]) -> dict[str, Any]:
    """An alert as a dict, whether the operator passed the object or it came back from XCom."""
    return value.as_dict() if isinstance(value, Alert) else dict(value)


def _alerts_message(alerts: list[dict[str, Any]]) -> tuple[str, str, str]:
    """Subject, plain-text details and HTML details (the caller puts the final subject on top)."""
    first = alerts[0]
    if len(alerts) == 1:
        subject = (
            f"[sync alert: {first['severity']}] {first['sync_id']}: {str(first['rule']).replace('_', ' ')} "
            f"{first['observed_text']} > {first['threshold_text']}"
        )
    else:
        severity = "critical" if any(a["severity"] == "critical" for a in alerts) else "warning"
        syncs = sorted({str(a["sync_id"]) for a in alerts})
        subject = f"[sync alert: {severity}] {len(alerts)} alerts on {', '.join(syncs)}"
    lines = []
    for a in alerts:
        lines.append(
            f"{a['severity'].upper()} {a['rule']} on sync {a['sync_id']} "
            f"(target {a['target']}, schema {a['schema']}, table {a.get('target_table') or '?'}): "
            f"observed {a['observed_text']}, threshold {a['threshold_text']}\n  {a['message']}\n"
            f"  dedupe key: {a['dedupe_key']}"
        )
    text = "\n\n".join(lines) + "\n"
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(a.get(k) if a.get(k) is not None else ''))}</td>"
            for k in ("severity", "sync_id", "rule", "observed_text", "threshold_text", "target", "target_table")
        )
        + "</tr>"
        for a in alerts
    )
    details = "".join(
        f"<li>{html.escape(str(a['message']))} <small>(alert {html.escape(str(a['dedupe_key']))})</small></li>"
        for a in alerts
    )
    body_html = (
        "<table border='1' cellpadding='4'><tr><th>severity</th><th>sync</th><th>rule</th><th>observed</th>"
        f"<th>threshold</th><th>target</th><th>table</th></tr>{rows}</table><ul>{details}</ul>"
    )
    return subject, text, body_html


def _failure_message(context: Mapping[str, Any]) -> tuple[str, str, str]:
    """A failed task as an alert: the sync (the operator's ``sync_id`` when it has one) and the error."""
    ti = context.get("ti") or context.get("task_instance")
    task = context.get("task")
    dag_id = getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", "?")
    task_id = getattr(ti, "task_id", None) or getattr(task, "task_id", "?")
    sync_id = getattr(task, "sync_id", None)
    target = getattr(task, "target_conn_id", None)
    error = context.get("exception")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    what = f"sync {sync_id}" if sync_id else "sync task"
    subject = f"[sync failed] {what}: task {dag_id}.{task_id} failed: {first[:160]}"
    facts = [
        ("sync", sync_id or "?"),
        ("task", f"{dag_id}.{task_id}"),
        ("run", context.get("run_id", "?")),
        ("try", getattr(ti, "try_number", "?")),
        ("target", target or "?"),
        ("error", f"{type(error).__name__}: {error}"),
    ]
    text = "\n".join(f"{k}: {v}" for k, v in facts) + "\n"
    body_html = (
        "<table>"
        + "".join(
            f"<tr><th align='left'>{k}</th><td>{html.escape(str(v)).replace(chr(10), '<br>')}</td></tr>"
            for k, v in facts
        )
        + "</table>"
    )
    return subject, text, body_html


__all__ = ["DEFAULT_FILL_FIELDS", "SLACK_FILL_FIELDS", "SyncAlertError", "SyncAlertNotifier", "fresh", "slack_escape"]
