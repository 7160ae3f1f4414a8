"""Lossless JSON encoding of the scalar values a watermark is made of.

Watermarks (cursor value + primary-key tie-break) travel through XCom and live in a jsonb column,
so they must survive JSON without turning a timestamp into a string or a Decimal into a float.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

_TAGS = ("$datetime", "$date", "$time", "$decimal", "$bytes", "$uuid", "$timedelta")


def encode_value(value: Any) -> Any:
    """Return a JSON-safe representation of ``value`` that :func:`decode_value` reverses exactly."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"$float": repr(value)}
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"$timedelta": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    raise TypeError(f"cannot encode a {type(value).__name__} watermark value: {value!r}")


def decode_value(value: Any) -> Any:
    """Reverse :func:`encode_value`."""
    if not isinstance(value, dict):
        return value
    ((tag, raw),) = value.items()
    if tag == "$float":
        return float(raw)
    if tag == "$datetime":
        return dt.datetime.fromisoformat(raw)
    if tag == "$date":
        return dt.date.fromisoformat(raw)
    if tag == "$time":
        return dt.time.fromisoformat(raw)
    if tag == "$timedelta":
        return dt.timedelta(days=raw[0], seconds=raw[1], microseconds=raw[2])
    if tag == "$decimal":
        return Decimal(raw)
    if tag == "$bytes":
        return bytes.fromhex(raw)
    if tag == "$uuid":
        return uuid.UUID(raw)
    raise ValueError(f"unknown value tag {tag!r} (known: {', '.join(_TAGS)})")


def encode_row(values: tuple[Any, ...] | list[Any]) -> list[Any]:
    return [encode_value(v) for v in values]


def decode_row(values: list[Any]) -> tuple[Any, ...]:
    return tuple(decode_value(v) for v in values)
