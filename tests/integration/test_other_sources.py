"""SQLite and MariaDB as sources: every value arrives in PostgreSQL exactly as the source holds it.

The tests compare rows read back from both sides in Python (not checksums, since the types differ
between the databases): floats exactly, decimals by value, datetimes to the microsecond, bytes,
text with emoji and control characters, NULLs.  They also check the load counts of each run.
MariaDB tests use 127.0.0.1:3306 (root, no password) and skip when it is not reachable.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from psycopg import sql

from airflow_sync_provider.core import SyncSpec, run_sync
from airflow_sync_provider.core.load import LoadResult
from airflow_sync_provider.core.manifest import Manifest

from ..conftest import SyncEnv, mariadb_url

Rows = dict[int, tuple[Any, ...]]

NAMES = [
    "plain",
    "ünïcödé façade",
    "emoji 😀🚀👍🏽",
    "中文テキスト",
    "line\nbreak\r\nand tab\t",
    'quote " comma , semicolon ;',
    "",
    None,
    "\\N",
    "back\\slash",
]
WEIGHTS = [0.1, 1 / 3, 1e-300, 1.7976931348623157e308, -2.5, None, 5e-324, 123456789.12345679, -0.0]
SQLITE_WEIGHTS = [*WEIGHTS, float("inf"), float("-inf")]  # (MariaDB has no infinities)
PRICES = [Decimal("1234567890.12"), Decimal("-0.01"), Decimal("0.00"), None, Decimal("9999999999.99"), Decimal("42.5")]
PAYLOADS = [b"", b"\x00\xff\x10\n", bytes(range(256)), None, "😀".encode()]


def _pick(values: Sequence[Any], i: int) -> Any:
    return values[i % len(values)]


def _run(engine: sa.Engine, env: SyncEnv, spec: SyncSpec, run_id: str) -> tuple[Manifest, LoadResult]:
    with env.target() as target:
        manifest, result = run_sync(engine, target, spec, staging=env.staging, run_id=run_id)
    assert result.status == "applied"
    return manifest, result


def _counts(result: LoadResult) -> tuple[int, int, int, int]:
    return result.inserted, result.updated, result.deleted, result.version


def _target_rows(env: SyncEnv, table: str, columns: Sequence[str], where: str = "") -> Rows:
    query = sql.SQL("SELECT {} FROM {} {} ORDER BY id").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table), sql.SQL(where)
    )
    with env.target() as conn:
        return {int(row[0]): tuple(row[1:]) for row in conn.execute(query)}


def _assert_same_rows(target: Rows, source: Rows) -> None:
    assert target.keys() == source.keys()
    for key, values in source.items():
        # == is exact for floats, compares decimals by value and datetimes to the microsecond; the
        # types must match too, so e.g. a float that came back as a Decimal or a str is a failure.
        assert target[key] == values, key
        assert [type(v) for v in target[key]] == [type(v) for v in values], key


# --------------------------------------------------------------------------- SQLite

SQLITE_COLUMNS = ["id", "name", "weight", "price", "born", "payload", "updated_at"]


def _sqlite_source(tmp_path: Path, rows: int = 250) -> tuple[sa.Engine, sa.Table]:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'source.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, weight REAL, price NUMERIC(12, 2), born DATE, "
            "payload BLOB, updated_at DATETIME NOT NULL)"
        )
    table = sa.Table("items", sa.MetaData(), autoload_with=engine)
    base = dt.datetime(2024, 1, 1, 8, 0, 0)
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {
                    "id": i,
                    "name": _pick(NAMES, i),
                    "weight": _pick(SQLITE_WEIGHTS, i),
                    "price": None if _pick(PRICES, i) is None else str(_pick(PRICES, i)),
                    "born": None if i % 11 == 0 else dt.date(1, 1, 1) + dt.timedelta(days=i * 2903),
                    "payload": _pick(PAYLOADS, i),
                    # three rows share each cursor value: pages of 100 split tie groups
                    "updated_at": base + dt.timedelta(seconds=(i // 3) * 37, microseconds=(i // 3) * 7919 % 1_000_000),
                }
                for i in range(1, rows + 1)
            ],
        )
    return engine, table


def _sqlite_rows(engine: sa.Engine, table: sa.Table) -> Rows:
    with engine.connect() as conn:
        return {row[0]: tuple(row[1:]) for row in conn.execute(sa.select(table).order_by(table.c.id))}


def test_sqlite_incremental_sync_preserves_every_value(env: SyncEnv, tmp_path: Path) -> None:
    engine, table = _sqlite_source(tmp_path)
    spec = SyncSpec(sync_id="sqlite_items", source_table="items", cursor_column="updated_at", batch_rows=100)
    try:
        manifest, first = _run(engine, env, spec, "first")
        assert (manifest.rows, len(manifest.files)) == (250, 3)
        assert _counts(first) == (250, 0, 0, 1)
        _assert_same_rows(_target_rows(env, "items", SQLITE_COLUMNS), _sqlite_rows(engine, table))
        with env.target() as conn:
            types = dict(
                conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'items'"
                ).fetchall()
            )
        assert types == {
            "id": "bigint",
            "name": "text",
            "weight": "double precision",
            "price": "numeric",
            "born": "date",
            "payload": "bytea",
            "updated_at": "timestamp without time zone",
            "_sync_run_id": "text",
            "_sync_synced_at": "timestamp with time zone",
        }

        later = dt.datetime(2024, 2, 1, 12, 0, 0, 123456)
        with engine.begin() as conn:
            for n, i in enumerate(range(7, 250, 12)):  # 21 updates, all in the middle of the key range
                conn.execute(
                    table.update()
                    .where(table.c.id == i)
                    .values(name=f"changed {i} ✓", weight=i / 7, updated_at=later + dt.timedelta(seconds=n))
                )
            conn.execute(
                table.insert(),
                [
                    {
                        "id": 1000 + i,
                        "name": _pick(NAMES, i + 3),
                        "weight": _pick(SQLITE_WEIGHTS, i + 1),
                        "price": None if _pick(PRICES, i) is None else str(_pick(PRICES, i)),
                        "born": dt.date(2024, 2, 29),
                        "payload": _pick(PAYLOADS, i + 2),
                        "updated_at": later + dt.timedelta(minutes=5),  # 30 rows tied on the cursor
                    }
                    for i in range(30)
                ],
            )
        manifest, second = _run(engine, env, spec, "second")
        assert manifest.rows == 51
        assert _counts(second) == (30, 21, 0, 2)
        assert second.watermark == [{"$datetime": (later + dt.timedelta(minutes=5)).isoformat()}, 1029]
        _assert_same_rows(_target_rows(env, "items", SQLITE_COLUMNS), _sqlite_rows(engine, table))

        _, third = _run(engine, env, spec, "third")
        assert (third.rows_staged, *_counts(third)) == (0, 0, 0, 0, 3)
    finally:
        engine.dispose()


def test_sqlite_full_refresh_with_soft_deletes(env: SyncEnv, tmp_path: Path) -> None:
    engine, table = _sqlite_source(tmp_path, rows=120)
    spec = SyncSpec(
        sync_id="sqlite_full", source_table="items", target_table="items_full", mode="full", delete_mode="soft"
    )
    live = "WHERE _sync_deleted_at IS NULL"
    try:
        assert _counts(_run(engine, env, spec, "full-1")[1]) == (120, 0, 0, 1)
        _assert_same_rows(_target_rows(env, "items_full", SQLITE_COLUMNS, live), _sqlite_rows(engine, table))

        deleted_ids = [3, 40, 41, 99, 120]
        with engine.begin() as conn:
            removed = conn.execute(sa.select(table).where(table.c.id == 40)).one()
            conn.execute(table.delete().where(table.c.id.in_(deleted_ids)))
            conn.execute(table.update().where(table.c.id.in_([1, 2, 50])).values(price="0.5"))
            conn.execute(table.insert().values(id=500, name="new 🌱", updated_at=dt.datetime(2030, 1, 1)))
        assert _counts(_run(engine, env, spec, "full-2")[1]) == (1, 3, 5, 2)
        _assert_same_rows(_target_rows(env, "items_full", SQLITE_COLUMNS, live), _sqlite_rows(engine, table))
        with env.target() as conn:
            marked = conn.execute(
                "SELECT id, _sync_run_id FROM items_full WHERE _sync_deleted_at IS NOT NULL ORDER BY id"
            ).fetchall()
        assert marked == [(i, "full-2") for i in deleted_ids]

        with engine.begin() as conn:  # row 40 comes back, exactly as it was
            conn.execute(table.insert().values(removed._asdict()))
        assert _counts(_run(engine, env, spec, "full-3")[1]) == (0, 1, 0, 3)
        _assert_same_rows(_target_rows(env, "items_full", SQLITE_COLUMNS, live), _sqlite_rows(engine, table))
        with env.target() as conn:
            still_deleted = conn.execute(
                "SELECT array_agg(id ORDER BY id) FROM items_full WHERE _sync_deleted_at IS NOT NULL"
            ).fetchone()
            back = conn.execute("SELECT _sync_deleted_at, _sync_run_id FROM items_full WHERE id = 40").fetchone()
        assert still_deleted == ([3, 41, 99, 120],)
        assert back == (None, "full-3")

        assert _counts(_run(engine, env, spec, "full-4")[1]) == (0, 0, 0, 4)  # deleted rows are not re-counted
    finally:
        engine.dispose()


def test_sqlite_cursor_stamped_by_current_timestamp(env: SyncEnv, tmp_path: Path) -> None:
    """SQLite's CURRENT_TIMESTAMP stores 'YYYY-MM-DD HH:MM:SS' while SQLAlchemy binds datetimes as
    'YYYY-MM-DD HH:MM:SS.ffffff': many rows sharing one second (and rows written both ways) must
    still page and resume by (cursor, id) without skipping any."""
    path = tmp_path / "stamped.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT, "
            "updated_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        conn.execute(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 300) "
            "INSERT INTO events (id, body, updated_at) SELECT n, 'event ' || n, datetime('now', '-1 minute') FROM g"
        )
        (stamp,) = conn.execute("SELECT updated_at FROM events WHERE id = 1").fetchone()
    assert len(stamp) == 19  # no fractional seconds: the format this test is about
    engine = sa.create_engine(f"sqlite:///{path}")
    spec = SyncSpec(sync_id="events", source_table="events", cursor_column="updated_at", batch_rows=100)
    table = sa.Table("events", sa.MetaData(), autoload_with=engine)
    try:
        assert _counts(_run(engine, env, spec, "first")[1]) == (300, 0, 0, 1)

        with engine.begin() as conn:  # same second, written by SQLAlchemy ('... .000000'), lower and higher ids
            same_second = dt.datetime.fromisoformat(stamp)
            conn.execute(table.update().where(table.c.id.in_([5, 6])).values(body="touched", updated_at=same_second))
            conn.execute(table.insert().values(id=301, body="late", updated_at=same_second))
        with sqlite3.connect(path) as raw:
            raw.execute("UPDATE events SET body = 'later', updated_at = datetime('now', '-30 seconds') WHERE id = 7")
        _, second = _run(engine, env, spec, "second")
        # Rows 5 and 6 have the watermark's cursor value with a lower id: by (cursor, id) they are
        # not past it (the documented tie-break), so only 301 and 7 are new to this run.
        assert _counts(second) == (1, 1, 0, 2)
        columns = ["id", "body", "updated_at"]
        with engine.connect() as conn:
            source = {r[0]: tuple(r[1:]) for r in conn.execute(sa.select(table).where(table.c.id.notin_([5, 6])))}
        target = _target_rows(env, "events", columns, "WHERE id NOT IN (5, 6)")
        _assert_same_rows(target, source)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- MariaDB

_databases = itertools.count()


@dataclass
class MariaDB:
    """A throw-away database on the local MariaDB server."""

    url: str
    database: str

    def connect(self) -> Any:
        import pymysql

        url = sa.make_url(self.url)
        return pymysql.connect(
            host=url.host,
            port=url.port or 3306,
            user=url.username,
            password="",
            database=self.database,
            autocommit=True,
            charset="utf8mb4",
        )

    def execute(self, statement: str, args: Any = None, many: bool = False) -> list[tuple[Any, ...]]:
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                if many:
                    cursor.executemany(statement, args)
                else:
                    cursor.execute(statement, args)
                return list(cursor.fetchall())
        finally:
            conn.close()

    def engine(self) -> sa.Engine:
        return sa.create_engine(f"{self.url}/{self.database}?charset=utf8mb4", poolclass=sa.NullPool)


@pytest.fixture
def mariadb() -> Iterator[MariaDB]:
    url = mariadb_url()
    if url is None:
        pytest.skip(
            "MariaDB not reachable on 127.0.0.1:3306: no server accepting root without a password, or no PyMySQL"
        )
    import pymysql

    name = f"sync_test_{os.getpid()}_{next(_databases)}"
    server = sa.make_url(url)
    admin = pymysql.connect(host=server.host, port=server.port or 3306, user="root", autocommit=True)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        yield MariaDB(url, name)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


MARIADB_COLUMNS = ["id", "name", "price", "weight", "updated_at", "doc", "status", "payload", "active"]
BIG_IDS = [9_223_372_036_854_775_808, 18_446_744_073_709_551_615]  # beyond a signed bigint
DOCS = ['{"a": 1, "emoji": "😀", "nested": [1, 2.5, {"b": null}]}', "[]", None, '"just text"', '{"k": "ä\\n"}']


_DOC, _ACTIVE = MARIADB_COLUMNS.index("doc"), MARIADB_COLUMNS.index("active")


def _json_value(text: str | None) -> Any:
    return None if text is None else json.loads(text, parse_float=Decimal, parse_int=Decimal)


def _mariadb_rows(db: MariaDB) -> Rows:
    """The source rows as the target holds them: ``active`` (TINYINT(1)) 0/1 as booleans (any other
    value fails the sync: test_mysql_types.py), ``doc`` (JSON) by value."""
    synced: Rows = {}
    for source_row in db.execute(f"SELECT {', '.join(MARIADB_COLUMNS)} FROM items ORDER BY id"):
        row = list(source_row)
        row[_DOC] = _json_value(row[_DOC])
        row[_ACTIVE] = None if row[_ACTIVE] is None else {0: False, 1: True}[row[_ACTIVE]]
        synced[int(row[0])] = tuple(row[1:])
    return synced


def _mariadb_target_rows(env: SyncEnv) -> Rows:
    """The target rows, ``doc`` by value (read as text, so the same whether the column is text or jsonb)."""
    selected = [
        sql.SQL("{}::text").format(sql.Identifier(c)) if c == "doc" else sql.Identifier(c) for c in MARIADB_COLUMNS
    ]
    query = sql.SQL("SELECT {} FROM items ORDER BY id").format(sql.SQL(", ").join(selected))
    rows: Rows = {}
    with env.target() as conn:
        for target_row in conn.execute(query):
            row = list(target_row)
            row[_DOC] = _json_value(row[_DOC])
            rows[int(row[0])] = tuple(row[1:])
    return rows


def _mariadb_values(i: int, key: int) -> tuple[Any, ...]:
    return (
        key,
        _pick(NAMES, i),
        _pick(PRICES, i),
        _pick(WEIGHTS, i),
        _pick(DOCS, i),
        _pick(["new", "paid", "shipped", None], i),
        _pick(PAYLOADS, i),
        _pick([0, 1, None], i),
    )


def _seed_mariadb(db: MariaDB, ids: Sequence[int], offset: int = 0) -> None:
    db.execute(
        "INSERT INTO items (id, name, price, weight, doc, status, payload, active) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        [_mariadb_values(i + offset, key) for i, key in enumerate(ids)],
        many=True,
    )


def _create_mariadb_items(db: MariaDB) -> None:
    db.execute(
        "CREATE TABLE items ("
        " id BIGINT UNSIGNED NOT NULL PRIMARY KEY,"
        " name VARCHAR(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci,"
        " price DECIMAL(12,2),"
        " weight DOUBLE,"
        " updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),"
        " doc JSON,"
        " status ENUM('new', 'paid', 'shipped'),"
        " payload BLOB,"
        " active TINYINT(1),"
        " KEY items_cursor (updated_at, id)"
        ") ENGINE=InnoDB"
    )


def test_mariadb_incremental_sync_with_delete_detection(env: SyncEnv, mariadb: MariaDB) -> None:
    _create_mariadb_items(mariadb)
    ids = [*range(1, 249), *BIG_IDS]
    _seed_mariadb(mariadb, ids)  # one statement: all 250 rows share one cursor value
    spec = SyncSpec(
        sync_id="maria_items", source_table="items", cursor_column="updated_at", detect_deletes=True, batch_rows=100
    )
    engine = mariadb.engine()
    try:
        manifest, first = _run(engine, env, spec, "first")
        assert not [n for n in manifest.notes if "guard" in n or "lowered" in n], manifest.notes
        assert (manifest.rows, len(manifest.files)) == (250, 3)
        assert _counts(first) == (250, 0, 0, 1)
        _assert_same_rows(_mariadb_target_rows(env), _mariadb_rows(mariadb))

        # Changes: flip `active` on every 10th row (ON UPDATE bumps the cursor), insert 20, delete 7
        # (among them the largest key and the watermark's own key).
        updated = [i for i in ids if i % 10 == 0]
        mariadb.execute("UPDATE items SET active = 1 - COALESCE(active, 0), doc = JSON_ARRAY(id) WHERE id % 10 = 0")
        _seed_mariadb(mariadb, range(1001, 1021), offset=3)
        deleted = [3, 4, 77, 151, 152, *BIG_IDS]
        mariadb.execute(f"DELETE FROM items WHERE id IN ({', '.join(map(str, deleted))})")
        assert not set(deleted) & set(updated)

        manifest, second = _run(engine, env, spec, "second")
        assert manifest.rows == len(updated) + 20
        assert _counts(second) == (20, len(updated), len(deleted), 2)
        source = _mariadb_rows(mariadb)
        assert len(source) == 250 + 20 - len(deleted)
        _assert_same_rows(_mariadb_target_rows(env), source)
        newest = max((v[3], k) for k, v in source.items())
        assert second.watermark == [{"$datetime": newest[0].isoformat()}, newest[1]]

        _, third = _run(engine, env, spec, "third")
        assert (third.rows_staged, *_counts(third)) == (0, 0, 0, 0, 3)
    finally:
        engine.dispose()


def test_mariadb_open_transaction_holds_the_watermark_back(env: SyncEnv, mariadb: MariaDB) -> None:
    """A row written by a transaction still open during a run is not lost when it commits later,
    although a row committed meanwhile by another session has a later cursor value."""
    _create_mariadb_items(mariadb)
    _seed_mariadb(mariadb, range(1, 51))
    mariadb.execute("UPDATE items SET updated_at = updated_at - INTERVAL 1 MINUTE")  # well before the transaction
    spec = SyncSpec(sync_id="maria_guard", source_table="items", cursor_column="updated_at")
    engine = mariadb.engine()
    slow = mariadb.connect()
    try:
        slow.begin()
        with slow.cursor() as cursor:
            cursor.execute("INSERT INTO items (id, name) VALUES (1000, 'written first, committed last')")
        mariadb.execute("INSERT INTO items (id, name) VALUES (1001, 'written second, committed first')")

        manifest, first = _run(engine, env, spec, "during")
        assert _counts(first) == (50, 0, 0, 1)  # 1001 is at or above the open transaction's start
        assert any("open transaction" in note for note in manifest.notes), manifest.notes

        slow.commit()
        _, second = _run(engine, env, spec, "after")
        assert _counts(second) == (2, 0, 0, 2)
        _assert_same_rows(_mariadb_target_rows(env), _mariadb_rows(mariadb))
    finally:
        slow.close()
        engine.dispose()
