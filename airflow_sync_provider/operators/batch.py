"""What the operators that run a sync's batch are made of, written once.

* :class:`BaseExtractOperator`: an operator that extracts one batch (a table or an API endpoint):
  its backfill window (:func:`backfill_window`), its transform (watched for column lineage) and its
  staging area, the keyword arguments every extraction takes;
* :class:`BaseTableSyncOperator`: the table-sync declaration (the :class:`SyncSpec` arguments and
  ``staging_uri``), shared by the table operators and ``ReconcileOperator``;
* :class:`BaseTableExtractOperator`: both, plus the source engine and the target connection of a run.

The concrete operators add only their own arguments (see
:func:`~airflow_sync_provider.operators.common.extends_signature`, which keeps their signatures whole).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from typing import TYPE_CHECKING, Any

import psycopg
import sqlalchemy as sa
from airflow.sdk import BaseOperator, Context

from airflow_sync_provider import lineage
from airflow_sync_provider.assets import emit_table_events
from airflow_sync_provider.core import ConfigurationError, LoadResult, Manifest, SyncSpec
from airflow_sync_provider.core.extract import BatchTransform
from airflow_sync_provider.core.spec import DEFAULT_SCHEMA_DRIFT
from airflow_sync_provider.hooks.source import source_engine
from airflow_sync_provider.hooks.target import target_connection
from airflow_sync_provider.operators.common import (
    SPEC_TEMPLATE_FIELDS,
    build_sync_spec,
    extends_signature,
    resolve_transform,
    staging_area,
    target_for_run,
    task_errors,
)

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_sync_provider.core.api import ApiSpec

#: ``:param`` lines of the table-sync declaration (:class:`BaseTableSyncOperator`'s arguments).
SPEC_PARAMS_DOC = """
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
    :param staging_uri: where batches are staged (a folder or ``s3://``, ``gs://``... URI; the split
        operators need one every worker reads); default ``[sync] staging_uri``, else
        ``$SYNC_STAGING_DIR``, else a local cache folder. (templated)
"""

#: ``:param`` lines of :class:`BaseTableExtractOperator`'s own arguments.
EXTRACT_PARAMS_DOC = """
    :param transform: ``DataFrame -> DataFrame`` applied to every batch, or its ``"module:function"`` path.
    :param backfill: re-sync the run's window in backfill runs; ``False`` syncs from the watermark as usual.
