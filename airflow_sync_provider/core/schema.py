"""Column planning: how each source column is read, staged (Arrow type) and stored (PostgreSQL type).

Types Arrow has a faithful native type for (integers, floats, bounded numerics, text, booleans,
dates, timestamps, binary) are fetched as Python values and staged natively.  Types it has not
(json, uuid, interval, arrays, unbounded numeric, enums, network types...) are cast to text *in the
source query* and rebuilt by PostgreSQL from that text on load: lossless, and no Python per value.

From PostgreSQL the target keeps the source's exact type.  From MySQL/MariaDB (see :func:`plan_column`):

==============================  ==============================  ==========================================
source type                     PostgreSQL type                 values
==============================  ==============================  ==========================================
``TINYINT(1)``, ``BOOL``,       ``BOOLEAN``                     0 -> false, 1 -> true; any other value
``BOOLEAN`` (MySQL creates                                      fails the run with a ``DataError`` naming
all three as ``TINYINT(1)``)                                    the row, before anything is written
other ``TINYINT`` (signed or    ``SMALLINT``                    exact
unsigned)
``JSON``                        ``JSONB``                       read as JSON text, parsed by PostgreSQL:
                                                                equal JSON (key order, spacing and number
                                                                spelling as jsonb keeps them; of duplicate
                                                                keys the last one)
``VARCHAR(n)``                  ``VARCHAR(n)``                  exact (both count characters)
``CHAR(n)``                     ``CHAR(n)``                     exact as text: MySQL strips the padding on
                                                                read, PostgreSQL pads to n on output and
                                                                ignores it in comparisons; ``col::text``
                                                                gives the MySQL value
``TINYTEXT`` ... ``LONGTEXT``,  ``TEXT``                        exact
``ENUM``, ``SET``
``DATETIME(p)``                 ``TIMESTAMP WITHOUT TIME ZONE`` exact (a wall-clock value, no zone)
``TIMESTAMP(p)``                ``TIMESTAMP WITHOUT TIME ZONE`` as the *session* time zone shows it (below)
==============================  ==============================  ==========================================

MariaDB's ``JSON`` is an alias for ``LONGTEXT`` with a column ``CHECK (json_valid(col))`` that
SQLAlchemy does not reflect: such a column is ``JSONB`` when the caller passes
:func:`json_check_columns` to :func:`plan_column`, else ``TEXT`` (the text exactly as stored).  A
table-level ``CONSTRAINT ... CHECK (json_valid(col))`` is reflected, so recognised either way.
Source collations (``utf8mb4_unicode_ci``...) are not carried over: the target's default applies.
Other MySQL integers are unchanged: ``BIGINT`` (an ``INT UNSIGNED`` exceeds ``integer``), and
``NUMERIC(20, 0)`` for ``BIGINT UNSIGNED``.

``TIMESTAMP``: MySQL stores UTC and converts to and from the session's ``time_zone`` on every read
and write; ``DATETIME`` is stored and shown as written.  The sync reads both as its session shows
them (no zone attached), and compares cursor values and its ``NOW(6) - lag`` upper bound in that same
session time.  Give the source connection a fixed zone, ideally UTC (PyMySQL: ``init_command`` =
``SET time_zone = '+00:00'``, e.g. in the Airflow connection's ``sqlalchemy_query`` extra): then
``TIMESTAMP`` values land as UTC, and no daylight-saving fall-back hour shows two instants as one
wall-clock time (which would also make a ``TIMESTAMP`` cursor step backwards).  A ``DATETIME`` cursor
stamped by ``NOW()``/``CURRENT_TIMESTAMP`` holds the *writer's* session time: the sync's session
should use the writers' zone, or its upper bound is off by the difference (too early only delays
rows; too late weakens the late-commit guard).  Changing the session zone of an existing sync shifts
every ``TIMESTAMP`` value it reads: re-sync the table.

Upgrading: a target an earlier version created (``TINYINT(1)``/``TINYINT`` as ``bigint``,
``JSON``/``VARCHAR(n)``/``CHAR(n)`` as ``text``) makes these columns schema drift (:mod:`.drift`): the
load fails before writing anything and names them (``schema_drift='discard'`` keeps the wider
``bigint``/``text`` for ``SMALLINT``/``VARCHAR(n)``, but fails on ``boolean``, ``jsonb`` and
``char(n)`` too).  Alter the target columns to the new types (``ALTER COLUMN flag TYPE boolean USING
flag <> 0``, ``ALTER COLUMN doc TYPE jsonb USING doc::jsonb``, ``ALTER COLUMN name TYPE varchar(200)``;
``freeze`` accepts a target that already has the new type) and run again.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql, postgresql

_PG = postgresql.dialect()
_MYSQL_DIALECTS = frozenset({"mysql", "mariadb"})

# A CHECK that keeps one column to valid JSON, as MySQL/MariaDB render it: json_valid(`doc`).
_JSON_CHECK = re.compile(r"json_valid\s*\(\s*(?:`((?:[^`]|``)+)`|([A-Za-z0-9_$]+))\s*\)", re.IGNORECASE)

# A PostgreSQL type expression as SQLAlchemy compiles it, e.g. 'NUMERIC(12, 2)', 'VARCHAR(40)[]',
# 'TIMESTAMP WITH TIME ZONE'.  Type names travel in manifests; refuse anything else so a manifest
# can never smuggle SQL into DDL.
_PG_TYPE_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_ ]*(\(\s*\d+(\s*,\s*\d+)?\s*\))?[A-Za-z ]*(\[\])*$")

# PostgreSQL types without a default equality operator: compared as text in the merge.
TYPES_WITHOUT_EQUALITY = {"json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle"}


@dataclass(frozen=True)
class ColumnPlan:
    """One source column: the expression that selects it, its staged Arrow type, its target type."""

    name: str
    select: Any  # a SQLAlchemy column expression, labelled with ``name``
    arrow_type: pa.DataType
    pg_type: str
    nullable: bool
    as_text: bool


def validate_pg_type(pg_type: str) -> str:
    if not _PG_TYPE_PATTERN.match(pg_type.strip()):
        raise ValueError(f"refusing unexpected PostgreSQL type expression {pg_type!r}")
    return pg_type.strip()


class _TinyIntBoolean(sa.types.TypeDecorator[Any]):
    """A MySQL ``TINYINT(1)`` read as a boolean: 0 -> False, 1 -> True.

    Any other number is passed on unchanged, so staging it as a boolean fails with a
    :class:`~.errors.DataError` naming the row, column and rule: a flag column holding 2 is a fact
    about the data a person must look at, not something to round to ``true``.
    """

    impl = sa.SmallInteger
    cache_ok = True

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if value == 0:
            return False
        if value == 1:
            return True
        return value


def _json_checked(check: str) -> str | None:
    """The column a CHECK clause keeps to valid JSON (``json_valid(`doc`)``), or None."""
    check = check.strip()
    # Outer parentheses go: (json_valid(`a`)).  '(p) OR (q)' loses its ends too, then fails the full match.
    while check.startswith("(") and check.endswith(")"):
        check = check[1:-1].strip()
    match = _JSON_CHECK.fullmatch(check)
    if match is None:
        return None
    quoted, bare = match.groups()
    return quoted.replace("``", "`") if quoted is not None else bare


def _is_text(sa_type: Any) -> bool:
    return isinstance(sa_type, sa.String) and not isinstance(sa_type, (sa.Enum, mysql.SET))


def _table_json_checks(column: sa.Column[Any]) -> bool:
    """Whether a CHECK reflected with the column's table keeps it to valid JSON."""
    table = getattr(column, "table", None)
    for constraint in getattr(table, "constraints", ()):
        if isinstance(constraint, sa.CheckConstraint) and _json_checked(str(constraint.sqltext)) == column.name:
            return True
    return False


