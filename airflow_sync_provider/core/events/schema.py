"""Declared event schemas: JSON payloads decoded into typed Arrow columns, or rejected with a reason.

Decoding never raises for a bad message.  Anything the load could later choke on (bytes that are not
UTF-8, text that is not JSON or not an object, a missing key, a value of the wrong type or out of
range, a NUL character PostgreSQL text cannot hold, a non-finite number, a payload over the size
limit) is a :class:`Rejected` with the raw bytes and the reason, bound for the quarantine, so one bad
message never blocks the stream and is never lost.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.events.source import RawEvent
from airflow_sync_provider.core.manifest import ManifestColumn

ColumnType = Literal["text", "bigint", "integer", "double", "boolean", "timestamptz", "jsonb"]

#: Declared type -> (Arrow type staged, PostgreSQL type of the target column).
TYPES: dict[str, tuple[pa.DataType, str]] = {
    "text": (pa.string(), "text"),
    "bigint": (pa.int64(), "bigint"),
    "integer": (pa.int32(), "integer"),
    "double": (pa.float64(), "double precision"),
    "boolean": (pa.bool_(), "boolean"),
    "timestamptz": (pa.timestamp("us", tz="UTC"), "timestamp with time zone"),
    "jsonb": (pa.string(), "jsonb"),
}

_INT_RANGE = {"bigint": (-(2**63), 2**63 - 1), "integer": (-(2**31), 2**31 - 1)}
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024


class ValueRejected(Exception):
    """A value the declared column cannot take (the message says why)."""


@dataclass(frozen=True)
class EventColumn:
    """One typed column taken from the payload at ``path`` (dotted, default: the column name)."""

    name: str
    type: ColumnType = "text"
    path: str | None = None
    required: bool = True

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple((self.path or self.name).split("."))


@dataclass(frozen=True)
class EventSchema:
    """What an event is: its columns, its id, and how two versions of one key are ordered.

    ``key`` is what the target row is keyed by: the event id (the default: one row per event, an
    append-only log where a redelivery is a no-op) or an entity (one row per device, per SKU...,
    holding its latest event).  Between two events of one key the newer ``(event_time, sequence)``
    wins, within a batch and against the target, whatever order they arrived in.
    """

    columns: tuple[EventColumn, ...]
    event_id: str = "event_id"
    event_time: str | None = None
    sequence: str | None = None
    key: tuple[str, ...] = ()
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "key", tuple(self.key) or (self.event_id,))
        names = [c.name for c in self.columns]
        problems = []
        if len(set(names)) != len(names):
            problems.append("column names must be unique")
        for column in self.columns:
            if column.type not in TYPES:
                problems.append(f"column {column.name!r}: type must be one of {', '.join(TYPES)}, not {column.type!r}")
        by_name = {c.name: c for c in self.columns}
        for role, name in [("event_id", self.event_id), ("event_time", self.event_time), ("sequence", self.sequence)]:
            if name is not None and name not in by_name:
                problems.append(f"{role} {name!r} is not a declared column")
            elif name is not None and not by_name[name].required:
                problems.append(f"{role} {name!r} must be required (events are keyed and ordered by it)")
        for name in self.key:
            if name not in by_name or not by_name[name].required:
                problems.append(f"key column {name!r} must be a declared, required column")
        if self.event_time is not None and by_name.get(self.event_time, EventColumn("")).type != "timestamptz":
            problems.append("event_time must be a timestamptz column")
        if self.max_payload_bytes < 1:
            problems.append("max_payload_bytes must be positive")
        if problems:
            raise ConfigurationError("event schema: " + "; ".join(problems))

    @property
    def order(self) -> tuple[str, ...]:
        """The columns that order two events of one key (newest wins)."""
        return tuple(c for c in (self.event_time, self.sequence) if c)

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, TYPES[c.type][0], nullable=not c.required) for c in self.columns])

    @property
    def manifest_columns(self) -> tuple[ManifestColumn, ...]:
        return tuple(ManifestColumn(c.name, TYPES[c.type][1], not c.required) for c in self.columns)

    def pg_type(self, name: str) -> str:
        return next(TYPES[c.type][1] for c in self.columns if c.name == name)


@dataclass(frozen=True)
class Rejected:
    """A message that did not decode: raw bytes kept, with the reason (and its id when it had one)."""

    event: RawEvent
    reason: str
    event_id: str | None = None


@dataclass(frozen=True)
class Decoded:
    """A batch after decoding: typed rows (in arrival order) and the rejected messages."""

    rows: pa.Table
    rejected: tuple[Rejected, ...]


#: A pandas transform applied to the decoded rows of each batch (same declared columns out).
EventTransform = Callable[[Any], Any]


def decode_events(events: Iterable[RawEvent], schema: EventSchema) -> Decoded:
    """Decode every payload by ``schema``; what does not fit is rejected, never raised."""
    values: list[list[Any]] = [[] for _ in schema.columns]
    rejected: list[Rejected] = []
    for event in events:
        try:
            row = _decode(event.payload, schema)
        except ValueRejected as reason:
            rejected.append(Rejected(event, str(reason), _event_id_of(event.payload, schema)))
            continue
        for column_values, value in zip(values, row, strict=True):
            column_values.append(value)
    arrow = schema.arrow_schema
    rows = pa.Table.from_arrays([pa.array(v, type=f.type) for v, f in zip(values, arrow, strict=True)], schema=arrow)
    return Decoded(rows, tuple(rejected))


def _decode(payload: bytes, schema: EventSchema) -> list[Any]:
    if len(payload) > schema.max_payload_bytes:
        raise ValueRejected(f"payload of {len(payload):,} bytes exceeds max_payload_bytes={schema.max_payload_bytes:,}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueRejected(f"payload is not UTF-8: {error.reason} at byte {error.start}") from None
    try:
        document = json.loads(text, parse_constant=_no_constant)
    except ValueError as error:
        raise ValueRejected(f"payload is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise ValueRejected(f"payload is a JSON {type(document).__name__}, not an object")
    row: list[Any] = []
    for column in schema.columns:
        value = lookup_path(document, column.keys)
        if value is None:
            if column.required:
                raise ValueRejected(
                    f"column {column.name!r}: required key {'.'.join(column.keys)!r} is missing or null"
                )
            row.append(None)
            continue
        try:
            row.append(CONVERTERS[column.type](value))
        except ValueRejected as reason:
            raise ValueRejected(f"column {column.name!r}: {reason}") from None
    return row


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def lookup_path(document: Mapping[str, Any], keys: Sequence[str]) -> Any:
    value: Any = document
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _event_id_of(payload: bytes, schema: EventSchema) -> str | None:
    """The event id of a rejected payload, when it can be read at all (for the quarantine row)."""
    if len(payload) > schema.max_payload_bytes:
        return None
    try:
        document = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except ValueError:
        return None
    column = next(c for c in schema.columns if c.name == schema.event_id)
    value = lookup_path(document, column.keys) if isinstance(document, dict) else None
    return None if value is None or isinstance(value, dict | list) else str(value)[:200]


def _storable(text: str) -> str:
    """Text PostgreSQL can hold: no NUL character, no lone surrogate (``"\\ud800"`` in JSON)."""
    if "\x00" in text:
        raise ValueRejected("text holds a NUL character (PostgreSQL text cannot)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueRejected("text holds a lone UTF-16 surrogate (not a Unicode character)") from None
    return text


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueRejected(f"expected a string, got {_json_kind(value)}")
    return _storable(value)


def _integer(kind: str) -> Callable[[Any], int]:
    low, high = _INT_RANGE[kind]

    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueRejected(f"expected an integer, got {_json_kind(value)}")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueRejected(f"expected an integer, got {value!r}")
            value = int(value)
        if not low <= value <= high:
            raise ValueRejected(f"{value} is out of range for {kind}")
        return value

    return convert


def _double(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueRejected(f"expected a number, got {_json_kind(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueRejected(f"{value!r} is not a finite number")
    return number


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueRejected(f"expected true or false, got {_json_kind(value)}")
    return value


def _timestamp(value: Any) -> dt.datetime:
    """ISO 8601 text (no offset = UTC) or epoch seconds."""
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueRejected(f"{value[:64]!r} is not an ISO 8601 timestamp") from None
        return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return dt.datetime.fromtimestamp(value, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueRejected(f"{value!r} is out of range for epoch seconds") from None
    raise ValueRejected(f"expected a timestamp (ISO 8601 text or epoch seconds), got {_json_kind(value)}")


def _jsonb(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError as error:
        raise ValueRejected(f"not storable as jsonb: {error}") from None
    if "\\u0000" in text:
        raise ValueRejected("jsonb cannot hold a NUL character (\\u0000)")
    return _storable(text)


def _json_kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}.get(
        type(value), "an object"
    )


CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "text": _text,
    "bigint": _integer("bigint"),
    "integer": _integer("integer"),
    "double": _double,
    "boolean": _boolean,
    "timestamptz": _timestamp,
    "jsonb": _jsonb,
}


__all__ = [
    "TYPES",
    "ColumnType",
    "Decoded",
    "EventColumn",
    "EventSchema",
    "EventTransform",
    "Rejected",
    "decode_events",
]