"""


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


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    """The manifest without its file and column lists: what a one-task sync returns as XCom."""
    return {k: v for k, v in manifest.to_dict().items() if k not in ("files", "key_files", "columns")}


class BaseExtractOperator(BaseOperator):
    """An operator that extracts one batch of a sync (a table, an API endpoint) and stages it
    (:meth:`stage_batch`) or loads it too (:meth:`sync_batch`).

    Subclasses declare and set ``sync_id``, ``target_conn_id``, ``transform``, ``backfill`` and
    ``staging_uri``, and say how to build the spec, what connections a run takes and what the
    source is as a lineage dataset.
    """

    sync_id: str
    target_conn_id: str
    transform: BatchTransform | str | None
    backfill: bool
    staging_uri: str | None

    def build_spec(self) -> Any:
        """The spec of the (rendered) arguments; raises ``ConfigurationError``."""
        raise NotImplementedError

    def connections(self, spec: Any, context: Context) -> AbstractContextManager[tuple[Any, psycopg.Connection[Any]]]:
        """The source (an engine, an API client) and the target connection of a run, closed after."""
        raise NotImplementedError

    def source_dataset(self, manifest: Manifest) -> lineage.DatasetName:
        """The source of ``manifest`` as an OpenLineage dataset."""
        raise NotImplementedError

    def declared_lineage(self) -> OperatorLineage:
        """Lineage from the declaration alone, for a run that failed before it staged a batch."""
        return lineage.operator_lineage()

    def batch_options(self, spec: SyncSpec | ApiSpec, context: Context, *, split: bool = False) -> dict[str, Any]:
        """The keyword arguments of this run's extraction (``run_sync``, ``extract_for``, the API's):
        ``staging`` (``split``: the batch goes to another task, see
        :func:`~airflow_sync_provider.operators.common.staging_area`), ``run_id``, the ``transform``
        (watched for column lineage, kept in ``self._transform_watch``), ``logger`` and the backfill
        ``window`` (logged) when ``backfill`` is on and the sync is incremental."""
        window = backfill_window(context, spec.sync_id) if self.backfill and spec.mode == "incremental" else None
        if window is not None:
            self.log.info("backfill: re-syncing %s for [%s, %s); the watermark stays", spec.sync_id, *window)
        self._transform_watch = lineage.watch_transform(resolve_transform(self.transform))
        return {
            "staging": staging_area(self.staging_uri, split=split, executor=self.executor),
            "run_id": context["run_id"],
            "transform": self._transform_watch,
            "logger": self.log,
            "window": window,
        }

    def stage_batch(self, context: Context, extract: Callable[..., Manifest]) -> dict[str, Any]:
        """The run of an extract task: ``extract(source, target, spec, **options)`` stages the batch
        for another task; returns its manifest (XCom)."""
        with task_errors(self.sync_id):
            spec = self.build_spec()
            options = self.batch_options(spec, context, split=True)
            with self.connections(spec, context) as (source, target):
                manifest = extract(source, target, spec, **options)
        self._manifest = manifest
        self.log.info("%s", manifest.summary())
        return manifest.to_dict()

    def sync_batch(
        self, context: Context, sync: Callable[..., tuple[Manifest, LoadResult]], *, keep_staged: bool
    ) -> dict[str, Any]:
        """The run of a one-task sync: ``sync(source, target, spec, **options)`` extracts and loads
        the batch; emits the asset events of what it wrote; returns ``{"manifest": <summary>,
        "load": <load result>}`` (XCom)."""
        with task_errors(self.sync_id):
            spec = self.build_spec()
            options = self.batch_options(spec, context)
            with self.connections(spec, context) as (source, target):
                manifest, result = sync(source, target, spec, keep_staged=keep_staged, **options)
        self._manifest, self._result = manifest, result
        self.log.info("%s", manifest.summary())
        emit_table_events(context, self.outlets, self.target_conn_id, lineage.sync_writes(manifest, result), self.log)
        return {"manifest": manifest_summary(manifest), "load": result.to_dict()}

    def staged_lineage(self) -> OperatorLineage:
        """After :meth:`stage_batch`: the source -> the sync's staging folder, with column lineage
        through the transform."""
        manifest: Manifest | None = getattr(self, "_manifest", None)
        if manifest is None:
            return lineage.operator_lineage()
        staged = lineage.staging_dataset(manifest.staging_dir)
        watch = getattr(self, "_transform_watch", None)
        inputs, output = lineage.table_lineage(self.source_dataset(manifest), staged, manifest, watch=watch)
        return lineage.operator_lineage([inputs], [output])

    def synced_lineage(self) -> OperatorLineage:
        """After :meth:`sync_batch`: the source -> the target table (and history), with column
        lineage and row counts; the declared datasets when no batch was staged."""
        manifest: Manifest | None = getattr(self, "_manifest", None)
        if manifest is None:
            return self.declared_lineage()
        return lineage.load_lineage(
            self.target_conn_id,
            self.source_dataset(manifest),
            manifest,
            getattr(self, "_result", None),
            getattr(self, "_transform_watch", None),
        )


class BaseTableSyncOperator(BaseOperator):
    __doc__ = (
        """Takes a table-sync declaration (that of :class:`~airflow_sync_provider.core.SyncSpec`).
"""
        + SPEC_PARAMS_DOC
    )

    template_fields: Sequence[str] = SPEC_TEMPLATE_FIELDS

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

    def build_spec(self) -> SyncSpec:
        """The :class:`SyncSpec` of the (rendered) arguments; raises ``ConfigurationError``."""
        return build_sync_spec(self)

    @contextmanager
    def connections(
        self, spec: SyncSpec, context: Context | None = None
    ) -> Iterator[tuple[sa.Engine, psycopg.Connection[Any]]]:
        """The source engine and the target connection of a run, closed after; with the run's
        ``context``, the run is recorded in the target (:func:`~.common.record_dag_run`)."""
        with source_engine(self.source_conn_id, sync_id=spec.sync_id) as engine:
            if context is None:
                with closing(target_connection(self.target_conn_id, sync_id=spec.sync_id)) as target:
                    yield engine, target
                return
            with target_for_run(
                self.target_conn_id, spec.target_schema, spec.sync_id, context, source_conn_id=self.source_conn_id
            ) as target:
                yield engine, target


class BaseTableExtractOperator(BaseTableSyncOperator, BaseExtractOperator):
    __doc__ = (
        """Extracts one batch of a table sync: the declaration, ``transform`` and ``backfill``.
"""
        + SPEC_PARAMS_DOC
        + EXTRACT_PARAMS_DOC
    )

    @extends_signature(BaseTableSyncOperator.__init__)
    def __init__(
        self,
        *,
        transform: BatchTransform | str | None = None,
        backfill: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.transform = transform
        self.backfill = backfill

    def source_dataset(self, manifest: Manifest) -> lineage.DatasetName:
        return lineage.database_dataset(lineage.connection_url(self.source_conn_id), manifest.source_table)


__all__: Sequence[str] = (
    "EXTRACT_PARAMS_DOC",
    "SPEC_PARAMS_DOC",
    "BaseExtractOperator",
    "BaseTableExtractOperator",
    "BaseTableSyncOperator",
    "backfill_window",
    "manifest_summary",
)
