"""Log-based change data capture from PostgreSQL (logical decoding with ``pgoutput``).

``changes_to_staging`` stages the initial snapshot (first run) or the committed changes past the
target's position; ``load_cdc_manifest`` applies them with the position in one target transaction;
``confirm_applied`` then lets the slot free the WAL.  ``run_cdc_sync`` does all three.
``resnapshot_tables`` copies some tables anew while the others keep streaming (the recovery for a
table whose target copy cannot be trusted).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa

from airflow_sync_provider.core.cdc import slot
from airflow_sync_provider.core.cdc.apply import CdcLoadResult, load_cdc_manifest
from airflow_sync_provider.core.cdc.extract import changes_to_staging
from airflow_sync_provider.core.cdc.manifest import CdcManifest
from airflow_sync_provider.core.cdc.position import CdcPosition
from airflow_sync_provider.core.cdc.session import SourceSession, source_connection_for
from airflow_sync_provider.core.cdc.snapshot import snapshot_to_staging, table_snapshot_to_staging
from airflow_sync_provider.core.cdc.spec import CdcSpec
from airflow_sync_provider.core.errors import SyncError
from airflow_sync_provider.core.progress import Logger, PhaseObserver
from airflow_sync_provider.core.staging import StagingArea, is_memory
from airflow_sync_provider.core.state import committed_state

#: The committed state of a CDC sync: the one :func:`~airflow_sync_provider.core.state.committed_state`
#: every sync reads, under the name this package has always exported.
committed_cdc_state = committed_state


def confirm_applied(source: sa.Engine, spec: CdcSpec, end_lsn: int, session: SourceSession | None = None) -> int:
    """Advance the slot to what the target committed (after the commit, never before)."""
    with source_connection_for(source, spec.sync_id, f"confirming slot {spec.slot_name}", session) as conn:
        return slot.advance_slot(conn, spec.slot_name, end_lsn)


def _stage_and_load(
    stage: Callable[..., CdcManifest],
    source: sa.Engine,
    target: psycopg.Connection[Any],
    spec: CdcSpec,
    staging: StagingArea | None,
    run_id: str,
    logger: Logger | None,
    observer: PhaseObserver | None,
    keep_staged: bool,
    **stage_options: Any,
) -> tuple[CdcManifest, CdcLoadResult]:
    """Stage a batch from the committed state with ``stage``, then load it (one transaction with its position)."""
    in_memory: StagingArea | None = stage_options.get("change_staging")
    try:
        manifest = stage(
            source,
            spec,
            state=committed_state(target, spec),
            staging=staging or StagingArea(),
            run_id=run_id,
            logger=logger,
            **stage_options,
        )
        result = load_cdc_manifest(
            target, manifest, run_id=run_id, logger=logger, observer=observer, keep_staged=keep_staged
        )
    except BaseException:
        # Memory is never swept by age: free the batch now (the slot still holds its changes).
        if in_memory is not None and is_memory(in_memory.base_uri):
            in_memory.discard(in_memory.sync_uri(spec.sync_id))
        raise
    return manifest, result


def run_cdc_sync(
    source: sa.Engine,
    target: psycopg.Connection[Any],
    spec: CdcSpec,
    *,
    staging: StagingArea | None = None,
    run_id: str = "manual",
    logger: Logger | None = None,
    observer: PhaseObserver | None = None,
    keep_staged: bool = False,
    session: SourceSession | None = None,
    change_staging: StagingArea | None = None,
) -> tuple[CdcManifest, CdcLoadResult]:
    """Stage (snapshot or changes), apply with the position in one transaction, then confirm the slot.

    A stream passes its ``session`` (one source connection for all its batches) and may stage its
    change batches in ``change_staging`` (e.g. :func:`~..staging.memory_staging`); see
    :class:`~.session.SourceSession`.
    """
    manifest, result = _stage_and_load(
        changes_to_staging,
        source,
        target,
        spec,
        staging,
        run_id,
        logger,
        observer,
        keep_staged,
        session=session,
        change_staging=change_staging,
    )
    if result.status in ("applied", "already_applied"):
        position = CdcPosition.from_state(committed_state(target, spec))
        if position is not None:
            confirm_applied(source, spec, position.end_lsn, session)
    return manifest, result


def resnapshot_tables(
    source: sa.Engine,
    target: psycopg.Connection[Any],
    spec: CdcSpec,
    tables: Sequence[str],
    *,
    staging: StagingArea | None = None,
    run_id: str = "resnapshot",
    logger: Logger | None = None,
    observer: PhaseObserver | None = None,
    keep_staged: bool = False,
    attempts: int = 3,
) -> tuple[CdcManifest, CdcLoadResult]:
    """Copy ``tables`` (some of the sync's) anew, replacing their target rows, without resetting the sync.

    The other tables keep their rows and position; the next change batches skip, for these tables
    only, the transactions the new copy already holds.  Use it when a load fails because a table's
    target copy cannot be trusted (e.g. ``rule=unchanged TOAST value``: a row the source has is missing
    in the target).  A change batch staged before it is then refused as stale; the next run reads anew.
    Retried when a change batch commits between the copy and its load (``attempts``).
    """
    stage = functools.partial(table_snapshot_to_staging, tables=tables)
    for _ in range(attempts):
        manifest, result = _stage_and_load(stage, source, target, spec, staging, run_id, logger, observer, keep_staged)
        if result.status != "stale":
            return manifest, result
    raise SyncError(
        f"re-snapshot of {', '.join(tables)} was overtaken by change batches {attempts} times; pause the sync's "
        "DAG while it runs",
        sync_id=spec.sync_id,
    )


__all__ = [
    "CdcLoadResult",
    "CdcManifest",
    "CdcPosition",
    "CdcSpec",
    "SourceSession",
    "changes_to_staging",
    "committed_cdc_state",
    "confirm_applied",
    "load_cdc_manifest",
    "resnapshot_tables",
    "run_cdc_sync",
    "snapshot_to_staging",
    "table_snapshot_to_staging",
]
