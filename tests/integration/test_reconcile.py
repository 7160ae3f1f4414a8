"""Reconciliation after the load: counts and keyed hash buckets source vs target, the exact differing
keys, a repair that touches only those keys (never the sync state), windows, soft deletes, other
source dialects, the append-only record, and the Airflow operator.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from airflow_sync_provider.core import ConfigurationError, SyncSpec, run_sync
from airflow_sync_provider.core import reconcile as reconcile_module
from airflow_sync_provider.core.reconcile import (
    ReconcileResult,
    ReconcileWindow,
    iter_differing_keys,
    limits,
    reconcile,
    repair,
    window_from_manifest,
)

from ..conftest import SyncEnv, mariadb_url, source_columns, table_checksum

BASE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
ITEMS = """CREATE TABLE items (
    id bigint PRIMARY KEY,
    name text,
    amount numeric(12, 2),
    ratio double precision,
    big numeric,
    payload jsonb,
    tags text[],
    created date,
    updated_at timestamptz NOT NULL
)"""


def _insert_items(conn: psycopg.Connection[Any], first: int, last: int) -> None:
    """Mixed types: unicode text with '' and NULLs, numeric, float, unbounded numeric, jsonb, arrays,
    dates; ``updated_at`` = BASE + id minutes (so windows select known ids)."""
    conn.execute(
        """INSERT INTO items SELECT g,
             CASE g %% 7 WHEN 0 THEN NULL WHEN 1 THEN '' ELSE 'naïve ' || g || E' 😀 中文\\n"q"' END,
             CASE WHEN g %% 11 = 0 THEN NULL ELSE (g * 1.37)::numeric(12, 2) END,
             CASE WHEN g %% 13 = 0 THEN NULL ELSE g / 7.0 END,
             CASE WHEN g %% 5 = 0 THEN NULL ELSE (g::numeric / 3)::numeric(40, 20) END,
             CASE WHEN g %% 17 = 0 THEN NULL ELSE jsonb_build_object(
               'n', g, 'f', g / 3.0, 'nested', jsonb_build_object('b', g %% 3, 'a', ARRAY[g, g + 1]), 's', 'ü') END,
             ARRAY['x' || g, NULL],
             date '2020-01-01' + g %% 1000,
             %s::timestamptz + g * interval '1 minute'
           FROM generate_series(%s::int, %s::int) g""",
        (BASE, first, last),
    )


def _items_source(env: SyncEnv, rows: int = 3000) -> None:
    with env.source() as conn:
        conn.execute(ITEMS)
        _insert_items(conn, 1, rows)


def _spec(**options: Any) -> SyncSpec:
    return SyncSpec(
        **{"sync_id": "items", "source_table": "items", "cursor_column": "updated_at", "batch_rows": 1000, **options}
    )


def _reconcile(env: SyncEnv, spec: SyncSpec, **options: Any) -> ReconcileResult:
    engine = env.source_engine
    try:
        with env.target() as target:
            return reconcile(engine, target, spec, staging=env.staging, **options)
    finally:
        engine.dispose()


def _repair(env: SyncEnv, spec: SyncSpec, result: ReconcileResult, run_id: str = "repair-1") -> Any:
    engine = env.source_engine
    try:
        with env.target() as target:
            return repair(engine, target, spec, result, run_id=run_id, staging=env.staging)
    finally:
        engine.dispose()


def _ids(keys: Any) -> list[Any]:
    return sorted(k["id"] for k in keys)


def _state(env: SyncEnv) -> tuple[Any, ...]:
    with env.target() as conn:
        row = conn.execute("SELECT * FROM _sync_state WHERE sync_id = 'items'").fetchone()
    assert row is not None
    return tuple(row)


def _synced_at(env: SyncEnv, table: str = "items") -> dict[Any, Any]:
    with env.target() as conn:
        return dict(conn.execute(f"SELECT id, _sync_synced_at FROM {table}").fetchall())


def _assert_target_equals_source(env: SyncEnv, table: str = "items") -> None:
    with env.source() as src, env.target() as tgt:
        columns = source_columns(src, table)
        assert table_checksum(tgt, table, columns, ["id"]) == table_checksum(src, table, columns, ["id"])


# --------------------------------------------------------------------------- the core


@pytest.mark.parametrize("method", ["sql", "python"])
def test_reconcile_reports_exactly_the_altered_keys_and_repair_fixes_only_them(env: SyncEnv, method: str) -> None:
    _items_source(env)
    spec = _spec()
    env.sync(spec)

    clean = _reconcile(env, spec, method=method)
    assert (clean.equal, clean.method, clean.source_count, clean.target_count) == (True, method, 3000, 3000)
    assert (clean.differing_buckets, clean.differing_keys, clean.keys_uri) == (0, 0, None)

    with env.target() as conn:
        conn.execute("UPDATE items SET amount = amount + 1 WHERE id = 17")
        conn.execute("UPDATE items SET payload = payload || '{\"n\": 0}', name = 'changed' WHERE id = 18")
        conn.execute("DELETE FROM items WHERE id = 42")
        conn.execute("INSERT INTO items (id, name, updated_at) VALUES (100000, 'extra ✓', now())")
    before_state = _state(env)
    before_synced = _synced_at(env)

    found = _reconcile(env, spec, method=method, run_id="check-1")
    assert not found.equal
    assert (found.source_count, found.target_count) == (3000, 3000)
    assert _ids(found.missing_in_target) == [42]
    assert _ids(found.extra_in_target) == [100000]
    assert _ids(found.different) == [17, 18]
    columns = {k["id"]: c for k, c in zip(found.different, found.different_columns, strict=True)}
    assert columns == {17: ("amount",), 18: ("name", "payload")}
    assert (found.missing_count, found.extra_count, found.different_count) == (1, 1, 2)
    assert 1 <= found.differing_buckets <= 4
    staged = sorted((k["id"], k[reconcile_module.KIND_COLUMN]) for k in iter_differing_keys(found))
    assert staged == [(17, "different"), (18, "different"), (42, "missing_in_target"), (100000, "extra_in_target")]
    message = found.describe()
    assert "3,000 rows" in message and "(id=42)" in message and "(id=17) [amount]" in message
    assert len(json.dumps(found.to_dict())) < 5_000

    fixed = _repair(env, spec, found)
    assert (fixed.keys, fixed.inserted, fixed.updated, fixed.deleted) == (4, 1, 2, 1)
    assert _state(env) == before_state  # the watermark (and everything else in the state) did not move
    after_synced = _synced_at(env)
    untouched = set(before_synced) - {17, 18, 100000}
    assert {k: after_synced[k] for k in untouched} == {k: before_synced[k] for k in untouched}
    assert after_synced[17] > before_synced[17] and 42 in after_synced and 100000 not in after_synced
    assert not Path(found.keys_uri.removeprefix("file://")).exists()  # type: ignore[union-attr]

    again = _reconcile(env, spec, method=method)
    assert again.equal and again.differing_buckets == 0
    _assert_target_equals_source(env)

    with env.target() as conn:
        records = conn.execute(
            "SELECT run_id, source_count, target_count, differing_buckets, missing_in_target, extra_in_target, "
            "different, repaired, differing_keys FROM _sync_reconciliations ORDER BY reconciliation_id"
        ).fetchall()
        assert [(r[0], r[4], r[5], r[6], r[7]) for r in records] == [
            ("manual", 0, 0, 0, False),
            ("check-1", 1, 1, 2, False),
            ("repair-1", 1, 1, 2, True),
            ("manual", 0, 0, 0, False),
        ]
        assert records[1][8]["missing_in_target"] == [{"id": 42}]
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("UPDATE _sync_reconciliations SET repaired = true")
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("DELETE FROM _sync_reconciliations")


def test_window_reconciliation_only_looks_at_the_window(env: SyncEnv) -> None:
    _items_source(env)
    spec = _spec()
    env.sync(spec)
    with env.target() as conn:
        conn.execute("UPDATE items SET name = 'inside' WHERE id IN (100, 499)")
        conn.execute("UPDATE items SET name = 'outside' WHERE id IN (49, 500, 2000)")

    window = (BASE + dt.timedelta(minutes=50), BASE + dt.timedelta(minutes=500))  # ids 50..499
    result = _reconcile(env, spec, window=window)
    assert (result.source_count, result.target_count) == (450, 450)
    assert _ids(result.different) == [100, 499] and result.missing_count == result.extra_count == 0
    assert result.window is not None and result.window["include_high"] is False
    assert "in window" in result.describe()
    whole = _reconcile(env, spec)
    assert _ids(whole.different) == [49, 100, 499, 500, 2000]

    # A manifest's window: new source rows after the first sync, then reconcile only what that run synced.
    with env.source() as conn:
        _insert_items(conn, 3001, 3100)
    manifest, load = env.sync(spec)
    assert load.inserted == 100
    synced = window_from_manifest(manifest)
    assert synced is not None and synced.low == BASE + dt.timedelta(minutes=3000) and not synced.include_high
    with env.target() as conn:
        conn.execute("UPDATE items SET name = 'drifted' WHERE id IN (10, 3050)")
    recent = _reconcile(env, spec, window=synced)
    assert (recent.source_count, recent.different_count) == (101, 1)  # 3000 (the low watermark) .. 3100
    assert _ids(recent.different) == [3050]
    assert window_from_manifest({"manifest": {**manifest.to_dict(), "mode": "full"}}) is None


def test_soft_deletes_composite_text_keys_and_repair_by_soft_delete(env: SyncEnv) -> None:
    with env.source() as conn:
        conn.execute("CREATE TABLE stock (region text, code uuid, qty int, note text, PRIMARY KEY (region, code))")
        conn.execute(
            "INSERT INTO stock SELECT 'r' || (g % 4), md5(g::text)::uuid, g, CASE WHEN g % 3 = 0 THEN NULL "
            "ELSE 'note ' || g END FROM generate_series(1, 400) g"
        )
        gone = conn.execute("SELECT region, code FROM stock WHERE qty = 7").fetchone()
        conn.execute("DELETE FROM stock WHERE qty = 7")
    assert gone is not None
    spec = SyncSpec(sync_id="stock", source_table="stock", mode="full", delete_mode="soft")
    env.sync(spec)
    with env.source() as conn:
        conn.execute("DELETE FROM stock WHERE qty = 8")
    env.sync(spec)  # row 8 is now soft-deleted in the target: absent, like row 7 that never arrived
    assert _reconcile(env, spec).equal

    with env.target() as conn:
        conn.execute("UPDATE stock SET _sync_deleted_at = now() WHERE qty = 9")  # "absent", source has it
        conn.execute("UPDATE stock SET qty = -10 WHERE qty = 10")
        conn.execute("INSERT INTO stock (region, code, qty) VALUES ('r9', %s, 999)", (uuid.uuid4(),))
    found = _reconcile(env, spec)
    assert (found.missing_count, found.different_count, found.extra_count) == (1, 1, 1)
    assert found.extra_in_target[0]["region"] == "r9"

    fixed = _repair(env, spec, found)
    assert (fixed.inserted, fixed.updated, fixed.deleted) == (0, 2, 1)  # 9 revived, 10 corrected, extra marked
    assert _reconcile(env, spec).equal
    with env.target() as conn:
        marked = conn.execute(
            "SELECT region, qty, _sync_run_id FROM stock WHERE _sync_deleted_at IS NOT NULL ORDER BY qty"
        ).fetchall()
    assert marked == [("r0", 8, "manual"), ("r9", 999, "repair-1")]


def test_delete_mode_none_keeps_extra_rows_and_says_so(env: SyncEnv) -> None:
    _items_source(env, rows=200)
    spec = _spec(mode="full", delete_mode="none")
    env.sync(spec)
    with env.target() as conn:
        conn.execute("INSERT INTO items (id, updated_at) VALUES (-1, now())")
        conn.execute("UPDATE items SET tags = '{}' WHERE id = 3")
    found = _reconcile(env, spec)
    assert (_ids(found.extra_in_target), _ids(found.different)) == ([-1], [3])
    fixed = _repair(env, spec, found)
    assert (fixed.updated, fixed.deleted, fixed.not_deleted) == (1, 0, 1)
    after = _reconcile(env, spec)
    assert (after.extra_count, after.different_count) == (1, 0)  # kept on purpose: the spec never deletes


def test_everything_missing_in_small_memory_groups(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Phase 2 in many bounded groups, keys staged in several Parquet row groups, the repair
    re-inserting the whole table by key (and creating it when it is gone)."""
    _items_source(env, rows=1500)
    spec = _spec(mode="full")
    env.sync(spec)
    monkeypatch.setattr(limits, "GROUP_ROWS", 100)
    monkeypatch.setattr(limits, "FETCH_ROWS", 200)
    monkeypatch.setattr(limits, "KEYS_PER_QUERY", 70)
    with env.target() as conn:
        conn.execute("DELETE FROM items WHERE id % 2 = 0")
    for method in ("sql", "python"):
        found = _reconcile(env, spec, method=method, max_keys_reported=3)
        assert (found.missing_count, found.target_count, len(found.missing_in_target)) == (750, 750, 3)
        assert found.differing_buckets > 200
        assert sorted(k["id"] for k in iter_differing_keys(found)) == list(range(2, 1501, 2))
    assert _repair(env, spec, found).inserted == 750
    assert _reconcile(env, spec).equal

    with env.target() as conn:
        conn.execute("DROP TABLE items")
    missing = _reconcile(env, spec)
    assert (missing.target_count, missing.missing_count) == (0, 1500)
    assert _repair(env, spec, missing).inserted == 1500
    _assert_target_equals_source(env)


