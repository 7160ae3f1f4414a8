"""The status read model: what one target database's evidence says about each sync, as typed values.

Read-only views over ``_sync_state``, ``_sync_audit``, ``_sync_quality_results``, ``_sync_quarantine``,
``_sync_event_quarantine``, ``_sync_reconciliations`` and ``_sync_run_context`` (see :mod:`.read`).
The UI plugin renders them and the alert thresholds check them, so the field names are a stable
API: add fields, do not rename them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

#: ``table`` (cursor or full table syncs, backfills), ``cdc`` (logical decoding), ``stream`` (event
#: brokers), ``api`` (REST sources).
SyncKind = Literal["table", "cdc", "stream", "api"]


@dataclass(frozen=True)
class RuleFailure:
    """One expectation of a gate that did not pass (failed, warned, or had its rows quarantined)."""

    expectation: str
    column: str | None
    severity: str
    status: str
    unexpected_count: int | None = None
    example_keys: tuple[Any, ...] = ()

    @property
    def label(self) -> str:
        """``expect_column_values_to_be_between(qty)``: how the UI and alerts name the rule."""
        return f"{self.expectation}({self.column})" if self.column else self.expectation


@dataclass(frozen=True)
class GateStatus:
    """The newest quality-gate result of a sync (one row of ``_sync_quality_results``)."""

    run_id: str
    manifest_id: str
    validated_at: dt.datetime
    success: bool
    rows: int
    quarantined_rows: int
    expectations: int
    failing_rules: tuple[RuleFailure, ...] = ()
    report: str | None = None


@dataclass(frozen=True)
class ReconciliationStatus:
    """The newest reconciliation of a sync (one row of ``_sync_reconciliations``)."""

    run_id: str
    reconciled_at: dt.datetime
    method: str | None
    source_count: int
    target_count: int
    missing_in_target: int
    extra_in_target: int
    different: int
    differing_buckets: int
    repaired: bool

    @property
    def differences(self) -> int:
        """Rows that differ in any way (missing, extra or changed)."""
        return self.missing_in_target + self.extra_in_target + self.different

    @property
    def result(self) -> str:
        """``match``, ``repaired`` (differences found and repaired) or ``differences``."""
        if not self.differences:
            return "match"
        return "repaired" if self.repaired else "differences"


@dataclass(frozen=True)
class SlotStatus:
    """A CDC sync's replication slot on the source (read only when a source connection is given)."""

    slot_name: str
    exists: bool
    active: bool = False
    #: Bytes of WAL the slot has not confirmed yet: how far the target is behind the source.
    lag_bytes: int | None = None
    #: Bytes of WAL the source keeps for the slot (from its restart point): disk at risk.
    retained_bytes: int | None = None
    wal_status: str | None = None
    confirmed_lsn: str | None = None
    current_lsn: str | None = None


@dataclass(frozen=True)
class HeldBack:
    """Why the newest runs' watermark stayed behind ``now - lag``: an open transaction on the source.

    ``reason`` is the engine's note (``upper bound lowered from ... to ...: open transaction pid
    ...``); ``bound`` is the start of that transaction (where the cursor's upper bound stopped);
    ``since`` is when the first of the consecutive held-back runs ended (so ``now - since`` is
    how long the sync has been held back).
    """

    reason: str
    bound: dt.datetime | None
    since: dt.datetime
    runs: int


@dataclass(frozen=True)
class RunSummary:
    """One run of a sync (an Airflow run id): its loads summed, or the gate that stopped it.

    ``status``: the status of its last load (``applied``, ``backfilled``, ``stale``,
    ``already_applied``), or ``gate_failed`` / ``gate_passed`` / ``reconciled`` for a run that
    left a gate result or a reconciliation but no load.
    """

    run_id: str
    at: dt.datetime
    status: str
    loads: int = 0
    rows_staged: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    extract_seconds: float = 0.0
    load_seconds: float = 0.0
    dag_id: str | None = None

    @property
    def seconds(self) -> float:
        """Time spent extracting and loading (the run's latency as the ledger measured it)."""
        return self.extract_seconds + self.load_seconds


@dataclass(frozen=True)
class DayRows:
    """Rows a sync's loads changed on one day (UTC), from the ledger."""

    day: dt.date
    inserted: int
    updated: int
    deleted: int
    loads: int


@dataclass(frozen=True)
class SyncStatus:
    """Everything the target database knows about one sync, at ``read_at``."""

    sync_id: str
    schema: str
    kind: SyncKind
    #: The mode of the newest state or load (``incremental``, ``full``, ``cdc-stream``, ``events``...).
    mode: str | None
    read_at: dt.datetime
    source_table: str | None = None
    target_table: str | None = None
    #: Airflow DAGs that ran the sync (recorded by the operators; empty when run outside Airflow).
    dag_ids: tuple[str, ...] = ()
    source_conn_id: str | None = None
    slot_name: str | None = None
    state_version: int = 0
    committed_at: dt.datetime | None = None
    #: The raw committed watermark: ``[cursor, *key]`` for tables, a dict with LSNs for CDC.
    watermark: list[Any] | dict[str, Any] | None = None
    #: The watermark for people: the cursor value and key, or the CDC commit LSN.
    position: str | None = None
    #: The newest synced cursor value when the cursor is a date/time (UTC), else None.
    cursor_time: dt.datetime | None = None
    #: ``read_at - cursor_time`` (None when the cursor is not a time).
    freshness: dt.timedelta | None = None
    last_run: RunSummary | None = None
    rows_per_day: tuple[DayRows, ...] = ()
    gate: GateStatus | None = None
    #: Quarantined rows not replayed, superseded or abandoned (plus undecodable stream messages).
    quarantine_open: int = 0
    reconciliation: ReconciliationStatus | None = None
    slot: SlotStatus | None = None
    held_back: HeldBack | None = None
    #: The newest load's notes (lookback, backfill window, quiet-run columns...).
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class HistoryEntry:
    """One piece of evidence in a sync's history, newest first in :class:`SyncHistory`.

    ``event``: ``load`` (a ledger row), ``gate`` (a quality result) or ``reconciliation``.
    """

    event: str
    at: dt.datetime
    run_id: str
    status: str
    rows_staged: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    #: Extract plus load time of a load; the reconciliation's time; None for a gate.
    seconds: float | None = None
    extract_seconds: float = 0.0
    load_seconds: float = 0.0
    range_low: Any = None
    range_high: Any = None
    detail: str = ""


@dataclass(frozen=True)
class SyncHistory:
    """A sync's evidence since a point in time (newest first) and its runs (oldest first, for charts)."""

    sync_id: str
    since: dt.datetime
    entries: tuple[HistoryEntry, ...]
    runs: tuple[RunSummary, ...]
    #: True when more entries exist than were read (the oldest were left out).
    truncated: bool = False


__all__ = [
    "DayRows",
    "GateStatus",
    "HeldBack",
    "HistoryEntry",
    "ReconciliationStatus",
    "RuleFailure",
    "RunSummary",
    "SlotStatus",
    "SyncHistory",
    "SyncKind",
    "SyncStatus",
]
