"""A hook for the PostgreSQL side of change data capture: the replication slot and its publication.

Thin wrappers over :mod:`airflow_sync_provider.core.cdc.slot`; the CDC source is an ordinary
``postgres`` (or any PostgreSQL-reachable ``sync_sqlalchemy``) Airflow connection whose user has
the REPLICATION privilege, on a server with ``wal_level=logical``.
"""

from __future__ import annotations

from contextlib import closing
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.conninfo import make_conninfo

from airflow_sync_provider.core.cdc import CdcSpec
from airflow_sync_provider.core.cdc import slot as cdc_slot
from airflow_sync_provider.core.cdc.pgoutput import int_to_lsn
from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.hooks.source import SyncSourceHook

#: ``tables`` placeholder for a spec that only names a slot and a publication (sensors, triggers).
ANY_TABLES = ("*",)


def slot_spec(sync_id: str = "", slot_name: str = "", publication: str = "") -> CdcSpec:
    """The slot and publication names of a sync, with the same defaults as the sync's own ``CdcSpec``."""
    if not (sync_id or slot_name):
        raise ConfigurationError("give sync_id or slot_name to name the replication slot")
    return CdcSpec(
        sync_id=sync_id or slot_name,
        tables=ANY_TABLES,
        slot_name=slot_name,
        publication=publication or ("" if sync_id else slot_name),
    )


class PostgresCdcHook(SyncSourceHook):
    """The CDC source: a psycopg connection, the slot's lag and pending changes, slot set-up and removal."""

    conn_type = "postgres"
    hook_name = "PostgreSQL CDC source (Database Sync)"

    def get_sqlalchemy_url(self) -> sa.URL:
        url = super().get_sqlalchemy_url()
        if url.get_backend_name() != "postgresql":
            raise ConfigurationError(
                f"connection {self.source_conn_id!r} is a {url.get_backend_name()} database; CDC needs PostgreSQL"
            )
        return url

    def get_conninfo(self) -> str:
        """A libpq connection string (password included: never log it) for psycopg, sync or async.

        Built from the source URL's parts and query, plus the connection extras the PostgreSQL
        provider passes to the driver (``sslmode``, ``sslrootcert``, ``options``...).
        """
        url = self.get_sqlalchemy_url()
        query = {k: v if isinstance(v, str) else ",".join(v) for k, v in url.query.items()}
        return make_conninfo(
            "",
            host=url.host,
            port=url.port,
            user=url.username,
            password=url.password,
            dbname=url.database,
            **{**query, **self.get_connect_args()},
        )

    def get_cdc_connection(self, sync_id: str | None = None) -> psycopg.Connection[Any]:
        """A psycopg connection in autocommit mode; the caller closes it."""
        try:
            return psycopg.connect(self.get_conninfo(), autocommit=True)
        except psycopg.OperationalError as error:
            raise cdc_slot.connect_error(error, sync_id or self.source_conn_id) from error

    def slot_info(self, spec: CdcSpec) -> cdc_slot.SlotInfo:
        with closing(self.get_cdc_connection(spec.sync_id)) as conn:
            return cdc_slot.slot_info(conn, spec.slot_name)

    def slot_lag(self, spec: CdcSpec, *, check_pending: bool = True) -> dict[str, Any]:
        """How far behind the slot is: retained WAL, confirmed position, and whether data changes wait.

        ``pending`` is ``None`` when it is not known: the slot is missing, another session is reading
        it (a sync is running), or ``check_pending=False`` (peeking decodes WAL, so it is not free).
        """
        with closing(self.get_cdc_connection(spec.sync_id)) as conn:
            info = cdc_slot.slot_info(conn, spec.slot_name)
            published = publication_exists(conn, spec.publication)
            pending: bool | None = None
            if info.exists and published and check_pending:
                pending = _pending_or_none(conn, spec)
        confirmed = info.confirmed_flush_lsn
        return {
            "sync_id": spec.sync_id,
            "slot": spec.slot_name,
            "publication": spec.publication,
            "exists": info.exists,
            "confirmed_flush_lsn": int_to_lsn(confirmed) if confirmed is not None else None,
            "current_lsn": int_to_lsn(info.current_lsn),
            "retained_wal_bytes": info.retained_bytes,
            "publication_exists": published,
            "wal_status": info.wal_status,
            "active": info.active,
            "pending": pending,
            "description": info.describe(),
        }

    def has_pending_changes(self, spec: CdcSpec) -> bool:
        """Whether the slot holds data changes not yet confirmed (fails if the slot is missing or busy)."""
        with closing(self.get_cdc_connection(spec.sync_id)) as conn:
            cdc_slot.check_slot_usable(cdc_slot.slot_info(conn, spec.slot_name), spec)
            if not publication_exists(conn, spec.publication):
                raise ConfigurationError(missing_publication_message(spec.publication), sync_id=spec.sync_id)
            return cdc_slot.has_pending_changes(conn, spec.slot_name, spec.publication)

    def drop_slot(self, spec: CdcSpec) -> bool:
        """Drop the sync's slot (frees the WAL it retains); returns whether it existed.

        The sync's next run then fails until its state row is reset (a new initial snapshot).
        """
        with closing(self.get_cdc_connection(spec.sync_id)) as conn:
            return cdc_slot.drop_slot(conn, spec.slot_name)

    def ensure_ready(self, spec: CdcSpec) -> cdc_slot.SlotInfo:
        """Check the source (wal_level, privileges, keys), create the publication and the slot if missing."""
        with closing(self.get_cdc_connection(spec.sync_id)) as conn:
            tables = cdc_slot.check_source(conn, spec)
            cdc_slot.ensure_publication(conn, spec, tables)
            return cdc_slot.ensure_slot(conn, spec)


def publication_exists(conn: psycopg.Connection[Any], publication: str) -> bool:
    row = conn.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
    return bool(row and row[0])


def missing_publication_message(publication: str) -> str:
    # PostgreSQL 18 decodes a slot whose publication is missing as if nothing changed (a WARNING only).
    return (
        f"publication {publication!r} does not exist, so the slot shows no changes at all; changes committed "
        "while it is missing are never decoded: reset the sync (a new initial snapshot)"
    )


def _pending_or_none(conn: psycopg.Connection[Any], spec: CdcSpec) -> bool | None:
    try:
        return cdc_slot.has_pending_changes(conn, spec.slot_name, spec.publication)
    except psycopg.errors.ObjectInUse:
        return None  # a sync is reading the slot right now


__all__ = ["PostgresCdcHook", "missing_publication_message", "publication_exists", "slot_spec"]
