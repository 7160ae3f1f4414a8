"""REST APIs as sources: declared endpoints, paginated, incremental, rate-limit aware (docs/api.md).

An API sync stages its pages as Parquet and loads them with the table-sync load (one transaction
with the watermark), so gates, quarantine, transforms, history, the ledger and backfills work as
for tables.
"""

from airflow_sync_provider.core.api.client import (
    ApiAuth,
    ApiClient,
    ApiRequestError,
    ApiUnavailableError,
    RetryPolicy,
    mask_url,
    retry_after_seconds,
)
from airflow_sync_provider.core.api.extract import extract_api_to_staging, keep_newest
from airflow_sync_provider.core.api.paginate import (
    CursorPaginator,
    LinkHeaderPaginator,
    NextLinkPaginator,
    OffsetPaginator,
    PageNumberPaginator,
    PageRequest,
    Paginator,
    SinglePage,
    paginator_from,
)
from airflow_sync_provider.core.api.spec import ApiColumn, ApiSpec
from airflow_sync_provider.core.api.sync import extract_api_for, run_api_sync

__all__ = [
    "ApiAuth",
    "ApiClient",
    "ApiColumn",
    "ApiRequestError",
    "ApiSpec",
    "ApiUnavailableError",
    "CursorPaginator",
    "LinkHeaderPaginator",
    "NextLinkPaginator",
    "OffsetPaginator",
    "PageNumberPaginator",
    "PageRequest",
    "Paginator",
    "RetryPolicy",
    "SinglePage",
    "extract_api_for",
    "extract_api_to_staging",
    "keep_newest",
    "mask_url",
    "paginator_from",
    "retry_after_seconds",
    "run_api_sync",
]