def json_check_columns(bind: sa.Engine | sa.Connection, table: sa.Table) -> frozenset[str]:
    """Text columns of a reflected MySQL/MariaDB table that a CHECK keeps to valid JSON.

    MariaDB's ``JSON`` is an alias: the column is ``LONGTEXT`` with a column-level
    ``CHECK (json_valid(`col`))``, which SQLAlchemy does not reflect (it reflects only table-level
    ``CONSTRAINT ... CHECK`` lines).  This reads the checks from ``information_schema`` (MariaDB
    10.2.22+) and adds the table-level ones SQLAlchemy did reflect.  Pass the result to
    :func:`plan_column` as ``json_columns`` so such columns sync as ``jsonb``.  Only a check that is
    exactly ``json_valid(col)`` counts (``json_valid(col) OR col = ''`` admits non-JSON text).
    Empty for other dialects.
    """
    if bind.dialect.name not in _MYSQL_DIALECTS:
        return frozenset()
    found = {c.name for c in table.columns if _table_json_checks(c)}
    if getattr(bind.dialect, "is_mariadb", False):
        query = sa.text(
            "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
            "WHERE CONSTRAINT_SCHEMA = COALESCE(:schema, DATABASE()) AND TABLE_NAME = :table"
        )
        params = {"schema": table.schema, "table": table.name}
        try:
            if isinstance(bind, sa.Engine):
                with bind.connect() as conn:
                    clauses = list(conn.execute(query, params).scalars())
            else:
                clauses = list(bind.execute(query, params).scalars())
        except sa_exc.ProgrammingError:  # MariaDB before 10.2.22: no CHECK_CONSTRAINTS; JSON stays text
            clauses = []
        found.update(name for name in map(_json_checked, clauses) if name is not None)
    return frozenset(name for name in found if name in table.c and _is_text(table.c[name].type))


