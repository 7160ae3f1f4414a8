"""Airflow notifiers of the provider: sync alerts delivered through any Airflow notifier."""

from airflow_sync_provider.notifications.sync_alert import SyncAlertError, SyncAlertNotifier

__all__ = ["SyncAlertError", "SyncAlertNotifier"]
