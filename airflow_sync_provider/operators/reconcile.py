"""Reconcile a synced table after the load: source vs target counts and keyed hash buckets.

A thin Airflow layer over :mod:`airflow_sync_provider.core.reconcile`.  XCom carries a small result
dict (counts and a few example keys), never the keys themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from airflow_sync_provider import lineage
from airflow_sync_provider.core import Manifest, SyncError, SyncSpec
from airflow_sync_provider.core.reconcile import (
    ReconcileResult,
    ReconcileWindow,
    discard_keys,
    reconcile,
    repair,
    window_from_manifest,
)
from airflow_sync_provider.operators.batch import SPEC_PARAMS_DOC, BaseTableSyncOperator
from airflow_sync_provider.operators.common import (
    as_task_error,
    extends_signature,
    staging_area,
    xcom_dict,
)

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage


def parse_window_manifest(value: Any) -> ReconcileWindow | None:
    """The window of a manifest given as XCom gives it: a dict (an extract task's manifest, or the
    ``SyncTableOperator`` output ``{"manifest": ..., "load": ...}``), JSON text or a rendered dict."""
    if isinstance(value, Manifest):
        return window_from_manifest(value)
    return window_from_manifest(xcom_dict(value, argument="window_from_manifest", producer="a sync task"))


class ReconcileOperator(BaseTableSyncOperator):
    __doc__ = (
        """Compare a synced table with its source: row counts and keyed hash buckets, then the keys.

    Takes the same sync declaration as the sync operators (that of
    :class:`~airflow_sync_provider.core.SyncSpec`): give it the sync's, since windows are ranges of
    its cursor, and a repair deletes (or soft-deletes) as its ``delete_mode`` says and fails
    instead of deleting more than its ``max_delete_fraction``.  ``staging_uri`` is where the
    differing keys and the repair batches are staged.  ``window_from_manifest`` limits the
    comparison to the cursor window that manifest synced; without it the whole table is compared.

    With ``repair=True`` the differing keys are re-synced from the source (merged, or deleted where
    the source no longer has them) in one transaction that leaves the sync state untouched, and the
    table is reconciled again.  Differences that remain fail the task (``fail_on_difference``) with
    a message naming the table, the counts and example keys.  Returns a small result dict.
"""
        + SPEC_PARAMS_DOC
        + """    :param window_from_manifest: a manifest dict or XCom (``extract.output`` or ``sync.output``) whose
        cursor window is compared, instead of the whole table. (templated)
    :param buckets: number of hash buckets the keys are compared in.
    :param repair: re-sync the differing keys from the source, then reconcile again.
    :param fail_on_difference: fail the task when differences remain (otherwise log a warning).
    :param max_keys_reported: example keys named in the result and the failure message.
    :param method: ``"auto"``, ``"sql"`` (both PostgreSQL servers hash) or ``"python"`` (any source).
"""
    )

    template_fields: Sequence[str] = (*BaseTableSyncOperator.template_fields, "window_from_manifest")
    ui_color = "#f3e8fb"

    @extends_signature(BaseTableSyncOperator.__init__)
    def __init__(
        self,
        *,
        window_from_manifest: Any = None,
        buckets: int = 256,
        repair: bool = False,
        fail_on_difference: bool = True,
        max_keys_reported: int = 20,
        method: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.window_from_manifest = window_from_manifest
        self.buckets = buckets
        self.repair = repair
        self.fail_on_difference = fail_on_difference
        self.max_keys_reported = max_keys_reported
        self.method = method

    def execute(self, context: Context) -> dict[str, Any]:
        run_id = context["run_id"]
        try:
            spec = self.build_spec()
            window = parse_window_manifest(self.window_from_manifest) if self.window_from_manifest else None
            first, repaired, final = self._reconcile(spec, window, run_id)
        except SyncError as error:
            raise as_task_error(error.with_context(sync_id=self.sync_id)) from error
        self._reconciled = (spec, final)
        output = {
            **_summary(final),
            "repaired": repaired is not None,
            "repair": repaired.to_dict() if repaired else None,
            "before_repair": _summary(first) if repaired else None,
        }
        if not final.equal and self.fail_on_difference:
            advice = "" if self.repair else "; set repair=True to re-sync just these keys"
            raise AirflowFailException(
                f"reconciliation of sync {spec.sync_id!r} found differences: {final.describe()}"
                + (" (still, after the repair)" if repaired else "")
                + advice
            )
        if not final.equal:
            self.log.warning("reconcile %s: %s", spec.sync_id, final.describe())
        return output

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """Source and target as inputs; the target carries the comparison as a data-quality assertion."""
        done: tuple[SyncSpec, ReconcileResult] | None = getattr(self, "_reconciled", None)
        if done is None:
            return lineage.operator_lineage()
        spec, final = done
        check = {
            "expectation": f"reconciliation ({final.method})",
            "success": final.equal,
            "unexpected_count": final.differing_keys,
        }
        source = lineage.database_dataset(lineage.connection_url(self.source_conn_id), spec.qualified_source)
        target = lineage.database_dataset(lineage.connection_url(self.target_conn_id), spec.qualified_target)
        return lineage.operator_lineage(
            [lineage.input_dataset(source), lineage.input_dataset(target, quality=lineage.quality_facet([check]))]
        )

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> OperatorLineage:
        return self.get_openlineage_facets_on_complete(task_instance)

    def _reconcile(
        self, spec: SyncSpec, window: ReconcileWindow | None, run_id: str
    ) -> tuple[ReconcileResult, Any, ReconcileResult]:
        staging = staging_area(self.staging_uri)
        options: dict[str, Any] = {
            "window": window,
            "buckets": self.buckets,
            "max_keys_reported": self.max_keys_reported,
            "method": self.method,
            "run_id": run_id,
            "staging": staging,
            "logger": self.log,
        }
        with self.connections(spec) as (engine, target):
            first = reconcile(engine, target, spec, **options)
            if first.equal or not self.repair:
                discard_keys(first)
                return first, None, first
            repaired = repair(engine, target, spec, first, run_id=run_id, logger=self.log, staging=staging)
            final = reconcile(engine, target, spec, **options)
            discard_keys(final)
            return first, repaired, final


def _summary(result: ReconcileResult) -> dict[str, Any]:
    data = result.to_dict()
    data.pop("keys_uri", None)  # removed once the task ends
    return data


__all__: Sequence[str] = ("ReconcileOperator", "parse_window_manifest")
