"""The sync engine: pure Python (SQLAlchemy, psycopg, pyarrow, pandas), no Airflow imports."""

from airflow_sync_provider.core.errors import (
    ConfigurationError,
    DataError,
    SchemaError,
    SourceUnavailableError,
    SyncError,
    TargetUnavailableError,
    UnavailableError,
    UnsafeOperationError,
)
from airflow_sync_provider.core.extract import BatchTransform, extract_to_staging
from airflow_sync_provider.core.load import LoadResult, load_manifest
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.spec import SyncSpec
from airflow_sync_provider.core.staging import StagingArea
from airflow_sync_provider.core.state import SyncState, read_state
from airflow_sync_provider.core.sync import extract_for, run_sync

__all__ = [
    "BatchTransform",
    "ConfigurationError",
    "DataError",
    "LoadResult",
    "Manifest",
    "SchemaError",
    "SourceUnavailableError",
    "StagingArea",
    "SyncError",
    "SyncSpec",
    "SyncState",
    "TargetUnavailableError",
    "UnavailableError",
    "UnsafeOperationError",
    "extract_for",
    "extract_to_staging",
    "load_manifest",
    "read_state",
    "run_sync",
]
