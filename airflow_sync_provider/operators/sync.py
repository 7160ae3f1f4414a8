"""Operators: extract to staging, load staged batches into PostgreSQL, or both in one task.

All three run the same engine (:mod:`airflow_sync_provider.core`).  XCom carries only the manifest
(paths, counts, watermark range) and the load result, never rows.
"""

from __future__ import annotations

import ast
import datetime as dt
import importlib
import inspect
import json
import os
from collections.abc import Sequence
from contextlib import closing
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from airflow_sync_provider.core import (
    ConfigurationError,
    Manifest,
    SourceUnavailableError,
    StagingArea,
    SyncError,
    SyncSpec,
    extract_for,
    load_manifest,
)
from airflow_sync_provider.core.extract import BatchTransform
from airflow_sync_provider.core.spec import DEFAULT_SCHEMA_DRIFT
from airflow_sync_provider.hooks.source import SqlSourceHook
from airflow_sync_provider.hooks.target import SyncTargetHook

SPEC_TEMPLATE_FIELDS: tuple[str, ...] = (
    "sync_id",
    "source_table",
    "target_table",
    "source_schema",
    "target_schema",
    "cursor_column",
    "source_conn_id",
    "target_conn_id",
    "staging_uri",
)


def default_staging_uri() -> str | None:
    """``[sync] staging_uri`` from the Airflow config, else ``SYNC_STAGING_DIR``, else the engine default."""
    from airflow.configuration import conf

    return conf.get("sync", "staging_uri", fallback=None) or os.environ.get("SYNC_STAGING_DIR") or None


def resolve_transform(transform: BatchTransform | str | None) -> BatchTransform | None:
    """Accept a callable or a ``"package.module:function"`` path (handy in templated or YAML DAGs)."""
    if transform is None or callable(transform):
        return transform
    module_name, _, attribute = transform.partition(":")
    if not attribute:
        raise ConfigurationError(f"transform {transform!r} must look like 'package.module:function'")
    function = getattr(importlib.import_module(module_name), attribute)
    if not callable(function):
        raise ConfigurationError(f"transform {transform!r} is not callable")
    return function


def _fail(error: SyncError) -> Exception:
    """Bad config or bad data will fail the same way on every retry: fail fast, keep the message."""
    if isinstance(error, SourceUnavailableError):
        return error
    return AirflowFailException(str(error))


class _SyncSpecMixin:
    """Keyword arguments that declare a sync (see :class:`~airflow_sync_provider.core.SyncSpec`)."""

    sync_id: str
    source_table: str
    target_table: str | None
    source_schema: str | None
    target_schema: str
    mode: str
    cursor_column: str | None
    primary_key: Sequence[str]
    columns: Sequence[str]
    delete_mode: str
    detect_deletes: bool | None
    batch_rows: int
    lag: dt.timedelta
    lookback: dt.timedelta | int | None
    guard_open_transactions: bool
    state_table: str
    max_delete_fraction: float | None
    history_table: str | None
    schema_drift: str

    def _init_spec(
        self,
        *,
        sync_id: str | None,
        source_table: str,
        target_table: str | None = None,
        source_schema: str | None = None,
        target_schema: str = "public",
        mode: str = "incremental",
        cursor_column: str | None = None,
        primary_key: Sequence[str] = (),
        columns: Sequence[str] = (),
        delete_mode: str = "hard",
        detect_deletes: bool | None = None,
        batch_rows: int = 50_000,
        lag: dt.timedelta = dt.timedelta(0),
        lookback: dt.timedelta | int | None = None,
        guard_open_transactions: bool = True,
        state_table: str = "_sync_state",
        max_delete_fraction: float | None = None,
        history_table: str | None = None,
        schema_drift: str = DEFAULT_SCHEMA_DRIFT,
    ) -> None:
        self.sync_id = sync_id or source_table
        self.source_table = source_table
        self.target_table = target_table
        self.source_schema = source_schema
        self.target_schema = target_schema
        self.mode = mode
        self.cursor_column = cursor_column
        self.primary_key = primary_key
        self.columns = columns
        self.delete_mode = delete_mode
        self.detect_deletes = detect_deletes
        self.batch_rows = batch_rows
        self.lag = lag
        self.lookback = lookback
        self.guard_open_transactions = guard_open_transactions
        self.state_table = state_table
        self.max_delete_fraction = max_delete_fraction
        self.history_table = history_table
        self.schema_drift = schema_drift

    def build_spec(self) -> SyncSpec:
        return SyncSpec(
            sync_id=self.sync_id,
            source_table=self.source_table,
            target_table=self.target_table or "",
            source_schema=self.source_schema or None,
            target_schema=self.target_schema,
            mode=self.mode,  # type: ignore[arg-type]
            cursor_column=self.cursor_column or None,
            primary_key=tuple(self.primary_key),
            columns=tuple(self.columns),
            delete_mode=self.delete_mode,  # type: ignore[arg-type]
            detect_deletes=self.detect_deletes,
            batch_rows=self.batch_rows,
            lag=self.lag,
            lookback=self.lookback,
            guard_open_transactions=self.guard_open_transactions,
            state_table=self.state_table,
            max_delete_fraction=self.max_delete_fraction,
            history_table=self.history_table or None,
            schema_drift=self.schema_drift,  # type: ignore[arg-type]
        )


