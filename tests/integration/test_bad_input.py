"""Bad input fails loudly and changes nothing.

Every test first commits a successful sync (so the target holds data and ``_sync_state`` a
watermark), then makes valid changes *and* one bad input at the source and runs again.  The run
must raise a :class:`SyncError` whose message names the sync, the table and, where they apply, the
column, the row key and the rule -- and the target table (metadata columns included) and the state
row must be exactly as they were.  Where the input can be repaired, a further run then applies the
held-back valid changes, which shows the failed run neither lost nor half-applied them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from airflow_sync_provider.core import SyncSpec, extract_for, load_manifest, run_sync
from airflow_sync_provider.core.errors import (
    DataError,
    SchemaError,
    SourceUnavailableError,
    SyncError,
    TargetUnavailableError,
    UnavailableError,
)
from airflow_sync_provider.core.load import LoadResult

from ..conftest import SyncEnv, source_columns, table_checksum

SYNC = "orders"
SPEC = SyncSpec(sync_id=SYNC, source_table="orders", cursor_column="updated_at", batch_rows=100)

Snapshot = tuple[tuple[int, str], tuple[Any, ...]]


def _seed(env: SyncEnv, *, primary_key: bool = True, rows: int = 300) -> None:
    """A small ``orders`` table; ``updated_at`` is nullable on purpose (see the NULL-cursor test)."""
    with env.source() as conn:
        conn.execute(
            f"CREATE TABLE orders (id bigint {'PRIMARY KEY' if primary_key else ''}, region text DEFAULT 'eu', "
            "sku text, qty bigint, amount numeric(12,2), updated_at timestamptz DEFAULT clock_timestamp())"
        )
        conn.execute(
            "INSERT INTO orders (id, region, sku, qty, amount) "
            "SELECT g, CASE WHEN g %% 2 = 0 THEN 'eu' ELSE 'us' END, 'S' || (g %% 1000), g %% 13, g / 4.0 "
            "FROM generate_series(1, %s) g",
            (rows,),
        )


def _good_changes(env: SyncEnv, table: str = "orders") -> None:
    """Valid changes a failed run must not apply: 30 updates and 50 inserts."""
    with env.source() as conn:
        conn.execute(f"UPDATE {table} SET qty = qty + 100, updated_at = clock_timestamp() WHERE id % 10 = 0")
        conn.execute(
            f"INSERT INTO {table} (id, region, sku, qty, amount) "
            "SELECT g, 'eu', 'N' || g, 1, 1.5 FROM generate_series(1001, 1050) g"
        )


def _snapshot(env: SyncEnv, table: str = "orders") -> Snapshot:
    """Checksum of every target column (incl. ``_sync_*``) and the state row (version, watermark, manifest)."""
    with env.target() as conn:
        columns = source_columns(conn, table)
        checksum = table_checksum(conn, table, columns, ["id"])
    assert {"_sync_run_id", "_sync_synced_at"} <= set(columns)
    state = env.state(SYNC)
    assert state is not None
    return checksum, state


def _first_sync(env: SyncEnv, spec: SyncSpec = SPEC, rows: int = 300) -> Snapshot:
    _, result = env.sync(spec, run_id="first")
    assert (result.status, result.inserted, result.version) == ("applied", rows, 1)
    before = _snapshot(env, spec.target_table)
    assert before[0][0] == rows
    return before


def _assert_recovers(env: SyncEnv, spec: SyncSpec = SPEC, *, inserted: int = 50, updated: int = 30) -> LoadResult:
    """Once the input is repaired, the valid changes held back by the failed run are applied."""
    _, result = env.sync(spec, run_id="repaired")
    assert (result.status, result.inserted, result.updated, result.version) == ("applied", inserted, updated, 2)
    return result


def _assert_target_equals_source(env: SyncEnv, source_table: str = "orders", target_table: str = "orders") -> None:
    with env.source() as src, env.target() as tgt:
        columns = source_columns(src, source_table)
        assert table_checksum(tgt, target_table, columns, ["id"]) == table_checksum(src, source_table, columns, ["id"])


# --------------------------------------------------------------------------- missing objects


def test_missing_source_table(env: SyncEnv) -> None:
    _seed(env)
    before = _first_sync(env)
    _good_changes(env)
    with env.source() as conn:
        conn.execute("ALTER TABLE orders RENAME TO orders_renamed")

    with pytest.raises(SchemaError, match=r"^\[sync='orders' table='orders'\] source table does not exist") as info:
        env.sync(SPEC, run_id="bad")
    assert (info.value.sync_id, info.value.table) == ("orders", "orders")
    assert _snapshot(env) == before

    with env.source() as conn:
        conn.execute("ALTER TABLE orders_renamed RENAME TO orders")
    _assert_recovers(env)
    _assert_target_equals_source(env)


def test_missing_cursor_column(env: SyncEnv) -> None:
    _seed(env)
    before = _first_sync(env)
    _good_changes(env)
    with env.source() as conn:
        conn.execute("ALTER TABLE orders RENAME COLUMN updated_at TO changed_at")

    with pytest.raises(
        SchemaError,
        match=r"^\[sync='orders' table='orders' column='updated_at'\] column does not exist in the source table "
        r"\(it has: id, region, sku, qty, amount, changed_at\)",
    ):
        env.sync(SPEC, run_id="bad")
    assert _snapshot(env) == before

    with env.source() as conn:
        conn.execute("ALTER TABLE orders RENAME COLUMN changed_at TO updated_at")
    _assert_recovers(env)
    _assert_target_equals_source(env)


def test_missing_column_listed_in_columns(env: SyncEnv) -> None:
    spec = SPEC.with_options(columns=("id", "sku", "qty", "updated_at"))
    _seed(env)
    before = _first_sync(env, spec)
    _good_changes(env)
    with env.source() as conn:
        conn.execute("ALTER TABLE orders DROP COLUMN sku")

    with pytest.raises(SchemaError, match=r"^\[sync='orders' table='orders' column='sku'\] column does not exist"):
        env.sync(spec, run_id="bad")
    assert _snapshot(env) == before


# --------------------------------------------------------------------------- keys


def test_source_without_primary_key_needs_a_declared_one(env: SyncEnv) -> None:
    _seed(env)
    before = _first_sync(env)
    _good_changes(env)
    with env.source() as conn:
        conn.execute("ALTER TABLE orders DROP CONSTRAINT orders_pkey")

    with pytest.raises(
        SchemaError,
        match=r"^\[sync='orders' table='orders' rule=primary key required\] source table has no primary key; "
        r"declare primary_key=",
    ):
        env.sync(SPEC, run_id="bad")
    assert _snapshot(env) == before

    declared = SPEC.with_options(primary_key=("id",))
    result = _assert_recovers(env, declared)
    assert result.watermark is not None and result.watermark[1] == 1050
    _assert_target_equals_source(env)


def test_declared_key_with_null_in_batch(env: SyncEnv) -> None:
    """A declared composite key (region, id) on a table without one; a new row has region NULL."""
    spec = SPEC.with_options(primary_key=("region", "id"))
    _seed(env, primary_key=False)
    before = _first_sync(env, spec)
    _good_changes(env)
    with env.source() as conn:
        conn.execute("INSERT INTO orders (id, region, sku, qty, amount) VALUES (2000, NULL, 'X', 1, 1)")

    with pytest.raises(
        DataError,
        match=r"^\[sync='orders' table='public.orders' column='region' key=\(region=None, id=2000\) "
        r"rule=key not null\] a primary-key column is NULL",
    ):
        env.sync(spec, run_id="bad")
    assert _snapshot(env) == before

    with env.source() as conn:
        conn.execute("UPDATE orders SET region = 'eu', updated_at = clock_timestamp() WHERE id = 2000")
    _assert_recovers(env, spec, inserted=51)
    _assert_target_equals_source(env)


def test_declared_key_duplicated_in_batch(env: SyncEnv) -> None:
    """A view over two tables has no key; the declared one is violated once both contain id 150."""
    spec = SPEC.with_options(source_table="orders_all", target_table="orders", primary_key=("id",))
    _seed(env)
    with env.source() as conn:
        conn.execute("CREATE TABLE orders_archive (LIKE orders INCLUDING DEFAULTS)")
        conn.execute(
            "INSERT INTO orders_archive (id, region, sku, qty, amount) "
            "SELECT g, 'ar', 'A' || g, 0, 0 FROM generate_series(5001, 5010) g"
        )
        conn.execute("CREATE VIEW orders_all AS SELECT * FROM orders UNION ALL SELECT * FROM orders_archive")
    before = _first_sync(env, spec, rows=310)
    _good_changes(env)
    with env.source() as conn:
        conn.execute("UPDATE orders SET sku = 'touched', updated_at = clock_timestamp() WHERE id = 150")
        conn.execute("INSERT INTO orders_archive (id, region, sku, qty, amount) VALUES (150, 'ar', 'copy', 0, 0)")

    with pytest.raises(
        DataError,
        match=r"^\[sync='orders' table='public.orders' column='id' key=\(id=150\) rule=duplicate key in batch\] "
        r"the batch has two rows with the same primary key \(Key \(id\)=\(150\) already exists\.\)",
    ):
        env.sync(spec, run_id="bad")
    assert _snapshot(env) == before

    with env.source() as conn:
        conn.execute("DELETE FROM orders_archive WHERE id = 150")
    _assert_recovers(env, spec)
    _assert_target_equals_source(env, "orders_all", "orders")


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("column", "target_type", "bad_value", "message"),
    [
        ("sku", "varchar(5)", "'much-too-long'", r"\(character varying\(5\)\) cannot hold the value: value too long"),
        ("qty", "integer", "1099511627776", r"\(integer\) cannot hold the value: .*out of range for type integer"),
    ],
    ids=["text-too-long-for-varchar", "bigint-overflows-integer"],
)
def test_value_the_target_cannot_hold(
    env: SyncEnv, column: str, target_type: str, bad_value: str, message: str
) -> None:
    """The target table exists beforehand with a narrower type than the source's."""
    _seed(env)
    with env.target() as conn:
        conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, region text, sku text, qty bigint, amount numeric(12,2), "
            "updated_at timestamptz)"
        )
        conn.execute(f"ALTER TABLE orders ALTER COLUMN {column} TYPE {target_type}")
    before = _first_sync(env, SPEC.with_options(batch_rows=50))
    _good_changes(env)
    with env.source() as conn:  # the bad row is the last row of the last page
        conn.execute(f"UPDATE orders SET {column} = {bad_value}, updated_at = clock_timestamp() WHERE id = 42")

    with pytest.raises(
        DataError,
        match=rf"^\[sync='orders' table='public.orders' column='{column}' key=\(id=42\) rule=target type\] "
        rf"the target column {message}",
    ) as info:
        env.sync(SPEC.with_options(batch_rows=50), run_id="bad")
    assert (info.value.column, info.value.key, info.value.rule) == (column, {"id": 42}, "target type")
    assert _snapshot(env) == before


