"""MySQL/MariaDB column types arrive in PostgreSQL as their portable equivalents, values exactly.

``TINYINT(1)``/``BOOL`` become ``boolean`` (only 0 and 1: any other value fails the run, naming the
row), other ``TINYINT`` ``smallint``, ``JSON`` ``jsonb``, ``VARCHAR(n)``/``CHAR(n)`` keep their length,
the ``TEXT`` family is ``text``, ``DATETIME``/``TIMESTAMP`` are ``timestamp without time zone`` (a
``TIMESTAMP`` as the session time zone shows it).  Each test creates its own database on the MariaDB
server at 127.0.0.1:3306 (root, no password) and drops it after; all skip when it is not reachable.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from psycopg import sql

from airflow_sync_provider.core import SyncSpec, run_sync
from airflow_sync_provider.core import schema as schema_module
from airflow_sync_provider.core.errors import DataError
from airflow_sync_provider.core.load import LoadResult
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.reconcile import reconcile

from ..conftest import SyncEnv, mariadb_url


@dataclass
class MariaDB:
    """A throw-away database on the local MariaDB server."""

    server_url: str
    database: str

    def engine(self, time_zone: str = "+00:00") -> sa.Engine:
        """An engine whose sessions use ``time_zone`` (TIMESTAMP columns are shown in it)."""
        url = sa.make_url(self.server_url).set(database=self.database, query={"charset": "utf8mb4"})
        engine = sa.create_engine(url, poolclass=sa.NullPool)

        @sa.event.listens_for(engine, "connect")
        def _set_time_zone(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET time_zone = %s", (time_zone,))

        return engine

    def run(self, statement: str, params: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None) -> None:
        engine = self.engine()
        try:
            with engine.begin() as conn:
                if params is None:
                    conn.exec_driver_sql(statement)
                else:
                    conn.execute(sa.text(statement), params)
        finally:
            engine.dispose()

    def rows(self, table: str, columns: Sequence[str]) -> dict[int, dict[str, Any]]:
        """The source rows as the driver returns them (no SQLAlchemy type processing)."""
        engine = self.engine()
        preparer = engine.dialect.identifier_preparer
        query = "SELECT {} FROM {} ORDER BY id".format(", ".join(map(preparer.quote, columns)), preparer.quote(table))
        try:
            with engine.connect() as conn:
                return {int(r.id): dict(r._mapping) for r in conn.execute(sa.text(query))}
        finally:
            engine.dispose()


@pytest.fixture
def mariadb() -> Iterator[MariaDB]:
    url = mariadb_url()
    if url is None:
        pytest.skip(
            "MariaDB not reachable on 127.0.0.1:3306: no server accepting root without a password, or no PyMySQL"
        )
    admin = sa.create_engine(url, poolclass=sa.NullPool)
    name = f"sync_types_{uuid.uuid4().hex[:12]}"
    quoted = admin.dialect.identifier_preparer.quote(name)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {quoted} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    try:
        yield MariaDB(url, name)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted}")
        admin.dispose()


def _run(engine: sa.Engine, env: SyncEnv, spec: SyncSpec, run_id: str) -> tuple[Manifest, LoadResult]:
    with env.target() as target:
        manifest, result = run_sync(engine, target, spec, staging=env.staging, run_id=run_id)
    assert result.status == "applied"
    return manifest, result


def _target_types(env: SyncEnv, table: str) -> dict[str, tuple[str, str | None]]:
    """Column -> (format_type, collation name or None) of a target table, from pg_attribute."""
    with env.target() as conn:
        rows = conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), co.collname FROM pg_attribute a "
            "LEFT JOIN pg_collation co ON co.oid = a.attcollation "
            "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
            (sql.Identifier(table).as_string(conn),),
        ).fetchall()
    return {str(name): (str(kind), collation) for name, kind, collation in rows}


def _target_rows(env: SyncEnv, table: str, columns: Sequence[str]) -> dict[int, dict[str, Any]]:
    query = sql.SQL("SELECT {} FROM {} ORDER BY id").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table)
    )
    with env.target() as conn:
        cursor = conn.execute(query)
        names = [d.name for d in cursor.description or ()]
        return {int(row[0]): dict(zip(names, row, strict=True)) for row in cursor}


def _assert_same(target: Mapping[int, Mapping[str, Any]], expected: Mapping[int, Mapping[str, Any]]) -> None:
    assert target.keys() == expected.keys()
    for key, row in expected.items():
        assert dict(target[key]) == dict(row), key
        # == alone would accept 1 for True or a Decimal for an int: the Python types must match too.
        assert {c: type(v) for c, v in target[key].items()} == {c: type(v) for c, v in row.items()}, key


# --------------------------------------------------------------------------- types and values

TYPED_DDL = (
    "CREATE TABLE typed ("
    " id INT NOT NULL PRIMARY KEY,"
    " flag TINYINT(1),"
    " flag_bool BOOL,"
    " flag_boolean BOOLEAN NOT NULL DEFAULT FALSE,"
    " flag_unsigned TINYINT(1) UNSIGNED,"
    " tiny TINYINT,"
    " tiny_unsigned TINYINT UNSIGNED,"
    " code CHAR(3),"
    " name VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci,"
    " body TEXT,"
    " short_text TINYTEXT,"
    " medium_text MEDIUMTEXT,"
    " long_text LONGTEXT COLLATE utf8mb4_bin,"
    " happened DATETIME,"
    " happened6 DATETIME(6),"
    " stamped TIMESTAMP(6) NULL DEFAULT NULL,"
    " updated_at DATETIME(6) NOT NULL,"
    " KEY typed_cursor (updated_at, id)"
    ") ENGINE=InnoDB"
)
TYPED_COLUMNS = [
    "id",
    "flag",
    "flag_bool",
    "flag_boolean",
    "flag_unsigned",
    "tiny",
    "tiny_unsigned",
    "code",
    "name",
    "body",
    "short_text",
    "medium_text",
    "long_text",
    "happened",
    "happened6",
    "stamped",
    "updated_at",
]
BOOLEAN_COLUMNS = ("flag", "flag_bool", "flag_boolean", "flag_unsigned")
EXPECTED_TYPES = {
    "id": "bigint",  # INT: unchanged (an INT UNSIGNED would not fit integer)
    "flag": "boolean",
    "flag_bool": "boolean",
    "flag_boolean": "boolean",
    "flag_unsigned": "boolean",
    "tiny": "smallint",
    "tiny_unsigned": "smallint",
    "code": "character(3)",
    "name": "character varying(200)",
    "body": "text",
    "short_text": "text",
    "medium_text": "text",
    "long_text": "text",
    "happened": "timestamp without time zone",
    "happened6": "timestamp without time zone",
    "stamped": "timestamp without time zone",
    "updated_at": "timestamp without time zone",
    "_sync_run_id": "text",
    "_sync_synced_at": "timestamp with time zone",
}
BASE = dt.datetime(2024, 3, 1, 8, 0, 0, 123456)


def _typed_row(key: int, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(TYPED_COLUMNS)
    row.update(id=key, flag_boolean=0, updated_at=BASE)
    row.update(values)
    return row


TYPED_ROWS = [
    _typed_row(
        1,
        flag=1,
        flag_bool=1,
        flag_boolean=1,
        flag_unsigned=1,
        tiny=-128,
        tiny_unsigned=255,
        code="abc",
        name="ünïcödé façade 😀🚀👍🏽",
        body="line\nbreak\r\nand\ttab, 'single' \"double\" back\\slash \\N",
        short_text="x" * 255,
        medium_text="中文テキスト" * 2000,
        long_text="😀" * 70_000,
        happened=dt.datetime(1000, 1, 1, 0, 0, 0),
        happened6=dt.datetime(9999, 12, 31, 23, 59, 59, 999999),
        stamped=dt.datetime(1970, 1, 1, 0, 0, 1),
    ),
    _typed_row(
        2,
        flag=0,
        flag_bool=0,
        flag_unsigned=0,
        tiny=127,
        tiny_unsigned=0,
        code="a",  # PostgreSQL pads character(3) as MySQL does internally
        name="",
        body="",
        short_text="",
        medium_text="  leading and trailing spaces  ",
        long_text="",
        happened=dt.datetime(9999, 12, 31, 23, 59, 59),
        happened6=dt.datetime(1000, 1, 1, 0, 0, 0, 1),
        stamped=dt.datetime(2038, 1, 19, 3, 14, 7, 999999),
        updated_at=BASE + dt.timedelta(microseconds=1),
    ),
    _typed_row(3, updated_at=BASE + dt.timedelta(microseconds=1)),  # every nullable column NULL
    _typed_row(
        4,
        tiny=0,
        code="é😀",
        name="trailing spaces   ",
        body="ä" * 10_000,
        happened=dt.datetime(2024, 2, 29, 23, 59, 59),
        happened6=dt.datetime(2024, 2, 29, 12, 0, 0, 500000),
        stamped=dt.datetime(2024, 2, 29, 12, 0, 0, 500000),
        updated_at=BASE + dt.timedelta(seconds=1),
    ),
]


def _insert(mariadb: MariaDB, table: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    # Column names are this module's constants; every value is a bound parameter.
    mariadb.run(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})",
        [dict(r) for r in rows],
    )


def _as_synced(source: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """The source rows as PostgreSQL should hold them: 0/1 as booleans, CHAR(n) padded to n."""
    synced = {}
    for key, row in source.items():
        row = dict(row)
        for column in BOOLEAN_COLUMNS:
            row[column] = None if row[column] is None else {0: False, 1: True}[row[column]]
        row["code"] = None if row["code"] is None else row["code"].ljust(3)
        synced[key] = row
    return synced


def test_mysql_types_map_to_postgresql_equivalents_and_values_round_trip(env: SyncEnv, mariadb: MariaDB) -> None:
    mariadb.run(TYPED_DDL)
    _insert(mariadb, "typed", TYPED_COLUMNS, TYPED_ROWS)
    source = mariadb.rows("typed", TYPED_COLUMNS)
    assert source[1]["flag"] == 1 and type(source[1]["flag"]) is int  # the driver's view: TINYINT(1) is a number
    spec = SyncSpec(sync_id="maria_typed", source_table="typed", cursor_column="updated_at", batch_rows=2)
    engine = mariadb.engine()
    try:
        manifest, result = _run(engine, env, spec, "first")
        assert (manifest.rows, len(manifest.files), result.inserted) == (4, 2, 4)

        types = _target_types(env, "typed")
        assert {c: t for c, (t, _) in types.items()} == EXPECTED_TYPES
        # The source's collations (utf8mb4_unicode_ci, utf8mb4_bin) do not exist in PostgreSQL: not carried over.
        assert {c for c, (_, collation) in types.items() if collation not in (None, "default")} == set()

        target = _target_rows(env, "typed", TYPED_COLUMNS)
        _assert_same(target, _as_synced(source))
        with env.target() as conn:
            unpadded = dict(conn.execute("SELECT id, code::text FROM typed").fetchall())
        assert unpadded == {k: v["code"] for k, v in source.items()}  # as text, exactly the source's value

        with env.target() as conn:
            checked = reconcile(engine, conn, spec, staging=env.staging, record=False)
        assert (checked.equal, checked.source_count, checked.target_count) == (True, 4, 4), checked.describe()
    finally:
        engine.dispose()


def test_datetime6_cursor_pages_ties_and_resumes_to_the_microsecond(env: SyncEnv, mariadb: MariaDB) -> None:
    mariadb.run(TYPED_DDL)
    # 30 rows, three per cursor value, cursor values a microsecond apart: pages of 4 split tie groups.
    rows = [
        _typed_row(i, flag=i % 2, tiny=i, updated_at=BASE + dt.timedelta(microseconds=i // 3)) for i in range(1, 31)
    ]
    _insert(mariadb, "typed", TYPED_COLUMNS, rows)
    spec = SyncSpec(sync_id="maria_cursor", source_table="typed", cursor_column="updated_at", batch_rows=4)
    engine = mariadb.engine()
    try:
        _, first = _run(engine, env, spec, "first")
        assert (first.inserted, first.updated, first.version) == (30, 0, 1)
        assert first.watermark == [{"$datetime": (BASE + dt.timedelta(microseconds=10)).isoformat()}, 30]

        # Touch two rows in the middle (one microsecond past the watermark) and add one tied with them.
        later = BASE + dt.timedelta(microseconds=11)
        mariadb.run(
            "UPDATE typed SET flag = 1 - flag, updated_at = :at WHERE id IN (4, 17)",
            {"at": later},
        )
        _insert(mariadb, "typed", TYPED_COLUMNS, [_typed_row(31, flag=1, updated_at=later)])
        _, second = _run(engine, env, spec, "second")
        assert (second.inserted, second.updated, second.version) == (1, 2, 2)
        assert second.watermark == [{"$datetime": later.isoformat()}, 31]
        _assert_same(_target_rows(env, "typed", TYPED_COLUMNS), _as_synced(mariadb.rows("typed", TYPED_COLUMNS)))

        _, third = _run(engine, env, spec, "third")
        assert (third.rows_staged, third.inserted, third.updated) == (0, 0, 0)
    finally:
        engine.dispose()


@pytest.mark.parametrize(("column", "value"), [("flag", 2), ("flag", -1), ("flag_unsigned", 255)])
def test_tinyint1_holding_another_value_than_0_or_1_fails_naming_the_row(
    env: SyncEnv, mariadb: MariaDB, column: str, value: int
) -> None:
    mariadb.run(TYPED_DDL)
    _insert(mariadb, "typed", TYPED_COLUMNS, [_typed_row(1, flag=1), _typed_row(7, **{column: value})])
    spec = SyncSpec(sync_id="maria_flags", source_table="typed", cursor_column="updated_at")
    engine = mariadb.engine()
    try:
        with env.target() as target, pytest.raises(DataError) as raised:
            run_sync(engine, target, spec, staging=env.staging, run_id="bad")
    finally:
        engine.dispose()
    error = raised.value
    assert (error.sync_id, error.table, error.column, error.key, error.rule) == (
        "maria_flags",
        "typed",
        column,
        {"id": 7},
        "type",
    )
    assert f"value {value}" in error.reason and "BOOLEAN" in error.reason
    # Nothing was written: no target table, no state.
    assert env.state("maria_flags") is None
    assert _target_types(env, "typed") == {}


def test_timestamp_is_read_in_the_session_time_zone(env: SyncEnv, mariadb: MariaDB) -> None:
    """MySQL stores a TIMESTAMP as UTC and shows it in the session's time zone; DATETIME is shown as
    written.  The sync reads both as the session shows them into ``timestamp without time zone``:
    a connection with ``time_zone = '+00:00'`` therefore lands TIMESTAMPs as UTC."""
    mariadb.run(TYPED_DDL)
    written = dt.datetime(2024, 6, 1, 12, 0, 0, 500000)
    _insert(mariadb, "typed", TYPED_COLUMNS, [_typed_row(1, happened6=written, stamped=written)])  # a UTC session
    spec = SyncSpec(sync_id="maria_zone", source_table="typed", mode="full")
    engine = mariadb.engine(time_zone="+05:30")
    try:
        _run(engine, env, spec, "kolkata")
    finally:
        engine.dispose()
    row = _target_rows(env, "typed", ["id", "happened6", "stamped"])[1]
    assert row == {"id": 1, "happened6": written, "stamped": written + dt.timedelta(hours=5, minutes=30)}
    assert _target_types(env, "typed")["stamped"][0] == "timestamp without time zone"


# --------------------------------------------------------------------------- JSON

DOCS: list[str | None] = [
    '{"a": 1, "emoji": "😀", "nested": {"list": [1, 2.5, {"b": null, "c": [true, false]}], "empty": {}}}',
    "[]",
    None,
    "null",
    '"just text \\n with an escaped newline"',
    '{"k": "ä", "big": 12345678901234567890, "neg": -0.001, "exp": 1e300, "deep": [[[[["x"]]]]]}',
    "true",
    "123",
]


def _json_rows(mariadb: MariaDB, json_ddl: str) -> None:
    mariadb.run(f"CREATE TABLE docs (id INT NOT NULL PRIMARY KEY, {json_ddl}) ENGINE=InnoDB")
    _insert(mariadb, "docs", ["id", "doc"], [{"id": i, "doc": doc} for i, doc in enumerate(DOCS, start=1)])


def _parse(text: str | None) -> Any:
    # Numbers as Decimal: 1e300 and jsonb's rendering of it (1 and 300 zeros) are the same number.
    return None if text is None else json.loads(text, parse_float=Decimal, parse_int=Decimal)


def _assert_json_round_trip(env: SyncEnv, mariadb: MariaDB) -> None:
    assert _target_types(env, "docs")["doc"][0] == "jsonb"
    expected = {k: _parse(v["doc"]) for k, v in mariadb.rows("docs", ["id", "doc"]).items()}
    with env.target() as conn:
        target = {k: _parse(v) for k, v in conn.execute("SELECT id, doc::text FROM docs ORDER BY id")}
    assert target == expected
    assert [type(v) for v in target.values()] == [type(v) for v in expected.values()]
    with env.target() as conn:
        kinds = dict(conn.execute("SELECT id, doc IS NULL FROM docs").fetchall())
    assert kinds[3] is True and kinds[4] is False  # SQL NULL stays NULL, JSON null stays a JSON value


def test_json_checked_text_column_syncs_as_jsonb(env: SyncEnv, mariadb: MariaDB) -> None:
    """A text column a table CHECK keeps to valid JSON (``CHECK (json_valid(doc))``) is JSON."""
    _json_rows(mariadb, "doc LONGTEXT, CONSTRAINT doc_is_json CHECK (json_valid(doc))")
    engine = mariadb.engine()
    try:
        _run(engine, env, SyncSpec(sync_id="maria_docs", source_table="docs", mode="full"), "first")
        _assert_json_round_trip(env, mariadb)
        with env.target() as conn:
            spec = SyncSpec(sync_id="maria_docs", source_table="docs", mode="full")
            checked = reconcile(engine, conn, spec, staging=env.staging, record=False)
        assert checked.equal, checked.describe()
    finally:
        engine.dispose()


def test_mariadb_json_column_syncs_as_jsonb(env: SyncEnv, mariadb: MariaDB) -> None:
    _json_rows(mariadb, "doc JSON")
    engine = mariadb.engine()
    try:
        _run(engine, env, SyncSpec(sync_id="maria_json", source_table="docs", mode="full"), "first")
    finally:
        engine.dispose()
    _assert_json_round_trip(env, mariadb)


def test_json_check_columns_are_found_and_planned_as_jsonb(mariadb: MariaDB) -> None:
    mariadb.run(
        "CREATE TABLE checked ("
        " id INT PRIMARY KEY,"
        " doc JSON,"  # MariaDB: LONGTEXT + column CHECK (json_valid(`doc`))
        " checked LONGTEXT CHECK (json_valid(checked)),"
        " named LONGTEXT,"
        " plain LONGTEXT,"
        " positive INT CHECK (positive > 0),"
        " almost LONGTEXT CHECK (json_valid(almost) OR almost = ''),"
        " CONSTRAINT named_is_json CHECK (json_valid(named))"
        ")"
    )
    engine = mariadb.engine()
    try:
        table = sa.Table("checked", sa.MetaData(), autoload_with=engine)
        found = schema_module.json_check_columns(engine, table)
        dialect = engine.dialect.name
    finally:
        engine.dispose()
    assert found == {"doc", "checked", "named"}
    plans = {c.name: schema_module.plan_column(c, dialect, json_columns=found) for c in table.columns}
    assert {n: (p.pg_type, p.as_text) for n, p in plans.items() if n != "id"} == {
        "doc": ("JSONB", True),
        "checked": ("JSONB", True),
        "named": ("JSONB", True),
        "plain": ("TEXT", False),
        "positive": ("BIGINT", False),
        "almost": ("TEXT", False),  # may hold '' (not JSON): stays text
    }
    # A table-level CHECK is reflected by SQLAlchemy itself: recognised without the extra query too.
    assert schema_module.plan_column(table.c.named, dialect).pg_type == "JSONB"
    assert schema_module.plan_column(table.c.doc, dialect).pg_type == "TEXT"
