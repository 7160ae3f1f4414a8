"""The whole flow in one call: read state, extract, (transform), load.  Used by the all-in-one
operator, the demo and the tests; the split operators call the same two halves.

In one call the two halves overlap: the extraction runs in a thread and hands each staged file to
the load as soon as it is written, so the target's COPY of page *k* runs while the source serves
page *k+1*.  Still one target transaction with the state row: an extraction that fails mid-way
rolls back everything the run had loaded.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pyarrow as pa
import sqlalchemy as sa

from airflow_sync_provider.core.extract import BatchTransform, extract_to_staging
from airflow_sync_provider.core.load import COPY_ROWS, LoadResult, load_manifest
from airflow_sync_provider.core.manifest import Manifest, StagedFile
from airflow_sync_provider.core.progress import Logger, PhaseObserver
from airflow_sync_provider.core.spec import SyncSpec
from airflow_sync_provider.core.staging import StagingArea, iter_staged_batches
from airflow_sync_provider.core.state import StateOwner, SyncState, committed_state, read_source_schema

#: Called with each staged file's batch so far and its rows (``on_file`` of :func:`extract_to_staging`).
OnFile = Callable[[Manifest, pa.Table], None]


def extract_for(
    source: sa.Engine,
    target: psycopg.Connection[Any],
    spec: SyncSpec,
    *,
    staging: StagingArea,
    run_id: str,
    transform: BatchTransform | None = None,
    logger: Logger | None = None,
    window: tuple[Any, Any] | None = None,
) -> Manifest:
    """Extract from where the committed state in the target says the sync is (or a backfill ``window``).

    First it sweeps the staged batches of this sync that killed or abandoned runs left behind
    (older than ``staging.abandoned_after`` and no longer loadable: see
    :meth:`StagingArea.sweep_abandoned`).
    """
    extract = _extraction(
        source, target, spec, staging=staging, run_id=run_id, transform=transform, logger=logger, window=window
    )
    return extract(None)


def _extraction(
    source: sa.Engine,
    target: psycopg.Connection[Any],
    spec: SyncSpec,
    *,
    staging: StagingArea,
    run_id: str,
    transform: BatchTransform | None,
    logger: Logger | None,
    window: tuple[Any, Any] | None,
) -> Callable[[OnFile | None], Manifest]:
    """The run's :func:`extract_to_staging`, bound to the committed state (read after the sweep) and the
    recorded columns.  The target is read here, in the caller's thread: the extraction may run in another."""
    state = start_state(target, spec, staging, logger)
    recorded = recorded_columns(target, spec) if transform is not None else None

    def extract(on_file: OnFile | None) -> Manifest:
        return extract_to_staging(
            source,
            spec,
            state=state,
            staging=staging,
            run_id=run_id,
            transform=transform,
            logger=logger,
            window=window,
            recorded_columns=recorded,
            on_file=on_file,
        )

    return extract


def start_state(
    target: psycopg.Connection[Any], spec: StateOwner, staging: StagingArea, logger: Logger | None
) -> SyncState | None:
    """The committed state a run of ``spec`` starts from, after sweeping the staged batches of the sync
    that killed or abandoned runs left behind and that no load can apply any more (table, API and
    event syncs alike: their batches are pinned to a state version, see :func:`loadable_at`)."""
    state = committed_state(target, spec)
    staging.sweep_abandoned(spec.sync_id, pending=loadable_at(state), log=logger)
    return state


def loadable_at(state: SyncState | None) -> Callable[[dict[str, Any]], bool]:
    """Whether a staged table batch (its ``manifest.json``) would still change the target: it was
    extracted at the committed state version, so its load applies it instead of skipping it as
    stale.  A backfill window is not pinned to a version; its age alone decides."""
    version = state.version if state else 0

    def loadable(manifest: dict[str, Any]) -> bool:
        return manifest.get("window") is None and manifest.get("base_version") == version

    return loadable


def recorded_columns(conn: psycopg.Connection[Any], spec: SyncSpec) -> tuple[tuple[str, str], ...] | None:
    """The (transformed) columns the last committed load of this sync recorded, or None."""
    record = read_source_schema(conn, spec.target_schema, spec.state_table, spec.sync_id, spec.qualified_target)
    return record.columns if record is not None else None


