"""Operators: a Great Expectations quality gate between extract and load, and the quarantine replay.

The gate's XCom is the manifest to load (a dict, like the extract task's), with a one-line quality
summary added to its ``notes``; the compact per-expectation summary is pushed under the XCom key
``quality``.  Great Expectations is imported only when a task runs, never at DAG parse time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import closing
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, Context

from airflow_sync_provider import lineage
from airflow_sync_provider.core import ConfigurationError, Manifest, SyncError
from airflow_sync_provider.hooks.target import target_connection
from airflow_sync_provider.operators.common import (
    as_task_error,
    manifest_argument,
    resolve_transform,
    staging_area,
    target_for_run,
)
from airflow_sync_provider.plugins.links import SYNC_LINKS

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage


def _suite_argument(expectations: Any, suite_path: str | None) -> Any:
    if (expectations is None) == (not suite_path):
        raise ConfigurationError(
            "give exactly one of expectations (GX expectation objects) or suite_path (a JSON file)"
        )
    return expectations if expectations is not None else suite_path


def _push(context: Context, key: str, value: Any) -> None:
    ti = context.get("ti") if isinstance(context, Mapping) else None
    if ti is not None:
        ti.xcom_push(key=key, value=value)


class DataQualityGateOperator(BaseOperator):
    """Validate a staged batch with a Great Expectations suite before it is loaded.

    Put it between :class:`~airflow_sync_provider.operators.sync.ExtractToStagingOperator` and
    :class:`~airflow_sync_provider.operators.sync.LoadStagedToPostgresOperator`, and pass its
    output to the load: ``load = LoadStagedToPostgresOperator(manifest=gate.output, ...)``.

    :param manifest: the extract task's XCom (``extract.output``). (templated)
    :param target_conn_id: Airflow ``postgres`` connection of the target: the results are recorded
        there, and quarantined rows go to its ``_sync_quarantine``. (templated)
    :param expectations: GX expectation objects (a list) or a ``gx.ExpectationSuite``.
    :param suite_path: or a GX suite JSON file (templated).
    :param severities: ``{"<expectation type>[:<column>]": "error" | "warn"}``; otherwise
        ``meta={"severity": "warn"}`` on the expectation, otherwise GX's ``severity``; default error.
    :param quarantine: split rows failing row-level ``error`` expectations off into
        ``_sync_quarantine`` and load the rest (the watermark still moves).
    :param max_quarantine_fraction: fail (quarantine and load nothing) above this share of rows.
    :param chunk_rows: rows per GX batch for row-level expectations (bounds memory).
    :param staging_uri: where the batch is staged; default as for the sync operators. (templated)
    :param write_report: write an HTML report next to the staged batch.
    """

    template_fields: Sequence[str] = ("manifest", "target_conn_id", "suite_path", "staging_uri")
    ui_color = "#fff4d6"
    operator_extra_links = SYNC_LINKS

    def __init__(
        self,
        *,
        manifest: Any,
        target_conn_id: str,
        expectations: Any = None,
        suite_path: str | None = None,
        severities: Mapping[str, str] | None = None,
        quarantine: bool = False,
        max_quarantine_fraction: float = 0.0,
        chunk_rows: int = 200_000,
        staging_uri: str | None = None,
        write_report: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.manifest = manifest
        self.target_conn_id = target_conn_id
        self.expectations = expectations
        self.suite_path = suite_path
        self.severities = severities
        self.quarantine = quarantine
        self.max_quarantine_fraction = max_quarantine_fraction
        self.chunk_rows = chunk_rows
        self.staging_uri = staging_uri
        self.write_report = write_report

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_sync_provider.core.quality import validate_manifest

        manifest = self._manifest = manifest_argument(self.manifest)
        try:
            suite = _suite_argument(self.expectations, self.suite_path)
            with target_for_run(self.target_conn_id, manifest.target_schema, manifest.sync_id, context) as target:
                result = validate_manifest(
                    manifest,
                    suite,
                    severities=self.severities,
                    quarantine=self.quarantine,
                    max_quarantine_fraction=self.max_quarantine_fraction,
                    staging=staging_area(self.staging_uri, split=True, executor=self.executor),
                    target_conn=target,
                    run_id=context["run_id"],
                    logger=self.log,
                    chunk_rows=self.chunk_rows,
                    write_report=self.write_report,
                )
        except SyncError as error:
            failed = getattr(error, "result", None)
            if failed is not None:
                self._quality = failed.summary()
                _push(context, "quality", self._quality)
            raise as_task_error(error.with_context(sync_id=manifest.sync_id)) from error
        self._quality = result.summary()
        _push(context, "quality", self._quality)
        return result.manifest.to_dict()

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """The staged batch as input, with every expectation as a data-quality assertion (also on failure)."""
        manifest: Manifest | None = getattr(self, "_manifest", None)
        if manifest is None:
            return lineage.operator_lineage()
        summary: dict[str, Any] | None = getattr(self, "_quality", None)
        quality = lineage.quality_facet(summary["results"]) if summary and summary.get("results") else None
        staged = lineage.staging_dataset(manifest.staging_dir)
        return lineage.operator_lineage([lineage.input_dataset(staged, lineage.manifest_columns(manifest), quality)])

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> OperatorLineage:
        return self.get_openlineage_facets_on_complete(task_instance)


class ReplayQuarantinedRowsOperator(BaseOperator):
    """Merge a sync's pending quarantined rows into the target once they are fixed.

    :param sync_id: the sync whose quarantined rows are replayed. (templated)
    :param target_conn_id: Airflow ``postgres`` connection of the target. (templated)
    :param fix: a ``DataFrame -> DataFrame`` callable (or ``"module:function"``) applied to the rows
        first; rows it drops stay in quarantine.
    :param expectations: optional GX expectations to re-validate the fixed rows with (row-level
        expectations; rows still failing an ``error`` one stay in quarantine).
    :param suite_path: or a GX suite JSON file. (templated)
    :param severities: as for :class:`DataQualityGateOperator`.
    :param quarantined_in_run: only the rows this run quarantined (templated); default all pending.
    :param target_schema: schema of the target table and of ``_sync_quarantine``.
    :param staging_uri: where the fixed rows are staged; default as for the sync operators.

    Returns the replay counts (XCom); rows a later sync already updated are skipped and reported.
    """

    template_fields: Sequence[str] = ("sync_id", "target_conn_id", "suite_path", "quarantined_in_run")
    ui_color = "#fff4d6"
    operator_extra_links = SYNC_LINKS

    def __init__(
        self,
        *,
        sync_id: str,
        target_conn_id: str,
        fix: Any = None,
        expectations: Any = None,
        suite_path: str | None = None,
        severities: Mapping[str, str] | None = None,
        quarantined_in_run: str | None = None,
        target_schema: str = "public",
        staging_uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sync_id = sync_id
        self.target_conn_id = target_conn_id
        self.fix = fix
        self.expectations = expectations
        self.suite_path = suite_path
        self.severities = severities
        self.quarantined_in_run = quarantined_in_run
        self.target_schema = target_schema
        self.staging_uri = staging_uri

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_sync_provider.core.quality import replay_quarantined

        try:
            suite = None
            if self.expectations is not None or self.suite_path:
                suite = _suite_argument(self.expectations, self.suite_path)
            with closing(target_connection(self.target_conn_id, sync_id=self.sync_id)) as target:
                result = replay_quarantined(
                    target,
                    self.sync_id,
                    run_id=context["run_id"],
                    fix=resolve_transform(self.fix),
                    suite=suite,
                    severities=self.severities,
                    quarantined_in_run=self.quarantined_in_run or None,
                    target_schema=self.target_schema,
                    staging=staging_area(self.staging_uri),
                    logger=self.log,
                )
        except SyncError as error:
            raise as_task_error(error.with_context(sync_id=self.sync_id)) from error
        return result.to_dict()


class ReferentialIntegrityGateOperator(BaseOperator):
    """Fail (load nothing) when staged rows point to rows the target does not have.

    Sits between extract (or a quality gate) and load like :class:`DataQualityGateOperator` and
    passes the manifest on unchanged: ``load = LoadStagedToPostgresOperator(manifest=refs.output)``.

    :param manifest: the extract (or gate) task's XCom. (templated)
    :param target_conn_id: Airflow ``postgres`` connection of the target. (templated)
    :param references: ``{"<batch column>": "<schema>.<table>.<column>"}`` in the target, e.g.
        ``{"customer_id": "lending.customers.customer_id"}``.
    """

    template_fields: Sequence[str] = ("manifest", "target_conn_id")
    ui_color = "#fff4d6"
    operator_extra_links = SYNC_LINKS

    def __init__(self, *, manifest: Any, target_conn_id: str, references: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.manifest = manifest
        self.target_conn_id = target_conn_id
        self.references = references

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_sync_provider.core.references import Reference, check_references

        manifest = manifest_argument(self.manifest)
        try:
            references = [Reference.parse(column, target) for column, target in self.references.items()]
            with closing(target_connection(self.target_conn_id, sync_id=manifest.sync_id)) as target:
                results = check_references(target, manifest, references)
        except SyncError as error:
            raise as_task_error(error.with_context(sync_id=manifest.sync_id)) from error
        for result in results:
            self.log.info(
                "referential integrity %s: %d rows checked, all found", result.reference.describe(), result.rows_checked
            )
        return manifest.to_dict()


__all__: Sequence[str] = (
    "DataQualityGateOperator",
    "ReferentialIntegrityGateOperator",
    "ReplayQuarantinedRowsOperator",
)
