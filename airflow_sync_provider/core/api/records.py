"""Records out of JSON pages: the record list at a dotted path, and typed Arrow columns.

The columns are declared (:class:`~.spec.ApiColumn`, the event streams' declaration and value
rules) or inferred from the first page and then fixed for the run.  A record whose field does not
fit fails the run with a :class:`DataError` naming the endpoint, the field, the record's key and
the rule: an API's records are not quarantined one by one before staging (use a quality gate).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from airflow_sync_provider.core.errors import DataError
from airflow_sync_provider.core.events.schema import CONVERTERS, TYPES, EventColumn, ValueRejected, lookup_path
from airflow_sync_provider.core.manifest import ManifestColumn

#: How many records of the first page an inferred schema looks at.
INFER_RECORDS = 1_000


def path_keys(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split(".") if p)


def select(document: Any, path: str) -> Any:
    """The value at a dotted ``path`` (``""``: the document itself); None when absent."""
    keys = path_keys(path)
    return lookup_path(document, keys) if keys else document


def records_of(body: Any, path: str, *, where: str) -> list[Any]:
    """The list of records at ``path`` in a page body; anything else is an error naming ``where``."""
    found = select(body, path)
    if found is None:
        return []
    if not isinstance(found, list):
        raise DataError(
            f"the page's {('field ' + repr(path)) if path else 'body'} is a JSON {type(found).__name__}, "
            "not a list of records (check records_path)",
            table=where,
            rule="records_path",
        )
    return found


def _looks_like_time(value: str) -> bool:
    if len(value) < 16 or value[4:5] != "-" or value[10:11] not in ("T", " "):
        return False
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _infer_type(values: Sequence[Any]) -> str:
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return "text"
    if kinds <= {bool}:
        return "boolean"
    if kinds <= {int}:
        return "bigint"
    if kinds <= {int, float}:
        return "double"
    if kinds <= {str}:
        return "timestamptz" if all(_looks_like_time(v) for v in values if v is not None) else "text"
    if kinds <= {dict, list}:
        return "jsonb"
    return "jsonb"  # mixed kinds: keep the JSON as it is


def infer_columns(records: Sequence[Any], key: Sequence[str], cursor: str | None) -> tuple[EventColumn, ...]:
    """Columns for the top-level fields of the first records (nested objects become ``jsonb``)."""
    sample = [r for r in records[:INFER_RECORDS] if isinstance(r, dict)]
    names: dict[str, None] = {}
    for record in sample:
        names.update(dict.fromkeys(record))
    for name in (*key, *([cursor] if cursor else [])):
        names.setdefault(name, None)
    required = {*key, *([cursor] if cursor else [])}
    return tuple(
        EventColumn(name, _infer_type([r.get(name) for r in sample]), required=name in required)  # type: ignore[arg-type]
        for name in names
    )


def arrow_schema(columns: Sequence[EventColumn]) -> pa.Schema:
    return pa.schema([pa.field(c.name, TYPES[c.type][0], nullable=not c.required) for c in columns])


def manifest_columns(columns: Sequence[EventColumn]) -> tuple[ManifestColumn, ...]:
    return tuple(ManifestColumn(c.name, TYPES[c.type][1], not c.required) for c in columns)


def record_key(record: Any, columns: Mapping[str, EventColumn], key: Sequence[str]) -> dict[str, Any]:
    """The record's key as it came (for messages), whatever its types."""
    if not isinstance(record, dict):
        return {}
    return {k: lookup_path(record, columns[k].keys) if k in columns else record.get(k) for k in key}


def to_table(
    records: Sequence[Any],
    columns: Sequence[EventColumn],
    key: Sequence[str],
    *,
    where: str,
    sync_id: str | None = None,
) -> pa.Table:
    """Typed Arrow columns of ``records``; the first value that does not fit raises :class:`DataError`.

    Column by column: a column whose values all have the JSON kind its type takes goes to Arrow in
    one call (:func:`_fast_column`); any other goes value by value through the event streams'
    converters, which name the first value that does not fit.
    """
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(
                f"record {position} of the page is a JSON {type(record).__name__}, not an object",
                sync_id=sync_id,
                table=where,
                rule="record is an object",
            )
    by_name = {c.name: c for c in columns}
    arrays = []
    for column in columns:
        keys = column.keys
        if len(keys) == 1:
            name = keys[0]
            values = [record.get(name) for record in records]
        else:
            values = [lookup_path(record, keys) for record in records]
        array = _fast_column(values, column)
        if array is None:
            converted = _convert_column(values, records, column, by_name, key, where, sync_id)
            array = pa.array(converted, type=TYPES[column.type][0])
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=arrow_schema(columns))


_NONE = type(None)


def _fast_column(values: list[Any], column: EventColumn) -> pa.Array | None:
    """``values`` as the column's Arrow array in one call when their kinds leave no doubt (all
    ``int`` for an integer column, all ``str`` for text or ISO timestamps with an offset...);
    None sends the column down the value-by-value path (which converts or names the bad value)."""
    kinds = set(map(type, values))
    if _NONE in kinds:
        if column.required:
            return None
        kinds.discard(_NONE)
    arrow_type = TYPES[column.type][0]
    try:
        if column.type in ("bigint", "integer") and kinds <= {int}:
            return pa.array(values, type=arrow_type)  # out of range raises
        if column.type == "boolean" and kinds <= {bool}:
            return pa.array(values, type=arrow_type)
        if column.type == "double" and kinds <= {int, float}:
            array = pa.array(values, type=arrow_type)
            return array if pc.all(pc.is_finite(array)).as_py() in (True, None) else None
        if column.type == "text" and kinds <= {str}:
            array = pa.array(values, type=arrow_type)
            return None if pc.any(pc.match_substring(array, "\x00")).as_py() else array
        if column.type == "timestamptz" and kinds <= {str}:
            return pa.array(values, type=pa.string()).cast(arrow_type)  # no offset: the slow path (UTC)
    except (pa.ArrowException, UnicodeError, OverflowError, ValueError, TypeError):
        return None
    return None


def _convert_column(
    values: list[Any],
    records: Sequence[Any],
    column: EventColumn,
    by_name: Mapping[str, EventColumn],
    key: Sequence[str],
    where: str,
    sync_id: str | None,
) -> list[Any]:
    convert = CONVERTERS[column.type]
    converted: list[Any] = []
    for value, record in zip(values, records, strict=True):
        if value is None:
            if column.required:
                raise DataError(
                    f"required field {'.'.join(column.keys)!r} is missing or null",
                    sync_id=sync_id,
                    table=where,
                    column=column.name,
                    key=record_key(record, by_name, key),
                    rule="required",
                )
            converted.append(None)
            continue
        try:
            converted.append(convert(value))
        except ValueRejected as reason:
            raise DataError(
                f"value {str(value)[:80]!r} does not fit {column.type}: {reason}",
                sync_id=sync_id,
                table=where,
                column=column.name,
                key=record_key(record, by_name, key),
                rule=f"type {column.type}",
            ) from None
    return converted


__all__ = [
    "INFER_RECORDS",
    "arrow_schema",
    "infer_columns",
    "manifest_columns",
    "path_keys",
    "record_key",
    "records_of",
    "select",
    "to_table",
]
