"""Streaming by micro-batches: one exactly-once batch after another, for a bounded time.

A streaming task is a loop over an ordinary batch (for CDC, :func:`~.cdc.run_cdc_sync`; for an
incremental table sync, :func:`~.sync.run_sync`): each batch
commits its data with its position in one target transaction, so stopping between batches, or
killing the process inside one, loses and duplicates nothing, and the next run resumes from the
committed position.  The loop

* ends by itself after ``stream_for`` seconds, so the scheduler's next run takes over (a worker slot
  is held only while a run streams, and no replication slot stays active between runs);
* asks a cheap ``probe`` before each batch when it has one (for CDC: a peek at the slot, which writes
  nothing on the source; for a table: one indexed query for a row past the watermark) and sleeps
  ``poll_interval`` when there is nothing to do; after a batch that applied changes it goes on at
  once, to catch up;
* stops at once when asked (:class:`StopFlag`, set by ``on_kill``, SIGTERM or a test): a sleep is
  cut short, a batch in flight finishes its one transaction (or is rolled back with its process);
* logs throughput and lag every ``log_every`` seconds.

Nothing here knows Airflow; the operator and the reference DAG give it their step and stop flag.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from airflow_sync_provider.core.cdc import CdcSpec, run_cdc_sync
from airflow_sync_provider.core.cdc import slot as cdc_slot
from airflow_sync_provider.core.cdc.extract import SourceSession
from airflow_sync_provider.core.errors import ConfigurationError, SyncError
from airflow_sync_provider.core.extract import BatchTransform, compute_upper_bound, keyset_after
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.progress import Logger
from airflow_sync_provider.core.source import SourceTable, orderable, reflect_source
from airflow_sync_provider.core.spec import SyncSpec
from airflow_sync_provider.core.staging import StagingArea, memory_staging
from airflow_sync_provider.core.state import committed_state
from airflow_sync_provider.core.sync import run_sync
from airflow_sync_provider.core.values import decode_row, decode_value

#: Seconds between two throughput/lag lines of a stream.
LOG_EVERY = 30.0
#: An idle CDC stream still runs a batch (whose heartbeat lets the slot advance) once the slot
#: retains this much WAL written by others, so peeks stay cheap and the source can recycle WAL.
IDLE_ADVANCE_BYTES = 16 * 1024 * 1024
#: A stream's change batch staged in memory ends at the first transaction boundary past this many
#: bytes of changes (pgoutput messages), which bounds the memory a catch-up takes.
MEMORY_BATCH_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class BatchOutcome:
    """What one micro-batch did: ``changes`` applied (0: nothing to do) and, when the step knows it,
    ``lag_seconds`` from the newest applied change's commit at the source to its commit here."""

    changes: int
    lag_seconds: float | None = None
    detail: str = ""


class StopFlag:
    """Ask a running stream to stop; thread- and signal-safe (a :class:`threading.Event`)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def request(self, reason: str = "stop requested") -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return early (True) when a stop is requested."""
        return self._event.wait(max(seconds, 0.0))


