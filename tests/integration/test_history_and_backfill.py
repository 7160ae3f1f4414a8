"""SCD type 2 history kept with the merge, and backfill windows that never move the watermark."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_sync_provider.core import SyncSpec
from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.operators.sync import backfill_window

from ..conftest import SyncEnv

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def _customers(env: SyncEnv, rows: int = 200) -> None:
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE customers (id int PRIMARY KEY, email text, segment text, profile jsonb, "
            "updated_at timestamptz NOT NULL)"
        )
        conn.execute(
            "INSERT INTO customers SELECT g, 'c' || g || '@bank.example', 'retail', jsonb_build_object('n', g), "
            "%s + g * interval '1 hour' FROM generate_series(1, %s) g",
            (T0, rows),
        )


def _history(env: SyncEnv, key: int) -> list[tuple[Any, ...]]:
    with env.target() as conn:
        return conn.execute(
            "SELECT email, _is_current, _valid_to IS NULL, _sync_deleted FROM customers_history "
            "WHERE id = %s ORDER BY _valid_from",
            (key,),
        ).fetchall()


def test_scd2_history_opens_and_closes_versions_with_the_merge(env: SyncEnv) -> None:
    _customers(env)
    spec = SyncSpec(
        sync_id="customers",
        source_table="customers",
        cursor_column="updated_at",
        detect_deletes=True,
        history_table="customers_history",
    )
    env.sync(spec)
    with env.source() as conn:
        conn.execute("UPDATE customers SET email = 'new1@bank.example', updated_at = now() WHERE id = 1")
        conn.execute('UPDATE customers SET profile = \'{"n": 2, "vip": true}\', updated_at = now() WHERE id = 2')
        conn.execute("UPDATE customers SET segment = segment WHERE id = 3")  # not re-extracted: no new version
        conn.execute("DELETE FROM customers WHERE id = 4")
        conn.execute("INSERT INTO customers VALUES (1000, 'late@bank.example', 'sme', '{}', now())")
    env.sync(spec)
    env.sync(spec)  # no changes: the history must not grow

    assert _history(env, 1) == [("c1@bank.example", False, False, False), ("new1@bank.example", True, True, False)]
    assert len(_history(env, 2)) == 2
    assert _history(env, 3) == [("c3@bank.example", True, True, False)]
    assert _history(env, 4) == [("c4@bank.example", False, False, True)]
    assert _history(env, 1000) == [("late@bank.example", True, True, False)]
    with env.target() as conn:
        current = conn.execute(
            "SELECT count(*), count(DISTINCT id) FROM customers_history WHERE _is_current"
        ).fetchone()
        assert current == (200, 200)  # 200 initial - 1 deleted + 1 new, one current version each
        total = conn.execute("SELECT count(*) FROM customers_history").fetchone()
        assert total == (203,)
        # the database itself refuses a second current version of a key
        with pytest.raises(Exception, match="one_current"):
            conn.execute(
                "INSERT INTO customers_history (id, email, _valid_from, _is_current) VALUES (1, 'x', now(), true)"
            )
        # the current versions equal the target table
        cols = "id, email, segment, profile::text, updated_at"
        target_rows = conn.execute(f"SELECT {cols} FROM customers ORDER BY id").fetchall()
        current_rows = conn.execute(f"SELECT {cols} FROM customers_history WHERE _is_current ORDER BY id").fetchall()
    assert target_rows == current_rows and len(target_rows) == 200


def test_scd2_history_rolls_back_with_a_failed_load(env: SyncEnv) -> None:
    _customers(env, rows=20)
    spec = SyncSpec(sync_id="customers", source_table="customers", cursor_column="updated_at", history_table="h")
    env.sync(spec)
    with env.source() as conn:
        conn.execute("UPDATE customers SET email = 'changed', updated_at = now() WHERE id = 5")
    with env.target() as conn:  # make the merge fail after the history was written
        conn.execute("ALTER TABLE customers ADD CONSTRAINT no_changed CHECK (email <> 'changed')")
    with pytest.raises(Exception, match="no_changed"):
        env.sync(spec)
    with env.target() as conn:
        assert conn.execute("SELECT count(*) FROM h").fetchone() == (20,)
        conn.execute("ALTER TABLE customers DROP CONSTRAINT no_changed")
    env.sync(spec)
    with env.target() as conn:
        assert conn.execute("SELECT count(*), count(*) FILTER (WHERE _is_current) FROM h").fetchone() == (21, 20)


def test_backfill_window_resyncs_only_that_window_and_keeps_the_watermark(env: SyncEnv) -> None:
    _customers(env, rows=100)  # updated_at = T0 + id hours
    spec = SyncSpec(sync_id="customers", source_table="customers", cursor_column="updated_at")
    env.sync(spec)
    version, watermark, _ = env.state("customers") or (None, None, None)

    # Damage the target in and out of the window, and change the source in the window without
    # moving its cursor (the classic reason to backfill: a fix applied to history).
    with env.target() as conn:
        conn.execute("UPDATE customers SET email = 'damaged' WHERE id IN (10, 20, 60)")
        conn.execute("DELETE FROM customers WHERE id = 30")
    with env.source() as conn:
        conn.execute("UPDATE customers SET segment = 'corrected' WHERE id BETWEEN 11 AND 40")
    window = (T0 + dt.timedelta(hours=10), T0 + dt.timedelta(hours=41))  # ids 10..40

    for _ in range(2):  # idempotent: the second run changes nothing
        manifest, result = env.sync(spec, window=window)
    assert manifest.rows == 31 and result.status == "backfilled"
    assert (result.inserted, result.updated) == (0, 0)
    assert env.state("customers") == (version, watermark, env.state("customers")[2])  # type: ignore[index]
    with env.target() as conn:
        rows = dict(conn.execute("SELECT id, email || '/' || segment FROM customers").fetchall())
        ledger = conn.execute(
            "SELECT mode, status, rows_staged FROM _sync_audit WHERE sync_id = 'customers' ORDER BY entry_id"
        ).fetchall()
    assert rows[10] == "c10@bank.example/retail" and rows[20] == "c20@bank.example/corrected"
    assert rows[30] == "c30@bank.example/corrected"  # re-inserted
    assert rows[60] == "damaged/retail"  # outside the window: untouched
    assert rows[41] == "c41@bank.example/retail"  # the window's end is exclusive
    assert ledger[1:] == [("backfill", "backfilled", 31), ("backfill", "backfilled", 31)]

    # a live run afterwards continues from the unchanged watermark
    with env.source() as conn:
        conn.execute("UPDATE customers SET email = 'live', updated_at = now() WHERE id = 99")
    _, live = env.sync(spec)
    assert live.status == "applied" and live.updated == 1 and live.version == version + 1


def test_backfill_never_overwrites_a_newer_row(env: SyncEnv) -> None:
    _customers(env, rows=10)
    spec = SyncSpec(sync_id="customers", source_table="customers", cursor_column="updated_at")
    env.sync(spec)
    window = (T0, T0 + dt.timedelta(days=1))
    # The backfill reads row 5 at its old version; then a live run commits a newer one first.
    from airflow_sync_provider.core.load import load_manifest
    from airflow_sync_provider.core.sync import extract_for

    engine = env.source_engine
    with env.target() as target:
        stale = extract_for(engine, target, spec, staging=env.staging, run_id="backfill", window=window)
    with env.source() as conn:
        conn.execute("UPDATE customers SET email = 'newer', updated_at = now() WHERE id = 5")
    env.sync(spec)
    with env.target() as target:
        result = load_manifest(target, stale, run_id="backfill")
    engine.dispose()
    assert result.status == "backfilled"
    with env.target() as conn:
        assert conn.execute("SELECT email FROM customers WHERE id = 5").fetchone() == ("newer",)


def test_backfill_window_needs_a_cursor(env: SyncEnv) -> None:
    _customers(env, rows=3)
    spec = SyncSpec(sync_id="customers_full", source_table="customers", mode="full")
    with pytest.raises(ConfigurationError, match="backfill window needs an incremental sync"):
        env.sync(spec, window=(T0, T0 + dt.timedelta(days=1)))


class _Run:
    def __init__(self, run_type: str, conf: dict[str, Any] | None = None) -> None:
        self.run_type, self.conf = run_type, conf or {}


def test_backfill_window_comes_from_the_run() -> None:
    start, end = T0, T0 + dt.timedelta(hours=1)
    live: Any = {"dag_run": _Run("scheduled"), "data_interval_start": start, "data_interval_end": end}
    assert backfill_window(live, "s") is None
    backfill: Any = {"dag_run": _Run("backfill"), "data_interval_start": start, "data_interval_end": end}
    assert backfill_window(backfill, "s") == (start, end)
    manual: Any = {"dag_run": _Run("manual", {"window_start": "2026-01-01T00:00:00+00:00", "window_end": "2026-01-02"})}
    utc = dt.UTC
    assert backfill_window(manual, "s") == (dt.datetime(2026, 1, 1, tzinfo=utc), dt.datetime(2026, 1, 2, tzinfo=utc))
    zero: Any = {"dag_run": _Run("backfill"), "data_interval_start": start, "data_interval_end": start}
    with pytest.raises(ConfigurationError, match="CronDataIntervalTimetable"):
        backfill_window(zero, "s")
    assert AirflowFailException  # the operators turn ConfigurationError into a no-retry failure
