"""What an API sync is: one endpoint, how its records are found, keyed, ordered and paged."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from airflow_sync_provider.core.api.paginate import Paginator, SinglePage
from airflow_sync_provider.core.drift import DEFAULT_SCHEMA_DRIFT, SchemaDrift
from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.events.schema import TYPES, EventColumn
from airflow_sync_provider.core.spec import DeleteMode, SyncSpec

ApiMode = Literal["incremental", "full"]

#: A declared field of the records: name, type (``text``, ``bigint``, ``integer``, ``double``,
#: ``boolean``, ``timestamptz``, ``jsonb``), dotted ``path`` in the record, ``required``.
#: The same declaration as an event stream's columns.
ApiColumn = EventColumn


@dataclass(frozen=True)
class ApiSpec:
    """Declaration of one API sync: ``GET endpoint`` (relative to the connection's base URL) into
    ``target_schema.target_table``.

    * ``records_path``: where the records are in a page's JSON body (dotted, ``""`` = the body is
      the list itself).
    * ``primary_key`` / ``cursor_field``: fields of a record (dotted paths allowed through
      ``columns``' ``path``); ``cursor_field`` orders changes (``updated_at``).
    * ``columns``: the declared fields (their Arrow/PostgreSQL types); empty = inferred from the
      first page and then fixed for the run (a later record that does not fit fails, naming it).
    * ``mode="incremental"``: ``cursor_param`` (e.g. ``updated_since``) is sent with the committed
      watermark minus ``lookback``; the new watermark is the largest cursor seen, held back to
      ``now - lag`` so records the API publishes late (with an older cursor) are read by the next run.
      ``cursor_end_param`` (e.g. ``updated_before``) bounds a backfill window on the server side.
    * ``mode="full"``: every record every run; with ``detect_deletes`` (default on) target rows
      whose key the API no longer lists are deleted (or soft-deleted), as a full table sync does.
    """

    sync_id: str
    endpoint: str
    target_table: str
    primary_key: tuple[str, ...]
    records_path: str = "data"
    params: Mapping[str, Any] = field(default_factory=dict)
    paginator: Paginator = field(default_factory=SinglePage)
    columns: tuple[ApiColumn, ...] = ()
    mode: ApiMode = "incremental"
    cursor_field: str | None = None
    cursor_param: str | None = None
    cursor_end_param: str | None = None
    #: strftime format of the cursor value sent in ``cursor_param`` (default: ISO 8601 for times).
    cursor_format: str | None = None
    #: The first run's cursor value (default: no cursor parameter at all, i.e. everything).
    start_value: Any = None
    lag: dt.timedelta = dt.timedelta(0)
    lookback: dt.timedelta | int | None = None
    target_schema: str = "public"
    state_table: str = "_sync_state"
    delete_mode: DeleteMode = "hard"
    detect_deletes: bool | None = None
    max_delete_fraction: float | None = None
    history_table: str | None = None
    schema_drift: SchemaDrift = DEFAULT_SCHEMA_DRIFT
    #: Records per staged Parquet file (bounds memory: pages are buffered up to this many records).
    batch_records: int = 50_000
    #: Fail (never silently stop) when an endpoint serves more pages than this in one run.
    max_pages: int = 100_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "primary_key", tuple(self.primary_key))
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "params", dict(self.params))
        if self.detect_deletes is None:
            object.__setattr__(self, "detect_deletes", self.mode == "full" and self.delete_mode != "none")

        def fail(message: str) -> None:
            raise ConfigurationError(message, sync_id=self.sync_id, table=self.source_name)

        if not self.endpoint:
            fail("endpoint is required")
        if not self.primary_key:
            fail("primary_key is required (records are merged by it)")
        if self.mode == "incremental" and not (self.cursor_field and self.cursor_param):
            fail("incremental mode needs cursor_field and cursor_param (e.g. updated_at / updated_since)")
        if self.detect_deletes and self.mode != "full":
            fail("detect_deletes needs mode='full' (only a run that lists every key can tell what is gone)")
        if self.batch_records < 1 or self.max_pages < 1:
            fail("batch_records and max_pages must be positive")
        names = [c.name for c in self.columns]
        if self.columns:
            for column in self.columns:
                if column.type not in TYPES:
                    fail(f"column {column.name!r}: type must be one of {', '.join(TYPES)}, not {column.type!r}")
            missing = [k for k in (*self.primary_key, self.cursor_field) if k and k not in names]
            if missing:
                fail(f"columns must declare the key and cursor fields; missing {missing}")
            if len(set(names)) != len(names):
                fail("column names must be unique")
        self.as_sync_spec()  # names, drift policy and lag are checked the way a table sync's are

    @property
    def source_name(self) -> str:
        """How the source appears in messages, the state row and the ledger."""
        return f"api:{self.endpoint}"

    @property
    def qualified_target(self) -> str:
        return f"{self.target_schema}.{self.target_table}"

    def as_sync_spec(self) -> SyncSpec:
        """The table-sync view of this target (what the load, state, gates and transforms handle)."""
        return SyncSpec(
            sync_id=self.sync_id,
            source_table=self.source_name,
            target_table=self.target_table,
            target_schema=self.target_schema,
            mode=self.mode,
            cursor_column=self.cursor_field if self.mode == "incremental" else None,
            primary_key=self.primary_key,
            delete_mode=self.delete_mode,
            detect_deletes=self.detect_deletes,
            batch_rows=self.batch_records,
            lag=self.lag,
            lookback=self.lookback,
            state_table=self.state_table,
            max_delete_fraction=self.max_delete_fraction,
            history_table=self.history_table,
            schema_drift=self.schema_drift,
        )

    def with_options(self, **changes: Any) -> ApiSpec:
        return replace(self, **changes)


__all__ = ["ApiColumn", "ApiMode", "ApiSpec"]
