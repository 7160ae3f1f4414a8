"""Operators: extract to staging, load staged batches into PostgreSQL, or both in one task.

All three run the same engine (:mod:`airflow_sync_provider.core`).  XCom carries only the manifest
(paths, counts, watermark range) and the load result, never rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, Context

from airflow_sync_provider import lineage
from airflow_sync_provider.assets import emit_table_events
from airflow_sync_provider.core import Manifest, SyncSpec, extract_for, load_manifest, run_sync
from airflow_sync_provider.core.streaming import TableStream, check_streamable
from airflow_sync_provider.operators.batch import (
    EXTRACT_PARAMS_DOC,
    SPEC_PARAMS_DOC,
    BaseTableExtractOperator,
    backfill_window,
    manifest_summary,
)
from airflow_sync_provider.operators.common import (
    check_shared_staging,
    extends_signature,
    manifest_argument,
    parse_manifest,
    resolve_transform,
    target_for_run,
    task_errors,
)
from airflow_sync_provider.operators.streaming import (
    STREAM_PARAMS_DOC,
    STREAM_TEMPLATE_FIELDS,
    StreamingOperator,
)
from airflow_sync_provider.plugins.links import SYNC_LINKS

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage


class ExtractToStagingOperator(BaseTableExtractOperator):
    __doc__ = (
        """Extract new/changed rows (or the whole table) from a source into staged Parquet files.

    Reads the committed watermark from the target's state table, so it needs ``target_conn_id`` too.
    Returns the manifest (a small dict) as XCom; pass it to :class:`LoadStagedToPostgresOperator`.
    An optional pandas ``transform`` runs on every batch before it is staged.

    Backfills: in a run made by ``airflow backfill create`` (or with ``window_start``/``window_end``
    in the run's conf), an incremental sync re-reads the rows whose cursor is in the run's window,
    and the load merges them without touching the watermark (see :func:`backfill_window`).

    The sync declaration (``sync_id`` ... ``schema_drift``) is that of
    :class:`~airflow_sync_provider.core.SyncSpec`.
"""
        + SPEC_PARAMS_DOC
        + EXTRACT_PARAMS_DOC
    )

    ui_color = "#e8f1fb"
    operator_extra_links = SYNC_LINKS

    def execute(self, context: Context) -> dict[str, Any]:
        return self.stage_batch(context, extract_for)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """Source table -> the sync's staging folder, with column lineage through the transform."""
        return self.staged_lineage()


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
        manifest = self._manifest = manifest_argument(self.manifest)
        with task_errors(manifest.sync_id):
            check_shared_staging(manifest.staging_dir, executor=self.executor, what=f"the load of {manifest.sync_id}")
            with target_for_run(self.target_conn_id, manifest.target_schema, manifest.sync_id, context) as target:
                result = load_manifest(
                    target, manifest, run_id=context["run_id"], logger=self.log, keep_staged=self.keep_staged
                )
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


class SyncTableOperator(BaseTableExtractOperator, StreamingOperator):
    __doc__ = (
        """Extract, (transform) and load one table in a single task: the simple case; or stream.

    Runs :func:`~airflow_sync_provider.core.run_sync`.  Returns ``{"manifest": <manifest summary>,
    "load": <load result>}``.  Backfill runs re-sync their window as described for
    :class:`ExtractToStagingOperator`; the sync declaration is that of
    :class:`~airflow_sync_provider.core.SyncSpec`.

    With ``stream_for`` an incremental sync runs such batches one after another
    (:class:`~airflow_sync_provider.core.streaming.TableStream`: before each, one indexed query on
    the source asks for a row past the committed watermark) and returns ``{"stream": <stats>}``.
    A full sync, or a backfill run, cannot stream (the task fails, saying so).
"""
        + SPEC_PARAMS_DOC
        + EXTRACT_PARAMS_DOC
        + "    :param keep_staged: keep the staged files after the load (they are removed by default).\n"
        + STREAM_PARAMS_DOC
    )

    template_fields: Sequence[str] = (*BaseTableExtractOperator.template_fields, *STREAM_TEMPLATE_FIELDS)
    ui_color = "#fdf3e1"
    operator_extra_links = SYNC_LINKS

    @extends_signature(BaseTableExtractOperator.__init__, StreamingOperator.__init__)
    def __init__(self, *, keep_staged: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_staged = keep_staged

    def execute(self, context: Context) -> dict[str, Any]:
        with task_errors(self.sync_id):
            stream_for = self.stream_seconds()
        if stream_for is None:
            return self.sync_batch(context, run_sync, keep_staged=self.keep_staged)
        with task_errors(self.sync_id):
            spec = self.build_spec()
            options = self.batch_options(spec, context)
            check_streamable(spec, window=options["window"])
            return self._stream(spec, options, stream_for, context)

    def _stream(self, spec: SyncSpec, options: dict[str, Any], stream_for: float, context: Context) -> dict[str, Any]:
        with self.stopping() as stop, self.connections(spec, context) as (engine, target):
            stream = TableStream(
                engine,
                target,
                spec,
                staging=options["staging"],
                run_id=options["run_id"],
                logger=self.log,
                transform=options["transform"],
            )
            try:
                stats = self.run_stream(
                    stream, stop, stream_for=stream_for, what=f"sync {spec.sync_id}: stream", probe_first=True
                )
            finally:
                stream.close()
        return {"stream": stats.to_dict()}

    def get_openlineage_facets_on_start(self) -> OperatorLineage:
        """Source table -> target table, named from the (rendered) declaration: no counts yet."""
        spec = self.build_spec()
        source = lineage.database_dataset(lineage.connection_url(self.source_conn_id), spec.qualified_source)
        target = lineage.database_dataset(lineage.connection_url(self.target_conn_id), spec.qualified_target)
        return lineage.operator_lineage([lineage.input_dataset(source)], [lineage.output_dataset(target)])

    def declared_lineage(self) -> OperatorLineage:
        return self.get_openlineage_facets_on_start()

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """Source table -> target table (and history), with column lineage and row counts."""
        return self.synced_lineage()


__all__: Sequence[str] = (
    "ExtractToStagingOperator",
    "LoadStagedToPostgresOperator",
    "SyncTableOperator",
    "backfill_window",
    "manifest_summary",
    "parse_manifest",
    "resolve_transform",
)
