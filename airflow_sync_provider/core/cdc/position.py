"""Where a CDC sync is: the position committed in the target's state row, and the snapshot hand-off.

The slot is created *before* the initial snapshot is read, so every transaction committing after the
slot's start is in the stream; a transaction the snapshot already saw is skipped when the stream is
read (:class:`SnapshotFilter`, by transaction id, not by time).  The position keeps that snapshot
while transactions up to its WAL position may still be read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from airflow_sync_provider.core.cdc import pgoutput
from airflow_sync_provider.core.cdc.manifest import CdcManifest, skip_reason
from airflow_sync_provider.core.state import SyncState

#: Key of the CDC position inside the state row's ``watermark`` JSON.
POSITION_KEYS = ("commit_lsn", "end_lsn", "snapshot", "snapshot_lsn")


@dataclass(frozen=True)
class CdcPosition:
    """Where a CDC sync is, as committed in the target state row (``watermark`` JSON)."""

    commit_lsn: int
    end_lsn: int
    snapshot: str | None = None
    snapshot_lsn: int | None = None
    #: Tables re-snapshotted since: ``{"schema.table": {"snapshot": str, "snapshot_lsn": int}}``.
    table_snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_watermark(self) -> dict[str, Any]:
        mark: dict[str, Any] = {
            "cdc": True,
            "commit_lsn": pgoutput.int_to_lsn(self.commit_lsn),
            "end_lsn": pgoutput.int_to_lsn(self.end_lsn),
            "snapshot": self.snapshot,
            "snapshot_lsn": pgoutput.int_to_lsn(self.snapshot_lsn) if self.snapshot_lsn is not None else None,
        }
        if self.table_snapshots:
            mark["table_snapshots"] = {
                table: {"snapshot": t["snapshot"], "snapshot_lsn": pgoutput.int_to_lsn(t["snapshot_lsn"])}
                for table, t in sorted(self.table_snapshots.items())
            }
        return mark

    @classmethod
    def from_state(cls, state: SyncState | None) -> CdcPosition | None:
        mark = state.watermark if state else None
        if not isinstance(mark, dict) or not mark.get("cdc"):
            return None
        snapshot_lsn = mark.get("snapshot_lsn")
        return cls(
            commit_lsn=pgoutput.lsn_to_int(mark["commit_lsn"]),
            end_lsn=pgoutput.lsn_to_int(mark["end_lsn"]),
            snapshot=mark.get("snapshot"),
            snapshot_lsn=pgoutput.lsn_to_int(snapshot_lsn) if snapshot_lsn else None,
            table_snapshots={
                table: {"snapshot": t["snapshot"], "snapshot_lsn": pgoutput.lsn_to_int(t["snapshot_lsn"])}
                for table, t in (mark.get("table_snapshots") or {}).items()
            },
        )

    def after(self, commit_lsn: int, end_lsn: int) -> CdcPosition:
        """The position once a batch up to ``commit_lsn`` is applied: a snapshot hand-off is kept while
        transactions up to its WAL position may still be read."""
        keep = self.snapshot_lsn is not None and commit_lsn <= self.snapshot_lsn
        return CdcPosition(
            commit_lsn,
            end_lsn,
            self.snapshot if keep else None,
            self.snapshot_lsn if keep else None,
            {table: t for table, t in self.table_snapshots.items() if commit_lsn <= t["snapshot_lsn"]},
        )


class SnapshotFilter:
    """Is a transaction already contained in the initial snapshot (``xmin:xmax:xip,...``)?"""

    def __init__(self, snapshot: str) -> None:
        xmin, xmax, xip = snapshot.split(":")
        self.xmin, self.xmax = int(xmin), int(xmax)
        self.in_progress = {int(x) for x in xip.split(",") if x}

    def visible(self, xid32: int) -> bool:
        # pgoutput gives 32-bit xids; the snapshot has 64-bit ones. The transactions in question are
        # recent (they commit before snapshot_lsn), so place the xid in the epoch nearest to xmax.
        full = (self.xmax & ~0xFFFFFFFF) | xid32
        if full > self.xmax + 2**31:
            full -= 2**32
        elif full < self.xmax - 2**31:
            full += 2**32
        if full < self.xmin:
            return True
        return full < self.xmax and full not in self.in_progress


def still_loadable(state: SyncState | None, position: CdcPosition | None) -> Callable[[dict[str, Any]], bool]:
    """For the staging sweep: whether a staged batch's manifest is one a load would still apply."""
    version = state.version if state else 0
    last_manifest_id = state.last_manifest_id if state else None

    def loadable(data: dict[str, Any]) -> bool:
        try:
            manifest = CdcManifest.from_dict(data)
        except (KeyError, TypeError, ValueError):  # not a CDC batch of this sync: its age decides
            return False
        return skip_reason(manifest, version, last_manifest_id, position) is None

    return loadable
