"""The whole flow in one call: read state, extract, (transform), load.  Used by the all-in-one
operator, the demo and the tests; the split operators call the same two halves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa

from airflow_sync_provider.core.extract import BatchTransform, extract_to_staging
from airflow_sync_provider.core.load import LoadResult, load_manifest
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.progress import Logger, PhaseObserver
from airflow_sync_provider.core.spec import SyncSpec
from airflow_sync_provider.core.staging import StagingArea
from airflow_sync_provider.core.state import SyncState, committed_state, read_source_schema


def extract_for(
    source: sa.Engine,
    target: psycopg.Connection[Any],
    spec: SyncSpec,
    *,
    staging: StagingArea,
    run_id: str,
    transform: BatchTransform | None = None,
    logger: Logger | None = None,
    window: tuple[Any, Any] | None = None,
) -> Manifest:
    """Extract from where the committed state in the target says the sync is (or a backfill ``window``).

    First it sweeps the staged batches of this sync that killed or abandoned runs left behind
    (older than ``staging.abandoned_after`` and no longer loadable: see
    :meth:`StagingArea.sweep_abandoned`).
    """
    state = committed_state(target, spec)
    staging.sweep_abandoned(spec.sync_id, pending=loadable_at(state), log=logger)
    return extract_to_staging(
        source,
        spec,
        state=state,
        staging=staging,
        run_id=run_id,
        transform=transform,
        logger=logger,
        window=window,
        recorded_columns=recorded_columns(target, spec) if transform is not None else None,
    )


def loadable_at(state: SyncState | None) -> Callable[[dict[str, Any]], bool]:
    """Whether a staged table batch (its ``manifest.json``) would still change the target: it was
    extracted at the committed state version, so its load applies it instead of skipping it as
    stale.  A backfill window is not pinned to a version; its age alone decides."""
    version = state.version if state else 0

    def loadable(manifest: dict[str, Any]) -> bool:
        return manifest.get("window") is None and manifest.get("base_version") == version

    return loadable


def recorded_columns(conn: psycopg.Connection[Any], spec: SyncSpec) -> tuple[tuple[str, str], ...] | None:
    """The (transformed) columns the last committed load of this sync recorded, or None."""
    record = read_source_schema(conn, spec.target_schema, spec.state_table, spec.sync_id, spec.qualified_target)
    return record.columns if record is not None else None


def run_sync(
    source: sa.Engine,
    target: psycopg.Connection[Any],
    spec: SyncSpec,
    *,
    staging: StagingArea | None = None,
    run_id: str = "manual",
    transform: BatchTransform | None = None,
    logger: Logger | None = None,
    observer: PhaseObserver | None = None,
    window: tuple[Any, Any] | None = None,
    keep_staged: bool = False,
) -> tuple[Manifest, LoadResult]:
    """Extract, (transform) and load one batch; ``window`` makes it a backfill of that cursor range.

    ``keep_staged`` keeps the staged files after the load (they are removed by default).
    """
    manifest = extract_for(
        source,
        target,
        spec,
        staging=staging or StagingArea(),
        run_id=run_id,
        transform=transform,
        logger=logger,
        window=window,
    )
    result = load_manifest(target, manifest, run_id=run_id, logger=logger, observer=observer, keep_staged=keep_staged)
    return manifest, result