def plan_column(column: sa.Column[Any], dialect_name: str, json_columns: Collection[str] = ()) -> ColumnPlan:
    """Decide how to read, stage and store one reflected column.

    From MySQL/MariaDB (see the module docstring for the full table and the ``TIMESTAMP`` rules):
    ``TINYINT(1)`` (which is what ``BOOL``/``BOOLEAN`` create) becomes ``BOOLEAN``, reading 0 and 1
    as false and true; a ``TINYINT(1)`` holding any other value (2, -1, 255 if unsigned) fails the
    extraction with a :class:`~.errors.DataError` naming the table, column, row key and rule
    ``type``, and nothing is written.  A column that really holds small numbers should be declared
    ``TINYINT`` (or ``SMALLINT``) at the source, which syncs as ``SMALLINT``.  ``JSON`` becomes
    ``JSONB``; a text column named in ``json_columns`` (see :func:`json_check_columns`) or kept to
    valid JSON by a reflected table-level CHECK is JSON too.  ``VARCHAR(n)``/``CHAR(n)`` keep their
    length; ``CHAR(n)`` is read as text (MySQL strips its padding) so comparisons with the padded
    PostgreSQL value go through ``::text``.  ``DATETIME`` and ``TIMESTAMP`` are read as the session
    shows them, into ``TIMESTAMP WITHOUT TIME ZONE``.
    """
    sa_type = column.type
    from_pg = dialect_name == "postgresql"
    from_mysql = dialect_name in _MYSQL_DIALECTS
    native = True
    arrow: pa.DataType
    pg_type: str
    reader: Any = None  # a type to read the column through (type_coerce: same SQL, other result processing)

    if isinstance(sa_type, postgresql.DOMAIN):
        sa_type = sa_type.data_type
    if from_mysql and _is_text(sa_type) and (column.name in json_columns or _table_json_checks(column)):
        sa_type = sa.JSON()
    if isinstance(sa_type, sa.String) and sa_type.collation:
        sa_type = sa_type.copy()
        sa_type.collation = None  # the target database may not have the source's collations
    if isinstance(sa_type, sa.Boolean):
        arrow, pg_type = pa.bool_(), "BOOLEAN"
    elif from_mysql and isinstance(sa_type, mysql.TINYINT):
        if sa_type.display_width == 1:
            arrow, pg_type, reader = pa.bool_(), "BOOLEAN", _TinyIntBoolean()
        else:  # -128..127 or 0..255
            arrow, pg_type = pa.int16(), "SMALLINT"
    elif isinstance(sa_type, sa.Integer):
        unsigned = bool(getattr(sa_type, "unsigned", False))
        if unsigned and isinstance(sa_type, sa.BigInteger):
            arrow, pg_type = pa.decimal128(20, 0), "NUMERIC(20, 0)"
        elif isinstance(sa_type, sa.SmallInteger) and not unsigned:
            arrow, pg_type = pa.int16(), "SMALLINT"
        elif from_pg and not isinstance(sa_type, sa.BigInteger):
            arrow, pg_type = pa.int32(), "INTEGER"
        else:
            # SQLite INTEGER is 64-bit; MySQL INT UNSIGNED exceeds int32.
            arrow, pg_type = pa.int64(), "BIGINT"
    elif isinstance(sa_type, sa.Float):
        if from_pg and isinstance(sa_type, postgresql.REAL):
            arrow, pg_type = pa.float32(), "REAL"
        else:
            arrow, pg_type = pa.float64(), "DOUBLE PRECISION"
    elif isinstance(sa_type, sa.Numeric):
        precision, scale = sa_type.precision, sa_type.scale or 0
        if precision and precision <= 38:
            arrow, pg_type = pa.decimal128(precision, scale), f"NUMERIC({precision}, {scale})"
        else:
            native, arrow, pg_type = False, pa.string(), "NUMERIC"
    elif isinstance(sa_type, sa.DateTime):
        if sa_type.timezone:
            arrow, pg_type = pa.timestamp("us", tz="UTC"), "TIMESTAMP WITH TIME ZONE"
        else:
            arrow, pg_type = pa.timestamp("us"), "TIMESTAMP WITHOUT TIME ZONE"
    elif isinstance(sa_type, sa.Date):
        arrow, pg_type = pa.date32(), "DATE"
    elif isinstance(sa_type, sa.Time):
        if getattr(sa_type, "timezone", False):
            native, arrow, pg_type = False, pa.string(), "TIME WITH TIME ZONE"
        else:
            arrow, pg_type = pa.time64("us"), "TIME WITHOUT TIME ZONE"
    elif isinstance(sa_type, (sa.LargeBinary, sa.types._Binary)):
        arrow, pg_type = pa.binary(), "BYTEA"
    elif isinstance(sa_type, sa.JSON):
        native, arrow = False, pa.string()
        pg_type = "JSON" if from_pg and not isinstance(sa_type, postgresql.JSONB) else "JSONB"
    elif isinstance(sa_type, sa.Enum):
        native, arrow, pg_type = False, pa.string(), "TEXT"
    elif isinstance(sa_type, sa.String):
        arrow = pa.string()
        if from_pg:
            pg_type = _compile_pg(sa_type)
        elif from_mysql:
            pg_type, native = _mysql_string(sa_type)
        else:
            pg_type = "TEXT"
    else:
        # uuid, interval, arrays, inet, money, ranges, unknown types...: text round trip.
        native, arrow = False, pa.string()
        pg_type = _compile_pg(sa_type) if from_pg else "TEXT"

    try:
        pg_type = validate_pg_type(pg_type)
    except ValueError:
        native, arrow, pg_type = False, pa.string(), "TEXT"
    if native and isinstance(sa_type, sa.Float) and sa_type.asdecimal:
        # MySQL/MariaDB DOUBLE and REAL reflect with asdecimal=True: SQLAlchemy would turn every value
        # into a Decimal rounded to 10 places (lossy, and not a float Arrow accepts).  Keep the driver's float.
        reader = sa.Float(asdecimal=False)
    select: Any = column if native else sa.cast(column, sa.String).label(column.name)
    if native and reader is not None:
        select = sa.type_coerce(column, reader).label(column.name)
    return ColumnPlan(
        name=column.name,
        select=select,
        arrow_type=arrow,
        pg_type=pg_type,
        nullable=bool(column.nullable),
        as_text=not native,
    )


