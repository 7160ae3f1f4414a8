"""One read of the slot: what the decoders fill (:class:`ChangeRead`, a :class:`TableStream` per
table) and how a table's buffered changes become staged Parquet files and its manifest.

Both decoders (:mod:`.per_message`, the reference, and :mod:`.bulk`) share it, so they stage the
same files; :func:`~.extract.changes_to_staging` does what comes before and after a read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
import pyarrow as pa

from airflow_sync_provider.core.cdc import pgoutput, slot
from airflow_sync_provider.core.cdc.manifest import (
    LSN_COLUMN,
    MOVED_FROM_COLUMN,
    OP_COLUMN,
    SEQ_COLUMN,
    UNCHANGED_COLUMN,
    TruncateEvent,
)
from airflow_sync_provider.core.cdc.position import CdcPosition, SnapshotFilter
from airflow_sync_provider.core.cdc.session import NOT_UTF8
from airflow_sync_provider.core.cdc.spec import CdcSpec
from airflow_sync_provider.core.errors import DataError, SchemaError
from airflow_sync_provider.core.manifest import Manifest, ManifestColumn, StagedFile
from airflow_sync_provider.core.progress import Logger, Progress
from airflow_sync_provider.core.schema import validate_pg_type
from airflow_sync_provider.core.staging import StagingArea


@dataclass
class TableStream:
    """Staged changes of one table: column buffers flushed to a Parquet file every ``batch_rows``."""

    source: slot.SourceTableInfo
    relation: pgoutput.Relation | None = None
    columns: tuple[ManifestColumn, ...] = ()
    files: list[StagedFile] = field(default_factory=list)
    buffer: list[list[Any]] = field(default_factory=list)
    buffer_bytes: int = 0
    rows: int = 0
    #: The bulk decoder's buffer: Arrow batches in this schema, in commit order (instead of ``buffer``).
    pieces: list[pa.RecordBatch] = field(default_factory=list)

    def schema(self) -> pa.Schema:
        fields = [pa.field(c.name, pa.string()) for c in self.columns]
        fields += [
            pa.field(OP_COLUMN, pa.string()),
            pa.field(LSN_COLUMN, pa.int64()),
            pa.field(SEQ_COLUMN, pa.int64()),
            pa.field(UNCHANGED_COLUMN, pa.string()),
            pa.field(MOVED_FROM_COLUMN, pa.int64()),
        ]
        return pa.schema(fields)


@dataclass
class ChangeRead:
    """One read of the slot: what both decoders are given and what they hand back.

    The decoders (:mod:`.per_message`, the reference, and :mod:`.bulk`) fill the tables'
    streams and the counters; :func:`~.extract.changes_to_staging` does what comes before and after.
    """

    spec: CdcSpec
    conn: psycopg.Connection[Any]
    position: CdcPosition
    staging: StagingArea
    staging_dir: str
    streams: dict[int, TableStream]
    sql_ascii: bool
    heartbeat: str
    upto: int
    log: Logger
    progress: Progress
    snapshot_filter: SnapshotFilter | None
    #: Re-snapshotted tables: per source oid, the snapshot whose transactions are skipped for it.
    table_filters: dict[int, tuple[SnapshotFilter, int]]
    by_name: dict[tuple[str, str], int]
    pending_types: dict[tuple[int, int], str] = field(default_factory=dict)
    transactions: int = 0
    changes: int = 0
    skipped: int = 0
    truncates: list[TruncateEvent] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    last_commit: int = 0
    last_end: int = 0
    #: The heartbeat's transaction came back: everything committed before it was read.
    reached: bool = False
    heartbeat_end: int = 0

    def flush(self, stream: TableStream) -> None:
        flush_stream(self.staging, self.staging_dir, stream, self.conn, self.pending_types, self.spec)

    def relation_changed(self, stream: TableStream, txn_lsn: int, transactions: int) -> bool:
        """A table's columns changed mid-batch (its new Relation message has arrived): whether the batch
        must end before this transaction (the table has staged rows; ``transactions`` were read before
        it); fails if it is the first."""
        if not (stream.rows or stream.buffer or stream.pieces):
            stream.columns = ()
            return False
        # The table's columns changed mid-batch: end the batch before this transaction, so every
        # staged file has one shape; the next run starts with the new one.
        if not transactions:  # it is the first: ending before it would stall for ever
            raise SchemaError(
                f"the transaction committed at {pgoutput.int_to_lsn(txn_lsn)} changes this "
                "table's columns between two of its row changes, so its changes cannot be "
                "staged in one shape. Re-snapshot just this table (resnapshot_tables; the "
                "stream then skips that transaction for it, the other tables keep streaming)",
                sync_id=self.spec.sync_id,
                table=stream.source.qualified,
                rule="schema change inside a transaction",
            )
        self.notes.append(
            f"columns of {stream.source.qualified} changed at {pgoutput.int_to_lsn(txn_lsn)}; "
            "the batch ends before that transaction"
        )
        return True

    def new_relation(self, stream: TableStream, relation: pgoutput.Relation) -> None:
        stream.relation = relation
        self.pending_types.update(
            {
                (c.type_oid, c.type_modifier): ""
                for c in relation.columns
                if (c.type_oid, c.type_modifier) not in self.pending_types
            }
        )


def refuse_not_utf8(stream: TableStream, row: list[Any], spec: CdcSpec) -> None:
    """A SQL_ASCII source's value that is not UTF-8 cannot be staged: fail naming it (see NOT_UTF8)."""
    assert stream.relation is not None
    names = [c.name for c in stream.relation.columns]
    for name, value in zip(names, row, strict=False):
        if isinstance(value, pgoutput.NotUtf8):
            key = {k: row[names.index(k)] for k in stream.source.primary_key if k in names}
            raise DataError(
                f"a changed row holds {value.raw[:40]!r}, which is not valid UTF-8: {NOT_UTF8}",
                sync_id=spec.sync_id,
                table=stream.source.qualified,
                column=name,
                key=key,
                rule="encoding",
            )


