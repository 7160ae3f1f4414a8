"""The sync status read model: one target database's evidence about each sync, as typed values.

``read_sync_statuses(conn, schema)`` gives a :class:`SyncStatus` per sync (the UI's overview and
the alert thresholds read it); ``read_sync_history(conn, schema, sync_id, since)`` its ledger
history (the detail page and its chart).  ``record_run_context`` is how the operators tie runs to
their Airflow DAG.  Pure Python: no Airflow imports.
"""

from airflow_sync_provider.core.status.context import (
    CONTEXT_TABLE,
    RunContext,
    read_run_contexts,
    record_run_context,
)
from airflow_sync_provider.core.status.model import (
    DayRows,
    GateStatus,
    HeldBack,
    HistoryEntry,
    ReconciliationStatus,
    RuleFailure,
    RunSummary,
    SlotStatus,
    SyncHistory,
    SyncKind,
    SyncStatus,
)
from airflow_sync_provider.core.status.read import (
    evidence_schemas,
    read_slot_status,
    read_sync_history,
    read_sync_status,
    read_sync_statuses,
    sync_kind,
)

__all__ = [
    "CONTEXT_TABLE",
    "DayRows",
    "GateStatus",
    "HeldBack",
    "HistoryEntry",
    "ReconciliationStatus",
    "RuleFailure",
    "RunContext",
    "RunSummary",
    "SlotStatus",
    "SyncHistory",
    "SyncKind",
    "SyncStatus",
    "evidence_schemas",
    "read_run_contexts",
    "read_slot_status",
    "read_sync_history",
    "read_sync_status",
    "read_sync_statuses",
    "record_run_context",
    "sync_kind",
]
