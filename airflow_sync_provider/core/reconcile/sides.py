"""The two sides of a comparison, read with the sync's own column plans: the source (any SQLAlchemy
dialect) and the target (PostgreSQL), each giving per-bucket aggregates and keyed rows.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pyarrow as pa
import sqlalchemy as sa
from psycopg import sql

from airflow_sync_provider.core.catalog import column_types
from airflow_sync_provider.core.errors import DataError, SchemaError, SyncError, database_error
from airflow_sync_provider.core.reconcile import limits
from airflow_sync_provider.core.reconcile.fingerprint import (
    MASK,
    bucket_aggregates,
    canonical_keys,
    column_kinds,
    fingerprint,
    key_index,
)
from airflow_sync_provider.core.reconcile.results import ReconcileWindow
from airflow_sync_provider.core.schema import ColumnPlan, validate_pg_type
from airflow_sync_provider.core.source import SourceTable, bound_value, orderable, rows_to_table
from airflow_sync_provider.core.spec import DELETED_AT_COLUMN, SyncSpec
from airflow_sync_provider.core.sqltext import bindable, execute


@dataclass(frozen=True)
class TargetInfo:
    """The target table as the comparison needs it: whether it exists, its column types, soft deletes."""

    exists: bool
    column_types: dict[str, str]
    soft_deletes: bool


#: Phase 1, per bucket: row counts and sums of row hashes (mod 2^64).
Aggregates = tuple[list[int], list[int]]
#: Phase 2 rows: (canonical key, typed key, row hash, bucket)
KeyedRows = Iterator[tuple[tuple[Any, ...], tuple[Any, ...], int, int]]


class _Side:
    """What both sides share: the compared columns, the key among them, how each is canonicalised."""

    def __init__(
        self, source: SourceTable, spec: SyncSpec, window: ReconcileWindow | None, buckets: int, method: str
    ) -> None:
        self.source, self.spec, self.window = source, spec, window
        self.buckets, self.method = buckets, method
        self.key_index = key_index(source)
        self.key_plans = [source.plans[i] for i in self.key_index]
        self.kinds = column_kinds(source)
        self.key_kinds = [self.kinds[i] for i in self.key_index]


class SourceSide(_Side):
    """The source, read with the sync's own column plans (any SQLAlchemy dialect)."""

    def __init__(
        self,
        conn: sa.Connection,
        source: SourceTable,
        spec: SyncSpec,
        window: ReconcileWindow | None,
        buckets: int,
        method: str,
    ) -> None:
        super().__init__(source, spec, window, buckets, method)
        self.conn = conn

    def _conditions(self) -> list[Any]:
        if self.window is None:
            return []
        assert self.spec.cursor_column
        column = self.source.table.c[self.spec.cursor_column]
        ordered = orderable(column, self.source.dialect)
        conditions = []
        for name, value, compare in (
            ("window_low", self.window.low, operator.ge),
            ("window_high", self.window.high, operator.le if self.window.include_high else operator.lt),
        ):
            if value is not None:  # (a cursor read as text binds as text, cast back on PostgreSQL)
                bound = orderable(column, self.source.dialect, bound_value(name, column, value, self.source))
                conditions.append(compare(ordered, bound))
        return conditions

    def _stream(self, query: sa.Select[Any]) -> Iterator[list[tuple[Any, ...]]]:
        result = self.conn.execution_options(stream_results=True, yield_per=limits.FETCH_ROWS).execute(query)
        for part in result.partitions(limits.FETCH_ROWS):
            yield [tuple(row) for row in part]

    def _pages(self) -> Iterator[pa.Table]:
        query = sa.select(*(p.select for p in self.source.plans)).select_from(self.source.table)
        for rows in self._stream(query.where(*self._conditions())):
            yield rows_to_table(rows, self.source, self.spec)

    def _sql_hashes(self) -> tuple[Any, Any]:
        table = self.source.table
        row = sa.func.row(*(table.c[p.name] for p in self.source.plans))
        key = sa.func.row(*(table.c[k] for k in self.source.primary_key))
        row_hash = sa.func.hashtextextended(sa.cast(row, sa.Text), 0)
        key_hash = sa.func.hashtextextended(sa.cast(key, sa.Text), 1)
        size: Any = sa.literal_column(str(self.buckets))
        return ((key_hash % size) + size) % size, row_hash

    def aggregates(self) -> Aggregates:
        counts, sums = [0] * self.buckets, [0] * self.buckets
        if self.method == "sql":
            bucket, row_hash = self._sql_hashes()
            inner = sa.select(bucket.label("b"), row_hash.label("h")).select_from(self.source.table)
            inner_q = inner.where(*self._conditions()).subquery()
            query = sa.select(inner_q.c.b, sa.func.count(), sa.func.sum(sa.cast(inner_q.c.h, sa.Numeric))).group_by(
                inner_q.c.b
            )
            for b, count, total in self.conn.execute(query):
                counts[int(b)], sums[int(b)] = int(count), int(total) & MASK
            return counts, sums
        return bucket_aggregates(self._pages(), self.kinds, self.key_index, self.buckets)

    def rows_in(self, group: set[int]) -> KeyedRows:
        if self.method == "sql":
            bucket, row_hash = self._sql_hashes()
            query = (
                sa.select(*(p.select for p in self.key_plans), row_hash, bucket)
                .select_from(self.source.table)
                .where(*self._conditions(), bucket.in_(sorted(group)))
            )
            key_source = SourceTable(
                self.source.table, self.source.dialect, self.source.primary_key, tuple(self.key_plans)
            )
            for rows in self._stream(query):
                keys = rows_to_table([r[:-2] for r in rows], key_source, self.spec)
                yield from _keyed(keys, self.key_kinds, [r[-2] for r in rows], [r[-1] for r in rows])
            return
        for page in self._pages():
            page_buckets, hashes, canonical = fingerprint(page, self.kinds, self.key_index, self.buckets)
            yield from _select_rows(page, self.key_index, page_buckets, hashes, canonical, group)

    def rows_by_key(self, keys: Sequence[tuple[Any, ...]]) -> pa.Table:
        return rows_to_table(source_rows_by_key(self.conn, self.source, keys), self.source, self.spec)