@contextmanager
def stop_on_signals(stop: StopFlag, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[StopFlag]:
    """Turn ``signals`` into a stop request while the block runs (main thread only; else a no-op).

    The previous handler is called too (Airflow's task runner calls ``on_kill`` from its own), and
    restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.request(f"signal {signal.Signals(signum).name}")
        earlier = previous.get(signum)
        if callable(earlier) and signum != signal.SIGINT:
            earlier(signum, frame)

    for signum in signals:
        previous[signum] = signal.signal(signum, handler)
    try:
        yield stop
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)


@dataclass
class StreamStats:
    """What a stream did; logged every ``log_every`` seconds and returned at the end."""

    batches: int = 0
    changes: int = 0
    idle_polls: int = 0
    seconds: float = 0.0
    busy_seconds: float = 0.0
    last_lag_seconds: float | None = None
    max_lag_seconds: float | None = None
    ended: str = ""
    lags: list[float] = field(default_factory=list, repr=False)

    def add(self, outcome: BatchOutcome, seconds: float) -> None:
        self.busy_seconds += seconds
        if outcome.changes <= 0:
            self.idle_polls += 1
            return
        self.batches += 1
        self.changes += outcome.changes
        if outcome.lag_seconds is not None:
            self.last_lag_seconds = outcome.lag_seconds
            self.max_lag_seconds = max(self.max_lag_seconds or 0.0, outcome.lag_seconds)
            if len(self.lags) < 100_000:
                self.lags.append(outcome.lag_seconds)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "lags"}
        out["changes_per_s"] = round(self.changes / self.seconds, 2) if self.seconds else 0.0
        if self.lags:
            ordered = sorted(self.lags)
            out["p50_lag_seconds"] = ordered[len(ordered) // 2]
            out["p95_lag_seconds"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
        return out


def _describe(what: str, stats: StreamStats, window: StreamStats, seconds: float) -> str:
    lag = "" if window.last_lag_seconds is None else f"; lag {window.last_lag_seconds:.2f} s"
    if window.max_lag_seconds is not None:
        lag += f" (max {window.max_lag_seconds:.2f} s)"
    return (
        f"{what}: {window.changes:,} changes in {window.batches} batches over the last {seconds:.0f} s "
        f"({window.changes / max(seconds, 1e-9):,.1f}/s, {window.idle_polls} idle polls, busy "
        f"{100 * window.busy_seconds / max(seconds, 1e-9):.0f}%){lag}; {stats.changes:,} changes in all"
    )


def run_stream(
    step: Callable[[], BatchOutcome],
    *,
    stream_for: float,
    poll_interval: float = 1.0,
    probe: Callable[[], bool] | None = None,
    stop: StopFlag | None = None,
    logger: Logger | None = None,
    log_every: float = LOG_EVERY,
    what: str = "stream",
    clock: Callable[[], float] = time.monotonic,
    probe_first: bool = False,
) -> StreamStats:
    """Run ``step`` (one exactly-once micro-batch) again and again for ``stream_for`` seconds.

    ``probe`` (optional) says cheaply whether a batch would find anything; when it says no, or a
    batch applied nothing, the loop sleeps ``poll_interval``.  The first batch runs without asking
    (it may have a snapshot to take) unless ``probe_first``, for a probe that knows that too (a
    table stream: a batch with nothing to do would still commit a state version).  An error in a
    batch ends the stream with that error: its transaction was rolled back, so a retry resumes from
    the committed position.
    """
    if stream_for < 0 or poll_interval < 0:
        raise ValueError("stream_for and poll_interval must not be negative")
    stop = stop or StopFlag()
    stats, window = StreamStats(), StreamStats()
    started = clock()
    deadline, logged = started + stream_for, started
    first = True
    while not stop.requested:
        now = clock()
        if now >= deadline and not first:
            stats.ended = "stream_for elapsed"
            break
        forced = first and not probe_first
        outcome = step() if forced or probe is None or probe() else BatchOutcome(0)
        first = False
        after = clock()
        stats.add(outcome, after - now)
        window.add(outcome, after - now)
        if logger is not None and after - logged >= log_every:
            logger.info("%s", _describe(what, stats, window, after - logged))
            window, logged = StreamStats(), after
        if outcome.changes <= 0 and stop.wait(min(poll_interval, deadline - after)):
            break
    stats.ended = stats.ended or stop.reason or "stream_for elapsed"
    stats.seconds = clock() - started
    if logger is not None:
        logger.info("%s ended (%s): %s", what, stats.ended, stats.to_dict())
    return stats


class CdcStream:
    """The probe and the step of a streaming CDC sync: each batch is one :func:`run_cdc_sync`.

    One :class:`~.cdc.extract.SourceSession` serves the whole stream: the probe, the slot read and
    the confirmation share its connection, and the source checks run once a minute, not per batch.
    The probe peeks at the slot (a peek writes nothing on the source: no heartbeat, no WAL); a batch
    runs when the slot holds a data change, on the first poll (snapshot or catch-up), or when the
    slot retains more than ``idle_advance_bytes`` of WAL written by others (the batch's heartbeat
    then lets the slot advance).  With ``in_memory`` (the default) a change batch is staged in this
    process's memory, bounded to ``memory_batch_bytes`` of changes (a catch-up is then several
    batches); the initial snapshot still goes to ``staging``.
    """

    def __init__(
        self,
        source: sa.Engine,
        target: psycopg.Connection[Any],
        spec: CdcSpec,
        *,
        staging: StagingArea | None = None,
        run_id: str = "stream",
        logger: Logger | None = None,
        idle_advance_bytes: int = IDLE_ADVANCE_BYTES,
        in_memory: bool = True,
        memory_batch_bytes: int = MEMORY_BATCH_BYTES,
    ) -> None:
        if in_memory and (spec.max_batch_bytes is None or spec.max_batch_bytes > memory_batch_bytes):
            spec = dataclasses.replace(spec, max_batch_bytes=memory_batch_bytes)
        self.source = source
        self.target = target
        self.spec = spec
        self.staging = staging or StagingArea()
        self.change_staging = memory_staging(f"stream-{spec.sync_id}") if in_memory else None
        self.run_id = run_id
        self.logger = logger
        self.idle_advance_bytes = idle_advance_bytes
        self.session = SourceSession(source, spec)

    def probe(self) -> bool:
        """Whether a batch would find something to do (never writes on the source)."""
        try:
            with self.session.connection(f"peeking at slot {self.spec.slot_name}") as conn:
                info = cdc_slot.slot_info(conn, self.spec.slot_name)
                if not info.exists or info.retained_bytes > self.idle_advance_bytes:
                    return True  # the batch takes the snapshot, reports the lost slot, or lets the slot advance
                return cdc_slot.has_pending_changes(conn, self.spec.slot_name, self.spec.publication)
        except psycopg.errors.ObjectInUse:
            return True  # someone else holds the slot for a moment: let the batch wait for it
        except (psycopg.Error, SyncError):
            return True  # the session dropped its connection: the batch reconnects or reports the lost source

    def step(self) -> BatchOutcome:
        manifest, result = run_cdc_sync(
            self.source,
            self.target,
            self.spec,
            staging=self.staging,
            run_id=self.run_id,
            logger=self.logger,
            session=self.session,
            change_staging=self.change_staging,
        )
        changes = manifest.changes if result.status == "applied" else 0
        if result.status == "applied" and manifest.kind != "changes":
            changes = max(manifest.rows, 1)
        return BatchOutcome(changes, detail=f"{manifest.kind} {result.status} {result.commit_lsn or ''}".strip())

    def close(self) -> None:
        self.session.close()


def check_streamable(spec: SyncSpec, *, window: tuple[Any, Any] | None = None) -> None:
    """Refuse, with :class:`ConfigurationError`, a table sync (or a run) that cannot stream.

    A full sync re-reads (and compares) the whole table in every batch; a backfill run re-syncs one
    cursor window once, while a stream follows the watermark.
    """
    if spec.mode != "incremental":
        raise ConfigurationError(
            "a full sync cannot stream: every batch would re-read the whole table; stream an incremental sync "
            "(mode='incremental' with a cursor_column), or use CDC (CdcSyncOperator)",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
            rule="streaming",
        )
    if window is not None:
        raise ConfigurationError(
            f"this run is a backfill of [{window[0]}, {window[1]}): it re-syncs that window once and cannot "
            "stream; run backfills without stream_for (or give the streaming task backfill=False)",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
            rule="streaming",
        )


class _Unlogged:
    """A logger for the upper bound a probe computes every poll: the batch logs its own notes."""

    def info(self, msg: str, /, *args: Any) -> None:
        return None

    def warning(self, msg: str, /, *args: Any) -> None:
        return None


class TableStream:
    """The probe and the step of a streaming incremental table sync: each batch is one :func:`run_sync`.

    The probe asks the source one ``EXISTS`` query: is there a row past the committed watermark,
    ``(cursor, key) > (watermark)`` exactly as the extraction pages (an index on the cursor and key
    columns makes it cheap).  A sync that never committed runs its first batch at once (it creates
    the target table); one that committed no watermark yet (an empty table) asks for any row.  When
    ``lag`` is set, or a batch found nothing past the watermark (rows held back by the
    open-transaction guard), the probe also asks the extraction's upper bound, so rows a batch would
    not read yet commit no empty batch per poll.  Rows only a ``lookback`` would re-read are not
    probed for: every batch re-reads them.

    The probe keeps one source connection for the stream (its transaction ends after each probe, so
    it never lowers the open-transaction guard); the batches take theirs from the engine's pool, so
    they stay open between batches too (unless the engine has a ``NullPool``).
    """

    def __init__(
        self,
        source: sa.Engine,
        target: psycopg.Connection[Any],
        spec: SyncSpec,
        *,
        staging: StagingArea | None = None,
        run_id: str = "stream",
        logger: Logger | None = None,
        transform: BatchTransform | None = None,
    ) -> None:
        check_streamable(spec)
        self.source = source
        self.target = target
        self.spec = spec
        self.staging = staging or StagingArea()
        self.run_id = run_id
        self.logger = logger
        self.transform = transform
        self._table: SourceTable | None = None
        self._connection: sa.Connection | None = None
        self._held_back = False

    def probe(self) -> bool:
        """Whether a batch would find a row past the committed watermark (never writes anywhere)."""
        try:
            state = committed_state(self.target, self.spec)
            if state is None:
                return True  # never synced: the first batch creates the target table
            if state.watermark is not None and not isinstance(state.watermark, list):
                return True  # another kind of sync's position: the batch says what is wrong
            return self._rows_past(decode_row(state.watermark) if state.watermark else None)
        except (psycopg.Error, sa_exc.SQLAlchemyError, SyncError):
            self._drop_connection()
            return True  # a connection was lost or the table changed: the batch reconnects or reports it

    def _rows_past(self, watermark: tuple[Any, ...] | None) -> bool:
        source = self._source_table()
        assert self.spec.cursor_column
        cursor = source.table.c[self.spec.cursor_column]
        order = [cursor, *(source.table.c[k] for k in source.primary_key)]
        conditions = []
        if watermark is not None:
            if len(watermark) != len(order):
                return True  # the key changed since that watermark: the batch decides
            conditions.append(keyset_after(order, watermark, source))
        if self._held_back or self.spec.lag > dt.timedelta(0):
            upper, _ = compute_upper_bound(self.source, self.spec, source, _Unlogged())
            if upper is not None:
                bound = sa.bindparam("upper_bound", upper, type_=cursor.type)
                conditions.append(orderable(cursor, source.dialect) < orderable(cursor, source.dialect, bound))
        query = sa.select(sa.select(sa.literal(1)).select_from(source.table).where(*conditions).exists())
        connection = self._connect()
        with connection.begin():
            return bool(connection.execute(query).scalar())

    def step(self) -> BatchOutcome:
        """One exactly-once batch (:func:`run_sync`); its lag is ``now - `` the newest cursor value it
        synced when the cursor is a timestamp (a naive one is taken as UTC)."""
        manifest, result = run_sync(
            self.source,
            self.target,
            self.spec,
            staging=self.staging,
            run_id=self.run_id,
            transform=self.transform,
            logger=self.logger,
        )
        self._held_back = manifest.watermark_high == manifest.watermark_low
        changes = result.inserted + result.updated + result.deleted if result.status == "applied" else 0
        return BatchOutcome(
            changes,
            lag_seconds=_cursor_lag(manifest) if changes else None,
            detail=f"{manifest.rows} rows {result.status} (version {result.version})",
        )

    def close(self) -> None:
        self._drop_connection()

    def _source_table(self) -> SourceTable:
        if self._table is None:
            self._table = reflect_source(self.source, self.spec)
        return self._table

    def _connect(self) -> sa.Connection:
        if self._connection is None or self._connection.closed or self._connection.invalidated:
            self._connection = self.source.connect()
        return self._connection

    def _drop_connection(self) -> None:
        connection, self._connection, self._table = self._connection, None, None
        if connection is not None:
            connection.close()


def _cursor_lag(manifest: Manifest) -> float | None:
    """Seconds from the newest cursor value a batch synced to now, for a timestamp cursor."""
    if not manifest.rows or not manifest.watermark_high:
        return None
    newest = decode_value(manifest.watermark_high[0])
    if not isinstance(newest, dt.datetime):
        return None
    if newest.tzinfo is None:
        newest = newest.replace(tzinfo=dt.UTC)
    return max((dt.datetime.now(dt.UTC) - newest).total_seconds(), 0.0)


__all__ = [
    "IDLE_ADVANCE_BYTES",
    "LOG_EVERY",
    "MEMORY_BATCH_BYTES",
    "BatchOutcome",
    "CdcStream",
    "StopFlag",
    "StreamStats",
    "TableStream",
    "check_streamable",
    "run_stream",
    "stop_on_signals",
]
