"""A hook giving a SQLAlchemy engine for any Airflow connection: postgres, mysql, sqlite, or any
SQLAlchemy URL, so one extraction engine serves every source database."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from airflow.sdk import BaseHook

from airflow_sync_provider.core.errors import ConfigurationError

#: Airflow connection types we can turn into a SQLAlchemy URL without any extra configuration.
DRIVERS = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mysql+pymysql",
    "sqlite": "sqlite",
    "mssql": "mssql+pymssql",
    "oracle": "oracle+oracledb",
}


class SqlSourceHook(BaseHook):
    """SQLAlchemy engine for a sync source.

    The URL comes from the connection's fields and type (see ``DRIVERS``); the connection extra can
    override it with ``sqlalchemy_url`` (complete URL) or ``sqlalchemy_drivername`` (e.g.
    ``"mssql+pyodbc"``), and add URL query parameters with ``sqlalchemy_query`` (a JSON object).
    For SQLite, the database file path goes in *host* (or *schema*).
    """

    conn_name_attr = "source_conn_id"
    default_conn_name = "sync_source_default"
    conn_type = "sync_sqlalchemy"
    hook_name = "SQLAlchemy source (Database Sync)"

    def __init__(self, source_conn_id: str = default_conn_name, engine_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.source_conn_id = source_conn_id
        self.engine_kwargs = engine_kwargs or {}

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {"hidden_fields": [], "relabeling": {"schema": "Database"}}

    def get_sqlalchemy_url(self) -> sa.URL:
        conn = self.get_connection(self.source_conn_id)
        extra = conn.extra_dejson
        if extra.get("sqlalchemy_url"):
            return sa.make_url(extra["sqlalchemy_url"])
        drivername = extra.get("sqlalchemy_drivername") or DRIVERS.get((conn.conn_type or "").lower())
        if not drivername:
            raise ConfigurationError(
                f"connection {self.source_conn_id!r} has type {conn.conn_type!r}, which has no known SQLAlchemy "
                f"driver; set extra 'sqlalchemy_drivername' or 'sqlalchemy_url' (known types: {', '.join(DRIVERS)})"
            )
        if drivername == "sqlite":
            return sa.URL.create("sqlite", database=conn.host or conn.schema or None)
        query = {str(k): str(v) for k, v in (extra.get("sqlalchemy_query") or {}).items()}
        if drivername.startswith("postgresql") and extra.get("sslmode"):
            query.setdefault("sslmode", str(extra["sslmode"]))
        return sa.URL.create(
            drivername,
            username=conn.login or None,
            password=conn.password or None,
            host=conn.host or None,
            port=conn.port or None,
            database=conn.schema or None,
            query=query,
        )

    def get_engine(self) -> sa.Engine:
        """A new engine; the caller disposes it (``with closing``-style) at the end of the task."""
        return sa.create_engine(self.get_sqlalchemy_url(), pool_pre_ping=True, **self.engine_kwargs)

    def get_conn(self) -> sa.Connection:
        return self.get_engine().connect()

    def test_connection(self) -> tuple[bool, str]:
        engine = self.get_engine()
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True, "Connection successfully tested"
        except Exception as error:  # reported to the UI, never raised
            return False, str(error)
        finally:
            engine.dispose()
