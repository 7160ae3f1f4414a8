"""What a sync is: the declaration users write once and every run follows."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from airflow_sync_provider.core.drift import DEFAULT_SCHEMA_DRIFT, SCHEMA_DRIFT_POLICIES, SchemaDrift
from airflow_sync_provider.core.errors import ConfigurationError

SyncMode = Literal["incremental", "full"]
DeleteMode = Literal["hard", "soft", "none"]

_SYNC_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")

#: Metadata columns the load adds to every target table it manages.
RUN_ID_COLUMN = "_sync_run_id"
SYNCED_AT_COLUMN = "_sync_synced_at"
DELETED_AT_COLUMN = "_sync_deleted_at"


@dataclass(frozen=True)
class SyncSpec:
    """Declaration of one table sync.

    ``mode="incremental"`` reads rows whose ``(cursor_column, primary key)`` is past the committed
    watermark; ``mode="full"`` reads the whole table.  With ``detect_deletes`` (default: on for full,
    off for incremental, where it adds a key-only scan of the source) target rows whose key the
    source no longer has are deleted (``delete_mode="hard"``) or marked in ``_sync_deleted_at``
    (``delete_mode="soft"``).

    Late commits (a source transaction that commits after an extraction with an older cursor value)
    are defended by an upper bound on the cursor: ``now() - lag`` on the source, lowered to the start
    of the oldest open source transaction when ``guard_open_transactions`` is on (PostgreSQL and
    MySQL/MariaDB), and optionally by re-reading a ``lookback`` window below the watermark.
    """

    sync_id: str
    source_table: str
    target_table: str = ""
    source_schema: str | None = None
    target_schema: str = "public"
    mode: SyncMode = "incremental"
    cursor_column: str | None = None
    primary_key: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    delete_mode: DeleteMode = "hard"
    detect_deletes: bool | None = None
    batch_rows: int = 50_000
    lag: dt.timedelta = dt.timedelta(0)
    lookback: dt.timedelta | int | None = None
    guard_open_transactions: bool = True
    state_table: str = "_sync_state"
    max_delete_fraction: float | None = None
    #: What a load does when the source's columns changed since the last load: ``"freeze"`` (the
    #: default: fail, naming table, column, old/new type and the rule, before anything is written),
    #: ``"evolve"`` (add columns, widen types in the target) or ``"discard"`` (keep syncing the known
    #: columns).  The table of cases and the reasons for the default are in :mod:`.drift`.
    schema_drift: SchemaDrift = DEFAULT_SCHEMA_DRIFT
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    #: Keep an SCD type 2 history of the target in this table (same schema), written in the load's
    #: transaction (see :mod:`.history`).
    history_table: str | None = None

    def __post_init__(self) -> None:
        if not self.target_table:
            object.__setattr__(self, "target_table", self.source_table)
        if self.detect_deletes is None:
            object.__setattr__(self, "detect_deletes", self.mode == "full" and self.delete_mode != "none")
        object.__setattr__(self, "primary_key", tuple(self.primary_key))
        object.__setattr__(self, "columns", tuple(self.columns))
        self.validate()

    def validate(self) -> None:
        def fail(message: str) -> None:
            raise ConfigurationError(message, sync_id=self.sync_id, table=self.source_table)

        if not _SYNC_ID.match(self.sync_id or ""):
            fail("sync_id must be 1-200 characters of letters, digits, '_', '.', '-'")
        if not self.source_table:
            fail("source_table is required")
        if self.mode not in ("incremental", "full"):
            fail(f"mode must be 'incremental' or 'full', not {self.mode!r}")
        if self.mode == "incremental" and not self.cursor_column:
            fail("incremental mode needs cursor_column (e.g. an updated_at column); use mode='full' otherwise")
        if self.delete_mode not in ("hard", "soft", "none"):
            fail(f"delete_mode must be 'hard', 'soft' or 'none', not {self.delete_mode!r}")
        if self.detect_deletes and self.delete_mode == "none":
            fail("detect_deletes needs delete_mode 'hard' or 'soft'")
        if self.batch_rows < 1:
            fail("batch_rows must be positive")
        if self.lag < dt.timedelta(0):
            fail("lag must not be negative")
        if self.max_delete_fraction is not None and not 0 <= self.max_delete_fraction <= 1:
            fail("max_delete_fraction must be between 0 and 1")
        if self.schema_drift not in SCHEMA_DRIFT_POLICIES:
            fail(f"schema_drift must be one of {', '.join(SCHEMA_DRIFT_POLICIES)}, not {self.schema_drift!r}")
        if self.history_table is not None and self.history_table in ("", self.target_table):
            fail("history_table must name a table other than the target table")
        if self.columns:
            missing = [k for k in (*self.primary_key, self.cursor_column) if k and k not in self.columns]
            if missing:
                fail(f"columns must include the key and cursor columns; missing {missing}")

    @property
    def qualified_source(self) -> str:
        return f"{self.source_schema}.{self.source_table}" if self.source_schema else self.source_table

    @property
    def qualified_target(self) -> str:
        return f"{self.target_schema}.{self.target_table}"

    def with_options(self, **changes: Any) -> SyncSpec:
        return replace(self, **changes)