def test_null_cursor_values(env: SyncEnv) -> None:
    _seed(env)
    before = _first_sync(env)
    _good_changes(env)
    with env.source() as conn:
        conn.execute("UPDATE orders SET updated_at = NULL WHERE id IN (7, 8)")

    with pytest.raises(
        DataError,
        match=r"^\[sync='orders' table='orders' column='updated_at' key=\(id=[78]\) rule=cursor not null\] "
        r"2 row\(s\) have a NULL cursor and would never be synced incrementally \(example keys: ",
    ) as info:
        env.sync(SPEC, run_id="bad")
    assert "{'id': 7}" in str(info.value) and "{'id': 8}" in str(info.value)
    assert _snapshot(env) == before

    with env.source() as conn:
        conn.execute("UPDATE orders SET updated_at = clock_timestamp() WHERE id IN (7, 8)")
    _assert_recovers(env, updated=32)
    _assert_target_equals_source(env)


def test_unreadable_sqlite_cursor(env: SyncEnv, tmp_path: Path) -> None:
    """SQLite stores DATETIME as free text: a value it cannot read as a time is refused like a NULL
    (it would otherwise never be extracted, silently)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'source.db'}", poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, sku TEXT, updated_at DATETIME)")
        conn.exec_driver_sql(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 150) "
            "INSERT INTO orders SELECT n, 'S' || n, datetime('2024-01-01', '+' || n || ' minutes') FROM g"
        )
    with env.target() as target:
        assert run_sync(engine, target, SPEC, staging=env.staging, run_id="first")[1].inserted == 150
    before = _snapshot(env)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO orders VALUES (151, 'new', datetime('2024-02-01'))")
        conn.exec_driver_sql("UPDATE orders SET updated_at = 'yesterday-ish' WHERE id = 99")

    with (
        env.target() as target,
        pytest.raises(
            DataError,
            match=r"^\[sync='orders' table='orders' column='updated_at' key=\(id=99\) rule=cursor not null\] "
            r"1 row\(s\) have a NULL \(or unreadable\) cursor",
        ),
    ):
        run_sync(engine, target, SPEC, staging=env.staging, run_id="bad")
    assert _snapshot(env) == before


# --------------------------------------------------------------------------- environment and code


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("driver", ["postgresql+psycopg", "mysql+pymysql"])
def test_unreachable_source(env: SyncEnv, driver: str) -> None:
    _seed(env)
    before = _first_sync(env)
    engine = sa.create_engine(f"{driver}://sync@127.0.0.1:{_closed_port()}/shop", poolclass=sa.NullPool)

    with (
        env.target() as target,
        pytest.raises(
            SourceUnavailableError, match=r"^\[sync='orders' table='orders'\] cannot reach the source database: "
        ),
    ):
        run_sync(engine, target, SPEC, staging=env.staging, run_id="bad")
    assert _snapshot(env) == before


def test_target_lost_during_the_load(env: SyncEnv) -> None:
    """A target connection terminated before the load is a TargetUnavailableError (retryable, and
    not a *source* error); the retry applies the batch."""
    _seed(env)
    before = _first_sync(env)
    _good_changes(env)
    engine = env.source_engine
    try:
        with env.target() as target:
            manifest = extract_for(engine, target, SPEC, staging=env.staging, run_id="lost")
            with env.target() as killer:
                killer.execute("SELECT pg_terminate_backend(%s)", (target.info.backend_pid,))
            lost_message = r"^\[sync='orders' table='public\.orders'\] the target connection was lost"
            with pytest.raises(TargetUnavailableError, match=lost_message) as lost:
                load_manifest(target, manifest, run_id="lost")
    finally:
        engine.dispose()
    assert isinstance(lost.value, UnavailableError) and not isinstance(lost.value, SourceUnavailableError)
    assert _snapshot(env) == before
    _assert_recovers(env)


def _failing_on_batch(number: int) -> Callable[[pd.DataFrame], pd.DataFrame]:
    calls = 0

    def explode(batch: pd.DataFrame) -> pd.DataFrame:
        nonlocal calls
        calls += 1
        if calls == number:
            raise ValueError(f"cannot price sku {batch['sku'].iloc[0]}")
        return batch

    return explode


def test_transform_that_raises(env: SyncEnv) -> None:
    _seed(env)
    before = _first_sync(env)
    _good_changes(env)  # 80 changed rows: two pages of 50

    with pytest.raises(
        SyncError,
        match=r"^\[sync='orders' table='orders'\] transform 'explode' failed on batch 2: ValueError: cannot price sku ",
    ):
        env.sync(SPEC.with_options(batch_rows=50), run_id="bad", transform=_failing_on_batch(2))
    assert _snapshot(env) == before
    staging_root = Path(env.staging.base_uri.removeprefix("file://"))
    assert not list(staging_root.rglob("*.parquet"))  # the half-written batch was discarded

    _assert_recovers(env)
