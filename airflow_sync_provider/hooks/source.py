"""A hook giving a SQLAlchemy engine for any Airflow connection: postgres, mysql, sqlite, or any
SQLAlchemy URL, so one extraction engine serves every source database.

Where the connection's own provider hook is installed (``postgres`` with
apache-airflow-providers-postgres, ``mysql`` with the MySQL provider, ...), the engine comes from
it, so the provider's extras (SSL files, IAM tokens, ``sqlalchemy_scheme``...) are honoured; the
built-in driver map is the fallback for connection types without one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from airflow.exceptions import AirflowProviderDeprecationWarning
from airflow.providers.common.sql.hooks.sql import DbApiHook
from airflow.providers.postgres.hooks.postgres import PostgresHook
from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowException, AirflowNotFoundException

from airflow_sync_provider.core.errors import ConfigurationError, SourceUnavailableError

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

#: Extras of this hook that pick the URL themselves: with one of them the provider hook is not asked.
OWN_URL_EXTRAS = ("sqlalchemy_url", "sqlalchemy_drivername")


class SyncSourceHook(BaseHook):
    """SQLAlchemy engine for a sync source.

    The engine comes from the connection's own provider hook when one is installed (a
    ``DbApiHook``: :meth:`get_provider_hook`), with the connection extras that hook passes to the
    driver (for PostgreSQL: ``sslmode``, ``sslrootcert``, ``options``... and IAM tokens).  Otherwise
    the URL comes from the connection's fields and type (see ``DRIVERS``).  The connection extra can
    override both with ``sqlalchemy_url`` (complete URL) or ``sqlalchemy_drivername`` (e.g.
    ``"mssql+pyodbc"``), and add URL query parameters with ``sqlalchemy_query`` (a JSON object).
    For SQLite, the database file path goes in *host* (or *schema*).

    :param source_conn_id: the Airflow connection of the source database.
    :param engine_kwargs: extra keyword arguments for :func:`sqlalchemy.create_engine`.
    """

    conn_name_attr = "source_conn_id"
    default_conn_name = "sync_source_default"
    conn_type = "sync_sqlalchemy"
    hook_name = "SQLAlchemy source (Database Sync)"

    def __init__(self, source_conn_id: str = default_conn_name, engine_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.source_conn_id = source_conn_id
        self.engine_kwargs = engine_kwargs or {}
        self._provider_hook: DbApiHook | None = None
        self._provider_hook_looked_up = False

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {"hidden_fields": [], "relabeling": {"schema": "Database"}}

    def get_provider_hook(self) -> DbApiHook | None:
        """The connection's own provider hook (a ``DbApiHook``), or None when there is none to ask.

        None for this hook's own connection type, for a connection whose extra names its URL or
        driver (``sqlalchemy_url``, ``sqlalchemy_drivername``), and for a connection type whose
        provider is not installed (e.g. ``sqlite`` without apache-airflow-providers-sqlite).
        """
        if not self._provider_hook_looked_up:
            self._provider_hook = self._find_provider_hook()
            self._provider_hook_looked_up = True
        return self._provider_hook

    def _find_provider_hook(self) -> DbApiHook | None:
        conn = self.get_connection(self.source_conn_id)
        conn_type = (conn.conn_type or "").lower()
        own_url = any(conn.extra_dejson.get(k) for k in OWN_URL_EXTRAS)
        if not conn_type or conn_type == SyncSourceHook.conn_type or own_url:
            return None
        try:
            hook = conn.get_hook()
        except (AirflowException, ImportError) as error:
            self.log.debug("connection %r: no provider hook for type %r (%s)", self.source_conn_id, conn_type, error)
            return None
        return hook if isinstance(hook, DbApiHook) else None

    def get_sqlalchemy_url(self) -> sa.URL:
        """The source's URL: the provider hook's when there is one, else built from the connection."""
        provider = self.get_provider_hook()
        if provider is not None:
            try:
                url = provider.sqlalchemy_url
            except NotImplementedError:
                return sa.make_url(provider.get_uri())
            return url if isinstance(url, sa.URL) else sa.make_url(str(url))
        return self._url_from_connection()

    def _url_from_connection(self) -> sa.URL:
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

    def get_connect_args(self) -> dict[str, Any]:
        """Driver keyword arguments the provider hook would pass to ``connect()`` but its URL lacks.

        For a PostgreSQL provider hook: every connection extra it does not consume itself
        (``sslmode``, ``sslcert``, ``options``, ``keepalives``...), exactly as
        ``PostgresHook.get_conn`` passes them; empty otherwise.
        """
        provider = self.get_provider_hook()
        if not isinstance(provider, PostgresHook):
            return {}
        ignored = set(getattr(provider, "ignored_extra_options", ()))
        args = {k: v for k, v in provider.connection.extra_dejson.items() if k not in ignored}
        if getattr(provider, "options", None):
            args["options"] = provider.options
        return args

    def get_engine(self) -> sa.Engine:
        """A new engine; the caller disposes it (``with closing``-style) at the end of the task."""
        engine_kwargs: dict[str, Any] = {"pool_pre_ping": True, **self.engine_kwargs}
        connect_args = self.get_connect_args()
        if connect_args:
            engine_kwargs["connect_args"] = {**connect_args, **engine_kwargs.get("connect_args", {})}
        provider = self.get_provider_hook()
        if provider is not None:
            engine: sa.Engine = provider.get_sqlalchemy_engine(engine_kwargs=engine_kwargs)
            return engine
        return sa.create_engine(self._url_from_connection(), **engine_kwargs)

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


@contextmanager
def source_connection_defined(conn_id: str, sync_id: str | None) -> Iterator[None]:
    """Turn Airflow's "connection not defined" into a :class:`SourceUnavailableError` naming it."""
    try:
        yield
    except AirflowNotFoundException:
        raise SourceUnavailableError(
            f"Airflow connection {conn_id!r} (source) is not defined", sync_id=sync_id
        ) from None


@contextmanager
def source_engine(conn_id: str, *, sync_id: str) -> Iterator[sa.Engine]:
    """The engine of source connection ``conn_id``, disposed at the end of the block.

    A connection Airflow does not know raises :class:`SourceUnavailableError` naming it.
    """
    with source_connection_defined(conn_id, sync_id):
        engine = SyncSourceHook(source_conn_id=conn_id).get_engine()
    try:
        yield engine
    finally:
        engine.dispose()


def __getattr__(name: str) -> Any:
    if name == "SqlSourceHook":
        warnings.warn(
            "SqlSourceHook is deprecated: use airflow_sync_provider.hooks.source.SyncSourceHook",
            AirflowProviderDeprecationWarning,
            stacklevel=2,
        )
        return SyncSourceHook
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DRIVERS", "SyncSourceHook", "source_connection_defined", "source_engine"]
