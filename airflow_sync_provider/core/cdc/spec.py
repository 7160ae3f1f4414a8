"""What a CDC sync is: a set of PostgreSQL source tables streamed through one slot into a target."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from airflow_sync_provider.core.drift import DEFAULT_SCHEMA_DRIFT, SCHEMA_DRIFT_POLICIES, SchemaDrift
from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.spec import DeleteMode

_SLOT_UNSAFE = re.compile(r"[^a-z0-9_]")


@dataclass(frozen=True)
class CdcSpec:
    """Declaration of one CDC sync.

    ``tables`` are source tables (``"table"`` or ``"schema.table"``); each lands in ``target_schema``
    under its own name.  One replication slot and one publication serve the whole sync, so changes
    to several tables are applied in commit order and a multi-table transaction lands in one target
    transaction.  ``max_changes`` and ``max_batch_bytes`` bound one run (a run always ends at a
    transaction boundary); ``batch_rows`` and ``batch_bytes`` bound each staged file (memory).
    ``max_retained_wal_bytes`` fails the run (with
    the slot's figures) when the slot holds more WAL than that, e.g. after the DAG was paused.
    """

    sync_id: str
    tables: tuple[str, ...]
    target_schema: str = "public"
    slot_name: str = ""
    publication: str = ""
    delete_mode: DeleteMode = "hard"
    max_changes: int = 1_000_000
    batch_rows: int = 50_000
    #: Bytes of changes (pgoutput messages) per staged file: with batch_rows, what bounds memory
    #: (a 1 MB-per-row table reaches this long before batch_rows).
    batch_bytes: int = 16 * 1024 * 1024
    #: A run ends at the first transaction boundary past this many bytes of changes (None: no limit).
    max_batch_bytes: int | None = 2 * 1024 * 1024 * 1024
    max_retained_wal_bytes: int | None = None
    state_table: str = "_sync_state"
    #: What a load does when a table's columns changed at the source (see :mod:`..drift`):
    #: ``freeze`` fails, ``evolve`` adds and widens target columns; ``discard`` is refused for
    #: change batches (unchanged TOAST values are marked by column position).
    schema_drift: SchemaDrift = DEFAULT_SCHEMA_DRIFT
    #: Keep an SCD type 2 history of every table in ``<table>_history`` (see :mod:`..history`),
    #: written in the same transaction as the changes and the LSN.
    history: bool = False
    #: How the slot's messages are decoded.  ``bulk`` (the default) fetches them in a few large
    #: buffers and walks their columns with numpy over whole buffers (see :mod:`.bulk`);
    #: ``per_message`` is the reference implementation, one Python object per message (see
    #: :mod:`.pgoutput`), kept for comparison (benchmarks, the equivalence tests) and as a fallback.
    #: Both stage the same rows.
    decoder: Literal["bulk", "per_message"] = "bulk"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tables", tuple(self.tables))
        default = "sync_" + _SLOT_UNSAFE.sub("_", self.sync_id.lower())
        if not self.slot_name:
            object.__setattr__(self, "slot_name", default[:63])
        if not self.publication:
            object.__setattr__(self, "publication", default[:63])
        self.validate()

    def validate(self) -> None:
        def fail(message: str) -> None:
            raise ConfigurationError(message, sync_id=self.sync_id)

        if not self.tables:
            fail("a CDC sync needs at least one source table")
        if not re.fullmatch(r"[a-z0-9_]{1,63}", self.slot_name):
            fail(f"slot_name {self.slot_name!r} must be 1-63 characters of lower-case letters, digits and '_'")
        if self.schema_drift not in SCHEMA_DRIFT_POLICIES:
            fail(f"schema_drift must be one of {', '.join(SCHEMA_DRIFT_POLICIES)}, not {self.schema_drift!r}")
        if self.delete_mode not in ("hard", "soft"):
            fail(f"delete_mode must be 'hard' or 'soft' for CDC, not {self.delete_mode!r}")
        if self.max_changes < 1 or self.batch_rows < 1 or self.batch_bytes < 1:
            fail("max_changes, batch_rows and batch_bytes must be positive")
        if self.decoder not in ("bulk", "per_message"):
            fail(f"decoder must be 'bulk' or 'per_message', not {self.decoder!r}")
        if self.max_batch_bytes is not None and self.max_batch_bytes < 1:
            fail("max_batch_bytes must be positive (or None)")

    def source_name(self, table: str) -> tuple[str, str]:
        """``(schema, table)`` of a declared source table."""
        schema, _, name = table.rpartition(".")
        return (schema or "public", name)

    def target_name(self, table: str) -> str:
        return self.source_name(table)[1]

    def history_table_of(self, table: str) -> str | None:
        """The SCD2 history table of a declared source table (None without ``history``)."""
        return f"{self.target_name(table)}_history" if self.history else None
