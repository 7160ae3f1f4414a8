"""``reconcile``: compare source and target (phase 1 per bucket, phase 2 per key) and record the result."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import sqlalchemy as sa

from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.progress import LOG, Logger
from airflow_sync_provider.core.reconcile.differences import DifferenceSink, compare_buckets, differing_columns
from airflow_sync_provider.core.reconcile.method import choose_method, pin_source_settings, pin_target_settings
from airflow_sync_provider.core.reconcile.record import ensure_reconcile_table, record_reconciliation
from airflow_sync_provider.core.reconcile.results import Method, ReconcileResult, WindowLike, key_dict, resolve_window
from airflow_sync_provider.core.reconcile.sides import (
    SourceSide,
    TargetSide,
    snapshot_connection,
    source_error,
    target_info,
)
from airflow_sync_provider.core.source import reflect_source
from airflow_sync_provider.core.spec import SyncSpec
from airflow_sync_provider.core.staging import StagingArea
from airflow_sync_provider.core.target import idle_autocommit


def reconcile(
    source_engine: sa.Engine,
    target_conn: psycopg.Connection[Any],
    spec: SyncSpec,
    *,
    window: WindowLike = None,
    buckets: int = 256,
    max_keys_reported: int = 20,
    method: Method = "auto",
    run_id: str = "manual",
    staging: StagingArea | None = None,
    record: bool = True,
    logger: Logger | None = None,
) -> ReconcileResult:
    """Compare source and target (whole table, or ``window`` on the cursor column); see the module doc.

    ``record``: append the result to ``_sync_reconciliations`` (as ``run_id``).  When keys differ,
    they are all staged under ``staging`` (``result.keys_uri``); :func:`repair` consumes and removes
    them, :func:`discard_keys` just removes them.
    """
    log = logger or LOG
    started = time.monotonic()
    if not 1 <= buckets <= 1_000_000:
        raise ConfigurationError("buckets must be between 1 and 1,000,000", sync_id=spec.sync_id)
    if method not in ("auto", "sql", "python"):
        raise ConfigurationError(f"method must be 'auto', 'sql' or 'python', not {method!r}", sync_id=spec.sync_id)
    scope = resolve_window(window, spec)
    source = reflect_source(source_engine, spec)
    idle_autocommit(target_conn, step="reconciliation", sync_id=spec.sync_id)
    target = target_info(target_conn, spec, source)
    staging = staging or StagingArea()

    source_conn = snapshot_connection(source_engine, source)
    try:
        with source_conn.begin(), target_conn.transaction():
            target_conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            pin_target_settings(target_conn)
            pin_source_settings(source_conn, source)
            chosen = choose_method(method, source_conn, target_conn, source, target, spec, log)
            sides = (
                SourceSide(source_conn, source, spec, scope, buckets, chosen),
                TargetSide(target_conn, target, source, spec, scope, buckets, chosen),
            )
            (source_counts, source_sums), (target_counts, target_sums) = (s.aggregates() for s in sides)
            differing = [
                b for b in range(buckets) if source_counts[b] != target_counts[b] or source_sums[b] != target_sums[b]
            ]
            sink = DifferenceSink(staging, spec, source, max_keys_reported)
            try:
                confirmed = compare_buckets(differing, source_counts, target_counts, sides, sink)
                different_columns = differing_columns(sink.examples["different"], sides)
                keys_uri = sink.close()
            except BaseException:
                sink.discard()
                raise
    except sa.exc.DBAPIError as error:
        raise source_error("reconciliation", spec, error) from error
    finally:
        source_conn.close()

    result = ReconcileResult(
        sync_id=spec.sync_id,
        source_table=spec.qualified_source,
        target_table=spec.qualified_target,
        primary_key=source.primary_key,
        method=chosen,
        buckets=buckets,
        window=scope.to_dict() if scope else None,
        source_count=sum(source_counts),
        target_count=sum(target_counts),
        differing_buckets=confirmed,
        missing_count=sink.counts["missing_in_target"],
        extra_count=sink.counts["extra_in_target"],
        different_count=sink.counts["different"],
        missing_in_target=tuple(key_dict(source, k) for k in sink.examples["missing_in_target"]),
        extra_in_target=tuple(key_dict(source, k) for k in sink.examples["extra_in_target"]),
        different=tuple(key_dict(source, k) for k in sink.examples["different"]),
        different_columns=tuple(different_columns),
        seconds=round(time.monotonic() - started, 3),
        keys_uri=keys_uri,
    )
    if record:
        ensure_reconcile_table(target_conn, spec.target_schema)
        with target_conn.transaction():
            record_reconciliation(target_conn, spec.target_schema, result, run_id=run_id)
    log.info("reconcile %s (%s hashing): %s in %.2f s", spec.sync_id, chosen, result.describe(), result.seconds)
    return result


__all__ = [
    "reconcile",
]
