"""Operator extra links: "Sync status" (the sync's detail page) and "Quality report" (its quality section).

Airflow 3 computes a link on the worker when the task ends and keeps it in XCom, so the link is
built from the rendered operator: its ``target_conn_id``, ``target_schema`` and ``sync_id``, or the
``sync_id`` and ``target_schema`` of the manifest it loaded or gated.  The target connection must be
one of ``[sync] status_conn_ids`` for the page to show it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperatorLink

from airflow_sync_provider.plugins.urls import URL_PREFIX, api_base_url, detail_path

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey


def sync_location(operator: Any) -> tuple[str, str, str] | None:
    """``(target_conn_id, schema, sync_id)`` of the sync an operator ran, or None when it cannot tell."""
    conn_id = getattr(operator, "target_conn_id", None)
    sync_id = getattr(operator, "sync_id", None)
    schema = getattr(operator, "target_schema", None)
    manifest = getattr(operator, "manifest", None)
    if manifest is not None and not (sync_id and schema):
        from airflow_sync_provider.core.errors import SyncError
        from airflow_sync_provider.operators.common import xcom_dict

        try:
            data = xcom_dict(manifest)
        except SyncError:
            return None
        sync_id = sync_id or data.get("sync_id")
        schema = schema or data.get("target_schema")
    if not (isinstance(conn_id, str) and isinstance(sync_id, str) and conn_id and sync_id):
        return None
    return conn_id, schema if isinstance(schema, str) and schema else "public", sync_id


def status_url(operator: Any, anchor: str = "") -> str:
    """The URL of the operator's sync on the status pages ("" when the operator does not name one)."""
    location = sync_location(operator)
    if location is None:
        return ""
    return f"{api_base_url()}{URL_PREFIX}{detail_path(*location)}{anchor}"


class SyncStatusLink(BaseOperatorLink):
    """The sync's page in the "Sync status" view: watermark, last runs, rows and latency over time."""

    name = "Sync status"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return status_url(operator)


class QualityReportLink(BaseOperatorLink):
    """The quality section of the sync's page: the newest gate's failing rules and quarantined rows."""

    name = "Quality report"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return status_url(operator, "#quality")


#: What the sync operators declare as ``operator_extra_links``.
SYNC_LINKS = (SyncStatusLink(), QualityReportLink())

__all__ = ["SYNC_LINKS", "QualityReportLink", "SyncStatusLink", "status_url", "sync_location"]
