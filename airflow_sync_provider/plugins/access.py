"""Who may see which sync: Airflow's own auth manager decides, by the DAGs that ran the sync.

A sync is shown to a user who may read (GET) at least one DAG recorded in its run context
(``_sync_run_context``).  A sync no DAG ever claimed (run outside Airflow, or before the operators
recorded their DAG) is shown only to users who may read every DAG.  The auth manager is the one
the api-server runs (SimpleAuthManager, FAB, Keycloak...), so roles and per-DAG permissions apply
as they do in the rest of the UI.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from airflow_sync_provider.core.status import SyncStatus


@dataclass(frozen=True)
class Access:
    """A user's read access: the DAG ids they may read among those asked about, and whether all."""

    dag_ids: frozenset[str]
    all_dags: bool

    def allows(self, status: SyncStatus) -> bool:
        if status.dag_ids:
            return any(d in self.dag_ids for d in status.dag_ids)
        return self.all_dags


def user_access(user: Any, dag_ids: Iterable[str]) -> Access:
    """What ``user`` may read of ``dag_ids``, asked of the api-server's auth manager."""
    from airflow.api_fastapi.app import get_auth_manager

    manager = get_auth_manager()
    wanted = set(dag_ids)
    allowed = manager.filter_authorized_dag_ids(dag_ids=wanted, user=user, method="GET") if wanted else set()
    return Access(frozenset(allowed), bool(manager.is_authorized_dag(method="GET", user=user)))


def visible(statuses: Iterable[SyncStatus], access: Access) -> list[SyncStatus]:
    """The statuses ``access`` allows, in their order."""
    return [s for s in statuses if access.allows(s)]


__all__ = ["Access", "user_access", "visible"]
