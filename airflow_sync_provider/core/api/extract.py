"""Pages of an API endpoint into the staged Parquet batch the table-sync load takes.

1. The request: the spec's parameters, plus (incremental) ``cursor_param`` = the committed
   watermark minus ``lookback`` (or a backfill window's bounds).
2. Pages follow the paginator, with the loop guard (a repeated request or more than ``max_pages``
   fails the run); progress is logged (pages, records, records/s).
3. Records become typed Arrow columns (declared, or inferred from the first page and then fixed),
   are buffered up to ``batch_records`` and written as one Parquet file each: memory is bounded by
   that, not by the endpoint's size.  The optional transform runs on each file's rows.
4. A key served twice (offset pages shifted by an insert, a record updated between pages) keeps
   its newest version (largest cursor, later page on a tie): the batch holds each key once.
5. The new watermark is the largest cursor seen, held back to ``now - lag`` (and never below the
   committed one); it goes into the manifest, so the load commits it with the rows.

A failure at any step removes the half-written batch: nothing is staged for a load, nothing committed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from airflow_sync_provider.core.api.client import ApiClient, format_cursor
from airflow_sync_provider.core.api.paginate import PageRequest
from airflow_sync_provider.core.api.records import infer_columns, manifest_columns, records_of, to_table
from airflow_sync_provider.core.api.spec import ApiColumn, ApiSpec
from airflow_sync_provider.core.errors import ConfigurationError, SyncError
from airflow_sync_provider.core.events.schema import TYPES
from airflow_sync_provider.core.extract import (
    BatchTransform,
    _lookback_start,
    apply_transform,
    new_manifest_id,
    staged_manifest,
)
from airflow_sync_provider.core.manifest import Manifest, ManifestColumn, StagedFile
from airflow_sync_provider.core.progress import LOG, Logger
from airflow_sync_provider.core.schema import pg_type_for_arrow
from airflow_sync_provider.core.staging import StagingArea, filesystem_for
from airflow_sync_provider.core.state import SyncState
from airflow_sync_provider.core.values import decode_row, encode_value

_ORDINAL = "__api_ordinal"
#: Seconds between two progress lines of a long fetch.
PROGRESS_EVERY = 10.0


def committed_cursor(state: SyncState | None, spec: ApiSpec) -> Any:
    """The cursor value the committed state holds (None: never synced, or a full-mode sync)."""
    if spec.mode != "incremental" or state is None or state.watermark is None:
        return None
    if not isinstance(state.watermark, list) or len(state.watermark) != 1:
        raise ConfigurationError(
            "the state row of this sync_id holds another kind of sync's position: give the API sync its own sync_id",
            sync_id=spec.sync_id,
            table=spec.source_name,
        )
    return decode_row(state.watermark)[0]


def first_request(spec: ApiSpec, low: Any, window: tuple[Any, Any] | None, notes: list[str]) -> PageRequest:
    """The first page's request: the spec's parameters and the cursor parameters of this run."""
    params = dict(spec.params)
    since: Any = None
    if window is not None:
        since = window[0]
        if spec.cursor_end_param:
            params[spec.cursor_end_param] = format_cursor(window[1], spec.cursor_format)
        notes.append(f"backfill window [{window[0]!r}, {window[1]!r}); the watermark stays as committed")
    elif low is not None:
        since = _lookback_start(spec.as_sync_spec(), low)
        if since is not None:
            notes.append(f"lookback: re-reading from {since!r}")
        else:
            since = low
    elif spec.mode == "incremental":
        since = spec.start_value
    if since is not None and spec.cursor_param:
        params[spec.cursor_param] = format_cursor(since, spec.cursor_format)
    return spec.paginator.first(PageRequest(spec.endpoint, params))


#: Pages fetched ahead of the one being typed and staged (the next request needs the previous
#: page, but the server can build page k+1 while page k is typed and written).
PREFETCH_PAGES = 2


def fetch_pages(
    client: ApiClient, spec: ApiSpec, request: PageRequest, log: Logger, prefetch: int = PREFETCH_PAGES
) -> Generator[list[Any]]:
    """:func:`page_loop` in a thread of its own, up to ``prefetch`` pages ahead (bounded memory);
    its error is raised here, and closing this generator stops it at its next page."""
    if prefetch < 1:
        yield from page_loop(client, spec, request, log)
        return
    pages: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                pages.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for page in page_loop(client, spec, request, log):
                if not put(("page", page)):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            put(("error", error))
            return
        put(("done", None))

    worker = threading.Thread(target=produce, name=f"fetch {spec.sync_id}", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = pages.get()
            if kind == "error":
                raise value
            if kind == "done":
                return
            yield value
    finally:
        stop.set()
        worker.join(timeout=_STOP_WAIT)


#: Seconds a stopped fetch waits for its thread (it stops after its current request).
_STOP_WAIT = 60.0


def page_loop(client: ApiClient, spec: ApiSpec, request: PageRequest, log: Logger) -> Iterator[list[Any]]:
    """The records of each page, following the paginator, with the loop guard and progress lines."""
    seen: set[Any] = set()
    pages = records = 0
    started = last = time.monotonic()
    next_request: PageRequest | None = request
    while next_request is not None:
        identity = next_request.identity()
        if identity in seen:
            raise SyncError(
                f"pagination loop: the API sent page {pages} the way to a page already read "
                f"({client.masked(next_request.url, next_request.params)}); stopping instead of reading it "
                "again (check the paginator settings, or the API's cursor)",
                sync_id=spec.sync_id,
                table=spec.source_name,
                rule="pagination loop guard",
            )
        if pages >= spec.max_pages:
            raise SyncError(
                f"more than max_pages={spec.max_pages} pages in one run; raise max_pages if the endpoint "
                "really is that large (a run never stops early with records left unread)",
                sync_id=spec.sync_id,
                table=spec.source_name,
                rule="max_pages",
            )
        seen.add(identity)
        response, body = client.get(next_request.url, next_request.params, where=spec.source_name, sync_id=spec.sync_id)
        page = records_of(body, spec.records_path, where=spec.source_name)
        pages += 1
        records += len(page)
        yield page
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY:
            last = now
            log.info(
                "api sync %s: %d page(s), %s record(s) so far (%s records/s)",
                spec.sync_id, pages, f"{records:,}", f"{records / (now - started):,.0f}",
            )  # fmt: skip
        next_request = spec.paginator.next(next_request, response, body, len(page))
    elapsed = time.monotonic() - started
    log.info(
        "api sync %s: fetched %d page(s), %s record(s) in %.2f s (%s records/s, %d request(s))",
        spec.sync_id, pages, f"{records:,}", elapsed, f"{records / elapsed if elapsed else 0:,.0f}",
        client.requests,
    )  # fmt: skip


def extract_api_to_staging(
    client: ApiClient,
    spec: ApiSpec,
    *,
    state: SyncState | None,
    staging: StagingArea,
    run_id: str,
    transform: BatchTransform | None = None,
    logger: Logger | None = None,
    window: tuple[Any, Any] | None = None,
    recorded_columns: Sequence[tuple[str, str]] | None = None,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> Manifest:
    """Fetch the endpoint's records past the committed watermark (or all of them) into staging.

    ``window``: a backfill: the records whose cursor is in ``[low, high)`` (sent as the cursor
    parameters and checked here too), merged without moving the watermark.  ``now`` is the clock
    ``lag`` counts back from.
    """
    log = logger or LOG
    started = time.monotonic()
    if window is not None and spec.mode != "incremental":
        raise ConfigurationError(
            "a backfill window needs an incremental API sync (a cursor to select the window by)",
            sync_id=spec.sync_id,
            table=spec.source_name,
        )
    low = committed_cursor(state, spec)
    notes: list[str] = []
    request = first_request(spec, low, window, notes)
    manifest_id = new_manifest_id()
    staging_dir = staging.batch_uri(spec.sync_id, manifest_id)
    writer = _BatchWriter(spec, staging, staging_dir, transform, window)
    try:
        with contextlib.closing(fetch_pages(client, spec, request, log)) as pages:  # a failure stops the fetch
            for page in pages:
                writer.add(page)
        writer.flush()
        files, dropped = keep_newest(writer.files, spec.primary_key, writer.cursor_name)
    except BaseException:
        staging.discard(staging_dir, log)  # a half-written batch is never loaded
        raise
    if dropped:
        notes.append(f"{dropped} older version(s) of keys served twice were left out (the newest kept)")
        log.info("api sync %s: %s", spec.sync_id, notes[-1])

    high = low
    if spec.mode == "incremental" and window is None and writer.max_cursor is not None:
        high = writer.max_cursor
        if spec.lag and isinstance(high, dt.datetime):
            held = now() - spec.lag
            if high > held:
                notes.append(f"watermark held back by lag {spec.lag} to {held.isoformat()} (late records re-read)")
                high = held
        if low is not None and high < low:
            high = low
    columns = writer.columns() or _recorded(recorded_columns)
    manifest = staged_manifest(
        spec.as_sync_spec(),
        run_id=run_id,
        manifest_id=manifest_id,
        staging_dir=staging_dir,
        started=started,
        primary_key=spec.primary_key,
        columns=columns,
        files=files,
        base_version=state.version if state else 0,
        watermark_low=[encode_value(low)] if low is not None else None,
        watermark_high=[encode_value(high)] if high is not None else None,
        window=window,
        notes=notes,
    )
    staging.write_manifest(manifest)
    return manifest


def _recorded(recorded: Sequence[tuple[str, str]] | None) -> tuple[ManifestColumn, ...]:
    return tuple(ManifestColumn(name, pg_type) for name, pg_type in (recorded or ()))


class _BatchWriter:
    """Buffers records up to ``batch_records``, types them and writes one Parquet file per batch."""

    def __init__(
        self,
        spec: ApiSpec,
        staging: StagingArea,
        staging_dir: str,
        transform: BatchTransform | None,
        window: tuple[Any, Any] | None,
    ) -> None:
        self.spec = spec
        self.staging = staging
        self.staging_dir = staging_dir
        self.transform = transform
        self.window = window
        self.declared: tuple[ApiColumn, ...] = spec.columns
        self.files: list[StagedFile] = []
        self.schema: pa.Schema | None = None
        self.max_cursor: Any = None
        self.cursor_name = spec.cursor_field
        self._buffer: list[Any] = []

    def add(self, page: list[Any]) -> None:
        self._buffer.extend(page)
        if len(self._buffer) >= self.spec.batch_records:
            self.flush()

    def flush(self) -> None:
        records, self._buffer = self._buffer, []
        if not records:
            return
        spec = self.spec
        if not self.declared:
            self.declared = infer_columns(records, spec.primary_key, spec.cursor_field)
        table = to_table(records, self.declared, spec.primary_key, where=spec.source_name, sync_id=spec.sync_id)
        if self.cursor_name and self.cursor_name in table.column_names:
            cursor = table.column(self.cursor_name)
            if self.window is not None:
                low, high = (pa.scalar(v, cursor.type) for v in self.window)
                table = table.filter(pc.and_(pc.greater_equal(cursor, low), pc.less(cursor, high)))
                cursor = table.column(self.cursor_name)
            if table.num_rows:
                top = pc.max(cursor).as_py()
                if self.max_cursor is None or top > self.max_cursor:
                    self.max_cursor = top
        if not table.num_rows:
            return
        if self.transform is not None:
            table = apply_transform(table, self.transform, spec.as_sync_spec(), len(self.files) + 1)
            missing = [k for k in spec.primary_key if k not in table.column_names]
            if missing:
                raise SyncError(
                    f"the transform dropped primary-key field(s) {missing}; the load needs them to merge",
                    sync_id=spec.sync_id,
                    table=spec.source_name,
                    column=missing,
                )
            if self.cursor_name not in table.column_names:
                self.cursor_name = None  # newest-wins falls back to arrival order
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            try:
                table = table.select(self.schema.names).cast(self.schema)
            except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise SyncError(
                    f"batch {len(self.files) + 1} has columns {table.schema} after {self.schema}: {error}",
                    sync_id=spec.sync_id,
                    table=spec.source_name,
                ) from error
        uri = f"{self.staging_dir}/part-{len(self.files):05d}.parquet"
        with self.staging.open_writer(uri, table.schema) as writer:
            writer.write_table(table)
        self.files.append(StagedFile(uri, table.num_rows))

    def columns(self) -> tuple[ManifestColumn, ...]:
        """The staged columns with their target types (declared types; a transform's by Arrow type)."""
        declared = {c.name: c for c in self.declared}
        if self.schema is None:
            return manifest_columns(self.declared)
        columns = []
        for field in self.schema:
            column = declared.get(field.name)
            if column is not None and TYPES[column.type][0] == field.type:
                columns.append(ManifestColumn(field.name, TYPES[column.type][1], not column.required))
            else:
                columns.append(ManifestColumn(field.name, pg_type_for_arrow(field.type), True))
        return tuple(columns)


def keep_newest(files: Sequence[StagedFile], key: Sequence[str], cursor: str | None) -> tuple[list[StagedFile], int]:
    """Leave each key once in the staged files: its largest cursor, the later arrival on a tie.

    Reads only the key and cursor columns to decide; rewrites only the files that lose rows.
    Returns the files and how many rows were left out.
    """
    if not files:
        return list(files), 0
    wanted = [*key, *([cursor] if cursor else [])]
    parts = []
    for number, staged in enumerate(files):
        fs, path = filesystem_for(staged.uri)
        part = pq.read_table(path, filesystem=fs, columns=wanted)
        parts.append(part.append_column("__file", pa.repeat(pa.scalar(number, pa.int32()), part.num_rows)))
    table = pa.concat_tables(parts)
    table = table.append_column(_ORDINAL, pa.array(range(table.num_rows), pa.int64()))
    counts = table.group_by(list(key)).aggregate([(_ORDINAL, "count")])
    if pc.max(counts.column(f"{_ORDINAL}_count")).as_py() <= 1:
        return list(files), 0
    order = [(k, "ascending") for k in wanted] + [(_ORDINAL, "ascending")]
    ordered = table.take(pc.sort_indices(table, sort_keys=order))
    last: Any = None
    for name in key:
        column = ordered.column(name)
        differs = pc.not_equal(column.slice(0, ordered.num_rows - 1), column.slice(1))
        last = differs if last is None else pc.or_(last, differs)
    keep = pa.concat_arrays([*last.chunks, pa.array([True])])
    dropped = ordered.filter(pc.invert(keep))
    start = 0
    offsets = []
    for staged in files:
        offsets.append(start)
        start += staged.rows
    by_file: dict[int, set[int]] = {}
    for number, ordinal in zip(dropped.column("__file").to_pylist(), dropped.column(_ORDINAL).to_pylist(), strict=True):
        by_file.setdefault(number, set()).add(ordinal - offsets[number])
    result = list(files)
    for number, rows in by_file.items():
        staged = files[number]
        fs, path = filesystem_for(staged.uri)
        full = pq.read_table(path, filesystem=fs)
        mask = pa.array([i not in rows for i in range(full.num_rows)])
        kept = full.filter(mask)
        pq.write_table(kept, path, filesystem=fs)
        result[number] = StagedFile(staged.uri, kept.num_rows)
    return [f for f in result if f.rows], dropped.num_rows


__all__ = [
    "PREFETCH_PAGES",
    "committed_cursor",
    "extract_api_to_staging",
    "fetch_pages",
    "first_request",
    "keep_newest",
    "page_loop",
]
