"""Airflow Assets for the tables a sync writes, so downstream DAGs can be scheduled on them.

A table's asset URI is ``postgres://host:port/database/schema/table``: the form the Airflow postgres
provider validates and turns into the OpenLineage dataset ``postgres://host:port`` /
``database.schema.table``, so Airflow, lineage tools and other DAGs all recognise the table.  Host,
port and database come from the Airflow connection, and a DAG file must not look connections up
(in most deployments that is a metadata-database or secrets-backend call at every parse).  So a DAG
declares an :class:`~airflow.sdk.AssetAlias` with a name made of names only (:func:`table_asset`:
``<conn id>.<schema>.<table>``), in a task's ``outlets`` and in the ``schedule`` of the DAGs that
consume it; the operator, at run time, looks the connection up and emits the asset event of the
real ``postgres://`` asset through that alias (:func:`emit_table_events`), with ``extra`` holding
the watermark range and the row counts.  Airflow resolves the alias to the asset at the first
event and triggers the consumers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from airflow.sdk import Asset, AssetAlias

from airflow_sync_provider.core.errors import SyncError
from airflow_sync_provider.lineage import TableWrite, connection_url, postgres_asset_uri

#: The group of the aliases (and the assets) of synced tables in the Airflow UI.
ASSET_GROUP = "sync"


def table_asset(conn_id: str, schema: str, table: str) -> AssetAlias:
    """The alias of table ``schema.table`` in the database of connection ``conn_id``.

    Named ``<conn id>.<schema>.<table>``: built from names only, so a DAG file creates it at parse
    time without looking the connection up.  Put it in the writing task's ``outlets`` and in the
    consuming DAG's ``schedule``; the sync operators emit the ``postgres://`` asset through it.
    """
    return AssetAlias(name=table_alias_name(conn_id, schema, table), group=ASSET_GROUP)


def table_alias_name(conn_id: str, schema: str, table: str) -> str:
    return f"{conn_id}.{schema}.{table}"


def table_asset_uri(conn_id: str, schema: str, table: str) -> str:
    """``postgres://host:port/database/schema/table`` of the table (looks the connection up: run time only)."""
    return postgres_asset_uri(connection_url(conn_id), schema, table)


def event_extra(write: TableWrite) -> dict[str, Any]:
    """What an asset event of ``write`` carries: row counts, then the range (watermark, LSN...) given."""
    return {"inserted": write.inserted, "updated": write.updated, "deleted": write.deleted, **write.extra}


def emit_table_events(
    context: Mapping[str, Any], outlets: Iterable[Any], conn_id: str, writes: Sequence[TableWrite], log: Any = None
) -> list[str]:
    """Add the asset events of the tables ``writes`` names (in the database of ``conn_id``) to the
    task's outlets; returns the URIs emitted.

    * an :class:`AssetAlias` named ``<conn_id>.<schema>.<table>`` (:func:`table_asset`) gets the
      event of that table's ``postgres://`` asset; an alias with another name gets it only when the
      task wrote a single table (so a hand-named alias on a one-table sync works too);
    * an :class:`Asset` whose URI is a written table's gets its event's ``extra`` (Airflow emits it).
    """
    events = context.get("outlet_events")
    outlets = list(outlets or ())
    if events is None or not outlets or not writes:
        return []
    try:
        uris = [table_asset_uri(conn_id, w.schema, w.table) for w in writes]
    except SyncError as error:  # the data is committed: failing the task now would only retry it for nothing
        if log is not None:
            log.warning("asset events not emitted: %s", error)
        return []
    by_alias = {table_alias_name(conn_id, w.schema, w.table): (w, uri) for w, uri in zip(writes, uris, strict=True)}
    emitted: list[str] = []
    for outlet in outlets:
        if isinstance(outlet, AssetAlias):
            found = by_alias.get(outlet.name) or ((writes[0], uris[0]) if len(writes) == 1 else None)
            if found is None:
                if log is not None:
                    log.warning("outlet alias %r names no table this task wrote (%s)", outlet.name, sorted(by_alias))
                continue
            write, uri = found
            events[outlet].add(Asset(uri=uri, group=ASSET_GROUP), extra=event_extra(write))
            emitted.append(uri)
        elif isinstance(outlet, Asset):
            for write, uri in zip(writes, uris, strict=True):
                if outlet.uri == uri:
                    events[outlet].extra.update(event_extra(write))
                    emitted.append(uri)
    if emitted and log is not None:
        log.info("asset events: %s", ", ".join(emitted))
    return emitted


def emit_table_event(
    context: Mapping[str, Any],
    conn_id: str,
    schema: str,
    table: str,
    *,
    inserted: int = 0,
    updated: int = 0,
    deleted: int = 0,
    **extra: Any,
) -> list[str]:
    """For a ``@task`` that writes ``schema.table`` itself: emit its event through the task's
    :func:`table_asset` outlet (an alias emits nothing unless the task adds an event)."""
    task = context.get("task")
    write = TableWrite(schema, table, inserted, updated, deleted, extra=dict(extra))
    return emit_table_events(context, getattr(task, "outlets", ()), conn_id, [write], getattr(task, "log", None))


__all__ = [
    "ASSET_GROUP",
    "emit_table_event",
    "emit_table_events",
    "event_extra",
    "table_alias_name",
    "table_asset",
    "table_asset_uri",
]
