"""Hourly health check of the case studies' syncs: alert thresholds, delivered by e-mail.

``SyncHealthCheckOperator`` reads what each target database knows about its syncs (the status read
model) and sends one e-mail per breached threshold through Airflow's ``SmtpNotifier``; a run with
a breach fails (red in the grid) after sending, a healthy run sends nothing.  An open alert is sent
once per run, so a cleared or retried task does not send it twice; the next hourly run sends it
again while it stays open.

* ``check_inventory`` (``inventory_central``, every schema with syncs): store orders older than
  6 hours, a warehouse CDC slot keeping more than 1 GB of WAL, a watermark held back by an open
  transaction for more than 30 minutes, any quarantined row, any unrepaired reconciliation difference.
* ``check_bank`` (``loan_management``, ``credit_scoring``, ``fraud_detection``): the same except
  freshness (customer records change rarely: an old newest row is normal) and slots (no CDC).

Delivery: Airflow connection ``smtp_default`` (an ``smtp`` connection, e.g.
``AIRFLOW_CONN_SMTP_DEFAULT``), recipients in Variable ``sync_alert_email_to`` (comma-separated;
e.g. ``AIRFLOW_VAR_SYNC_ALERT_EMAIL_TO``), another connection id in Variable ``sync_alert_smtp_conn_id``.
Both are read when an alert is sent, never when this file is parsed.  See docs/alerts.md for
Slack and other notifiers.
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.smtp.notifications.smtp import SmtpNotifier
from airflow.sdk import DAG

from airflow_sync_provider.operators.health import SyncHealthCheckOperator

INVENTORY_TARGETS = ["inventory_central"]
BANK_TARGETS = ["loan_management", "credit_scoring", "fraud_detection"]
COMMON = {
    "watermark_held_back_longer_than": "30m",
    "quarantine_above": 0,
    "reconciliation_differences": 0,
}


def email() -> SmtpNotifier:
    """The e-mail channel; subject and body are filled by the health check (SyncAlertNotifier)."""
    return SmtpNotifier(
        to="{{ var.value.get('sync_alert_email_to', 'data-platform@example.com') }}",
        smtp_conn_id="{{ var.value.get('sync_alert_smtp_conn_id', 'smtp_default') }}",
    )


with DAG(
    dag_id="sync_health",
    schedule="@hourly",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["sync", "alerts"],
    doc_md=__doc__,
    default_args={"retries": 0},  # the next hourly run is the retry; sent alerts are not sent twice
):
    SyncHealthCheckOperator(
        task_id="check_inventory",
        target_conn_ids=INVENTORY_TARGETS,
        thresholds={**COMMON, "freshness_older_than": "6h", "slot_retained_wal_over": "1GB"},
        notifiers=[email()],
    )
    SyncHealthCheckOperator(
        task_id="check_bank",
        target_conn_ids=BANK_TARGETS,
        thresholds=COMMON,
        notifiers=[email()],
    )
