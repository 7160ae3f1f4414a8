"""The PostgreSQL target: a psycopg 3 connection from a ``postgres`` Airflow connection, with
retries on transient connection failures (the load is one transaction, so retrying is safe)."""

from __future__ import annotations

from typing import Any

import psycopg
from airflow.providers.postgres.hooks.postgres import PostgresHook
from airflow.sdk.exceptions import AirflowNotFoundException
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from airflow_sync_provider.core.errors import SyncError, TargetUnavailableError


class SyncTargetHook(PostgresHook):
    """PostgresHook that hands the sync engine a psycopg 3 connection outside any transaction."""

    hook_name = "Postgres (Database Sync target)"

    @retry(
        retry=retry_if_exception_type(psycopg.OperationalError),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.5, max=5),
        reraise=True,
    )
    def _connect(self) -> Any:
        return self.get_conn()

    def get_sync_connection(self) -> psycopg.Connection[Any]:
        """A psycopg 3 connection in autocommit mode; the caller closes it.

        Raises :class:`TargetUnavailableError` when the server cannot be reached (after 3 tries).
        """
        conn_id = getattr(self, self.conn_name_attr)
        try:
            conn = self._connect()
        except psycopg.OperationalError as error:
            raise TargetUnavailableError(
                f"cannot reach the target database of connection {conn_id!r}: {error}"
            ) from error
        if not isinstance(conn, psycopg.Connection):
            raise TargetUnavailableError(
                f"connection {conn_id!r} did not give a psycopg 3 connection (got {type(conn).__module__}); "
                "install psycopg 3 and SQLAlchemy 2 so apache-airflow-providers-postgres uses it"
            )
        conn.autocommit = True
        return conn


def target_connection(conn_id: str, *, sync_id: str | None) -> psycopg.Connection[Any]:
    """The sync's connection to target ``conn_id`` (autocommit; the caller closes it).

    A connection Airflow does not know, or a server that cannot be reached, raises
    :class:`TargetUnavailableError` naming the connection and the sync.
    """
    try:
        return SyncTargetHook(postgres_conn_id=conn_id).get_sync_connection()
    except AirflowNotFoundException:
        raise TargetUnavailableError(
            f"Airflow connection {conn_id!r} (target) is not defined", sync_id=sync_id
        ) from None
    except SyncError as error:
        raise error.with_context(sync_id=sync_id) from error.__cause__


__all__ = ["SyncTargetHook", "target_connection"]
