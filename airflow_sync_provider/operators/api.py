"""Sync a REST API endpoint into PostgreSQL: in one task, or extract-only for a gate in between.

Both run the engine's API source (:mod:`airflow_sync_provider.core.api`): pages staged as Parquet,
then the table-sync load (rows + watermark in one transaction).  ``ApiToStagingOperator`` returns
the manifest, so :class:`~airflow_sync_provider.operators.quality.DataQualityGateOperator` (with
quarantine) and :class:`~airflow_sync_provider.operators.sync.LoadStagedToPostgresOperator` follow
it exactly as they follow a table extract.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import psycopg
from airflow.sdk import Context

from airflow_sync_provider import lineage
from airflow_sync_provider.core.api import (
    ApiColumn,
    ApiSpec,
    RetryPolicy,
    extract_api_for,
    paginator_from,
    run_api_sync,
)
from airflow_sync_provider.core.api.client import ApiClient
from airflow_sync_provider.core.api.paginate import Paginator
from airflow_sync_provider.core.extract import BatchTransform
from airflow_sync_provider.core.spec import DEFAULT_SCHEMA_DRIFT
from airflow_sync_provider.hooks.api import ApiSourceHook
from airflow_sync_provider.operators.batch import BaseExtractOperator
from airflow_sync_provider.operators.common import target_for_run
from airflow_sync_provider.operators.events import event_columns
from airflow_sync_provider.plugins.links import SYNC_LINKS

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_sync_provider.core.manifest import Manifest

API_TEMPLATE_FIELDS: tuple[str, ...] = (
    "sync_id",
    "http_conn_id",
    "endpoint",
    "query_params",
    "target_conn_id",
    "target_table",
    "target_schema",
    "records_path",
    "staging_uri",
)

_PARAMS_DOC = """
    :param sync_id: names the sync (state row, ledger, quarantine). (templated)
    :param http_conn_id: an ``http`` connection: base URL and auth (see
        :mod:`airflow_sync_provider.hooks.api` for the extras). (templated)
    :param endpoint: the path of the records, relative to the base URL. (templated)
    :param target_conn_id: the ``postgres`` connection of the target; it holds the state. (templated)
    :param target_table: the table the records go to (created from the columns). (templated)
    :param primary_key: the record fields the target is keyed by.
    :param records_path: where the records are in a page (dotted; ``""`` = the body is the list). (templated)
    :param query_params: query parameters of every request (the spec's ``params``). (templated)
    :param paginator: a paginator object, or ``"link_header"``, ``{"type": "cursor", "cursor_path":
        "meta.next", "param": "cursor"}``, ``{"type": "offset", "limit": 500}``... (see docs/api.md).
    :param columns: the declared fields (:class:`~airflow_sync_provider.core.api.ApiColumn` or dicts
        ``{"name", "type", "path", "required"}``); default inferred from the first page.
    :param mode: ``"incremental"`` (by the cursor) or ``"full"`` (every record; deletes detected).
    :param cursor_field: the field ordering changes (e.g. ``updated_at``).
    :param cursor_param: the parameter the committed watermark is sent in (e.g. ``updated_since``).
    :param cursor_end_param: the parameter a backfill window's end is sent in (e.g. ``updated_before``).
    :param cursor_format: strftime format of the cursor parameter (default ISO 8601).
    :param start_value: the cursor value of the first run (default: everything).
    :param lag: hold the watermark back to ``now - lag`` (records the API publishes late are re-read).
    :param lookback: re-read this much below the watermark every run.
    :param target_schema: schema of the target table and the state table.
    :param state_table: the state table.
    :param delete_mode: ``"hard"``, ``"soft"`` or ``"none"`` (full mode's delete detection).
    :param detect_deletes: full mode: remove target rows the API no longer lists (default on).
    :param max_delete_fraction: fail instead of deleting more than this share of the target.
    :param history_table: keep an SCD type 2 history of the target in this table.
    :param schema_drift: ``"freeze"``, ``"evolve"`` or ``"discard"``.
    :param batch_records: records per staged file (bounds memory).
    :param max_pages: fail if an endpoint serves more pages than this in one run.
    :param http_retry: a :class:`~airflow_sync_provider.core.api.RetryPolicy` or its fields as a dict.
    :param transform: ``DataFrame -> DataFrame`` for every batch, or ``"module:function"``.
    :param backfill: in backfill runs (or with ``window_start``/``window_end`` in the conf), re-sync
        the window through the cursor parameters without moving the watermark.
    :param staging_uri: where batches are staged; default ``[sync] staging_uri``. (templated)
"""


class _ApiDeclaration(BaseExtractOperator):
    """The declaration both API operators take (an :class:`ApiSpec` plus the connections)."""

    template_fields: Sequence[str] = API_TEMPLATE_FIELDS
    ui_color = "#eef6ee"
    operator_extra_links = SYNC_LINKS

    def __init__(
        self,
        *,
        sync_id: str,
        http_conn_id: str,
        endpoint: str,
        target_conn_id: str,
        target_table: str,
        primary_key: Sequence[str],
        records_path: str = "data",
        query_params: Mapping[str, Any] | None = None,
        paginator: Paginator | Mapping[str, Any] | str | None = None,
        columns: Sequence[ApiColumn | Mapping[str, Any]] = (),
        mode: str = "incremental",
        cursor_field: str | None = None,
        cursor_param: str | None = None,
        cursor_end_param: str | None = None,
        cursor_format: str | None = None,
        start_value: Any = None,
        lag: dt.timedelta = dt.timedelta(0),
        lookback: dt.timedelta | int | None = None,
        target_schema: str = "public",
        state_table: str = "_sync_state",
        delete_mode: str = "hard",
        detect_deletes: bool | None = None,
        max_delete_fraction: float | None = None,
        history_table: str | None = None,
        schema_drift: str = DEFAULT_SCHEMA_DRIFT,
        batch_records: int = 50_000,
        max_pages: int = 100_000,
        http_retry: RetryPolicy | Mapping[str, Any] | None = None,
        transform: BatchTransform | str | None = None,
        backfill: bool = True,
        staging_uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sync_id = sync_id
        self.http_conn_id = http_conn_id
        self.endpoint = endpoint
        self.target_conn_id = target_conn_id
        self.target_table = target_table
        self.primary_key = primary_key
        self.records_path = records_path
        self.query_params = dict(query_params or {})
        self.paginator = paginator
        self.columns = columns
        self.mode = mode
        self.cursor_field = cursor_field
        self.cursor_param = cursor_param
        self.cursor_end_param = cursor_end_param
        self.cursor_format = cursor_format
        self.start_value = start_value
        self.lag = lag
        self.lookback = lookback
        self.target_schema = target_schema
        self.state_table = state_table
        self.delete_mode = delete_mode
        self.detect_deletes = detect_deletes
        self.max_delete_fraction = max_delete_fraction
        self.history_table = history_table
        self.schema_drift = schema_drift
        self.batch_records = batch_records
        self.max_pages = max_pages
        self.http_retry = http_retry
        self.transform = transform
        self.backfill = backfill
        self.staging_uri = staging_uri

    def build_spec(self) -> ApiSpec:
        """The :class:`ApiSpec` of the (rendered) arguments; raises ``ConfigurationError``."""
        return ApiSpec(
            sync_id=self.sync_id,
            endpoint=self.endpoint,
            target_table=self.target_table,
            primary_key=tuple(self.primary_key),
            records_path=self.records_path,
            params=self.query_params,
            paginator=paginator_from(self.paginator),
            columns=event_columns(self.columns),
            mode=self.mode,  # type: ignore[arg-type]
            cursor_field=self.cursor_field or None,
            cursor_param=self.cursor_param or None,
            cursor_end_param=self.cursor_end_param or None,
            cursor_format=self.cursor_format or None,
            start_value=self.start_value,
            lag=self.lag,
            lookback=self.lookback,
            target_schema=self.target_schema,
            state_table=self.state_table,
            delete_mode=self.delete_mode,  # type: ignore[arg-type]
            detect_deletes=self.detect_deletes,
            max_delete_fraction=self.max_delete_fraction,
            history_table=self.history_table or None,
            schema_drift=self.schema_drift,  # type: ignore[arg-type]
            batch_records=self.batch_records,
            max_pages=self.max_pages,
        )

    def http_retry_policy(self) -> RetryPolicy | None:
        if self.http_retry is None or isinstance(self.http_retry, RetryPolicy):
            return self.http_retry
        return RetryPolicy(**dict(self.http_retry))

    def source_dataset(self, manifest: Manifest) -> lineage.DatasetName:
        return self.api_dataset()

    def api_dataset(self) -> lineage.DatasetName:
        """The endpoint as an OpenLineage dataset: namespace the base URL's scheme and host, name its path."""
        base = ApiSourceHook(self.http_conn_id).url_from_endpoint(None)
        url = urlsplit(urljoin(base.rstrip("/") + "/", self.endpoint.lstrip("/")))
        return lineage.DatasetName(f"{url.scheme}://{url.netloc.rsplit('@', 1)[-1]}", url.path)

    @contextmanager
    def connections(self, spec: ApiSpec, context: Context) -> Iterator[tuple[ApiClient, psycopg.Connection[Any]]]:
        """The API client and the target connection of a run (its DAG run recorded), closed after."""
        client = ApiSourceHook(self.http_conn_id).api_client(retry=self.http_retry_policy(), logger=self.log)
        try:
            with target_for_run(
                self.target_conn_id, spec.target_schema, spec.sync_id, context, source_conn_id=self.http_conn_id
            ) as target:
                yield client, target
        finally:
            client.close()


class ApiToPostgresOperator(_ApiDeclaration):
    __doc__ = (
        """Fetch an API endpoint's new records (or all of them) and merge them into PostgreSQL, exactly once.

    Pages are staged, then loaded with the watermark in one transaction; a page that fails after
    its retries fails the task with the URL (secrets masked), status, attempts and body, and
    nothing is committed (a rate limit or an outage is retryable by Airflow; a 4xx is not).
    Returns ``{"manifest": <summary>, "load": <load result>}`` (small).
"""
        + _PARAMS_DOC
        + "    :param keep_staged: keep the staged files after the load.\n"
    )

    def __init__(self, *, keep_staged: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_staged = keep_staged

    def execute(self, context: Context) -> dict[str, Any]:
        return self.sync_batch(context, run_api_sync, keep_staged=self.keep_staged)

    def declared_lineage(self) -> OperatorLineage:
        target = lineage.database_dataset(
            lineage.connection_url(self.target_conn_id), f"{self.target_schema}.{self.target_table}"
        )
        return lineage.operator_lineage([lineage.input_dataset(self.api_dataset())], [lineage.output_dataset(target)])

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """The endpoint -> the target table (and history), with column lineage and row counts."""
        return self.synced_lineage()


class ApiToStagingOperator(_ApiDeclaration):
    __doc__ = (
        """Fetch an API endpoint's new records into staged Parquet files; return the manifest.

    Follow it with a ``DataQualityGateOperator`` (quarantine included) and a
    ``LoadStagedToPostgresOperator``, as for a table extract.
"""
        + _PARAMS_DOC
    )

    def execute(self, context: Context) -> dict[str, Any]:
        return self.stage_batch(context, extract_api_for)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """The endpoint -> the sync's staging folder, with column lineage through the transform."""
        return self.staged_lineage()


__all__ = ["API_TEMPLATE_FIELDS", "ApiToPostgresOperator", "ApiToStagingOperator"]