def _source_engine(conn_id: str, sync_id: str) -> Any:
    try:
        return SqlSourceHook(source_conn_id=conn_id).get_engine()
    except AirflowNotFoundException:
        raise SourceUnavailableError(
            f"Airflow connection {conn_id!r} (source) is not defined", sync_id=sync_id
        ) from None


def _target_connection(conn_id: str, sync_id: str) -> Any:
    try:
        return SyncTargetHook(postgres_conn_id=conn_id).get_sync_connection()
    except AirflowNotFoundException:
        raise SourceUnavailableError(
            f"Airflow connection {conn_id!r} (target) is not defined", sync_id=sync_id
        ) from None
    except SyncError as error:
        raise error.with_context(sync_id=sync_id) from error.__cause__


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def backfill_window(context: Context, sync_id: str) -> tuple[Any, Any] | None:
    """The cursor window a run must re-sync instead of moving the watermark, or None for a live run.

    * ``dag_run.conf`` with ``window_start`` and ``window_end`` (ISO timestamps, UTC unless they say
      otherwise): that window, for
      a manual re-sync of any range ("Trigger DAG w/ config");
    * a run created by ``airflow backfill create`` (run type ``backfill``): its data interval
      ``[data_interval_start, data_interval_end)``.  The DAG needs a timetable with real intervals
      (``CronDataIntervalTimetable`` / ``DeltaDataIntervalTimetable``): Airflow 3's default cron
      timetable gives zero-length ones, which is refused here rather than silently syncing nothing.
    """
    dag_run = context.get("dag_run")
    conf = getattr(dag_run, "conf", None) or {}
    start: Any
    end: Any
    if conf.get("window_start") or conf.get("window_end"):
        if not (conf.get("window_start") and conf.get("window_end")):
            raise ConfigurationError("dag_run.conf needs both window_start and window_end", sync_id=sync_id)
        start, end = (_utc(dt.datetime.fromisoformat(str(conf[k]))) for k in ("window_start", "window_end"))
    elif str(getattr(getattr(dag_run, "run_type", None), "value", getattr(dag_run, "run_type", ""))) == "backfill":
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        if start is None or end is None or start >= end:
            raise ConfigurationError(
                f"this backfill run has an empty data interval [{start}, {end}): give the DAG a timetable with "
                "real intervals, e.g. schedule=CronDataIntervalTimetable('@hourly', timezone='UTC')",
                sync_id=sync_id,
                rule="backfill window",
            )
    else:
        return None
    if start >= end:
        raise ConfigurationError(f"backfill window [{start}, {end}) is empty", sync_id=sync_id, rule="backfill window")
    return start, end


