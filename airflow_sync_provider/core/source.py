"""The source table as a sync reads it: reflection and column plans, the form that orders and
compares a column, bound values, and pages of rows as typed Arrow columns (row by row, or by
``COPY ... TO STDOUT`` from PostgreSQL).  Extraction (:mod:`.extract`) and reconciliation
(:mod:`.reconcile`) read the source through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
import sqlalchemy as sa
from psycopg import sql as psycopg_sql
from sqlalchemy import exc as sa_exc

from airflow_sync_provider.core.errors import (
    DataError,
    SchemaError,
    SourceUnavailableError,
    database_error,
    first_line,
)
from airflow_sync_provider.core.schema import ColumnPlan, json_check_columns, plan_column
from airflow_sync_provider.core.spec import SyncSpec


@dataclass(frozen=True)
class SourceTable:
    """A reflected source table and how each of its synced columns is read."""

    table: sa.Table
    dialect: str
    primary_key: tuple[str, ...]
    plans: tuple[ColumnPlan, ...]


def reflect_source(engine: sa.Engine, spec: SyncSpec) -> SourceTable:
    """Reflect the source table and check the columns the sync needs exist."""
    try:
        table = sa.Table(spec.source_table, sa.MetaData(), schema=spec.source_schema, autoload_with=engine)
    except sa_exc.NoSuchTableError:
        raise SchemaError(
            "source table does not exist (check the name, schema and the connection's database)",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
        ) from None
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as error:
        raise SourceUnavailableError(
            f"cannot reach the source database: {first_line(error.orig or error)}",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
        ) from error

    names = [c.name for c in table.columns]
    primary_key = spec.primary_key or tuple(c.name for c in table.primary_key.columns)
    if not primary_key:
        raise SchemaError(
            "source table has no primary key; declare primary_key=(...) with columns that are "
            "unique and not null, so rows can be merged and deletes detected",
            sync_id=spec.sync_id,
            table=spec.qualified_source,
            rule="primary key required",
        )
    wanted = list(spec.columns) or names
    for column in dict.fromkeys([*primary_key, *([spec.cursor_column] if spec.cursor_column else []), *wanted]):
        if column not in table.c:
            raise SchemaError(
                f"column does not exist in the source table (it has: {', '.join(names)})",
                sync_id=spec.sync_id,
                table=spec.qualified_source,
                column=column,
            )
    selected = list(dict.fromkeys([*primary_key, *wanted]))
    json_columns = json_check_columns(engine, table)
    plans = tuple(plan_column(table.c[name], engine.dialect.name, json_columns) for name in selected)
    return SourceTable(table=table, dialect=engine.dialect.name, primary_key=tuple(primary_key), plans=plans)


def orderable(column: sa.Column[Any], dialect: str, expression: Any = None) -> Any:
    """``column`` (or a value bound for it) in the form that orders, compares and pages it.

    SQLite keeps DATETIME as text in whichever format the writer used: SQLAlchemy writes
    ``YYYY-MM-DD HH:MM:SS.ffffff`` (and so binds keyset values and bounds that way), while
    ``DEFAULT CURRENT_TIMESTAMP`` and ``datetime('now')`` write ``YYYY-MM-DD HH:MM:SS``.  Compared as
    text one instant is then unequal to itself (``'..:00' < '..:00.000000'``): the keyset condition
    after a CURRENT_TIMESTAMP-stamped row skips every later row of that second, and the exclusive
    upper bound lets rows of its own second through.  Both sides go through ``strftime`` instead,
    which renders every format SQLite understands the same way (milliseconds; ties go to the key).
    """
    expression = column if expression is None else expression
    if dialect == "sqlite" and isinstance(column.type, sa.DateTime):
        return sa.func.strftime("%Y-%m-%d %H:%M:%f", expression)
    return expression


def _key_of(row: Sequence[Any], plans: Sequence[ColumnPlan], primary_key: Sequence[str]) -> dict[str, Any]:
    index = {p.name: i for i, p in enumerate(plans)}
    return {k: row[index[k]] for k in primary_key}


def _to_arrow(
    values: Sequence[Any], plan: ColumnPlan, rows: Sequence[Sequence[Any]], source: SourceTable, spec: SyncSpec
) -> pa.Array:
    try:
        return pa.array(values, type=plan.arrow_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError) as error:
        for position, value in enumerate(values):  # slow path, only to name the bad row
            try:
                pa.array([value], type=plan.arrow_type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError):
                raise DataError(
                    f"value {value!r} cannot be staged as {plan.arrow_type} (target type {plan.pg_type}): {error}",
                    sync_id=spec.sync_id,
                    table=spec.qualified_source,
                    column=plan.name,
                    key=_key_of(rows[position], source.plans, source.primary_key),
                    rule="type",
                ) from error
        raise


def rows_to_table(rows: Sequence[Sequence[Any]], source: SourceTable, spec: SyncSpec) -> pa.Table:
    """Source rows (in the order of ``source.plans``) as Arrow columns of the planned types; a value that
    does not fit raises :class:`DataError` naming its row's key."""
    if isinstance(rows, _ArrowPage):  # read by COPY: already typed Arrow columns
        return rows.table
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in source.plans]
    arrays = [_to_arrow(values, plan, rows, source, spec) for values, plan in zip(columns, source.plans, strict=True)]
    return pa.Table.from_arrays(arrays, names=[p.name for p in source.plans])


