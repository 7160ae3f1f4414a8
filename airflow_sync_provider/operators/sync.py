"""Operators: extract to staging, load staged batches into PostgreSQL, or both in one task.

All three run the same engine (:mod:`airflow_sync_provider.core`).  XCom carries only the manifest
(paths, counts, watermark range) and the load result, never rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from contextlib import closing
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, Context

from airflow_sync_provider import lineage
from airflow_sync_provider.assets import emit_table_events
from airflow_sync_provider.core import (
    ConfigurationError,
    Manifest,
    SyncError,
    SyncSpec,
    extract_for,
    load_manifest,
    run_sync,
)
from airflow_sync_provider.core.extract import BatchTransform
from airflow_sync_provider.core.spec import DEFAULT_SCHEMA_DRIFT
from airflow_sync_provider.hooks.source import source_engine
from airflow_sync_provider.hooks.target import target_connection
from airflow_sync_provider.operators.common import (
    SPEC_TEMPLATE_FIELDS,
    as_task_error,
    build_sync_spec,
    check_shared_staging,
    parse_manifest,
    record_dag_run,
    resolve_transform,
    staging_area,
)
from airflow_sync_provider.plugins.links import SYNC_LINKS

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage


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


def _run_window(operator: BaseOperator, backfill: bool, spec: SyncSpec, context: Context) -> tuple[Any, Any] | None:
    """The backfill window of this run (see :func:`backfill_window`) when ``backfill`` is on, logged."""
    window = backfill_window(context, spec.sync_id) if backfill and spec.mode == "incremental" else None
    if window is not None:
        operator.log.info("backfill: re-syncing %s for [%s, %s); the watermark stays", spec.sync_id, *window)
    return window


class ExtractToStagingOperator(BaseOperator):
    """Extract new/changed rows (or the whole table) from a source into staged Parquet files.

    Reads the committed watermark from the target's state table, so it needs ``target_conn_id`` too.
    Returns the manifest (a small dict) as XCom; pass it to :class:`LoadStagedToPostgresOperator`.
    An optional pandas ``transform`` runs on every batch before it is staged.

    Backfills: in a run made by ``airflow backfill create`` (or with ``window_start``/``window_end``
    in the run's conf), an incremental sync re-reads the rows whose cursor is in the run's window,
    and the load merges them without touching the watermark (see :func:`backfill_window`).

    The sync declaration (``sync_id`` ... ``schema_drift``) is that of
    :class:`~airflow_sync_provider.core.SyncSpec`.

    :param source_conn_id: Airflow connection of the source database (any SQLAlchemy-reachable
        database: see :class:`~airflow_sync_provider.hooks.source.SyncSourceHook`). (templated)
    :param target_conn_id: Airflow ``postgres`` connection of the target; it holds the sync state. (templated)
    :param source_table: the table (or view) to read. (templated)
    :param sync_id: names the sync in the state table; default ``source_table``. (templated)
    :param target_table: the table to write; default ``source_table``. (templated)
    :param source_schema: schema of ``source_table``; default the connection's. (templated)
    :param target_schema: schema of ``target_table`` and of the state table. (templated)
    :param mode: ``"incremental"`` (rows past the committed watermark) or ``"full"`` (the whole table).
    :param cursor_column: the column an incremental sync resumes from, e.g. ``updated_at``. (templated)
    :param primary_key: key columns; default the source table's primary key.
    :param columns: the columns to sync (including the key and the cursor); default all.
    :param delete_mode: ``"hard"`` (delete), ``"soft"`` (set ``_sync_deleted_at``) or ``"none"``.
    :param detect_deletes: find target rows the source no longer has; default on for ``full`` only.
    :param batch_rows: rows per staged file (bounds memory).
    :param lag: read only cursor values older than ``now() - lag`` on the source.
    :param lookback: re-read this much below the watermark every run (an int for numeric cursors).
    :param guard_open_transactions: stop below the oldest open source transaction (late commits).
    :param state_table: the state table (in ``target_schema``).
    :param max_delete_fraction: fail instead of deleting more than this share of the target's rows.
    :param history_table: keep an SCD type 2 history of the target in this table.
    :param schema_drift: when the source's columns changed: ``"freeze"`` (fail), ``"evolve"`` or ``"discard"``.
    :param staging_uri: where batches are staged (a folder or ``s3://``, ``gs://``... URI every worker
        reads); default ``[sync] staging_uri``, else ``$SYNC_STAGING_DIR``, else a local cache folder. (templated)
    :param transform: ``DataFrame -> DataFrame`` applied to every batch, or its ``"module:function"`` path.
    :param backfill: re-sync the run's window in backfill runs; ``False`` syncs from the watermark as usual.
    """

    template_fields: Sequence[str] = SPEC_TEMPLATE_FIELDS
    ui_color = "#e8f1fb"
    operator_extra_links = SYNC_LINKS

    def __init__(
        self,
        *,
        source_conn_id: str,
        target_conn_id: str,
        source_table: str,
        sync_id: str | None = None,
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
        staging_uri: str | None = None,
        transform: BatchTransform | str | None = None,
        backfill: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source_conn_id = source_conn_id
        self.target_conn_id = target_conn_id
        self.source_table = source_table
        self.sync_id = sync_id or source_table
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
        self.staging_uri = staging_uri
        self.transform = transform
        self.backfill = backfill

    def build_spec(self) -> SyncSpec:
        """The :class:`SyncSpec` of the (rendered) arguments; raises ``ConfigurationError``."""
        return build_sync_spec(self)

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            spec = self.build_spec()
            window = _run_window(self, self.backfill, spec, context)
            self._transform_watch = lineage.watch_transform(resolve_transform(self.transform))
            with (
                source_engine(self.source_conn_id, sync_id=spec.sync_id) as engine,
                closing(target_connection(self.target_conn_id, sync_id=spec.sync_id)) as target,
            ):
                record_dag_run(target, spec.target_schema, spec.sync_id, context, source_conn_id=self.source_conn_id)
                manifest = extract_for(
                    engine,
                    target,
                    spec,
                    staging=staging_area(self.staging_uri, split=True, executor=self.executor),
                    run_id=context["run_id"],
                    transform=self._transform_watch,
                    logger=self.log,
                    window=window,
                )
        except SyncError as error:
            raise as_task_error(error.with_context(sync_id=self.sync_id)) from error
        self._manifest = manifest
        self.log.info("%s", manifest.summary())
        return manifest.to_dict()

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """Source table -> the sync's staging folder, with column lineage through the transform."""
        manifest: Manifest | None = getattr(self, "_manifest", None)
        if manifest is None:
            return lineage.operator_lineage()
        source = lineage.database_dataset(lineage.connection_url(self.source_conn_id), manifest.source_table)
        staged = lineage.staging_dataset(manifest.staging_dir)
        inputs, output = lineage.table_lineage(source, staged, manifest, watch=getattr(self, "_transform_watch", None))
        return lineage.operator_lineage([inputs], [output])


class LoadStagedToPostgresOperator(BaseOperator):
    """Merge a staged batch into PostgreSQL and commit the new watermark with it, exactly once.

    A manifest that was already committed (task retry) or that a newer run overtook (stale) is a
    logged no-op.  Returns the load result (a small dict) as XCom.

    :param manifest: the extract task's XCom (``extract_task.output``; a dict, or its JSON or repr). (templated)
    :param target_conn_id: Airflow ``postgres`` connection of the target. (templated)
    :param keep_staged: keep the staged files after the load (they are removed by default).
    """

    template_fields: Sequence[str] = ("manifest", "target_conn_id")
    ui_color = "#e6f4ea"
    operator_extra_links = SYNC_LINKS

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
        try:
            manifest = parse_manifest(self.manifest)
        except SyncError as error:
            raise as_task_error(error) from error
        self._manifest = manifest
        try:
            check_shared_staging(manifest.staging_dir, executor=self.executor, what=f"the load of {manifest.sync_id}")
            with closing(target_connection(self.target_conn_id, sync_id=manifest.sync_id)) as target:
                record_dag_run(target, manifest.target_schema, manifest.sync_id, context)
                result = load_manifest(
                    target, manifest, run_id=context["run_id"], logger=self.log, keep_staged=self.keep_staged
                )
        except SyncError as error:
            raise as_task_error(error.with_context(sync_id=manifest.sync_id)) from error
        self._result = result
        emit_table_events(context, self.outlets, self.target_conn_id, lineage.sync_writes(manifest, result), self.log)
        return result.to_dict()

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """The sync's staging folder -> the target table (and its history table), with row counts."""
        manifest: Manifest | None = getattr(self, "_manifest", None)
        if manifest is None:
            return lineage.operator_lineage()
        staged = lineage.staging_dataset(manifest.staging_dir)
        return lineage.load_lineage(self.target_conn_id, staged, manifest, getattr(self, "_result", None), None)


class SyncTableOperator(BaseOperator):
    """Extract, (transform) and load one table in a single task: the simple case.

    Runs :func:`~airflow_sync_provider.core.run_sync`.  Returns ``{"manifest": <manifest summary>,
    "load": <load result>}``.  Backfill runs re-sync their window as described for
    :class:`ExtractToStagingOperator`; the sync declaration is that of
    :class:`~airflow_sync_provider.core.SyncSpec`.

    :param source_conn_id: Airflow connection of the source database (any SQLAlchemy-reachable
        database: see :class:`~airflow_sync_provider.hooks.source.SyncSourceHook`). (templated)
    :param target_conn_id: Airflow ``postgres`` connection of the target; it holds the sync state. (templated)
    :param source_table: the table (or view) to read. (templated)
    :param sync_id: names the sync in the state table; default ``source_table``. (templated)
    :param target_table: the table to write; default ``source_table``. (templated)
    :param source_schema: schema of ``source_table``; default the connection's. (templated)
    :param target_schema: schema of ``target_table`` and of the state table. (templated)
    :param mode: ``"incremental"`` (rows past the committed watermark) or ``"full"`` (the whole table).
    :param cursor_column: the column an incremental sync resumes from, e.g. ``updated_at``. (templated)
    :param primary_key: key columns; default the source table's primary key.
    :param columns: the columns to sync (including the key and the cursor); default all.
    :param delete_mode: ``"hard"`` (delete), ``"soft"`` (set ``_sync_deleted_at``) or ``"none"``.
    :param detect_deletes: find target rows the source no longer has; default on for ``full`` only.
    :param batch_rows: rows per staged file (bounds memory).
    :param lag: read only cursor values older than ``now() - lag`` on the source.
    :param lookback: re-read this much below the watermark every run (an int for numeric cursors).
    :param guard_open_transactions: stop below the oldest open source transaction (late commits).
    :param state_table: the state table (in ``target_schema``).
    :param max_delete_fraction: fail instead of deleting more than this share of the target's rows.
    :param history_table: keep an SCD type 2 history of the target in this table.
    :param schema_drift: when the source's columns changed: ``"freeze"`` (fail), ``"evolve"`` or ``"discard"``.
    :param staging_uri: where batches are staged (a folder or ``s3://``, ``gs://``... URI); default
        ``[sync] staging_uri``, else ``$SYNC_STAGING_DIR``, else a local cache folder. (templated)
    :param transform: ``DataFrame -> DataFrame`` applied to every batch, or its ``"module:function"`` path.
    :param backfill: re-sync the run's window in backfill runs; ``False`` syncs from the watermark as usual.
    :param keep_staged: keep the staged files after the load (they are removed by default).
    """

    template_fields: Sequence[str] = SPEC_TEMPLATE_FIELDS
    ui_color = "#fdf3e1"
    operator_extra_links = SYNC_LINKS

    def __init__(
        self,
        *,
        source_conn_id: str,
        target_conn_id: str,
        source_table: str,
        sync_id: str | None = None,
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
        staging_uri: str | None = None,
        transform: BatchTransform | str | None = None,
        backfill: bool = True,
        keep_staged: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source_conn_id = source_conn_id
        self.target_conn_id = target_conn_id
        self.source_table = source_table
        self.sync_id = sync_id or source_table
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
        self.staging_uri = staging_uri
        self.transform = transform
        self.backfill = backfill
        self.keep_staged = keep_staged

    def build_spec(self) -> SyncSpec:
        """The :class:`SyncSpec` of the (rendered) arguments; raises ``ConfigurationError``."""
        return build_sync_spec(self)

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            spec = self.build_spec()
            window = _run_window(self, self.backfill, spec, context)
            self._transform_watch = lineage.watch_transform(resolve_transform(self.transform))
            with (
                source_engine(self.source_conn_id, sync_id=spec.sync_id) as engine,
                closing(target_connection(self.target_conn_id, sync_id=spec.sync_id)) as target,
            ):
                record_dag_run(target, spec.target_schema, spec.sync_id, context, source_conn_id=self.source_conn_id)
                manifest, result = run_sync(
                    engine,
                    target,
                    spec,
                    staging=staging_area(self.staging_uri),
                    run_id=context["run_id"],
                    transform=self._transform_watch,
                    logger=self.log,
                    window=window,
                    keep_staged=self.keep_staged,
                )
        except SyncError as error:
            raise as_task_error(error.with_context(sync_id=self.sync_id)) from error
        self._manifest, self._result = manifest, result
        self.log.info("%s", manifest.summary())
        emit_table_events(context, self.outlets, self.target_conn_id, lineage.sync_writes(manifest, result), self.log)
        return {"manifest": manifest_summary(manifest), "load": result.to_dict()}

    def get_openlineage_facets_on_start(self) -> OperatorLineage:
        """Source table -> target table, named from the (rendered) declaration: no counts yet."""
        spec = self.build_spec()
        source = lineage.database_dataset(lineage.connection_url(self.source_conn_id), spec.qualified_source)
        target = lineage.database_dataset(lineage.connection_url(self.target_conn_id), spec.qualified_target)
        return lineage.operator_lineage([lineage.input_dataset(source)], [lineage.output_dataset(target)])

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """Source table -> target table (and history), with column lineage and row counts."""
        manifest: Manifest | None = getattr(self, "_manifest", None)
        if manifest is None:  # failed before a batch was staged: the declared tables
            return self.get_openlineage_facets_on_start()
        source = lineage.database_dataset(lineage.connection_url(self.source_conn_id), manifest.source_table)
        return lineage.load_lineage(
            self.target_conn_id,
            source,
            manifest,
            getattr(self, "_result", None),
            getattr(self, "_transform_watch", None),
        )


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    """The manifest without its file and column lists: what a one-task sync returns as XCom."""
    return {k: v for k, v in manifest.to_dict().items() if k not in ("files", "key_files", "columns")}


__all__: Sequence[str] = (
    "ExtractToStagingOperator",
    "LoadStagedToPostgresOperator",
    "SyncTableOperator",
    "backfill_window",
    "manifest_summary",
    "parse_manifest",
    "resolve_transform",
)