def test_sqlite_source_reconciles_equal_across_dialects(env: SyncEnv, tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'source.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, weight REAL, price NUMERIC(12, 2), "
            "born DATE, payload BLOB, doc JSON, flag BOOLEAN, updated_at DATETIME NOT NULL)"
        )
    table = sa.Table("items", sa.MetaData(), autoload_with=engine)
    weights = [0.1, 1 / 3, 1e-300, 1.7976931348623157e308, -0.0, None, float("inf"), 5e-324]
    docs = ['{"b": 1, "a": [1.0, 2, {"z": null, "y": "ü"}]}', '{"n": 1e2, "s": "x"}', None, "[]", '"text"']
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {
                    "id": i,
                    "name": [None, "", "ünïcödé 😀", "line\nbreak", "中文"][i % 5],
                    "weight": weights[i % len(weights)],
                    "price": None if i % 9 == 0 else str(Decimal(i) / 4),
                    "born": None if i % 11 == 0 else dt.date(1, 1, 1) + dt.timedelta(days=i * 2903),
                    "payload": None if i % 4 == 0 else bytes(range(i % 256)),
                    "doc": docs[i % len(docs)],
                    "flag": [True, False, None][i % 3],
                    "updated_at": dt.datetime(2024, 1, 1, 8) + dt.timedelta(seconds=i * 37, microseconds=i * 7919),
                }
                for i in range(1, 301)
            ],
        )
    # CURRENT_TIMESTAMP-style text (no fractional seconds) must compare equal too
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE items SET updated_at = '2024-02-01 10:00:00' WHERE id = 5")
    spec = SyncSpec(sync_id="sqlite_items", source_table="items", cursor_column="updated_at", batch_rows=100)
    try:
        with env.target() as target:
            run_sync(engine, target, spec, staging=env.staging)
            result = reconcile(engine, target, spec, staging=env.staging)
            assert (result.equal, result.method, result.source_count) == (True, "python", 300)
            window = reconcile(engine, target, spec, staging=env.staging, window=(dt.datetime(2024, 2, 1, 10), None))
            assert (window.equal, window.source_count) == (True, 1)  # the text-stamped row, by strftime

            target.execute("UPDATE items SET doc = '{\"a\": 2}', weight = weight + 1 WHERE id = 9")
            target.execute("DELETE FROM items WHERE id = 7")
            found = reconcile(engine, target, spec, staging=env.staging)
            assert (_ids(found.different), _ids(found.missing_in_target)) == ([9], [7])
            assert found.different_columns == (("weight", "doc"),)
            fixed = repair(engine, target, spec, found, run_id="fix", staging=env.staging)
            assert (fixed.inserted, fixed.updated) == (1, 1)
            assert reconcile(engine, target, spec, staging=env.staging).equal
    finally:
        engine.dispose()


