"""Drain an event source into PostgreSQL: bounded batches, each loaded with its stream position in
one target transaction, then acknowledged.

Per batch:

1. read after the position committed in ``_sync_state`` (log-based sources) or whatever the broker
   redelivers (MQTT);
2. decode by the declared schema; what does not decode is quarantined (committed, idempotent);
3. keep the newest event per key by ``(event_time, sequence)`` (arrival order only breaks exact
   ties), then drop events the target already holds a newer-or-equal version of;
4. stage the rows as Parquet and load them with the table-sync load (:func:`~..load.load_manifest`:
   COPY into a temp stage + one set-based merge, the state row locked, the new position written,
   the ledger row, one commit);
5. only then acknowledge the batch to the broker.

A crash before 4's commit changes nothing in the target; a crash between it and 5 makes the next
read start after the committed position (logs) or the broker redeliver (MQTT), and the merge keyed
by the event (or entity) key turns the redelivery into a no-op.  Concurrent drains of one sync are
safe: each load applies only on top of the state version its batch was read at, so the second one
finds the version moved, commits nothing and rewinds.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from airflow_sync_provider.core.catalog import table_exists
from airflow_sync_provider.core.errors import DataError
from airflow_sync_provider.core.events.quarantine import EVENT_QUARANTINE_TABLE, quarantine_events
from airflow_sync_provider.core.events.schema import EventSchema, EventTransform, decode_events
from airflow_sync_provider.core.events.source import EventBatch, EventSource, Position
from airflow_sync_provider.core.events.spec import EventSpec
from airflow_sync_provider.core.extract import new_manifest_id
from airflow_sync_provider.core.load import LoadResult, load_manifest
from airflow_sync_provider.core.manifest import Manifest, StagedFile
from airflow_sync_provider.core.progress import LOG, Logger, PhaseObserver
from airflow_sync_provider.core.schema import validate_pg_type
from airflow_sync_provider.core.sqltext import execute
from airflow_sync_provider.core.staging import StagingArea
from airflow_sync_provider.core.state import SyncState, committed_state
from airflow_sync_provider.core.sync import start_state

_ARRIVAL = "__arrival"


@dataclass(frozen=True)
class BatchOutcome:
    """One batch: what came, what was quarantined or superseded, what the load did."""

    events: int
    quarantined: int
    superseded: int
    load: LoadResult
    position: Position | None


@dataclass
class DrainResult:
    """What a drain did (small enough for XCom)."""

    sync_id: str
    batches: int = 0
    events: int = 0
    bytes: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    quarantined: int = 0
    #: Events older than (or as old as) a version of their key in the batch or the target.
    superseded: int = 0
    stale_batches: int = 0
    position: Position | None = None
    version: int = 0
    seconds: float = 0.0

    def add(self, batch: EventBatch, outcome: BatchOutcome) -> None:
        self.batches += 1
        self.events += outcome.events
        self.bytes += batch.bytes
        self.quarantined += outcome.quarantined
        self.superseded += outcome.superseded
        if outcome.load.status == "applied":
            self.inserted += outcome.load.inserted
            self.updated += outcome.load.updated
            self.unchanged += outcome.load.unchanged
            self.position = outcome.position
            self.version = outcome.load.version
        else:
            self.stale_batches += 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def committed_position(state: SyncState | None) -> Position | None:
    """The stream position a committed event-sync state holds (its watermark's one element)."""
    if state is None or not isinstance(state.watermark, list) or not state.watermark:
        return None
    position = state.watermark[0]
    return position if isinstance(position, dict) else None


def drain_events(
    source: EventSource,
    conn: psycopg.Connection[Any],
    spec: EventSpec,
    *,
    staging: StagingArea | None = None,
    run_id: str = "manual",
    wait: float = 1.0,
    max_batches: int | None = None,
    max_seconds: float | None = None,
    transform: EventTransform | None = None,
    logger: Logger | None = None,
    observer: PhaseObserver | None = None,
) -> DrainResult:
    """Load batches until the source has nothing for ``wait`` seconds (or a bound is reached).

    ``max_batches`` / ``max_seconds`` bound a drain under a publisher that never stops (the next
    run continues from the committed position).  ``observer`` sees the load's phases and
    ``"acknowledged"`` after the broker was told.
    """
    log = logger or LOG
    staging = staging or StagingArea()
    started = time.monotonic()
    result = DrainResult(spec.sync_id)
    start_state(conn, spec, staging, log)  # for its sweep: each batch reads the state it loads on
    while max_batches is None or result.batches < max_batches:
        if max_seconds is not None and time.monotonic() - started >= max_seconds:
            break
        outcome, batch = load_next_batch(
            source,
            conn,
            spec,
            staging=staging,
            run_id=run_id,
            wait=wait,
            transform=transform,
            logger=log,
            observer=observer,
        )
        if batch is None or outcome is None:
            break
        result.add(batch, outcome)
    if result.position is None and result.version == 0:
        final = committed_state(conn, spec)
        result.position, result.version = committed_position(final), final.version if final else 0
    result.seconds = round(time.monotonic() - started, 3)
    log.info(
        "event sync %s: %d batch(es), %d event(s) (%d bytes): %d inserted, %d updated, %d unchanged, "
        "%d superseded, %d quarantined, %d stale batch(es); position %s (version %d) in %.2f s",
        spec.sync_id, result.batches, result.events, result.bytes, result.inserted, result.updated,
        result.unchanged, result.superseded, result.quarantined, result.stale_batches, result.position,
        result.version, result.seconds,
    )  # fmt: skip
    return result


def load_next_batch(
    source: EventSource,
    conn: psycopg.Connection[Any],
    spec: EventSpec,
    *,
    staging: StagingArea,
    run_id: str,
    wait: float = 1.0,
    transform: EventTransform | None = None,
    logger: Logger | None = None,
    observer: PhaseObserver | None = None,
) -> tuple[BatchOutcome | None, EventBatch | None]:
    """Read, decode, quarantine, load and acknowledge one batch; ``(None, None)`` when none came."""
    log = logger or LOG
    state = committed_state(conn, spec)
    after = committed_position(state) if source.positioned else None
    batch = source.read(after, max_events=spec.batch_events, max_bytes=spec.batch_bytes, wait=wait)
    if not batch.events:
        return None, None
    try:
        decoded = decode_events(batch.events, spec.schema)
        quarantined = quarantine_events(conn, spec.target_schema, spec.sync_id, decoded.rejected, run_id)
        if decoded.rejected:
            log.warning(
                "event sync %s: %d of %d event(s) quarantined in %s.%s (%d new), first: %s",
                spec.sync_id, len(decoded.rejected), len(batch.events), spec.target_schema,
                EVENT_QUARANTINE_TABLE, quarantined, decoded.rejected[0].reason,
            )  # fmt: skip
        rows = apply_transform(decoded.rows, spec, transform)
        newest = newest_per_key(rows, spec.schema)
        fresh = drop_superseded(conn, spec, newest)
        manifest = stage_rows(staging, spec, fresh, state, after=after, end=batch.end, run_id=run_id, source=source)
        load = load_manifest(conn, manifest, run_id=run_id, logger=log, observer=observer)
    except BaseException:
        source.rewind()
        raise
    if load.status == "applied":
        source.acknowledge(batch)
        if observer is not None:
            observer("acknowledged", {"events": len(batch.events), "position": batch.end})
    else:
        source.rewind()
    superseded = rows.num_rows - fresh.num_rows
    return BatchOutcome(len(batch.events), len(decoded.rejected), superseded, load, batch.end), batch


def apply_transform(rows: pa.Table, spec: EventSpec, transform: EventTransform | None) -> pa.Table:
    """The decoded rows through a pandas transform (declared columns in, declared columns out)."""
    if transform is None or rows.num_rows == 0:
        return rows
    frame = transform(rows.to_pandas())
    try:
        return pa.Table.from_pandas(frame, schema=spec.schema.arrow_schema, preserve_index=False)
    except (pa.ArrowException, KeyError, ValueError, TypeError) as error:
        raise DataError(
            f"the transform's result does not fit the declared event schema: {error}",
            sync_id=spec.sync_id,
            table=spec.qualified_target,
            rule="event schema",
        ) from error


def newest_per_key(rows: pa.Table, schema: EventSchema) -> pa.Table:
    """One row per key: the newest by ``(event_time, sequence)``, the later arrival on a tie."""
    if rows.num_rows < 2:
        return rows
    indexed = rows.append_column(_ARRIVAL, pa.array(range(rows.num_rows), pa.int64()))
    order = [(k, "ascending") for k in schema.key] + [(c, "ascending") for c in (*schema.order, _ARRIVAL)]
    ordered = indexed.take(pc.sort_indices(indexed, sort_keys=order))
    last = None
    for name in schema.key:
        column = ordered.column(name)
        differs = pc.not_equal(column.slice(0, ordered.num_rows - 1), column.slice(1))
        last = differs if last is None else pc.or_(last, differs)
    assert last is not None
    keep = pa.concat_arrays([*last.chunks, pa.array([True])]) if last.num_chunks else pa.array([True])
    newest = ordered.filter(keep)
    # Back in arrival order (a stable, readable staged file), without the helper column.
    return newest.take(pc.sort_indices(newest, sort_keys=[(_ARRIVAL, "ascending")])).drop_columns([_ARRIVAL])


def drop_superseded(conn: psycopg.Connection[Any], spec: EventSpec, rows: pa.Table) -> pa.Table:
    """Leave out events whose key the target holds at a newer or equal ``(event_time, sequence)``.

    Read before the load's transaction: a load of this sync committing in between moves the state
    version, so the batch is then refused as stale and read again, never applied over it.
    """
    schema = spec.schema
    if not schema.order or rows.num_rows == 0 or not table_exists(conn, spec.target_schema, spec.target_table):
        return rows
    columns = [*schema.key, *schema.order]
    arrays = sql.SQL(", ").join(
        sql.SQL("%s::{}[]").format(sql.SQL(validate_pg_type(schema.pg_type(c)))) for c in columns
    )
    aliases = sql.SQL(", ").join(sql.Identifier(f"b{i}") for i in range(len(columns)))
    match = sql.SQL(" AND ").join(
        sql.SQL("n.{} = b.{}").format(sql.Identifier(k), sql.Identifier(f"b{i}")) for i, k in enumerate(schema.key)
    )
    target_order = sql.SQL(", ").join(sql.SQL("n.{}").format(sql.Identifier(c)) for c in schema.order)
    batch_order = sql.SQL(", ").join(sql.Identifier(f"b{len(schema.key) + i}") for i in range(len(schema.order)))
    query = sql.SQL(
        "SELECT b.ordinality - 1 FROM unnest({arrays}) WITH ORDINALITY AS b({aliases}, ordinality) "
        "JOIN {target} n ON {match} WHERE ({target_order}) >= ({batch_order})"
    ).format(
        arrays=arrays,
        aliases=aliases,
        target=sql.Identifier(spec.target_schema, spec.target_table),
        match=match,
        target_order=target_order if len(schema.order) > 1 else sql.SQL("ROW({})").format(target_order),
        batch_order=batch_order if len(schema.order) > 1 else sql.SQL("ROW({})").format(batch_order),
    )
    stale = {r[0] for r in execute(conn, query, [rows.column(c).to_pylist() for c in columns]).fetchall()}
    if not stale:
        return rows
    return rows.filter(pa.array([i not in stale for i in range(rows.num_rows)]))


def stage_rows(
    staging: StagingArea,
    spec: EventSpec,
    rows: pa.Table,
    state: SyncState | None,
    *,
    after: Position | None,
    end: Position | None,
    run_id: str,
    source: EventSource,
) -> Manifest:
    """Write the batch's rows as one Parquet file and describe it for the table-sync load.

    The stream position goes into the manifest's watermark (``[position]``), so the load commits it
    to ``_sync_state`` with the rows; the state version pins the batch to the state it was read at.
    """
    manifest_id = new_manifest_id()
    batch_dir = staging.batch_uri(spec.sync_id, manifest_id)
    files: tuple[StagedFile, ...] = ()
    if rows.num_rows:
        uri = f"{batch_dir}/part-00000.parquet"
        with staging.open_writer(uri, rows.schema) as writer:
            writer.write_table(rows)
        files = (StagedFile(uri, rows.num_rows),)
    manifest = Manifest(
        sync_id=spec.sync_id,
        run_id=run_id,
        manifest_id=manifest_id,
        mode="events",
        source_table=f"{source.kind}:{source.name}",
        target_schema=spec.target_schema,
        target_table=spec.target_table,
        primary_key=spec.schema.key,
        cursor_column=spec.schema.event_time,
        columns=spec.schema.manifest_columns,
        files=files,
        rows=rows.num_rows,
        base_version=state.version if state else 0,
        watermark_low=[after] if after is not None else None,
        watermark_high=[end] if end is not None else None,
        extracted_at=dt.datetime.now(dt.UTC).isoformat(),
        staging_dir=batch_dir,
        delete_mode="none",
        state_table=spec.state_table,
        schema_drift=spec.schema_drift,
    )
    staging.write_manifest(manifest)
    return manifest


__all__ = [
    "BatchOutcome",
    "DrainResult",
    "apply_transform",
    "committed_position",
    "drain_events",
    "drop_superseded",
    "load_next_batch",
    "newest_per_key",
    "stage_rows",
]