def bound_value(name: str, column: sa.Column[Any], value: Any, source: SourceTable) -> Any:
    """A value bound for ``column`` (keyset and window bounds, key lookups).

    Key columns read as text (uuid, ...) carry text values: bind them as text and, on PostgreSQL
    (whose dialect casts binds explicitly), cast back to the column's type.
    """
    if not any(p.as_text and p.name == column.name for p in source.plans):
        return sa.bindparam(name, value, type_=column.type)
    text = sa.bindparam(name, value, type_=sa.String())
    return sa.cast(text, column.type) if source.dialect == "postgresql" else text


#: Arrow types a PostgreSQL CSV COPY renders in a form pyarrow's CSV reader parses back exactly.
_COPY_TYPES = (
    pa.types.is_boolean,
    pa.types.is_integer,
    pa.types.is_floating,
    pa.types.is_decimal,
    pa.types.is_timestamp,
    pa.types.is_date32,
    pa.types.is_time64,
    pa.types.is_string,
)


class _ArrowPage(Sequence[tuple[Any, ...]]):
    """A keyset page read by COPY: an Arrow table that answers ``page[-1]`` like a list of rows.

    Only the last row is ever turned into Python values (it is the next page's keyset position and
    the watermark), so a page costs no Python object per value.
    """

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, int):
            raise TypeError("an Arrow page is indexed by row position only")
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(index)
        return tuple(self.table.slice(position, 1).to_pylist()[0].values())


def copy_eligible(connection: sa.Connection, source: SourceTable) -> bool:
    """Whether pages can be read by COPY: psycopg 3 on PostgreSQL, UTF-8, ISO dates, exact floats,
    and only column types whose CSV text Arrow parses back to the same value."""
    if source.dialect != "postgresql" or connection.dialect.driver != "psycopg":
        return False
    if not all(any(check(p.arrow_type) for check in _COPY_TYPES) for p in source.plans):
        return False
    raw = connection.connection.driver_connection
    if not isinstance(raw, psycopg.Connection) or raw.info.encoding != "utf-8":
        return False
    row = connection.execute(
        sa.text("SELECT current_setting('DateStyle'), current_setting('extra_float_digits')::int")
    ).one()
    return str(row[0]).upper().startswith("ISO") and int(row[1]) >= 1


def copy_page(
    connection: sa.Connection, query: sa.Select[Any], source: SourceTable, spec: SyncSpec
) -> _ArrowPage | None:
    """Read one page with ``COPY (page query) TO STDOUT (FORMAT csv)`` into typed Arrow columns.

    Returns None when Arrow cannot parse a value back exactly (infinite or BC timestamps, NaN
    numerics, ...): the caller then reads the page row by row, which names the offending row.
    Runs in the extraction's own transaction (same snapshot as every other page).
    """
    compiled = query.compile(dialect=connection.dialect)
    processors = getattr(compiled, "_bind_processors", {}) or {}
    params = {
        name: (processors[name](value) if name in processors else value)
        for name, value in compiled.construct_params().items()
    }
    statement = psycopg_sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(psycopg_sql.SQL(compiled.string))
    raw = connection.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    buffer = bytearray()
    try:
        with raw.cursor() as cursor, cursor.copy(statement, params) as copy:
            for chunk in copy:
                buffer += chunk
    except psycopg.Error as error:
        raise database_error(error, "extraction", sync_id=spec.sync_id, table=spec.qualified_source) from error
    names = [p.name for p in source.plans]
    schema = pa.schema([pa.field(p.name, p.arrow_type) for p in source.plans])
    if not buffer:  # past the last page (Arrow refuses an empty CSV)
        return _ArrowPage(schema.empty_table())
    # PostgreSQL quotes every CSV value that holds a newline: without a quote in the page, no value
    # does, and Arrow parses ~2-4x faster (multi-threaded) when told so.
    quoted = b'"' in buffer
    try:
        table = pacsv.read_csv(
            pa.py_buffer(bytes(buffer)),
            read_options=pacsv.ReadOptions(
                column_names=names, block_size=max(len(buffer), 1 << 20), use_threads=not quoted
            ),
            parse_options=pacsv.ParseOptions(newlines_in_values=quoted),
            convert_options=pacsv.ConvertOptions(
                column_types={p.name: p.arrow_type for p in source.plans},
                null_values=[""],
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
                true_values=["t"],
                false_values=["f"],
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return _ArrowPage(table.combine_chunks().cast(schema) if table.schema != schema else table.combine_chunks())


__all__ = ["SourceTable", "bound_value", "copy_eligible", "copy_page", "orderable", "reflect_source", "rows_to_table"]
