"""Reconcile a synced table after the load: source vs target counts and keyed hash buckets.

A thin Airflow layer over :mod:`airflow_sync_provider.core.reconcile`.  XCom carries a small result
dict (counts and a few example keys), never the keys themselves.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from contextlib import closing
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from airflow_sync_provider.core import ConfigurationError, Manifest, StagingArea, SyncError, SyncSpec
from airflow_sync_provider.core.reconcile import (
    ReconcileResult,
    ReconcileWindow,
    discard_keys,
    reconcile,
    repair,
    window_from_manifest,
)
from airflow_sync_provider.operators.sync import (
    _SPEC_ARGUMENTS,
    SPEC_TEMPLATE_FIELDS,
    _fail,
    _source_engine,
    _SyncSpecMixin,
    _target_connection,
    default_staging_uri,
)


def parse_window_manifest(value: Any) -> ReconcileWindow | None:
    """The window of a manifest given as XCom gives it: a dict (an extract task's manifest, or the
    ``SyncTableOperator`` output ``{"manifest": ..., "load": ...}``), JSON text or a rendered dict."""
    if isinstance(value, Manifest):
        return window_from_manifest(value)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)  # a Jinja-rendered Python dict
            except (ValueError, SyntaxError):
                raise ConfigurationError("window_from_manifest is neither JSON nor a dict") from None
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"window_from_manifest must be a manifest dict from a sync task's XCom, got {type(value).__name__}"
        )
    return window_from_manifest(value)


class ReconcileOperator(_SyncSpecMixin, BaseOperator):
    """Compare a synced table with its source: row counts and keyed hash buckets, then the keys.

    Takes the same sync declaration as the sync operators (``sync_id``, tables, ``mode``,
    ``cursor_column``, ``primary_key``, ``columns``, ``delete_mode``...).  ``window_from_manifest``
    (a manifest dict or XCom, e.g. ``extract.output`` or ``sync.output``) limits the comparison to
    the cursor window that manifest synced; without it the whole table is compared.

    With ``repair=True`` the differing keys are re-synced from the source (merged, or deleted where
    the source no longer has them) in one transaction that leaves the sync state untouched, and the
    table is reconciled again.  Differences that remain fail the task (``fail_on_difference``) with
    a message naming the table, the counts and example keys.  Returns a small result dict.
    """

    template_fields: Sequence[str] = (*SPEC_TEMPLATE_FIELDS, "window_from_manifest")
    ui_color = "#f3e8fb"

    def __init__(
        self,
        *,
        source_conn_id: str,
        target_conn_id: str,
        source_table: str,
        sync_id: str | None = None,
        window_from_manifest: Any = None,
        buckets: int = 256,
        repair: bool = False,
        fail_on_difference: bool = True,
        max_keys_reported: int = 20,
        method: str = "auto",
        staging_uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        spec_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _SPEC_ARGUMENTS}
        super().__init__(**kwargs)
        self._init_spec(sync_id=sync_id, source_table=source_table, **spec_kwargs)
        self.source_conn_id = source_conn_id
        self.target_conn_id = target_conn_id
        self.window_from_manifest = window_from_manifest
        self.buckets = buckets
        self.repair = repair
        self.fail_on_difference = fail_on_difference
        self.max_keys_reported = max_keys_reported
        self.method = method
        self.staging_uri = staging_uri

    def execute(self, context: Context) -> dict[str, Any]:
        spec = self.build_spec()
        run_id = context["run_id"]
        try:
            window = parse_window_manifest(self.window_from_manifest) if self.window_from_manifest else None
            first, repaired, final = self._reconcile(spec, window, run_id)
        except SyncError as error:
            raise _fail(error.with_context(sync_id=spec.sync_id)) from error
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

    def _reconcile(
        self, spec: SyncSpec, window: ReconcileWindow | None, run_id: str
    ) -> tuple[ReconcileResult, Any, ReconcileResult]:
        staging = StagingArea(self.staging_uri or default_staging_uri())
        options: dict[str, Any] = {
            "window": window,
            "buckets": self.buckets,
            "max_keys_reported": self.max_keys_reported,
            "method": self.method,
            "run_id": run_id,
            "staging": staging,
            "logger": self.log,
        }
        engine = _source_engine(self.source_conn_id, spec.sync_id)
        try:
            with closing(_target_connection(self.target_conn_id, spec.sync_id)) as target:
                first = reconcile(engine, target, spec, **options)
                if first.equal or not self.repair:
                    discard_keys(first)
                    return first, None, first
                repaired = repair(engine, target, spec, first, run_id=run_id, logger=self.log, staging=staging)
                final = reconcile(engine, target, spec, **options)
                discard_keys(final)
                return first, repaired, final
        finally:
            engine.dispose()


def _summary(result: ReconcileResult) -> dict[str, Any]:
    data = result.to_dict()
    data.pop("keys_uri", None)  # removed once the task ends
    return data


__all__: Sequence[str] = ("ReconcileOperator", "parse_window_manifest")
