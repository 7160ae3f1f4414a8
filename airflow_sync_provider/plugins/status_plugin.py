"""The Airflow plugin of the provider: the "Sync status" view in the Airflow 3 UI.

Registered by the provider's ``airflow.plugins`` entry point (pyproject.toml).  It mounts the
status app (:mod:`.app`) in the api-server at ``/sync-status`` and puts
"Sync status" in the UI's Browse menu (an external view the UI shows in a frame at
``/plugin/sync-status``).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_sync_provider.plugins.links import QualityReportLink, SyncStatusLink
from airflow_sync_provider.plugins.urls import URL_PREFIX, base_path


class SyncStatusPlugin(AirflowPlugin):
    """Mounts the "Sync status" pages and adds them to the UI's navigation."""

    name = "sync_status"

    @classmethod
    def on_load(cls, *args: object, **kwargs: object) -> None:
        """Build the app only where plugins are loaded (api-server, CLI), not wherever this module is imported."""
        from airflow_sync_provider.plugins.app import create_app

        cls.fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Sync status"}]
        cls.external_views = [
            {
                "name": "Sync status",
                "href": f"{base_path()}{URL_PREFIX}/",
                "url_route": "sync-status",
                "destination": "nav",
                "category": "browse",
            }
        ]


__all__ = ["QualityReportLink", "SyncStatusLink", "SyncStatusPlugin"]