def test_mariadb_source_reconciles_equal(env: SyncEnv) -> None:
    url = mariadb_url()
    if url is None:
        pytest.skip("MariaDB not reachable on 127.0.0.1:3306 (root, no password) or no PyMySQL")
    name = f"sync_reconcile_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, poolclass=sa.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    engine = sa.create_engine(f"{url}/{name}?charset=utf8mb4", poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE items (id BIGINT PRIMARY KEY, name VARCHAR(50), price DECIMAL(12, 2), weight DOUBLE, "
                "doc JSON, status ENUM('new', 'done'), payload BLOB, updated_at DATETIME(6) NOT NULL)"
            )
            conn.exec_driver_sql(
                "INSERT INTO items VALUES (1, 'ünï 😀', 12.5, 0.1, '{\"b\": 1, \"a\": [1.0, 2]}', 'new', x'00ff', "
                "'2024-01-01 00:00:00.123456'), (2, NULL, NULL, NULL, NULL, NULL, NULL, '2024-01-02 00:00:00'), "
                "(3, '', -0.01, 1e300, '[]', 'done', '', '2024-01-03 00:00:00')"
            )
        spec = SyncSpec(sync_id="maria_items", source_table="items", cursor_column="updated_at")
        with env.target() as target:
            run_sync(engine, target, spec, staging=env.staging)
            result = reconcile(engine, target, spec, staging=env.staging)
            assert (result.equal, result.method, result.source_count) == (True, "python", 3)
            target.execute('UPDATE items SET doc = \'{"a": [1, 2], "b": 2}\' WHERE id = 1')
            assert _ids(reconcile(engine, target, spec, staging=env.staging).different) == [1]
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