def _mysql_string(sa_type: sa.String) -> tuple[str, bool]:
    """PostgreSQL type of a MySQL/MariaDB string column, and whether it is read natively.

    ``CHAR(n)`` is read as text: PostgreSQL pads ``character(n)`` values to n on output while MySQL
    strips the padding, so value comparisons (reconciliation) read the target through ``::text``,
    which strips it again.  Lengths count characters on both sides.  ``CHAR(0)``/``VARCHAR(0)``
    (legal in MySQL, not in PostgreSQL) are ``TEXT``.
    """
    length = sa_type.length
    if length and isinstance(sa_type, (sa.CHAR, sa.NCHAR)):
        return f"CHAR({int(length)})", False
    if length and isinstance(sa_type, (sa.VARCHAR, sa.NVARCHAR)):
        return f"VARCHAR({int(length)})", True
    return "TEXT", True


def _compile_pg(sa_type: Any) -> str:
    if isinstance(sa_type, postgresql.ARRAY) and isinstance(sa_type.item_type, sa.Enum):
        return "TEXT[]"
    try:
        return str(sa_type.compile(dialect=_PG))
    except Exception:  # a type PostgreSQL's compiler has no name for: keep the data as text
        return "TEXT"


def pg_type_for_arrow(arrow_type: pa.DataType) -> str:
    """Target type for a column a transform added (it has no source column to take a type from)."""
    t = arrow_type
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_uint8(t):
        return "SMALLINT"
    if pa.types.is_int32(t) or pa.types.is_uint16(t):
        return "INTEGER"
    if pa.types.is_integer(t):
        return "BIGINT"
    if pa.types.is_floating(t):
        return "DOUBLE PRECISION"
    if pa.types.is_decimal(t):
        return f"NUMERIC({t.precision}, {t.scale})"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP WITH TIME ZONE" if t.tz else "TIMESTAMP WITHOUT TIME ZONE"
    if pa.types.is_date(t):
        return "DATE"
    if pa.types.is_time(t):
        return "TIME WITHOUT TIME ZONE"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "BYTEA"
    if pa.types.is_duration(t):
        return "INTERVAL"
    return "TEXT"
