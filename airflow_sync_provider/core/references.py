"""Referential integrity of a staged batch against a table in the target, checked before the load.

Great Expectations validates a batch on its own; "every loan points to an existing customer" needs
the target.  The check reads only the referencing column (and the key, for the message) from the
staged files, chunk by chunk, and asks the target which values its referenced table lacks, with
an index-friendly anti-join over a bound array per chunk: nothing is loaded, nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql

from airflow_sync_provider.core.errors import ConfigurationError, DataError
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.schema import validate_pg_type
from airflow_sync_provider.core.sqltext import execute
from airflow_sync_provider.core.staging import iter_staged_batches

_CHUNK_ROWS = 50_000


@dataclass(frozen=True)
class Reference:
    """``column`` of the batch must exist in ``schema.table.ref_column`` of the target."""

    column: str
    schema: str
    table: str
    ref_column: str

    @classmethod
    def parse(cls, column: str, references: str) -> Reference:
        parts = references.split(".")
        if len(parts) != 3 or not all(parts):
            raise ConfigurationError(
                f"references must look like 'schema.table.column', not {references!r}", rule="referential integrity"
            )
        return cls(column, *parts)

    def describe(self) -> str:
        return f"{self.column} -> {self.schema}.{self.table}.{self.ref_column}"


@dataclass
class ReferenceResult:
    reference: Reference
    rows_checked: int = 0
    orphans: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.orphans == 0


def check_references(
    conn: psycopg.Connection[Any], manifest: Manifest, references: Sequence[Reference], *, examples: int = 5
) -> list[ReferenceResult]:
    """Check every reference; raise :class:`DataError` naming the rows whose value has no parent."""
    column_types = {c.name: c.pg_type for c in manifest.columns}
    results = []
    for reference in references:
        if reference.column not in column_types:
            raise ConfigurationError(
                f"the batch has no column {reference.column!r} to check ({reference.describe()})",
                sync_id=manifest.sync_id,
                table=f"{manifest.target_schema}.{manifest.target_table}",
                column=reference.column,
                rule="referential integrity",
            )
        result = ReferenceResult(reference)
        array_type = sql.SQL(validate_pg_type(column_types[reference.column]) + "[]")
        query = sql.SQL(
            "SELECT v FROM unnest(%s::{array_type}) AS u(v) "
            "WHERE v IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE p.{ref} = u.v)"
        ).format(
            array_type=array_type,
            parent=sql.Identifier(reference.schema, reference.table),
            ref=sql.Identifier(reference.ref_column),
        )
        wanted = list(dict.fromkeys([*manifest.primary_key, reference.column]))  # the column may be a key column
        for staged in manifest.files:
            for batch in iter_staged_batches(staged.uri, _CHUNK_ROWS):
                table = pa.Table.from_batches([batch]).select(wanted)
                values = table.column(reference.column).to_pylist()
                result.rows_checked += len(values)
                missing = {row[0] for row in execute(conn, query, (list(set(values)),))}
                if not missing:
                    continue
                for row in table.to_pylist():
                    if row[reference.column] in missing:
                        result.orphans += 1
                        if len(result.examples) < examples:
                            result.examples.append(row)
        results.append(result)
    failed = [r for r in results if not r.ok]
    if failed:
        first = failed[0]
        shown = ", ".join("(" + ", ".join(f"{k}={v}" for k, v in example.items()) + ")" for example in first.examples)
        raise DataError(
            f"{first.orphans} of {first.rows_checked} rows point to no existing row "
            f"({first.reference.describe()}); examples: {shown}; nothing was loaded",
            sync_id=manifest.sync_id,
            table=f"{manifest.target_schema}.{manifest.target_table}",
            column=first.reference.column,
            key={k: first.examples[0][k] for k in manifest.primary_key} if first.examples else None,
            rule="referential integrity",
        )
    return results


__all__ = ["Reference", "ReferenceResult", "check_references"]