def test_sql_method_is_refused_where_it_could_disagree(env: SyncEnv) -> None:
    with env.source() as conn:
        conn.execute("CREATE TYPE mood AS ENUM ('ok', 'sad')")
        conn.execute("CREATE TABLE moods (id int PRIMARY KEY, mood mood)")
        conn.execute("INSERT INTO moods VALUES (1, 'ok'), (2, 'sad'), (3, NULL)")
    spec = SyncSpec(sync_id="moods", source_table="moods", mode="full")
    env.sync(spec)
    auto = _reconcile(env, spec)
    assert (auto.equal, auto.method) == (True, "python")  # enum -> text in the target: no server-side hashing
    with pytest.raises(ConfigurationError, match=r"method='sql' is not possible.*'mood'"):
        _reconcile(env, spec, method="sql")
    with pytest.raises(ConfigurationError, match="cursor_column"):
        _reconcile(env, spec, window=(1, 2))


def test_reconcile_100k_rows_timing(env: SyncEnv) -> None:
    _items_source(env, rows=100_000)
    spec = _spec(batch_rows=50_000)
    env.sync(spec)
    timings = {}
    for method in ("sql", "python"):
        started = time.monotonic()
        result = _reconcile(env, spec, method=method)
        timings[method] = time.monotonic() - started
        assert result.equal and result.source_count == 100_000
    print(
        f"\nreconcile 100k rows (8 columns incl. numeric, jsonb, text[]): "
        f"sql hashing {timings['sql']:.2f} s, python hashing {timings['python']:.2f} s"
    )