def run_sync(
    source: sa.Engine,
    target: psycopg.Connection[Any],
    spec: SyncSpec,
    *,
    staging: StagingArea | None = None,
    run_id: str = "manual",
    transform: BatchTransform | None = None,
    logger: Logger | None = None,
    observer: PhaseObserver | None = None,
    window: tuple[Any, Any] | None = None,
    keep_staged: bool = False,
) -> tuple[Manifest, LoadResult]:
    """Extract, (transform) and load one batch; ``window`` makes it a backfill of that cursor range.

    ``keep_staged`` keeps the staged files after the load (they are removed by default).
    """
    staging = staging or StagingArea()
    extract = _extraction(
        source, target, spec, staging=staging, run_id=run_id, transform=transform, logger=logger, window=window
    )
    feed = _ExtractionFeed()
    worker = threading.Thread(target=feed.run, args=(extract,), name=f"extract {spec.sync_id}", daemon=True)
    worker.start()
    try:
        result = load_manifest(
            target, feed.head(), logger=logger, observer=observer, keep_staged=keep_staged, feed=feed, run_id=run_id
        )
    except BaseException:
        feed.cancel()
        worker.join(timeout=_STOP_WAIT)  # it stops at its next page; a hung source must not hold the error back
        if feed.failure is not None:  # the cause (the load may have failed on its removed files first)
            raise feed.failure from None
        raise
    worker.join()
    return feed.final(), result


#: Seconds a failed run waits for its extraction thread to stop (a daemon: it cannot keep the process).
_STOP_WAIT = 60.0


class _ExtractionFailed(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Cancelled(Exception):
    """The load ended (failed): the extraction stops at its next file."""


class _ExtractionFeed:
    """A :class:`~.load.BatchFeed` filled by an extraction thread: a bounded queue of staged files.

    The extraction blocks once the load is :attr:`MAX_AHEAD` files behind; the queue holds each
    file's rows too (at most that many pages in memory), so the load sends them without reading the
    Parquet file back.  Its error is raised in the load (wrapped, so a source's lost
    connection is not taken for the target's).
    """

    MAX_AHEAD = 4

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=self.MAX_AHEAD)
        self._cancelled = threading.Event()
        self._head: Manifest | None = None
        self._latest: Manifest | None = None
        self._final: Manifest | None = None
        self._taken = 0
        self._pages: dict[str, pa.Table] = {}
        #: What ended the extraction, if it failed.
        self.failure: BaseException | None = None

    # the extraction's side
    def run(self, extract: Callable[[OnFile], Manifest]) -> None:
        try:
            final = extract(lambda snapshot, page: self._put(("file", (snapshot, page))))
        except _Cancelled:
            return
        except BaseException as error:  # handed to the load, which raises it
            self.failure = error
            self._put(("error", error), cancellable=False)
            return
        self._put(("done", final), cancellable=False)

    def _put(self, item: tuple[str, Any], cancellable: bool = True) -> None:
        while not self._cancelled.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        if cancellable:
            raise _Cancelled

    def cancel(self) -> None:
        self._cancelled.set()

    # the load's side
    def _next(self) -> Manifest:
        kind, value = self._queue.get()
        if kind == "error":
            raise _ExtractionFailed(value)
        if kind == "done":
            self._final = value
        else:  # the file's rows, in memory: the load need not read them back
            value, page = value
            self._pages[value.files[-1].uri] = page
        self._latest = value
        return value

    def head(self) -> Manifest:
        if self._head is None:
            self._head = self._next()
        return self._head

    def files(self) -> Iterator[StagedFile]:
        self.head()
        while True:
            assert self._latest is not None
            while self._taken < len(self._latest.files):
                self._taken += 1
                yield self._latest.files[self._taken - 1]
            if self._final is not None:
                return
            self._next()

    def batches(self, staged: StagedFile) -> Iterator[pa.RecordBatch]:
        page = self._pages.pop(staged.uri, None)
        if page is None:  # a second pass (naming a rejected row) reads the file
            yield from iter_staged_batches(staged.uri, COPY_ROWS)
        else:
            yield from page.to_batches(max_chunksize=COPY_ROWS)

    def final(self) -> Manifest:
        for _ in self.files():
            pass
        assert self._final is not None
        return self._final
