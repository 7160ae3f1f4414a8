"""Drain an event stream (Redis Streams, NATS JetStream, MQTT) into a PostgreSQL table, exactly once.

One task reads bounded batches from the position committed in the target (or what an MQTT session
redelivers), decodes them by the declared schema, quarantines what does not decode, and loads each
batch with its position in one transaction (see :mod:`airflow_sync_provider.core.events.load`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import closing
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook, BaseOperator, Context

from airflow_sync_provider import lineage
from airflow_sync_provider.assets import emit_table_events
from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.events import EventColumn, EventSchema, EventSpec, drain_events
from airflow_sync_provider.core.events.schema import DEFAULT_MAX_PAYLOAD_BYTES, EventTransform
from airflow_sync_provider.core.events.spec import DEFAULT_BATCH_BYTES, DEFAULT_BATCH_EVENTS
from airflow_sync_provider.hooks.events import event_source
from airflow_sync_provider.hooks.target import target_connection
from airflow_sync_provider.operators.common import (
    record_dag_run,
    resolve_transform,
    staging_area,
    task_errors,
)
from airflow_sync_provider.plugins.links import SYNC_LINKS

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_sync_provider.core.events.load import DrainResult


def event_columns(columns: Sequence[EventColumn | Mapping[str, Any]]) -> tuple[EventColumn, ...]:
    """Columns given as :class:`EventColumn` or as dicts (``{"name": ..., "type": ..., "path": ...}``)."""
    try:
        return tuple(c if isinstance(c, EventColumn) else EventColumn(**dict(c)) for c in columns)
    except TypeError as error:
        raise ConfigurationError(f"event columns: {error}") from error


class EventStreamToPostgresOperator(BaseOperator):
    """Drain an event stream into ``target_schema.target_table`` in bounded, exactly-once batches.

    :param sync_id: names the sync (its state row, ledger entries, quarantine rows). (templated)
    :param source_conn_id: a ``redis``, ``nats`` or ``mqtt`` Airflow connection. (templated)
    :param stream: Redis stream key, JetStream stream name, or MQTT topic filter. (templated)
    :param target_conn_id: the ``postgres`` connection of the target. (templated)
    :param target_table: the table the events go to (created from the declared columns). (templated)
    :param columns: the declared event columns (:class:`EventColumn` or dicts).
    :param event_id: the column holding the event's id (the default key).
    :param event_time: a ``timestamptz`` column ordering two events of one key (newest wins).
    :param sequence: a column breaking ties of ``event_time`` (e.g. the device's counter).
    :param key: the target's key: the event id (default: one row per event) or entity columns
        (one row per entity, holding its newest event).
    :param transform: a pandas transform of each decoded batch (callable or ``"module:function"``).
    :param max_batches: stop after this many batches (a stream that never pauses); the next run goes on.
    :param max_seconds: stop after this many seconds (checked between batches).
    :param wait_seconds: how long a read waits for the first event before the drain ends.
    :param source_options: adapter options (Redis ``field``, ``trim_after_commit``; NATS ``subject``;
        MQTT ``client_id``, ``receive_maximum``, ``session_expiry``).

    Returns the drain's summary (a small dict) as XCom.  Add the target's asset alias
    (:func:`airflow_sync_provider.assets.table_asset`) to ``outlets`` to schedule on it: the task emits
    the table's ``postgres://`` asset event through it, with the counts and the stream position.
    """

    template_fields: Sequence[str] = (
        "sync_id",
        "source_conn_id",
        "stream",
        "target_conn_id",
        "target_table",
        "target_schema",
        "staging_uri",
    )
    ui_color = "#fff4e0"
    operator_extra_links = SYNC_LINKS

    def __init__(
        self,
        *,
        sync_id: str,
        source_conn_id: str,
        stream: str,
        target_conn_id: str,
        target_table: str,
        columns: Sequence[EventColumn | Mapping[str, Any]],
        event_id: str = "event_id",
        event_time: str | None = None,
        sequence: str | None = None,
        key: Sequence[str] = (),
        target_schema: str = "public",
        state_table: str = "_sync_state",
        batch_events: int = DEFAULT_BATCH_EVENTS,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        schema_drift: str = "freeze",
        transform: EventTransform | str | None = None,
        max_batches: int | None = None,
        max_seconds: float | None = None,
        wait_seconds: float = 1.0,
        source_options: Mapping[str, Any] | None = None,
        staging_uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sync_id = sync_id
        self.source_conn_id = source_conn_id
        self.stream = stream
        self.target_conn_id = target_conn_id
        self.target_table = target_table
        self.columns = columns
        self.event_id = event_id
        self.event_time = event_time
        self.sequence = sequence
        self.key = key
        self.target_schema = target_schema
        self.state_table = state_table
        self.batch_events = batch_events
        self.batch_bytes = batch_bytes
        self.max_payload_bytes = max_payload_bytes
        self.schema_drift = schema_drift
        self.transform = transform
        self.max_batches = max_batches
        self.max_seconds = max_seconds
        self.wait_seconds = wait_seconds
        self.source_options = source_options
        self.staging_uri = staging_uri

    def build_spec(self) -> EventSpec:
        schema = EventSchema(
            columns=event_columns(self.columns),
            event_id=self.event_id,
            event_time=self.event_time or None,
            sequence=self.sequence or None,
            key=tuple(self.key),
            max_payload_bytes=self.max_payload_bytes,
        )
        return EventSpec(
            sync_id=self.sync_id,
            target_table=self.target_table,
            schema=schema,
            target_schema=self.target_schema,
            state_table=self.state_table,
            batch_events=self.batch_events,
            batch_bytes=self.batch_bytes,
            schema_drift=self.schema_drift,  # type: ignore[arg-type]
        )

    def execute(self, context: Context) -> dict[str, Any]:
        with task_errors(self.sync_id):
            spec = self.build_spec()
            transform = resolve_transform(self.transform)
            source = event_source(
                self.source_conn_id,
                self.stream,
                sync_id=spec.sync_id,
                batch_events=spec.batch_events,
                **dict(self.source_options or {}),
            )
            try:
                with closing(target_connection(self.target_conn_id, sync_id=spec.sync_id)) as target:
                    record_dag_run(
                        target, spec.target_schema, spec.sync_id, context, source_conn_id=self.source_conn_id
                    )
                    result = drain_events(
                        source,
                        target,
                        spec,
                        staging=staging_area(self.staging_uri),
                        run_id=context["run_id"],
                        wait=self.wait_seconds,
                        max_batches=self.max_batches,
                        max_seconds=self.max_seconds,
                        transform=transform,
                        logger=self.log,
                    )
            finally:
                source.close()
        self._result = result
        emit_table_events(context, self.outlets, self.target_conn_id, self._writes(result), self.log)
        return result.to_dict()

    def _writes(self, result: DrainResult) -> list[lineage.TableWrite]:
        """The target table, when the drain committed events (the position is the event's range)."""
        if result.batches == result.stale_batches:
            return []
        extra = {"sync_id": self.sync_id, "events": result.events, "quarantined": result.quarantined}
        extra |= {"position": result.position, "state_version": result.version}
        return [lineage.TableWrite(self.target_schema, self.target_table, result.inserted, result.updated, extra=extra)]

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """The stream -> the target table; each declared column comes from its payload path."""
        conn = BaseHook.get_connection(self.source_conn_id)
        stream = lineage.stream_dataset(conn.conn_type or "stream", conn.host, conn.port, self.stream)
        columns = event_columns(self.columns)
        fields = {c.name: [lineage.ColumnSource(stream, c.path or c.name)] for c in columns}
        target = lineage.database_dataset(
            lineage.connection_url(self.target_conn_id), f"{self.target_schema}.{self.target_table}"
        )
        result: DrainResult | None = getattr(self, "_result", None)
        writes = self._writes(result) if result is not None else []
        output = lineage.output_dataset(
            target, [(c.name, c.type) for c in columns], fields, writes[0] if writes else None
        )
        return lineage.operator_lineage([lineage.input_dataset(stream)], [output])


__all__ = ["EventStreamToPostgresOperator", "event_columns"]
