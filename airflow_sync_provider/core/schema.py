"""Column planning: how each source column is read, staged (Arrow type) and stored (PostgreSQL type).

Types Arrow has a faithful native type for (integers, floats, bounded numerics, text, booleans,
dates, timestamps, binary) are fetched as Python values and staged natively.  Types it has not
(json, uuid, interval, arrays, unbounded numeric, enums, network types...) are cast to text *in the
source query* and rebuilt by PostgreSQL from that text on load: lossless, and no Python per value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

_PG = postgresql.dialect()

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


def plan_column(column: sa.Column[Any], dialect_name: str) -> ColumnPlan:
    """Decide how to read, stage and store one reflected column."""
    sa_type = column.type
    from_pg = dialect_name == "postgresql"
    native = True
    arrow: pa.DataType
    pg_type: str

    if isinstance(sa_type, postgresql.DOMAIN):
        sa_type = sa_type.data_type
    if isinstance(sa_type, sa.String) and sa_type.collation:
        sa_type = sa_type.copy()
        sa_type.collation = None  # the target database may not have the source's collations
    if isinstance(sa_type, sa.Boolean):
        arrow, pg_type = pa.bool_(), "BOOLEAN"
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
        pg_type = _compile_pg(sa_type) if from_pg else "TEXT"
    else:
        # uuid, interval, arrays, inet, money, ranges, unknown types...: text round trip.
        native, arrow = False, pa.string()
        pg_type = _compile_pg(sa_type) if from_pg else "TEXT"

    try:
        pg_type = validate_pg_type(pg_type)
    except ValueError:
        native, arrow, pg_type = False, pa.string(), "TEXT"
    select: Any = column if native else sa.cast(column, sa.String).label(column.name)
    if native and isinstance(sa_type, sa.Float) and sa_type.asdecimal:
        # MySQL/MariaDB DOUBLE and REAL reflect with asdecimal=True: SQLAlchemy would turn every value
        # into a Decimal rounded to 10 places (lossy, and not a float Arrow accepts).  Keep the driver's float.
        select = sa.type_coerce(column, sa.Float(asdecimal=False)).label(column.name)
    return ColumnPlan(
        name=column.name,
        select=select,
        arrow_type=arrow,
        pg_type=pg_type,
        nullable=bool(column.nullable),
        as_text=not native,
    )


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