class ExtractToStagingOperator(_SyncSpecMixin, BaseOperator):
    """Extract new/changed rows (or the whole table) from a source into staged Parquet files.

    Reads the committed watermark from the target's state table, so it needs ``target_conn_id`` too.
    Returns the manifest (a small dict) as XCom; pass it to :class:`LoadStagedToPostgresOperator`.
    An optional pandas ``transform`` runs on every batch before it is staged.

    Backfills: in a run made by ``airflow backfill create`` (or with ``window_start``/``window_end``
    in the run's conf), an incremental sync re-reads the rows whose cursor is in the run's window,
    and the load merges them without touching the watermark (see :func:`backfill_window`);
    ``backfill=False`` turns that off (the run then syncs from the watermark like any other).
    """

    template_fields: Sequence[str] = SPEC_TEMPLATE_FIELDS
    ui_color = "#e8f1fb"

    def __init__(
        self,
        *,
        source_conn_id: str,
        target_conn_id: str,
        source_table: str,
        sync_id: str | None = None,
        staging_uri: str | None = None,
        transform: BatchTransform | str | None = None,
        backfill: bool = True,
        **kwargs: Any,
    ) -> None:
        spec_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _SPEC_ARGUMENTS}
        super().__init__(**kwargs)
        self._init_spec(sync_id=sync_id, source_table=source_table, **spec_kwargs)
        self.source_conn_id = source_conn_id
        self.target_conn_id = target_conn_id
        self.staging_uri = staging_uri
        self.transform = transform
        self.backfill = backfill

    def execute(self, context: Context) -> dict[str, Any]:
        spec = self.build_spec()
        try:
            manifest = self._extract(spec, context)
        except SyncError as error:
            raise _fail(error.with_context(sync_id=spec.sync_id)) from error
        self.log.info("%s", manifest.summary())
        return manifest.to_dict()

    def _extract(self, spec: SyncSpec, context: Context) -> Manifest:
        window = backfill_window(context, spec.sync_id) if self.backfill and spec.mode == "incremental" else None
        if window is not None:
            self.log.info("backfill: re-syncing %s for [%s, %s); the watermark stays", spec.sync_id, *window)
        run_id = context["run_id"]
        engine = _source_engine(self.source_conn_id, spec.sync_id)
        try:
            with closing(_target_connection(self.target_conn_id, spec.sync_id)) as target:
                return extract_for(
                    engine,
                    target,
                    spec,
                    staging=StagingArea(self.staging_uri or default_staging_uri()),
                    run_id=run_id,
                    transform=resolve_transform(self.transform),
                    logger=self.log,
                    window=window,
                )
        finally:
            engine.dispose()


def manifest_dict(value: Any, producer: str = "an extract task") -> dict[str, Any]:
    """A manifest as XCom gives it: a dict (XComArg), JSON text, or a rendered dict repr."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = ast.literal_eval(value)  # a Jinja-rendered Python dict
    if not isinstance(value, dict):
        raise ConfigurationError(f"manifest must be a dict from {producer}'s XCom, got {type(value).__name__}")
    return value


def parse_manifest(value: Any) -> Manifest:
    if isinstance(value, Manifest):
        return value
    return Manifest.from_dict(manifest_dict(value))


class LoadStagedToPostgresOperator(BaseOperator):
    """Merge a staged batch into PostgreSQL and commit the new watermark with it, exactly once.

    ``manifest`` is the extract task's XCom (``extract_task.output``).  A manifest that was already
    committed (task retry) or that a newer run overtook (stale) is a logged no-op.
    """

    template_fields: Sequence[str] = ("manifest", "target_conn_id")
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        manifest: Any,
        target_conn_id: str,
        keep_staged: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.manifest = manifest
        self.target_conn_id = target_conn_id
        self.keep_staged = keep_staged

    def execute(self, context: Context) -> dict[str, Any]:
        manifest = parse_manifest(self.manifest)
        try:
            with closing(_target_connection(self.target_conn_id, manifest.sync_id)) as target:
                result = load_manifest(
                    target, manifest, run_id=context["run_id"], logger=self.log, keep_staged=self.keep_staged
                )
        except SyncError as error:
            raise _fail(error.with_context(sync_id=manifest.sync_id)) from error
        return result.to_dict()


class SyncTableOperator(ExtractToStagingOperator):
    """Extract, (transform) and load one table in a single task: the simple case.

    Returns ``{"manifest": <manifest summary>, "load": <load result>}``.
    """

    ui_color = "#fdf3e1"

    def __init__(self, *, keep_staged: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_staged = keep_staged

    def execute(self, context: Context) -> dict[str, Any]:
        spec = self.build_spec()
        try:
            manifest = self._extract(spec, context)
            self.log.info("%s", manifest.summary())
            with closing(_target_connection(self.target_conn_id, spec.sync_id)) as target:
                result = load_manifest(
                    target, manifest, run_id=context["run_id"], logger=self.log, keep_staged=self.keep_staged
                )
        except SyncError as error:
            raise _fail(error.with_context(sync_id=spec.sync_id)) from error
        summary = {k: v for k, v in manifest.to_dict().items() if k not in ("files", "key_files", "columns")}
        return {"manifest": summary, "load": result.to_dict()}


_SPEC_ARGUMENTS = frozenset(inspect.signature(_SyncSpecMixin._init_spec).parameters) - {
    "self",
    "sync_id",
    "source_table",
}

__all__: Sequence[str] = (
    "ExtractToStagingOperator",
    "LoadStagedToPostgresOperator",
    "SyncTableOperator",
    "backfill_window",
    "parse_manifest",
    "resolve_transform",
)
