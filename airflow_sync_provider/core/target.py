"""The target of a sync: its table's description, creation from the batch's columns and checks, and
the idle connection a step that runs its own transactions starts from.

Both the load (:mod:`.load`) and the SCD2 history (:mod:`.history`) describe tables with
:class:`TargetTable`; the catalog reads behind it are in :mod:`.catalog`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from airflow_sync_provider.core import drift
from airflow_sync_provider.core.catalog import column_types, unique_keys
from airflow_sync_provider.core.errors import SchemaError, SyncError
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.progress import LOG
from airflow_sync_provider.core.schema import TYPES_WITHOUT_EQUALITY, validate_pg_type
from airflow_sync_provider.core.spec import DELETED_AT_COLUMN, RUN_ID_COLUMN, SYNCED_AT_COLUMN
from airflow_sync_provider.core.state import SourceSchema, read_source_schema, write_source_schema


@dataclass(frozen=True)
class TargetTable:
    schema: str
    name: str
    column_types: dict[str, str]
    #: Source columns ``schema_drift="discard"`` leaves out of this load.
    discarded: tuple[str, ...] = ()
    #: Created by this load's transaction (no other session can see it yet).
    created: bool = False

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"


def idle_autocommit(conn: psycopg.Connection[Any], *, step: str, sync_id: str) -> None:
    """Before a step that runs its own transactions (load, gate, replay, reconciliation, repair): the
    target connection must be outside any transaction; it is switched to autocommit."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise SyncError(f"{step} needs a target connection outside any transaction", sync_id=sync_id)
    conn.autocommit = True


def target_table(conn: psycopg.Connection[Any], schema: str, name: str) -> TargetTable:
    """``schema.name`` as it is now (no columns: it does not exist)."""
    return TargetTable(schema, name, column_types(conn, schema, name) or {})


def metadata_columns(manifest: Manifest) -> list[tuple[str, str]]:
    """The ``_sync_*`` columns the load keeps in the target table (name, type)."""
    columns = [(RUN_ID_COLUMN, "TEXT"), (SYNCED_AT_COLUMN, "TIMESTAMP WITH TIME ZONE")]
    if manifest.delete_mode == "soft":
        columns.append((DELETED_AT_COLUMN, "TIMESTAMP WITH TIME ZONE"))
    return columns


def ensure_target_table(conn: psycopg.Connection[Any], manifest: Manifest) -> TargetTable:
    """Create the target table from the manifest's schema if missing, or check the existing one fits.

    Inside the load's transaction.  Changes of the source's columns since the last committed load
    follow the manifest's ``schema_drift`` policy (:mod:`.drift`: fail, alter the target, or leave
    new columns out), and the columns synced are recorded in the state row with the data.
    """
    schema, name = manifest.target_schema, manifest.target_table
    display = f"{schema}.{name}"
    reserved = [c.name for c in manifest.columns if c.name in (RUN_ID_COLUMN, SYNCED_AT_COLUMN, DELETED_AT_COLUMN)]
    if reserved:
        raise SchemaError(
            f"the source has column(s) {reserved} named like the metadata columns the load keeps in the target "
            f"({RUN_ID_COLUMN}, {SYNCED_AT_COLUMN}, {DELETED_AT_COLUMN}); leave them out with columns=(...) "
            "or rename them in a source view",
            sync_id=manifest.sync_id,
            table=display,
            column=reserved,
            rule="reserved column name",
        )
    existing = column_types(conn, schema, name)
    known = read_source_schema(conn, schema, manifest.state_table, manifest.sync_id, display)
    kind = "cdc" if manifest.mode == "cdc" else "table"

    def record() -> None:
        columns = SourceSchema(kind, tuple(drift.recorded_columns(manifest)))
        if columns != known:
            write_source_schema(conn, schema, manifest.state_table, manifest.sync_id, display, columns)

    if existing is None:
        definitions = [
            sql.SQL("{} {}{}").format(
                sql.Identifier(c.name),
                sql.SQL(validate_pg_type(c.pg_type)),
                sql.SQL(" NOT NULL") if c.name in manifest.primary_key else sql.SQL(""),
            )
            for c in manifest.columns
        ]
        definitions += [sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in metadata_columns(manifest)]
        definitions.append(
            sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, manifest.primary_key)))
        )
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("CREATE TABLE {} ({})").format(sql.Identifier(schema, name), sql.SQL(", ").join(definitions))
        )
        LOG.info("sync %s: created target table %s from the source schema", manifest.sync_id, display)
        existing = column_types(conn, schema, name)
        assert existing is not None
        record()
        return TargetTable(schema, name, existing, created=True)

    same_kind = known is not None and known.kind == kind
    plan = drift.apply_drift(conn, manifest, known.columns if known else None, existing, LOG, check_types=same_kind)
    if plan.discarded:
        manifest = drift.narrowed(manifest, plan.discarded)  # what record() writes
    if plan.statements:
        existing = column_types(conn, schema, name)
        assert existing is not None
    if set(manifest.primary_key) not in unique_keys(conn, schema, name):
        raise SchemaError(
            f"the target table has no primary key or unique index on ({', '.join(manifest.primary_key)}); "
            "the merge needs one to match rows",
            sync_id=manifest.sync_id,
            table=display,
            column=list(manifest.primary_key),
        )
    for column, pg_type in metadata_columns(manifest):
        if column not in existing:
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                    sql.Identifier(schema, name), sql.Identifier(column), sql.SQL(pg_type)
                )
            )
            existing[column] = pg_type.lower()
    record()
    return TargetTable(schema, name, existing, tuple(plan.discarded))


def comparable(alias: str, column: str, target: TargetTable) -> sql.Composable:
    """``alias.column`` in a form ``IS DISTINCT FROM`` can compare (for queries run with parameters)."""
    ref = sql.Identifier(alias, column)
    base_type = target.column_types.get(column, "").split("(")[0].strip().lower()
    return sql.SQL("{}::text").format(ref) if base_type in TYPES_WITHOUT_EQUALITY else ref


__all__ = ["TargetTable", "comparable", "ensure_target_table", "idle_autocommit", "metadata_columns", "target_table"]
