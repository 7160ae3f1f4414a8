"""Read one target schema's sync evidence into :class:`~.model.SyncStatus` and :class:`~.model.SyncHistory`.

Read-only and cheap: a handful of grouped queries per schema whatever the number of syncs (the
overview page reads every configured target on each load).  Tables that do not exist yet (a sync
that never gated, never reconciled) simply contribute nothing.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from airflow_sync_provider.core.audit import AUDIT_TABLE, QUALITY_TABLE, RECONCILE_TABLE
from airflow_sync_provider.core.catalog import table_exists
from airflow_sync_provider.core.cdc.pgoutput import int_to_lsn
from airflow_sync_provider.core.cdc.slot import slot_info
from airflow_sync_provider.core.cdc.spec import CdcSpec
from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.events.quarantine import EVENT_QUARANTINE_TABLE
from airflow_sync_provider.core.quality.store import QUARANTINE_TABLE
from airflow_sync_provider.core.sqltext import bindable, execute
from airflow_sync_provider.core.state import SyncState, read_state
from airflow_sync_provider.core.status.context import CONTEXT_TABLE, SyncOwner, dag_of_run, read_sync_owners
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
from airflow_sync_provider.core.values import decode_value

#: The note the extraction writes when an open source transaction lowered the cursor's upper bound
#: (see ``compute_upper_bound`` in :mod:`..extract`).
HELD_BACK_MARKER = ": open transaction "
#: How many of a sync's newest loads are searched for consecutive held-back runs.
HELD_BACK_WINDOW = 50


def sync_kind(mode: str | None, source_table: str | None = None) -> SyncKind:
    """The kind of a sync from its state or ledger mode (``cdc-*``: CDC, ``events``: stream, ``api*`` or
    an ``http(s)://`` / ``api:`` source: API; anything else, table)."""
    mode = (mode or "").lower()
    source = (source_table or "").lower()
    if mode.startswith("cdc"):
        return "cdc"
    if mode.startswith("event") or mode == "stream":
        return "stream"
    if mode.startswith("api") or source.startswith(("http://", "https://", "api:")):
        return "api"
    return "table"


def default_slot_name(sync_id: str) -> str | None:
    """The slot a CDC sync uses when its declaration names none (as :class:`CdcSpec` derives it)."""
    try:
        return CdcSpec(sync_id=sync_id, tables=("_",)).slot_name
    except ConfigurationError:
        return None


def read_slot_status(source: psycopg.Connection[Any], slot_name: str) -> SlotStatus:
    """Lag and retained WAL of ``slot_name`` on the source (``source``: any connection to its database)."""
    info = slot_info(source, slot_name)
    if not info.exists:
        return SlotStatus(slot_name, False, current_lsn=int_to_lsn(info.current_lsn))
    confirmed = info.confirmed_flush_lsn
    return SlotStatus(
        slot_name,
        True,
        active=info.active,
        lag_bytes=max(info.current_lsn - confirmed, 0) if confirmed is not None else None,
        retained_bytes=info.retained_bytes,
        wal_status=info.wal_status,
        confirmed_lsn=int_to_lsn(confirmed) if confirmed is not None else None,
        current_lsn=int_to_lsn(info.current_lsn),
    )


def evidence_schemas(conn: psycopg.Connection[Any], state_table: str = "_sync_state") -> list[str]:
    """The schemas of the database that hold sync evidence (a state table, ledger, gate results or run
    contexts), sorted: where a status view looks when it is given only a connection."""
    rows = conn.execute(
        "SELECT DISTINCT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND c.relname = ANY(%s) ORDER BY 1",
        ([state_table, AUDIT_TABLE, QUALITY_TABLE, CONTEXT_TABLE],),
    ).fetchall()
    return [r[0] for r in rows]


def read_sync_statuses(
    conn: psycopg.Connection[Any],
    schema: str = "public",
    *,
    state_table: str = "_sync_state",
    now: dt.datetime | None = None,
    days: int = 14,
    source: psycopg.Connection[Any] | None = None,
    sync_ids: Iterable[str] | None = None,
) -> list[SyncStatus]:
    """The status of every sync with evidence in ``schema`` (ordered by sync id).

    ``now`` (default: the database clock) is what freshness is measured against; ``days`` how far
    back ``rows_per_day`` goes; ``source``: a connection to the CDC source database, to read slot
    lag and retained WAL (without it ``slot`` stays None); ``sync_ids`` limits the read.
    """
    tables = {t for t in _EVIDENCE if table_exists(conn, schema, t)}
    has_state = table_exists(conn, schema, state_table)
    wanted = set(sync_ids) if sync_ids is not None else None
    ids = _sync_ids(conn, schema, tables, state_table if has_state else None)
    if wanted is not None:
        ids = [i for i in ids if i in wanted]
    if not ids:
        return []
    read_at = now or _db_now(conn)
    owners = read_sync_owners(conn, schema)
    last_loads = _last_load_runs(conn, schema) if AUDIT_TABLE in tables else {}
    day_rows = _rows_per_day(conn, schema, days) if AUDIT_TABLE in tables else {}
    recent = _recent_notes(conn, schema) if AUDIT_TABLE in tables else {}
    gates = _newest_gates(conn, schema) if QUALITY_TABLE in tables else {}
    reconciliations = _newest_reconciliations(conn, schema) if RECONCILE_TABLE in tables else {}
    quarantined = _open_quarantine(conn, schema, tables)
    statuses = []
    for sync_id in ids:
        state = read_state(conn, schema, state_table, sync_id) if has_state else None
        owner = owners.get(sync_id)
        load = last_loads.get(sync_id)
        mode = (state.mode if state else None) or (load.mode if load else None)
        source_table = (state.source_table if state else None) or (load.source_table if load else None)
        kind = sync_kind(mode, source_table)
        cursor_time = _cursor_time(state.watermark) if state and kind != "cdc" else None
        gate = gates.get(sync_id)
        reconciliation = reconciliations.get(sync_id)
        last_run = _last_run(load.run if load else None, gate, reconciliation)
        slot_name = (owner.slot_name if owner else None) or (default_slot_name(sync_id) if kind == "cdc" else None)
        statuses.append(
            SyncStatus(
                sync_id=sync_id,
                schema=schema,
                kind=kind,
                mode=mode,
                read_at=read_at,
                source_table=source_table,
                target_table=(state.target_table if state else None) or (load.target_table if load else None),
                dag_ids=owner.dag_ids if owner else (),
                source_conn_id=owner.source_conn_id if owner else None,
                slot_name=slot_name,
                state_version=state.version if state else 0,
                committed_at=state.committed_at if state else None,
                watermark=state.watermark if state else None,
                position=_position(state),
                cursor_time=cursor_time,
                freshness=read_at - cursor_time if cursor_time else None,
                last_run=_with_dag(conn, schema, last_run, sync_id, owner),
                rows_per_day=tuple(day_rows.get(sync_id, ())),
                gate=gate,
                quarantine_open=quarantined.get(sync_id, 0),
                reconciliation=reconciliation,
                slot=read_slot_status(source, slot_name)
                if source is not None and kind == "cdc" and slot_name
                else None,
                held_back=_held_back(recent.get(sync_id, [])),
                notes=tuple(recent[sync_id][0][1]) if recent.get(sync_id) else (),
            )
        )
    return statuses


def read_sync_status(conn: psycopg.Connection[Any], schema: str, sync_id: str, **kwargs: Any) -> SyncStatus | None:
    """The status of one sync, or None when ``schema`` holds no evidence of it."""
    found = read_sync_statuses(conn, schema, sync_ids=[sync_id], **kwargs)
    return found[0] if found else None


def read_sync_history(
    conn: psycopg.Connection[Any],
    schema: str,
    sync_id: str,
    since: dt.datetime,
    *,
    limit: int = 2000,
) -> SyncHistory:
    """Ledger rows, gate results and reconciliations of ``sync_id`` since ``since`` (newest first, at
    most ``limit`` of each) and the runs they make up (oldest first: the chart's points)."""
    entries: list[HistoryEntry] = []
    truncated = False
    for source in _HISTORY_SOURCES:
        rows, more = _history_rows(conn, schema, source, sync_id, since, limit)
        truncated |= more
        entries.extend(source.entry(r) for r in rows)
    entries.sort(key=lambda e: e.at, reverse=True)
    return SyncHistory(sync_id, since, tuple(entries), tuple(_runs_of(entries)), truncated)


# --------------------------------------------------------------------------- internals


def _load_entry(r: Mapping[str, Any]) -> HistoryEntry:
    details = _json(r["details"]) or {}
    return HistoryEntry(
        "load",
        r["recorded_at"],
        r["run_id"],
        r["status"],
        rows_staged=r["rows_staged"],
        inserted=r["inserted"],
        updated=r["updated"],
        deleted=r["deleted"],
        seconds=(r["extract_seconds"] or 0.0) + (r["load_seconds"] or 0.0),
        extract_seconds=r["extract_seconds"] or 0.0,
        load_seconds=r["load_seconds"] or 0.0,
        range_low=_json(r["range_low"]),
        range_high=_json(r["range_high"]),
        detail="; ".join([*details.get("notes", []), *([details["message"]] if details.get("message") else [])]),
    )


def _gate_entry(r: Mapping[str, Any]) -> HistoryEntry:
    failing = _failing_rules(_json(r["summary"]) or {})
    return HistoryEntry(
        "gate",
        r["validated_at"],
        r["run_id"],
        "passed" if r["success"] else "failed",
        rows_staged=r["rows"],
        detail=", ".join(f.label for f in failing)
        + (f"; {r['quarantined_rows']} quarantined" if r["quarantined_rows"] else ""),
    )


def _reconciliation_entry(r: Mapping[str, Any]) -> HistoryEntry:
    recon = _reconciliation(r)
    return HistoryEntry(
        "reconciliation",
        recon.reconciled_at,
        recon.run_id,
        recon.result,
        seconds=r["seconds"],
        detail=(
            f"source {recon.source_count:,}, target {recon.target_count:,}: {recon.missing_in_target} "
            f"missing, {recon.extra_in_target} extra, {recon.different} different"
        ),
    )


@dataclass(frozen=True)
class _HistorySource:
    """An evidence table as :func:`read_sync_history` reads it: which columns (None: all), the time
    ``since`` filters on, the id that orders it (newest first) and how a row becomes an entry."""

    table: str
    columns: tuple[str, ...] | None
    at: str
    order: str
    entry: Callable[[Mapping[str, Any]], HistoryEntry]


_LEDGER_COLUMNS = (
    "recorded_at", "run_id", "status", "mode", "rows_staged", "inserted", "updated", "deleted",
    "extract_seconds", "load_seconds", "range_low", "range_high", "details",
)  # fmt: skip
_HISTORY_SOURCES = (
    _HistorySource(AUDIT_TABLE, _LEDGER_COLUMNS, "recorded_at", "entry_id", _load_entry),
    _HistorySource(
        QUALITY_TABLE,
        ("validated_at", "run_id", "success", "rows", "quarantined_rows", "summary"),
        "validated_at",
        "result_id",
        _gate_entry,
    ),
    _HistorySource(RECONCILE_TABLE, None, "reconciled_at", "reconciliation_id", _reconciliation_entry),
)


def _history_rows(
    conn: psycopg.Connection[Any], schema: str, source: _HistorySource, sync_id: str, since: dt.datetime, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """The newest ``limit`` rows of ``sync_id`` in ``source`` since ``since`` (none when its table does not
    exist yet), and whether older ones were left out."""
    if not table_exists(conn, schema, source.table):
        return [], False
    columns = sql.SQL(", ").join(map(sql.Identifier, source.columns)) if source.columns else sql.SQL("*")
    rows = _dicts(
        conn,
        sql.SQL(
            "SELECT {} FROM {} WHERE sync_id = %(sync)s AND {} >= %(since)s ORDER BY {} DESC LIMIT %(limit)s"
        ).format(
            columns, sql.Identifier(schema, source.table), sql.Identifier(source.at), sql.Identifier(source.order)
        ),
        {"sync": sync_id, "since": since, "limit": limit + 1},
    )
    return rows[:limit], len(rows) > limit


_EVIDENCE = (AUDIT_TABLE, QUALITY_TABLE, RECONCILE_TABLE, QUARANTINE_TABLE, EVENT_QUARANTINE_TABLE, CONTEXT_TABLE)


class _LoadRun:
    """The newest run of a sync in the ledger, summed over its loads."""

    def __init__(self, row: Mapping[str, Any]) -> None:
        self.mode: str = row["mode"]
        self.source_table: str | None = row["source_table"]
        self.target_table: str | None = row["target_table"]
        self.run = RunSummary(
            run_id=row["run_id"],
            at=row["at"],
            status=row["status"],
            loads=int(row["loads"]),
            rows_staged=int(row["rows_staged"]),
            inserted=int(row["inserted"]),
            updated=int(row["updated"]),
            deleted=int(row["deleted"]),
            extract_seconds=float(row["extract_seconds"] or 0.0),
            load_seconds=float(row["load_seconds"] or 0.0),
        )


def _dicts(conn: psycopg.Connection[Any], query: sql.Composable, params: Any = ()) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(bindable(query, cursor), params).fetchall()


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _db_now(conn: psycopg.Connection[Any]) -> dt.datetime:
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    value: dt.datetime = row[0]
    return value


def _sync_ids(conn: psycopg.Connection[Any], schema: str, tables: set[str], state_table: str | None) -> list[str]:
    sources = sorted(tables | ({state_table} if state_table else set()))
    if not sources:
        return []
    query = sql.SQL(" UNION ").join(
        sql.SQL("SELECT sync_id FROM {}").format(sql.Identifier(schema, t)) for t in sources
    )
    return sorted(r[0] for r in execute(conn, query).fetchall())


def _last_load_runs(conn: psycopg.Connection[Any], schema: str) -> dict[str, _LoadRun]:
    """Per sync, its newest run in the ledger (by entry id) with its loads summed."""
    rows = _dicts(
        conn,
        sql.SQL(
            "WITH newest AS (SELECT DISTINCT ON (sync_id) sync_id, run_id FROM {a} ORDER BY sync_id, entry_id DESC) "
            "SELECT a.sync_id, a.run_id, max(a.recorded_at) AS at, count(*) AS loads, "
            "(array_agg(a.status ORDER BY a.entry_id DESC))[1] AS status, "
            "(array_agg(a.mode ORDER BY a.entry_id DESC))[1] AS mode, "
            "(array_agg(a.source_table ORDER BY a.entry_id DESC))[1] AS source_table, "
            "(array_agg(a.target_table ORDER BY a.entry_id DESC))[1] AS target_table, "
            "sum(a.rows_staged) AS rows_staged, sum(a.inserted) AS inserted, sum(a.updated) AS updated, "
            "sum(a.deleted) AS deleted, sum(a.extract_seconds) AS extract_seconds, "
            "sum(a.load_seconds) AS load_seconds "
            "FROM {a} a JOIN newest n USING (sync_id, run_id) GROUP BY a.sync_id, a.run_id"
        ).format(a=sql.Identifier(schema, AUDIT_TABLE)),
    )
    return {r["sync_id"]: _LoadRun(r) for r in rows}


def _rows_per_day(conn: psycopg.Connection[Any], schema: str, days: int) -> dict[str, list[DayRows]]:
    rows = execute(
        conn,
        sql.SQL(
            "SELECT sync_id, (recorded_at AT TIME ZONE 'UTC')::date AS day, sum(inserted), sum(updated), "
            "sum(deleted), count(*) FROM {} WHERE recorded_at >= now() - make_interval(days => %s) "
            "GROUP BY 1, 2 ORDER BY 1, 2"
        ).format(sql.Identifier(schema, AUDIT_TABLE)),
        (days,),
    ).fetchall()
    out: dict[str, list[DayRows]] = {}
    for sync_id, day, inserted, updated, deleted, loads in rows:
        out.setdefault(sync_id, []).append(DayRows(day, int(inserted), int(updated), int(deleted), int(loads)))
    return out


def _recent_notes(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[tuple[dt.datetime, list[str]]]]:
    """Per sync, its newest loads' ``(recorded_at, notes)``, newest first."""
    rows = execute(
        conn,
        sql.SQL(
            "SELECT sync_id, recorded_at, details -> 'notes' FROM (SELECT sync_id, recorded_at, details, "
            "row_number() OVER (PARTITION BY sync_id ORDER BY entry_id DESC) AS n FROM {}) x "
            "WHERE n <= %s ORDER BY sync_id, n"
        ).format(sql.Identifier(schema, AUDIT_TABLE)),
        (HELD_BACK_WINDOW,),
    ).fetchall()
    out: dict[str, list[tuple[dt.datetime, list[str]]]] = {}
    for sync_id, at, notes in rows:
        out.setdefault(sync_id, []).append((at, [str(n) for n in (_json(notes) or [])]))
    return out


def _held_back(recent: list[tuple[dt.datetime, list[str]]]) -> HeldBack | None:
    """The run of newest loads whose notes say an open transaction held the upper bound back."""
    streak: list[tuple[dt.datetime, str]] = []
    for at, notes in recent:
        note = next((n for n in notes if HELD_BACK_MARKER in n), None)
        if note is None:
            break
        streak.append((at, note))
    if not streak:
        return None
    reason = streak[0][1]
    return HeldBack(reason=reason, bound=_held_bound(reason), since=streak[-1][0], runs=len(streak))


def _held_bound(note: str) -> dt.datetime | None:
    """``upper bound lowered from A to B: open transaction ...`` -> B (the transaction's start)."""
    head = note.split(HELD_BACK_MARKER, 1)[0]
    _, _, bound = head.rpartition(" to ")
    try:
        value = dt.datetime.fromisoformat(bound.strip())
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _failing_rules(summary: Mapping[str, Any]) -> tuple[RuleFailure, ...]:
    failing = []
    for result in summary.get("results", []):
        if result.get("success"):
            continue
        column = result.get("column")
        failing.append(
            RuleFailure(
                expectation=str(result.get("expectation")),
                column=", ".join(column) if isinstance(column, list) else column,
                severity=str(result.get("severity", "error")),
                status=str(result.get("status", "failed")),
                unexpected_count=result.get("unexpected_count"),
                example_keys=tuple(result.get("example_keys", ())),
            )
        )
    return tuple(failing)


def _newest_gates(conn: psycopg.Connection[Any], schema: str) -> dict[str, GateStatus]:
    rows = _dicts(
        conn,
        sql.SQL(
            "SELECT DISTINCT ON (sync_id) sync_id, run_id, manifest_id, validated_at, success, rows, "
            "quarantined_rows, summary FROM {} ORDER BY sync_id, validated_at DESC, result_id DESC"
        ).format(sql.Identifier(schema, QUALITY_TABLE)),
    )
    out = {}
    for r in rows:
        summary = _json(r["summary"]) or {}
        out[r["sync_id"]] = GateStatus(
            run_id=r["run_id"],
            manifest_id=r["manifest_id"],
            validated_at=r["validated_at"],
            success=bool(r["success"]),
            rows=int(r["rows"]),
            quarantined_rows=int(r["quarantined_rows"]),
            expectations=int(summary.get("expectations", len(summary.get("results", [])))),
            failing_rules=_failing_rules(summary),
            report=summary.get("report"),
        )
    return out


def _reconciliation(r: Mapping[str, Any]) -> ReconciliationStatus:
    return ReconciliationStatus(
        run_id=r["run_id"],
        reconciled_at=r["reconciled_at"],
        method=r["method"],
        source_count=int(r["source_count"]),
        target_count=int(r["target_count"]),
        missing_in_target=int(r["missing_in_target"]),
        extra_in_target=int(r["extra_in_target"]),
        different=int(r["different"]),
        differing_buckets=int(r["differing_buckets"]),
        repaired=bool(r["repaired"]),
    )


def _newest_reconciliations(conn: psycopg.Connection[Any], schema: str) -> dict[str, ReconciliationStatus]:
    rows = _dicts(
        conn,
        sql.SQL(
            "SELECT DISTINCT ON (sync_id) * FROM {} ORDER BY sync_id, reconciled_at DESC, reconciliation_id DESC"
        ).format(sql.Identifier(schema, RECONCILE_TABLE)),
    )
    return {r["sync_id"]: _reconciliation(r) for r in rows}


def _open_quarantine(conn: psycopg.Connection[Any], schema: str, tables: set[str]) -> dict[str, int]:
    """Per sync: quarantined rows still pending (not replayed, superseded, skipped or abandoned), plus
    stream messages that did not decode (kept for inspection; nothing replays them)."""
    counts: dict[str, int] = {}
    queries = []
    if QUARANTINE_TABLE in tables:
        queries.append(
            sql.SQL("SELECT sync_id, count(*) FROM {} WHERE replay_status IS NULL GROUP BY sync_id").format(
                sql.Identifier(schema, QUARANTINE_TABLE)
            )
        )
    if EVENT_QUARANTINE_TABLE in tables:
        queries.append(
            sql.SQL("SELECT sync_id, count(*) FROM {} GROUP BY sync_id").format(
                sql.Identifier(schema, EVENT_QUARANTINE_TABLE)
            )
        )
    for query in queries:
        for sync_id, count in execute(conn, query).fetchall():
            counts[sync_id] = counts.get(sync_id, 0) + int(count)
    return counts


def _cursor_time(watermark: Any) -> dt.datetime | None:
    """The cursor of a ``[cursor, *key]`` watermark as an aware datetime (naive cursors are taken as
    UTC, as the engine compares them), or None when it is not a date/time."""
    if not isinstance(watermark, list) or not watermark:
        return None
    try:
        value = decode_value(watermark[0])
    except (ValueError, TypeError):
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, dt.date):
        return dt.datetime.combine(value, dt.time(), dt.UTC)
    return None


def _position(state: SyncState | None) -> str | None:
    """The committed watermark for people: ``cursor (key a, b)`` or the CDC commit LSN."""
    if state is None or state.watermark is None:
        return None
    mark = state.watermark
    if isinstance(mark, dict):
        if "commit_lsn" in mark:
            return f"LSN {mark['commit_lsn']}"
        return json.dumps(mark, default=str)
    values = []
    for raw in mark:
        try:
            value = decode_value(raw)
        except (ValueError, TypeError):
            value = raw
        values.append(value.isoformat() if isinstance(value, (dt.date, dt.time)) else str(value))
    if not values:
        return None
    return values[0] + (f" (key {', '.join(values[1:])})" if len(values) > 1 else "")


def _last_run(
    load: RunSummary | None, gate: GateStatus | None, reconciliation: ReconciliationStatus | None
) -> RunSummary | None:
    """The newest run: the ledger's, unless a newer run left only a gate result or a reconciliation."""
    candidates: list[RunSummary] = [load] if load else []
    if gate and (load is None or gate.run_id != load.run_id):
        candidates.append(
            RunSummary(
                gate.run_id, gate.validated_at, "gate_passed" if gate.success else "gate_failed", rows_staged=gate.rows
            )
        )
    seen = {r.run_id for r in candidates}
    if reconciliation and reconciliation.run_id not in seen:
        candidates.append(RunSummary(reconciliation.run_id, reconciliation.reconciled_at, "reconciled"))
    return max(candidates, key=lambda r: r.at, default=None)


def _with_dag(
    conn: psycopg.Connection[Any], schema: str, run: RunSummary | None, sync_id: str, owner: SyncOwner | None
) -> RunSummary | None:
    """``run`` with the DAG that recorded it (a run id alone does not name its DAG)."""
    if run is None or owner is None:
        return run
    dag_id = owner.dag_ids[0] if len(owner.dag_ids) == 1 else dag_of_run(conn, schema, sync_id, run.run_id)
    return replace(run, dag_id=dag_id)


def _runs_of(entries: list[HistoryEntry]) -> list[RunSummary]:
    """The loads of ``entries`` grouped by run (oldest first): rows and latency per run for the chart."""
    runs: dict[str, dict[str, Any]] = {}
    for e in sorted((e for e in entries if e.event == "load"), key=lambda e: e.at):
        run = runs.setdefault(
            e.run_id,
            {
                "run_id": e.run_id,
                "at": e.at,
                "status": e.status,
                "loads": 0,
                "rows_staged": 0,
                "inserted": 0,
                "updated": 0,
                "deleted": 0,
                "extract_seconds": 0.0,
                "load_seconds": 0.0,
            },
        )
        run["at"], run["status"] = e.at, e.status
        run["loads"] += 1
        for key in ("rows_staged", "inserted", "updated", "deleted", "extract_seconds", "load_seconds"):
            run[key] += getattr(e, key)
    return [RunSummary(**r) for r in runs.values()]


__all__ = [
    "HELD_BACK_MARKER",
    "default_slot_name",
    "evidence_schemas",
    "read_slot_status",
    "read_sync_history",
    "read_sync_status",
    "read_sync_statuses",
    "sync_kind",
]
