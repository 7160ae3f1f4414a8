"""A test-only auth manager: SimpleAuthManager with per-user DAG access, as FAB or Keycloak would give.

``SYNC_TEST_DAG_ACCESS`` (JSON ``{"user": ["dag_id", ...]}``) limits the listed users to those DAGs
(and to none "for all DAGs"); users not listed keep SimpleAuthManager's role-based access.
Configured only by the browser test (``AIRFLOW__CORE__AUTH_MANAGER``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager


class RestrictedAuthManager(SimpleAuthManager):
    @staticmethod
    def _limits() -> dict[str, list[str]]:
        return dict(json.loads(os.environ.get("SYNC_TEST_DAG_ACCESS", "{}")))

    def is_authorized_dag(self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None) -> bool:
        limits = self._limits()
        if user.username in limits:
            dag_id = getattr(details, "id", None)
            return method == "GET" and dag_id is not None and dag_id in limits[user.username]
        return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)