class TargetSide(_Side):
    """The target table (PostgreSQL), read into the same Arrow types as the source."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        target: TargetInfo,
        source: SourceTable,
        spec: SyncSpec,
        window: ReconcileWindow | None,
        buckets: int,
        method: str,
    ) -> None:
        super().__init__(source, spec, window, buckets, method)
        self.conn, self.target = conn, target
        self.plans = source.plans
        self.ident = sql.Identifier(spec.target_schema, spec.target_table)

    def _where(self) -> tuple[list[sql.Composable], dict[str, Any]]:
        conditions: list[sql.Composable] = []
        params: dict[str, Any] = {}
        if self.target.soft_deletes:
            conditions.append(sql.SQL("t.{} IS NULL").format(sql.Identifier(DELETED_AT_COLUMN)))
        if self.window is not None:
            assert self.spec.cursor_column
            cursor = sql.Identifier("t", self.spec.cursor_column)
            high_operator = "<=" if self.window.include_high else "<"
            for name, value, operator in (("low", self.window.low, ">="), ("high", self.window.high, high_operator)):
                if value is None:
                    continue
                placeholder: sql.Composable = sql.Placeholder(name)
                if isinstance(value, str):  # a cursor read as text: compare as the column's type
                    column_type = self.target.column_types.get(self.spec.cursor_column, "text")
                    placeholder = sql.SQL("CAST({} AS {})").format(placeholder, sql.SQL(validate_pg_type(column_type)))
                conditions.append(sql.SQL("{} {} {}").format(cursor, sql.SQL(operator), placeholder))
                params[name] = value
        return conditions, params

    def _select(self, columns: Sequence[sql.Composable], extra: Sequence[sql.Composable] = ()) -> sql.Composed:
        conditions, _ = self._where()
        conditions = [*conditions, *extra]
        where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
        return sql.SQL("SELECT {} FROM {} t{}").format(sql.SQL(", ").join(columns), self.ident, where)

    def _column(self, plan: ColumnPlan) -> sql.Composable:
        ref = sql.Identifier("t", plan.name)
        return sql.SQL("{}::text").format(ref) if plan.as_text else ref

    def _stream(self, query: sql.Composed, params: Mapping[str, Any]) -> Iterator[list[tuple[Any, ...]]]:
        with self.conn.cursor(name=f"sync_reconcile_{uuid.uuid4().hex[:12]}") as cursor:
            cursor.itersize = limits.FETCH_ROWS
            cursor.execute(bindable(query, cursor), params)
            while rows := cursor.fetchmany(limits.FETCH_ROWS):
                yield rows

    def _arrow(self, rows: Sequence[Sequence[Any]], plans: Sequence[ColumnPlan]) -> pa.Table:
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in plans]
        arrays = []
        for values, plan in zip(columns, plans, strict=True):
            try:
                arrays.append(pa.array(values, type=plan.arrow_type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError) as error:
                raise DataError(
                    f"a target value cannot be compared as {plan.arrow_type} (the source's type): {error}",
                    sync_id=self.spec.sync_id,
                    table=self.spec.qualified_target,
                    column=plan.name,
                    rule="type",
                ) from error
        return pa.Table.from_arrays(arrays, names=[p.name for p in plans])

    def _sql_hashes(self) -> tuple[sql.Composable, sql.Composable]:
        row = sql.SQL(", ").join(sql.Identifier("t", p.name) for p in self.plans)
        key = sql.SQL(", ").join(sql.Identifier("t", k) for k in self.source.primary_key)
        size = sql.Literal(self.buckets)
        bucket = sql.SQL("mod(mod(hashtextextended(ROW({})::text, 1), {}) + {}, {})").format(key, size, size, size)
        return bucket, sql.SQL("hashtextextended(ROW({})::text, 0)").format(row)

    def aggregates(self) -> Aggregates:
        counts, sums = [0] * self.buckets, [0] * self.buckets
        if not self.target.exists:
            return counts, sums
        _, params = self._where()
        if self.method == "sql":
            bucket, row_hash = self._sql_hashes()
            inner = self._select([sql.SQL("{} AS b").format(bucket), sql.SQL("{} AS h").format(row_hash)])
            query = sql.SQL("SELECT b, count(*), sum(h::numeric) FROM ({}) x GROUP BY b").format(inner)
            for b, count, total in execute(self.conn, query, params):
                counts[int(b)], sums[int(b)] = int(count), int(total) & MASK
            return counts, sums
        query = self._select([self._column(p) for p in self.plans])
        pages = (self._arrow(rows, self.plans) for rows in self._stream(query, params))
        return bucket_aggregates(pages, self.kinds, self.key_index, self.buckets)

    def rows_in(self, group: set[int]) -> KeyedRows:
        if not self.target.exists:
            return
        _, params = self._where()
        if self.method == "sql":
            bucket, row_hash = self._sql_hashes()
            in_group = sql.SQL("{} = ANY({})").format(bucket, sql.Placeholder("group"))
            query = self._select([*(self._column(p) for p in self.key_plans), row_hash, bucket], [in_group])
            for rows in self._stream(query, {**params, "group": sorted(group)}):
                keys = self._arrow([r[:-2] for r in rows], self.key_plans)
                yield from _keyed(keys, self.key_kinds, [r[-2] for r in rows], [r[-1] for r in rows])
            return
        for rows in self._stream(self._select([self._column(p) for p in self.plans]), params):
            page = self._arrow(rows, self.plans)
            page_buckets, hashes, canonical = fingerprint(page, self.kinds, self.key_index, self.buckets)
            yield from _select_rows(page, self.key_index, page_buckets, hashes, canonical, group)

    def rows_by_key(self, keys: Sequence[tuple[Any, ...]]) -> pa.Table:
        """The target rows with these keys (a handful: one indexed lookup each)."""
        rows: list[tuple[Any, ...]] = []
        if not self.target.exists:
            return self._arrow(rows, self.plans)
        _, params = self._where()
        match = []
        for index, plan in enumerate(self.key_plans):  # placeholders by position: names may hold ')' or '%'
            placeholder: sql.Composable = sql.Placeholder(f"key_{index}")
            if plan.as_text:
                column_type = validate_pg_type(self.target.column_types.get(plan.name, "text"))
                placeholder = sql.SQL("CAST({} AS {})").format(placeholder, sql.SQL(column_type))
            match.append(sql.SQL("{} = {}").format(sql.Identifier("t", plan.name), placeholder))
        query = self._select([self._column(p) for p in self.plans], match)
        for key in keys:
            values = {f"key_{i}": v for i, v in enumerate(key)}
            rows.extend(execute(self.conn, query, {**params, **values}).fetchall())
        return self._arrow(rows, self.plans)


def _keyed(keys: pa.Table, key_kinds: Sequence[str], hashes: Sequence[Any], buckets: Sequence[Any]) -> KeyedRows:
    canonical = canonical_keys(keys, key_kinds, list(range(len(key_kinds))))
    typed = zip(*(c.to_pylist() for c in keys.columns), strict=True)
    for canon, key, h, b in zip(canonical, typed, hashes, buckets, strict=True):
        yield canon, key, int(h) & MASK, int(b)


def _select_rows(
    page: pa.Table,
    key_index: Sequence[int],
    page_buckets: Sequence[int],
    hashes: Sequence[int],
    canonical: Sequence[tuple[Any, ...]],
    group: set[int],
) -> KeyedRows:
    positions = [i for i, b in enumerate(page_buckets) if b in group]
    if not positions:
        return
    chosen = page.take(pa.array(positions, pa.int64()))
    typed = zip(*(chosen.column(i).to_pylist() for i in key_index), strict=True)
    for position, key in zip(positions, typed, strict=True):
        yield canonical[position], key, hashes[position], page_buckets[position]


def source_rows_by_key(conn: sa.Connection, source: SourceTable, keys: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Source rows (all synced columns) whose key is one of ``keys`` (typed values as staged)."""
    rows: list[Any] = []
    columns = [source.table.c[k] for k in source.primary_key]
    lhs = [orderable(c, source.dialect) for c in columns]
    for start in range(0, len(keys), limits.KEYS_PER_QUERY):
        chunk = keys[start : start + limits.KEYS_PER_QUERY]
        values = [
            [
                orderable(c, source.dialect, bound_value(f"key_{n}_{i}", c, v, source))
                for i, (c, v) in enumerate(zip(columns, key, strict=True))
            ]
            for n, key in enumerate(chunk)
        ]
        if len(columns) == 1:
            condition = lhs[0].in_([v[0] for v in values])
        else:
            condition = sa.tuple_(*lhs).in_([sa.tuple_(*v) for v in values])
        query = sa.select(*(p.select for p in source.plans)).select_from(source.table).where(condition)
        rows.extend(conn.execute(query))
    return rows


