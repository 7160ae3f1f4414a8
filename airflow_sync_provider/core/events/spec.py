"""What an event sync is: the stream's declared schema, the target table, and the batch bounds."""

from __future__ import annotations

from dataclasses import dataclass

from airflow_sync_provider.core.drift import DEFAULT_SCHEMA_DRIFT, SchemaDrift
from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.events.schema import EventSchema
from airflow_sync_provider.core.spec import SyncSpec

DEFAULT_BATCH_EVENTS = 10_000
DEFAULT_BATCH_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class EventSpec:
    """Declaration of one event sync: a stream (or topic) into ``target_schema.target_table``.

    Memory is bounded by ``batch_events`` and ``batch_bytes`` (one batch in Python at a time,
    whatever the backlog).  The position in the stream lives in ``state_table`` (``_sync_state``),
    written in the same transaction as the rows.
    """

    sync_id: str
    target_table: str
    schema: EventSchema
    target_schema: str = "public"
    state_table: str = "_sync_state"
    batch_events: int = DEFAULT_BATCH_EVENTS
    batch_bytes: int = DEFAULT_BATCH_BYTES
    schema_drift: SchemaDrift = DEFAULT_SCHEMA_DRIFT

    def __post_init__(self) -> None:
        # The table-sync declaration checks the names, the key and the drift policy the same way.
        self.as_sync_spec()
        if self.batch_events < 1 or self.batch_bytes < 1:
            raise ConfigurationError("batch_events and batch_bytes must be positive", sync_id=self.sync_id)

    def as_sync_spec(self) -> SyncSpec:
        """The table-sync view of this target (what the load, state and gates know how to handle)."""
        return SyncSpec(
            sync_id=self.sync_id,
            source_table=self.target_table,
            target_table=self.target_table,
            target_schema=self.target_schema,
            mode="full",
            primary_key=self.schema.key,
            delete_mode="none",
            state_table=self.state_table,
            schema_drift=self.schema_drift,
            batch_rows=self.batch_events,
        )

    @property
    def qualified_target(self) -> str:
        return f"{self.target_schema}.{self.target_table}"


__all__ = ["DEFAULT_BATCH_BYTES", "DEFAULT_BATCH_EVENTS", "EventSpec"]
