"""Reconciliation after the load: compare source and target, report what differs, repair just that.

What is compared
    The synced columns as the sync reflects them
    (:func:`~airflow_sync_provider.core.source.reflect_source` and its column plans: key first, then
    the declared or all columns), over the whole table or a cursor window ``[low, high)`` (e.g. the
    range a manifest synced).  Target rows soft-deleted by the sync
    (``_sync_deleted_at IS NOT NULL``) count as absent; the ``_sync_*`` metadata columns and any
    column a transform added are ignored.

How (two phases, bounded memory)
    Every row gets a 64-bit *row hash* over all its compared values and a *bucket*
    (``hash(key) mod buckets``).  Phase 1 streams both sides once and keeps, per bucket, the row
    count and the sum of the row hashes mod 2^64: memory O(buckets), and equal aggregates mean equal
    buckets (a sum, unlike XOR, is not blind to a row that appears twice).  Phase 2 re-reads only
    the rows of the buckets that differ, keyed, to classify each differing key as *missing in
    target*, *extra in target* or *different* (differing buckets are processed in groups of at
    most ``_GROUP_ROWS`` source rows, so memory stays bounded even when everything differs).  All
    differing keys are staged to a Parquet file (``ReconcileResult.keys_uri``) for the repair; the
    result itself carries only counts and ``max_keys_reported`` examples per kind (plus, for the
    "different" examples, which columns differ).  Both phases read each side inside one
    ``REPEATABLE READ`` transaction, so they see the same data.

Two ways to hash, chosen per run (``method``)
    ``"python"`` (any source dialect): rows are streamed (server-side cursors) and converted with the
    sync's own column plans to the staged Arrow types on *both* sides, so a value is compared the
    way it was synced: SQLite text dates, MySQL DOUBLE, PostgreSQL timestamptz in any session time
    zone all arrive as the same Arrow value.  Each value is then rendered canonically (integers,
    fixed-scale decimals, dates and times via Arrow's string cast, timestamps with time zone in UTC;
    floats by ``repr``; bytes as hex; columns the sync reads as text are compared as text: from
    PostgreSQL the target keeps the exact type, so both sides render it identically; from other
    databases JSON is re-serialised with sorted keys and normalised numbers and unbounded NUMERIC
    normalised as a Decimal).  The ``repr`` of the row's tuple of canonical strings (unambiguous,
    NULL distinct from '') is hashed with BLAKE2b (8 bytes); the bucket hashes the key's canonical
    values the same way.  Measured on this project's 2-vCPU machines: 100k rows (8 columns incl.
    jsonb and text[]) in ~2.4 s, both sides included.

    ``"sql"`` (PostgreSQL -> PostgreSQL): both servers compute ``hashtextextended(ROW(cols)::text, 0)``
    and aggregate per bucket themselves, so phase 1 ships ``buckets`` rows instead of the table
    (the same 100k rows in ~0.5 s; ``tests/integration/test_reconcile.py`` prints both timings).  Text output is only a
    faithful rendering when both sides have the same types and settings, so ``"auto"`` picks it only
    when: every compared column has the same type (``format_type``) in source and target and is of a
    type whose text output is exact and setting-independent once the session is pinned (``TimeZone``
    UTC, ``DateStyle`` ISO, ``IntervalStyle`` postgres, ``extra_float_digits`` 1, ``bytea_output`` hex
    are set locally on both sides), both servers are PostgreSQL 12+ with the same server encoding,
    and a probe hashes identically on both.  Otherwise (e.g. a domain or enum column, a transform
    that retyped a column) it falls back to ``"python"``: correctness first.

Repair
    :func:`repair` re-reads exactly the differing keys from the source (by key, over the whole
    table, so a row that merely moved out of the window is updated, not deleted), stages them as
    Parquet with the same column plans and merges them with the load's own engine
    (:func:`~airflow_sync_provider.core.load.apply_table_batch`, a ``full``-mode manifest without
    delete detection) inside ONE target transaction that also deletes (or soft-deletes, per
    ``delete_mode``) target rows whose key the source does not have.  The sync's state row is locked
    (so a concurrent load waits and nothing older overwrites what the repair read) but never
    written: the watermark does not move. Only the differing keys are touched, so
    ``_sync_synced_at`` of every other row stays as it was.

Record
    Every reconciliation (and every repair) appends a row to ``<target_schema>._sync_reconciliations``
    (append-only: a trigger refuses UPDATE, DELETE and TRUNCATE).

Modules: :mod:`.compare` (:func:`reconcile`), :mod:`.sides` (reading source and target),
:mod:`.fingerprint` (canonical values and hashes), :mod:`.method` (``"sql"`` or ``"python"``
hashing), :mod:`.differences` (phase 2 and the staged differing keys), :mod:`.repairs`
(:func:`repair`), :mod:`.record` (the log), :mod:`.results` (result types), :mod:`.limits`
(page and group sizes).
"""

from __future__ import annotations

from airflow_sync_provider.core.audit import RECONCILE_TABLE
from airflow_sync_provider.core.reconcile.compare import reconcile
from airflow_sync_provider.core.reconcile.differences import discard_keys, iter_differing_keys
from airflow_sync_provider.core.reconcile.record import ensure_reconcile_table, record_reconciliation
from airflow_sync_provider.core.reconcile.repairs import repair
from airflow_sync_provider.core.reconcile.results import (
    KIND_COLUMN,
    ReconcileResult,
    ReconcileWindow,
    RepairResult,
    window_from_manifest,
)

__all__ = [
    "KIND_COLUMN",
    "RECONCILE_TABLE",
    "ReconcileResult",
    "ReconcileWindow",
    "RepairResult",
    "discard_keys",
    "ensure_reconcile_table",
    "iter_differing_keys",
    "reconcile",
    "record_reconciliation",
    "repair",
    "window_from_manifest",
]