def snapshot_connection(engine: sa.Engine, source: SourceTable) -> sa.Connection:
    """A source connection whose transaction reads one snapshot (REPEATABLE READ where the dialect has it)."""
    conn = engine.connect()
    if source.dialect in ("postgresql", "mysql", "mariadb"):
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
    return conn


def source_error(doing: str, spec: SyncSpec, error: sa.exc.DBAPIError) -> SyncError:
    """A driver error raised reading the source during ``doing``, naming the sync and the source table:
    retryable (:class:`SourceUnavailableError`) when the connection was lost, as in the extraction."""
    return database_error(error, f"{doing} reading the source", sync_id=spec.sync_id, table=spec.qualified_source)


def target_info(conn: psycopg.Connection[Any], spec: SyncSpec, source: SourceTable) -> TargetInfo:
    """The target table, checked to hold every compared column (and the cursor column)."""
    types = column_types(conn, spec.target_schema, spec.target_table) or {}
    if not types:
        return TargetInfo(exists=False, column_types={}, soft_deletes=False)
    missing = [p.name for p in source.plans if p.name not in types]
    if missing:
        raise SchemaError(
            f"the target table lacks column(s) {missing} that the source has: sync first (or drop them from the "
            "sync's columns), then reconcile",
            sync_id=spec.sync_id,
            table=spec.qualified_target,
            column=missing,
            rule="schema drift",
        )
    if spec.cursor_column and spec.cursor_column not in types:
        raise SchemaError("the cursor column is missing in the target", sync_id=spec.sync_id, column=spec.cursor_column)
    return TargetInfo(exists=True, column_types=types, soft_deletes=DELETED_AT_COLUMN in types)


__all__ = [
    "Aggregates",
    "KeyedRows",
    "SourceSide",
    "TargetInfo",
    "TargetSide",
    "snapshot_connection",
    "source_error",
    "source_rows_by_key",
    "target_info",
]