# --------------------------------------------------------------------------- the operator


@pytest.fixture
def connections(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> SyncEnv:
    port = env.server.port
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_SOURCE", f"postgres://postgres@127.0.0.1:{port}/{env.source_db}")
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_TARGET", f"postgres://postgres@127.0.0.1:{port}/{env.target_db}")
    monkeypatch.setenv("SYNC_STAGING_DIR", str(Path(env.staging.base_uri.removeprefix("file://"))))
    _items_source(env, rows=2000)
    return env


def test_operator_fails_with_a_clear_message_and_repairs_on_request(connections: SyncEnv) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_sync_provider.operators.reconcile import ReconcileOperator
    from airflow_sync_provider.operators.sync import SyncTableOperator

    declaration = {
        "source_conn_id": "sync_source",
        "target_conn_id": "sync_target",
        "sync_id": "items",
        "source_table": "items",
        "cursor_column": "updated_at",
    }
    synced = SyncTableOperator(task_id="sync", **declaration).execute({"run_id": "run-1"})  # type: ignore[arg-type]
    assert ReconcileOperator(task_id="check", **declaration).execute({"run_id": "run-1"})["equal"]  # type: ignore[arg-type]

    with connections.target() as conn:
        conn.execute("UPDATE items SET ratio = -1 WHERE id = 1234")
        conn.execute("DELETE FROM items WHERE id = 77")
    state = _state(connections)
    with pytest.raises(AirflowFailException) as failure:
        ReconcileOperator(task_id="check", **declaration).execute({"run_id": "run-2"})  # type: ignore[arg-type]
    message = str(failure.value)
    assert "sync 'items'" in message and "public.items has 1,999" in message and "2,000 rows" in message
    assert "(id=77)" in message and "(id=1234) [ratio]" in message and "repair=True" in message

    quiet = ReconcileOperator(task_id="check", fail_on_difference=False, **declaration)
    output = quiet.execute({"run_id": "run-3"})  # type: ignore[arg-type]
    assert (output["equal"], output["differing_keys"], output["repaired"]) == (False, 2, False)
    assert "keys_uri" not in output and len(json.dumps(output)) < 5_000

    # Window from the sync task's XCom: the first sync covered everything below its upper bound.
    windowed = ReconcileOperator(task_id="check", window_from_manifest=json.dumps(synced), repair=True, **declaration)
    fixed = windowed.execute({"run_id": "run-4"})  # type: ignore[arg-type]
    assert fixed["equal"] and fixed["repaired"] and fixed["window"] is not None
    assert fixed["before_repair"]["differing_keys"] == 2
    assert (fixed["repair"]["inserted"], fixed["repair"]["updated"]) == (1, 1)
    assert _state(connections) == state
    _assert_target_equals_source(connections)
    staged = Path(connections.staging.base_uri.removeprefix("file://")) / "items"
    assert not staged.exists() or not any(staged.iterdir())  # no differing-keys files left behind


def test_operator_is_registered_and_templated() -> None:
    from airflow_sync_provider.get_provider_info import get_provider_info
    from airflow_sync_provider.operators.reconcile import ReconcileOperator, parse_window_manifest

    modules = get_provider_info()["operators"][0]["python-modules"]
    assert "airflow_sync_provider.operators.reconcile" in modules
    assert {"window_from_manifest", "sync_id", "source_table"} <= set(ReconcileOperator.template_fields)
    manifest = {"mode": "incremental", "cursor_column": "n", "watermark_low": [5, 1], "watermark_high": [9, 3]}
    assert parse_window_manifest(repr(manifest)) == ReconcileWindow(5, 9, include_high=True)
