"""Where the status view reads: the target connections of ``[sync] status_conn_ids``, every schema
in them that holds sync evidence, and (for CDC syncs) the source connection the operators recorded.

A target or source that cannot be read becomes an error line on the page, never a failed page.
"""

from __future__ import annotations

import datetime as dt
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg

from airflow_sync_provider.core.errors import SyncError
from airflow_sync_provider.core.status import (
    SyncHistory,
    SyncStatus,
    evidence_schemas,
    read_slot_status,
    read_sync_history,
    read_sync_statuses,
)


@dataclass(frozen=True)
class TargetReport:
    """What one target connection says: its syncs' statuses, or why it could not be read."""

    conn_id: str
    statuses: tuple[SyncStatus, ...] = ()
    error: str | None = None
    #: Per CDC source connection that could not be read: why (its syncs show no slot figures).
    source_errors: dict[str, str] = field(default_factory=dict)


def configured_conn_ids() -> list[str]:
    """``[sync] status_conn_ids``: comma-separated Airflow connection ids of the targets to show."""
    from airflow.configuration import conf

    raw = conf.get("sync", "status_conn_ids", fallback="") or ""
    return [c.strip() for c in raw.split(",") if c.strip()]


def _target(conn_id: str) -> psycopg.Connection[Any]:
    from airflow_sync_provider.hooks.target import target_connection

    return target_connection(conn_id, sync_id=None)


def _with_slots(statuses: list[SyncStatus], errors: dict[str, str]) -> list[SyncStatus]:
    """CDC statuses with their slot read from the recorded source connection (one connection per source)."""
    from airflow_sync_provider.core.cdc.extract import open_source
    from airflow_sync_provider.hooks.source import source_engine

    wanted: dict[str, list[int]] = {}
    for i, status in enumerate(statuses):
        if status.kind == "cdc" and status.source_conn_id and status.slot_name:
            wanted.setdefault(status.source_conn_id, []).append(i)
    out = list(statuses)
    for source_conn_id, indexes in wanted.items():
        try:
            with (
                source_engine(source_conn_id, sync_id=statuses[indexes[0]].sync_id) as engine,
                closing(open_source(engine, statuses[indexes[0]].sync_id)) as source,
            ):
                for i in indexes:
                    slot_name = out[i].slot_name
                    assert slot_name is not None
                    out[i] = replace(out[i], slot=read_slot_status(source, slot_name))
        except (SyncError, psycopg.Error) as error:
            errors[source_conn_id] = str(error).splitlines()[0]
    return out


def read_target(conn_id: str, *, slots: bool = True) -> TargetReport:
    """Every sync status of every evidence schema of target ``conn_id``."""
    try:
        with closing(_target(conn_id)) as conn:
            statuses: list[SyncStatus] = []
            for schema in evidence_schemas(conn):
                statuses += read_sync_statuses(conn, schema)
    except (SyncError, psycopg.Error) as error:
        return TargetReport(conn_id, error=str(error).splitlines()[0])
    errors: dict[str, str] = {}
    if slots:
        statuses = _with_slots(statuses, errors)
    return TargetReport(conn_id, tuple(statuses), source_errors=errors)


def read_detail(
    conn_id: str, schema: str, sync_id: str, since: dt.datetime
) -> tuple[SyncStatus | None, SyncHistory | None, str | None]:
    """One sync's status (with its slot) and history, or the error that kept them from being read."""
    try:
        with closing(_target(conn_id)) as conn:
            found = read_sync_statuses(conn, schema, sync_ids=[sync_id])
            if not found:
                return None, None, None
            history = read_sync_history(conn, schema, sync_id, since)
    except (SyncError, psycopg.Error) as error:
        return None, None, str(error).splitlines()[0]
    errors: dict[str, str] = {}
    (status,) = _with_slots(found, errors)
    return status, history, "; ".join(f"source {k}: {v}" for k, v in errors.items()) or None


__all__ = ["TargetReport", "configured_conn_ids", "read_detail", "read_target"]
