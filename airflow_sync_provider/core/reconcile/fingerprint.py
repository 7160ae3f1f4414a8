"""Canonical fingerprints: every compared value rendered the same way on both sides, hashed per row and key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from airflow_sync_provider.core.schema import ColumnPlan
from airflow_sync_provider.core.source import SourceTable

MASK = (1 << 64) - 1


_dumps = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode  # (for canonical JSON)


def _canonical_decimal(text: str) -> str:
    try:
        value = Decimal(text)
    except InvalidOperation:
        return "?" + text
    if not value.is_finite():
        return str(value)
    return "0" if value.is_zero() else format(value.normalize(), "f")


def _canonical_json(text: str) -> str:
    try:
        value = json.loads(text, parse_float=Decimal, parse_int=Decimal)
    except ValueError:
        return "?" + text
    return _json_text(value)


def _json_text(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{_dumps(k)}:{_json_text(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_json_text(v) for v in value) + "]"
    if isinstance(value, Decimal):
        return _canonical_decimal(str(value))
    return _dumps(value)  # str, bool, None


def column_kinds(source: SourceTable) -> list[str]:
    """Per column: how text read from the source is normalised before hashing.

    From PostgreSQL the target keeps the exact source type, so its text renders identically on both
    sides and is compared as is (exact, and fast).  From other databases JSON text (key order,
    spacing, number spelling differ from jsonb's) and unbounded NUMERIC text are normalised.
    """
    kinds = []
    for plan in source.plans:
        base = plan.pg_type.split("(")[0].strip().upper()
        if not plan.as_text or source.dialect == "postgresql":
            kinds.append("")
        elif base in ("JSON", "JSONB"):
            kinds.append("json")
        elif base == "NUMERIC":
            kinds.append("numeric")
        else:
            kinds.append("")
    return kinds


def canonical_column(column: pa.ChunkedArray | pa.Array, kind: str) -> list[str | None]:
    """One column rendered canonically (identically for source and target values of equal value)."""
    types = pa.types
    t = column.type
    if types.is_binary(t) or types.is_large_binary(t):
        return [None if v is None else v.hex() for v in column.to_pylist()]
    if types.is_floating(t):
        return [None if v is None else repr(v) for v in column.to_pylist()]
    if types.is_string(t) or types.is_large_string(t):
        values = column.to_pylist()
        if kind == "json":
            return [None if v is None else _canonical_json(v) for v in values]
        if kind == "numeric":
            return [None if v is None else _canonical_decimal(v) for v in values]
        return values
    return pc.cast(column, pa.string()).to_pylist()


def _hashes(values: Iterable[tuple[str | None, ...]], person: bytes) -> list[int]:
    """BLAKE2b (8 bytes) of each tuple's repr: unambiguous for tuples of str/None (NULL is not '')."""
    blake, from_bytes = hashlib.blake2b, int.from_bytes
    return [from_bytes(blake(repr(v).encode(), digest_size=8, person=person).digest(), "little") for v in values]


def fingerprint(
    table: pa.Table, kinds: Sequence[str], key_index: Sequence[int], buckets: int
) -> tuple[list[int], list[int], list[tuple[str | None, ...]]]:
    """Per row: bucket, row hash and canonical key."""
    canonical = [canonical_column(table.column(i), kind) for i, kind in enumerate(kinds)]
    keys = list(zip(*(canonical[i] for i in key_index), strict=True))
    row_hashes = _hashes(zip(*canonical, strict=True), b"row")
    key_buckets = [h % buckets for h in _hashes(keys, b"key")]
    return key_buckets, row_hashes, keys


def bucket_aggregates(
    pages: Iterable[pa.Table], kinds: Sequence[str], key_index: Sequence[int], buckets: int
) -> tuple[list[int], list[int]]:
    """Phase 1 in Python: per bucket, the row count and the sum of the row hashes mod 2^64."""
    counts, sums = [0] * buckets, [0] * buckets
    for page in pages:
        page_buckets, hashes, _ = fingerprint(page, kinds, key_index, buckets)
        for b, h in zip(page_buckets, hashes, strict=True):
            counts[b] += 1
            sums[b] = (sums[b] + h) & MASK
    return counts, sums


def canonical_keys(table: pa.Table, kinds: Sequence[str], key_index: Sequence[int]) -> list[tuple[Any, ...]]:
    columns = [canonical_column(table.column(i), kinds[i]) for i in key_index]
    return list(zip(*columns, strict=True))


def key_index(source: SourceTable) -> list[int]:
    """Positions of the key columns among the compared columns."""
    names = [p.name for p in source.plans]
    return [names.index(k) for k in source.primary_key]


def plan_of(source: SourceTable, name: str) -> ColumnPlan:
    """The column plan of ``name``."""
    return next(p for p in source.plans if p.name == name)


__all__ = [
    "MASK",
    "bucket_aggregates",
    "canonical_column",
    "canonical_keys",
    "column_kinds",
    "fingerprint",
    "key_index",
    "plan_of",
]