def relation_shape(relation: pgoutput.Relation) -> tuple[tuple[str, int, int], ...]:
    return tuple((c.name, c.type_oid, c.type_modifier) for c in relation.columns)


def stream_columns(
    stream: TableStream, conn: psycopg.Connection[Any], pending_types: dict[tuple[int, int], str]
) -> tuple[ManifestColumn, ...]:
    assert stream.relation is not None
    unknown = {k for k, v in pending_types.items() if not v}
    if unknown:
        pending_types.update(slot.type_names(conn, unknown))
    return tuple(
        ManifestColumn(
            c.name, pending_types[(c.type_oid, c.type_modifier)].upper(), c.name not in stream.source.primary_key
        )
        for c in stream.relation.columns
    )


def catalog_columns(conn: psycopg.Connection[Any], table: slot.SourceTableInfo) -> tuple[ManifestColumn, ...]:
    rows = conn.execute(
        "SELECT a.attname, a.atttypid::int, a.atttypmod FROM pg_attribute a "
        "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (table.oid,),
    ).fetchall()
    names = slot.type_names(conn, {(r[1], r[2]) for r in rows})
    return tuple(ManifestColumn(r[0], _target_type(names[(r[1], r[2])]), r[0] not in table.primary_key) for r in rows)


def _target_type(source_type: str) -> str:
    """The source's type for the target column, or text for a type expression we would not put in DDL."""
    try:
        return validate_pg_type(source_type.upper())
    except ValueError:
        return "TEXT"


def flush_stream(
    staging: StagingArea,
    staging_dir: str,
    stream: TableStream,
    conn: psycopg.Connection[Any],
    pending_types: dict[tuple[int, int], str],
    spec: CdcSpec,
) -> None:
    if not stream.columns:
        stream.columns = stream_columns(stream, conn, pending_types)
    schema = stream.schema()
    if stream.pieces:
        batch = pa.Table.from_batches(stream.pieces, schema=schema)
    else:
        batch = pa.Table.from_arrays(
            [pa.array(list(col), type=f.type) for col, f in zip(zip(*stream.buffer, strict=True), schema, strict=True)],
            schema=schema,
        )
    label = staging.file_label(f"{stream.source.schema}.{stream.source.name}")
    name = f"{staging_dir}/{label}-{len(stream.files):05d}.parquet"
    with staging.open_writer(name, schema) as writer:
        writer.write_table(batch)
    stream.files.append(StagedFile(uri=name, rows=batch.num_rows))
    stream.rows += batch.num_rows
    stream.buffer.clear()
    stream.pieces.clear()
    stream.buffer_bytes = 0


def table_manifest(
    spec: CdcSpec,
    stream: TableStream,
    columns: tuple[ManifestColumn, ...],
    run_id: str,
    manifest_id: str,
    staging_dir: str,
) -> Manifest:
    return Manifest(
        sync_id=spec.sync_id,
        run_id=run_id,
        manifest_id=manifest_id,
        mode="cdc",
        source_table=stream.source.qualified,
        target_schema=spec.target_schema,
        target_table=spec.target_name(stream.source.qualified),
        primary_key=stream.source.primary_key,
        cursor_column=None,
        columns=columns,
        files=tuple(stream.files),
        rows=sum(f.rows for f in stream.files),
        base_version=0,
        watermark_low=None,
        watermark_high=None,
        staging_dir=staging_dir,
        delete_mode=spec.delete_mode,
        state_table=spec.state_table,
        schema_drift=spec.schema_drift,
        history_table=spec.history_table_of(stream.source.qualified),
    )
