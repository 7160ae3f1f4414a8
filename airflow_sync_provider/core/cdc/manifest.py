"""The CDC manifest: one staged batch of changes (or the initial snapshot) of a CDC sync.

Per table it holds an ordinary :class:`~airflow_sync_provider.core.manifest.Manifest` (files,
columns, key), so quality gates read CDC batches like any other; around them it carries the LSN
range, the truncates, and the snapshot hand-off facts.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from airflow_sync_provider.core.cdc.pgoutput import int_to_lsn
from airflow_sync_provider.core.cdc.spec import CdcSpec
from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.manifest import Manifest

if TYPE_CHECKING:
    from airflow_sync_provider.core.cdc.position import CdcPosition

CdcLoadStatus = Literal["applied", "stale", "already_applied", "no_changes"]

#: ``snapshot``: the initial copy of every table; ``changes``: a batch from the slot; ``table_snapshot``:
#: a new copy of some tables while the others keep streaming (see ``resnapshot_tables``).
CdcKind = Literal["snapshot", "changes", "table_snapshot"]

#: Columns every staged change file carries next to the table's own columns.
OP_COLUMN = "_cdc_op"  # I, U, D
LSN_COLUMN = "_cdc_lsn"  # LSN of the commit record of the change's transaction
SEQ_COLUMN = "_cdc_seq"  # position of the change within the batch (commit order, then statement order)
UNCHANGED_COLUMN = "_cdc_unchanged"  # PostgreSQL int[] text of 1-based positions of unchanged TOAST values
MOVED_FROM_COLUMN = "_cdc_moved_from"  # for an update that changed the key: seq of the old key's delete
CHANGE_COLUMNS = (OP_COLUMN, LSN_COLUMN, SEQ_COLUMN, UNCHANGED_COLUMN, MOVED_FROM_COLUMN)


@dataclass(frozen=True)
class TruncateEvent:
    table: str  # source table, "schema.name"
    lsn: int
    seq: int


@dataclass(frozen=True)
class CdcManifest:
    sync_id: str
    run_id: str
    manifest_id: str
    kind: CdcKind
    slot_name: str
    publication: str
    target_schema: str
    state_table: str
    delete_mode: str
    #: One per source table, in declaration order (files may be empty).
    tables: tuple[Manifest, ...]
    base_version: int
    #: Commit LSN of the last transaction the state had applied when this batch was read.
    applied_lsn: int
    #: Last transaction in the batch: its commit LSN (stored in the state) and end LSN (slot advance).
    commit_lsn: int
    end_lsn: int
    changes: int = 0
    transactions: int = 0
    truncates: tuple[TruncateEvent, ...] = ()
    #: Snapshot hand-off: the snapshot the initial copy was read in (``pg_current_snapshot()``) and the
    #: WAL position read right after it.  Transactions that commit at or before that position and are
    #: visible in the snapshot are already in the copy and are skipped when the stream is read.
    snapshot: str | None = None
    snapshot_lsn: int | None = None
    #: Per source table re-snapshotted since the initial snapshot, its own hand-off facts like the two
    #: above: ``{"schema.table": {"snapshot": ..., "snapshot_lsn": int}}``; a table_snapshot manifest
    #: holds its new ones, a change batch the ones it was read with.
    table_snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    staging_dir: str = ""
    extracted_at: str = ""
    extract_seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tables"] = [t.to_dict() for t in self.tables]
        data["truncates"] = [asdict(t) for t in self.truncates]
        data["notes"] = list(self.notes)
        data["format"] = "cdc-1"
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str) -> CdcManifest:
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, dict) or data.get("format") != "cdc-1":
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ConfigurationError(f"not a CDC manifest (format {found!r}); pass a CDC extract task's XCom")
        values = {k: v for k, v in data.items() if k != "format"}
        values["tables"] = tuple(Manifest.from_dict(t) for t in values["tables"])
        values["truncates"] = tuple(TruncateEvent(**t) for t in values.get("truncates", ()))
        values["notes"] = tuple(values.get("notes", ()))
        values["table_snapshots"] = dict(values.get("table_snapshots") or {})
        return cls(**values)

    def summary(self) -> str:
        from airflow_sync_provider.core.cdc.pgoutput import int_to_lsn

        return (
            f"CDC {self.kind} {self.manifest_id} of sync {self.sync_id!r}: {self.rows} rows "
            f"({self.changes} changes in {self.transactions} transactions) for {len(self.tables)} table(s), "
            f"up to commit {int_to_lsn(self.commit_lsn)}"
        )


def manifest_header(
    spec: CdcSpec, run_id: str, manifest_id: str, kind: CdcKind, staging_dir: str, started: float
) -> dict[str, Any]:
    """What every CDC manifest (snapshot, table re-snapshot, changes) says of its sync, run and batch."""
    return {
        "sync_id": spec.sync_id,
        "run_id": run_id,
        "manifest_id": manifest_id,
        "kind": kind,
        "slot_name": spec.slot_name,
        "publication": spec.publication,
        "target_schema": spec.target_schema,
        "state_table": spec.state_table,
        "delete_mode": spec.delete_mode,
        "staging_dir": staging_dir,
        "extracted_at": dt.datetime.now(dt.UTC).isoformat(),
        "extract_seconds": round(time.monotonic() - started, 3),
    }


def skip_reason(
    manifest: CdcManifest, version: int, last_manifest_id: str | None, position: CdcPosition | None
) -> tuple[CdcLoadStatus, str] | None:
    """Why a load would not apply ``manifest`` on top of the committed state (None: it would).

    The load asks it under the state lock; a run's staging sweep asks it to keep the batches a
    load may still apply.
    """
    if last_manifest_id == manifest.manifest_id:
        return "already_applied", f"manifest {manifest.manifest_id} is already committed (state version {version})"
    if manifest.kind == "table_snapshot" and version != manifest.base_version:
        # A batch committed since it was read: transactions it applied that the snapshot did not see
        # would be lost under the copy.  Re-snapshot again.
        return "stale", (
            f"stale re-snapshot {manifest.manifest_id} skipped: extracted at state version {manifest.base_version}, "
            f"but version {version} is committed; run the re-snapshot again"
        )
    if manifest.kind in ("snapshot", "table_snapshot"):
        if version != manifest.base_version:
            return "stale", (
                f"stale snapshot {manifest.manifest_id} skipped: extracted at state version {manifest.base_version}, "
                f"but version {version} is committed"
            )
        return None
    if position is None:
        return "stale", f"change batch {manifest.manifest_id} skipped: the sync has no committed snapshot"
    if manifest.snapshot != position.snapshot or manifest.table_snapshots != position.table_snapshots:
        return "stale", (
            f"change batch {manifest.manifest_id} skipped: it was read for another initial snapshot than the "
            "committed one (or before a table was re-snapshotted); the next run reads from the committed position"
        )
    if manifest.commit_lsn <= position.commit_lsn:
        if manifest.transactions == 0 and manifest.commit_lsn == manifest.applied_lsn:
            return "no_changes", f"no changes since {int_to_lsn(position.commit_lsn)}"
        return "already_applied", (
            f"change batch {manifest.manifest_id} (up to {int_to_lsn(manifest.commit_lsn)}) is already covered by "
            f"the committed position {int_to_lsn(position.commit_lsn)}; nothing to do"
        )
    return None
