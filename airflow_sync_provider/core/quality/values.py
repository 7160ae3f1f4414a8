"""Values the gate shows and stores: plain Python from pandas/NumPy/GX, JSON-safe and back, for messages."""

from __future__ import annotations

import datetime as dt
import decimal
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa


def plain(value: Any) -> Any:
    """A Python value from what pandas/numpy/GX hand back (np.int64, Timestamp, NaN...)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, pd.Timestamp):
        return None if pd.isna(value) else value.to_pydatetime()
    if value is pd.NaT or value is pd.NA:
        return None
    return value


def jsonable(value: Any) -> Any:
    """A JSON-safe rendering that :func:`from_jsonable` can turn back into the staged Arrow type."""
    value = plain(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset | np.ndarray):
        return [jsonable(v) for v in value]
    return str(value)


def from_jsonable(value: Any, kind: pa.DataType) -> Any:
    """Turn a :func:`jsonable` value (or a hand-edited one) back into a value of the staged type."""
    if value is None:
        return None
    if isinstance(value, str):
        if pa.types.is_decimal(kind):
            return decimal.Decimal(value)
        if pa.types.is_timestamp(kind):
            return dt.datetime.fromisoformat(value)
        if pa.types.is_date(kind):
            return dt.date.fromisoformat(value)
        if pa.types.is_time(kind):
            return dt.time.fromisoformat(value)
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return bytes.fromhex(value[2:]) if value.startswith("\\x") else value.encode()
        if pa.types.is_floating(kind):
            return float(value)
        if pa.types.is_integer(kind):
            return int(value)
        if pa.types.is_boolean(kind):
            return value.strip().lower() in ("t", "true", "1", "yes", "y", "on")
    if pa.types.is_decimal(kind) and isinstance(value, int | float):
        return decimal.Decimal(str(value))
    if pa.types.is_floating(kind) and isinstance(value, int):
        return float(value)
    return value


def display(value: Any) -> str:
    """A value in a message.  NULL is ``NULL``; a float NaN (a value, not a NULL) is ``NaN``.

    Row values from GX come through NumPy-backed pandas, where a NULL in a numeric column is NaN:
    the outcomes turn those back into None (see :mod:`.outcomes`) before they get here.
    """
    value = plain(value)
    if value is None:
        return "NULL"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # an integer column with NULLs reaches pandas as float
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        return "(" + ", ".join(f"{k}={display(v)}" for k, v in value.items()) + ")"
    if isinstance(value, list | tuple):
        shown = ", ".join(display(v) for v in list(value)[:6])
        return "[" + shown + (", ..." if len(value) > 6 else "") + "]"
    return str(value)


def percent(part: int, whole: int) -> str:
    """``part`` of ``whole`` as a short percentage (``0.3%``, ``0.0012%``)."""
    if not whole:
        return "0%"
    share = 100.0 * part / whole
    if share == 0:
        return "0%"
    return f"{share:.1f}%" if share >= 0.1 else f"{share:.2g}%"


KeyTuple = tuple[Any, ...]


def key_of(row: Mapping[str, Any], primary_key: Sequence[str]) -> KeyTuple:
    """A row's primary-key values as a hashable tuple of plain values."""
    return tuple(plain(row.get(k)) for k in primary_key)


__all__ = ["KeyTuple", "display", "from_jsonable", "jsonable", "key_of", "percent", "plain"]
