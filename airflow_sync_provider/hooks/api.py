"""REST API sources over Airflow ``http`` connections (apache-airflow-providers-http's type).

The connection gives the base URL (host with scheme, or schema + host, and port) and the
credentials; its extras say how they are sent:

* ``auth_type``: ``"basic"`` (login/password; the default when a login is set), ``"bearer"``
  (the password is the token; the default when only a password is set), ``"api_key"`` or ``"none"``;
* ``api_key_name`` (default ``X-API-Key``) and ``api_key_in`` (``"header"``, default, or ``"query"``);
* ``headers``: a dict of headers for every request; ``timeout``: seconds per request.

Example: ``AIRFLOW_CONN_CREDIT_BUREAU='{"conn_type": "http", "host": "https://api.bureau.example",
"password": "<token>", "extra": {"auth_type": "bearer"}}'``.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.http.hooks.http import HttpHook
from airflow.sdk.exceptions import AirflowNotFoundException

from airflow_sync_provider.core.api import ApiAuth, ApiClient, RetryPolicy
from airflow_sync_provider.core.errors import ConfigurationError, SourceUnavailableError
from airflow_sync_provider.core.progress import Logger

#: Connection extras this hook reads (HttpHook would send unknown extras as headers: we do not).
AUTH_EXTRAS = ("auth_type", "api_key_name", "api_key_in", "headers", "timeout")


def auth_from_connection(conn: Any) -> ApiAuth:
    """The :class:`ApiAuth` an ``http`` connection describes (see the module doc)."""
    extra = conn.extra_dejson
    kind = extra.get("auth_type") or ("basic" if conn.login else "bearer" if conn.password else "none")
    kind = str(kind).lower()
    if kind == "basic":
        return ApiAuth("basic", username=conn.login or "", password=conn.password or "")
    if kind == "bearer":
        return ApiAuth("bearer", token=conn.password)
    if kind == "api_key":
        return ApiAuth(
            "api_key",
            token=conn.password,
            name=str(extra.get("api_key_name") or "X-API-Key"),
            location=str(extra.get("api_key_in") or "header"),  # type: ignore[arg-type]
        )
    if kind == "none":
        return ApiAuth()
    raise ConfigurationError(
        f"connection {conn.conn_id!r}: extra auth_type must be basic, bearer, api_key or none, not {kind!r}"
    )


class ApiSourceHook(HttpHook):
    """An :class:`HttpHook` whose connection also builds the sync engine's :class:`ApiClient`."""

    hook_name = "REST API source (Database Sync)"

    def __init__(self, http_conn_id: str = HttpHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(method="GET", http_conn_id=http_conn_id, **kwargs)

    def api_client(self, *, retry: RetryPolicy | None = None, logger: Logger | None = None) -> ApiClient:
        """A client on the connection's base URL with its auth, headers and timeout."""
        try:
            conn = self.get_connection(self.http_conn_id)
        except AirflowNotFoundException:
            raise SourceUnavailableError(
                f"Airflow connection {self.http_conn_id!r} (REST API) is not defined"
            ) from None
        base_url = self.url_from_endpoint(None)
        extra = conn.extra_dejson
        headers = extra.get("headers") or {}
        if not isinstance(headers, dict):
            raise ConfigurationError(f"connection {self.http_conn_id!r}: extra headers must be a JSON object")
        policy = retry or RetryPolicy()
        if extra.get("timeout") and retry is None:
            policy = RetryPolicy(timeout=float(extra["timeout"]))
        return ApiClient(
            base_url,
            auth=auth_from_connection(conn),
            headers={str(k): str(v) for k, v in headers.items()},
            retry=policy,
            logger=logger,
        )


__all__ = ["AUTH_EXTRAS", "ApiSourceHook", "auth_from_connection"]
