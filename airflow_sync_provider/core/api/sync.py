"""An API sync in one call: committed state, fetch into staging, one load (rows + watermark)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import psycopg

from airflow_sync_provider.core.api.client import ApiClient
from airflow_sync_provider.core.api.extract import extract_api_to_staging
from airflow_sync_provider.core.api.spec import ApiSpec
from airflow_sync_provider.core.extract import BatchTransform
from airflow_sync_provider.core.load import LoadResult, load_manifest
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.progress import LOG, Logger, PhaseObserver
from airflow_sync_provider.core.staging import StagingArea, remove_staged
from airflow_sync_provider.core.sync import recorded_columns, start_state


def extract_api_for(
    client: ApiClient,
    target: psycopg.Connection[Any],
    spec: ApiSpec,
    *,
    staging: StagingArea,
    run_id: str,
    transform: BatchTransform | None = None,
    logger: Logger | None = None,
    window: tuple[Any, Any] | None = None,
    now: Callable[[], dt.datetime] | None = None,
) -> Manifest:
    """Fetch from where the committed state in the target says the sync is (or a backfill ``window``),
    after sweeping the batches killed runs of this sync left behind."""
    return extract_api_to_staging(
        client,
        spec,
        state=start_state(target, spec, staging, logger),
        staging=staging,
        run_id=run_id,
        transform=transform,
        logger=logger,
        window=window,
        recorded_columns=recorded_columns(target, spec.as_sync_spec()),
        **({"now": now} if now is not None else {}),
    )


def run_api_sync(
    client: ApiClient,
    target: psycopg.Connection[Any],
    spec: ApiSpec,
    *,
    staging: StagingArea | None = None,
    run_id: str = "manual",
    transform: BatchTransform | None = None,
    logger: Logger | None = None,
    observer: PhaseObserver | None = None,
    window: tuple[Any, Any] | None = None,
    keep_staged: bool = False,
    now: Callable[[], dt.datetime] | None = None,
) -> tuple[Manifest, LoadResult]:
    """Fetch, (transform) and load one batch with its watermark in one target transaction.

    Every page is staged before the load starts: a page failing after its retries fails the run
    before anything is written to the target.  A run whose endpoint served nothing and whose schema
    is not known yet (inferred columns, never loaded) has nothing to create or merge: it loads nothing.
    """
    log = logger or LOG
    staging = staging or StagingArea()
    manifest = extract_api_for(
        client, target, spec, staging=staging, run_id=run_id, transform=transform, logger=log, window=window, now=now
    )
    if not manifest.columns:
        remove_staged(manifest)
        message = "the endpoint served no records and no load recorded its columns yet: nothing to load"
        log.info("api sync %s: %s", spec.sync_id, message)
        return manifest, LoadResult(spec.sync_id, manifest.manifest_id, "stale", message=message)
    return manifest, load_manifest(
        target, manifest, run_id=run_id, logger=log, observer=observer, keep_staged=keep_staged
    )


__all__ = ["extract_api_for", "run_api_sync"]
