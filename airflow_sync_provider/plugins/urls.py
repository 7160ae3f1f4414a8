"""Where the status pages live, for the pages themselves and for the operators' extra links."""

from __future__ import annotations

from urllib.parse import quote, urlparse

#: Where the api-server mounts the status app.
URL_PREFIX = "/sync-status"


def detail_path(conn_id: str, schema: str, sync_id: str) -> str:
    """The detail page of a sync, relative to the app's mount point."""
    return f"/syncs/{quote(conn_id, safe='')}/{quote(schema, safe='')}/{quote(sync_id, safe='')}"


def api_base_url() -> str:
    """``[api] base_url`` without its trailing slash ("" when unset: links stay relative to the UI's host)."""
    from airflow.configuration import conf

    return (conf.get("api", "base_url", fallback="") or "").rstrip("/")


def base_path() -> str:
    """The path part of ``[api] base_url`` ("" at the root): where the api-server itself is mounted."""
    return urlparse(api_base_url()).path.rstrip("/")


__all__ = ["URL_PREFIX", "api_base_url", "base_path", "detail_path"]
