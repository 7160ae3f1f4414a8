"""Hostile identifiers through every optional feature that issues SQL.

``test_identifiers_and_keys.py`` and ``test_hostile_input.py`` sync plain tables with odd schema,
table and column names.  Here the same kind of names (a double quote, ``%`` as in ``%s``,
``%(x)s`` and ``%c``, surrounding blanks, backslashes, unicode, SQL keywords) go through SCD2
history (incl. deletes closing versions), soft deletes, reconciliation and repair, quarantine and
replay, backfill windows, schema drift ``evolve`` and CDC.  psycopg parses ``%`` placeholders in
the whole text of a query run with parameters, identifiers included, so every statement that
binds a value is a place where such a name can break.  Each test asserts the target equals the
source (or the feature's effect) over a small table.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from airflow_sync_provider.core import DataError, SyncError, SyncSpec, extract_for, load_manifest
from airflow_sync_provider.core.cdc import CdcSpec
from airflow_sync_provider.core.quality import QUARANTINE_TABLE, QualityError, replay_quarantined, validate_manifest
from airflow_sync_provider.core.reconcile import reconcile, repair
from airflow_sync_provider.core.references import Reference, check_references

from ..conftest import CdcEnv, SyncEnv, source_columns

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
ROWS = 20


@dataclass(frozen=True)
class Names:
    """A schema, a table and its four columns (key, text value, number, cursor), all hostile."""

    slug: str
    schema: str
    table: str
    key: str
    value: str
    number: str
    cursor: str

    @property
    def target_schema(self) -> str:
        return self.schema + " tgt"

    @property
    def history(self) -> str:
        return self.table + " hist"

    @property
    def columns(self) -> list[str]:
        return [self.key, self.value, self.number, self.cursor]


NAMES = {
    "double quote": Names("quote", 'S "q"', 'T "q"', 'i"d', '"v"', 'n"um', 'u"pd'),
    "percent": Names("percent", "100% %s", "rate %(x)s %c", "id %(k)s", "a%c", "n %s", "u%"),
    "blanks": Names("blanks", " s p ", " t ", " id ", "v ", " n", " up dated "),
    "backslash": Names("backslash", "b\\s", "t\\", "i\\d", "v\\", "\\n", "u\\d"),
    "unicode": Names("unicode", "Ünï 😀", "täblé ✓", "ïd", "välue 😀", "nüm", "üpdated"),
    "keywords": Names("keywords", "select", "table", "select", "from", "where", "order"),
}


def _expectations() -> Any:
    """GX's expectations, imported when a test needs them (the import takes seconds)."""
    import great_expectations

    return great_expectations.expectations


def _for_each(subtests: pytest.Subtests, check: Callable[[Names], None]) -> None:
    """``check`` every set of names, each in its own subtest (and schemas: one pair of databases serves all)."""
    for case, names in NAMES.items():
        with subtests.test(case):
            check(names)


def _create(env: SyncEnv, n: Names) -> None:
    """ROWS rows: key g, value 'v<g>', number g * 1.5, cursor T0 + g hours (no query parameters:
    a ``%`` in a name must not meet the placeholder parser in the test's own statements)."""
    with env.source() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(n.schema)))
        conn.execute(
            sql.SQL("CREATE TABLE {} ({} int PRIMARY KEY, {} text, {} numeric(10,2), {} timestamptz NOT NULL)").format(
                sql.Identifier(n.schema, n.table), *map(sql.Identifier, n.columns)
            )
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT g, 'v' || g, g * 1.5, {} + g * interval '1 hour' FROM generate_series(1, {}) g"
            ).format(sql.Identifier(n.schema, n.table), sql.Literal(T0), sql.Literal(ROWS))
        )


def _source(env: SyncEnv, n: Names, statement: str, **parts: sql.Composable) -> None:
    """Run ``statement`` on the source; ``{t}``, ``{k}``, ``{v}``, ``{n}``, ``{u}`` name the table and columns."""
    with env.source() as conn:
        conn.execute(_format(n, statement, **parts))


def _target(env: SyncEnv, n: Names, statement: str, **parts: sql.Composable) -> Any:
    with env.target() as conn:
        return conn.execute(_format(n, statement, **parts)).fetchall()


def _format(n: Names, statement: str, **parts: sql.Composable) -> sql.Composed:
    return sql.SQL(statement).format(
        t=sql.Identifier(n.schema, n.table),
        tt=sql.Identifier(n.target_schema, n.table),
        h=sql.Identifier(n.target_schema, n.history),
        k=sql.Identifier(n.key),
        v=sql.Identifier(n.value),
        n=sql.Identifier(n.number),
        u=sql.Identifier(n.cursor),
        **parts,
    )


def _checksum(
    conn: psycopg.Connection[Any], schema: str, table: str, columns: list[str], key: str, where: str = "true"
) -> tuple[int, str]:
    """(row count, md5 of the rows' text in key order) of the rows ``where`` selects."""
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), md5(coalesce(string_agg(({cols})::text, E'\\n' ORDER BY {key}), '')) FROM {t} WHERE {w}"
        ).format(
            cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
            key=sql.Identifier(key),
            t=sql.Identifier(schema, table),
            w=sql.SQL(where),
        )
    ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def _assert_same(env: SyncEnv, n: Names, target_where: str = "true", target_table: str | None = None) -> int:
    with env.source() as src, env.target() as tgt:
        columns = source_columns(src, n.table, n.schema)
        source = _checksum(src, n.schema, n.table, columns, n.key)
        target = _checksum(tgt, n.target_schema, target_table or n.table, columns, n.key, target_where)
    assert target == source
    return source[0]


def _spec(n: Names, **options: Any) -> SyncSpec:
    options = {"sync_id": "hostile", "cursor_column": n.cursor, "batch_rows": 7, **options}
    return SyncSpec(source_schema=n.schema, source_table=n.table, target_schema=n.target_schema, **options)


def _at(hours: int) -> sql.Literal:
    return sql.Literal(T0 + dt.timedelta(hours=hours))


# --------------------------------------------------------------------------- SCD2 history


def test_history_opens_and_closes_versions(env: SyncEnv, subtests: pytest.Subtests) -> None:
    _for_each(subtests, lambda n: _history_opens_and_closes_versions(env, n))


def _history_opens_and_closes_versions(env: SyncEnv, n: Names) -> None:
    _create(env, n)
    spec = _spec(n, history_table=n.history, detect_deletes=True)
    assert env.sync(spec, run_id="r1")[1].inserted == ROWS
    _source(env, n, "UPDATE {t} SET {v} = 'changed', {u} = {at} WHERE {k} <= 3", at=_at(100))
    _source(env, n, "DELETE FROM {t} WHERE {k} IN (10, 11)")
    _, second = env.sync(spec, run_id="r2")
    assert (second.updated, second.deleted) == (3, 2)
    _assert_same(env, n)

    versions = _target(
        env,
        n,
        "SELECT count(*), count(*) FILTER (WHERE _is_current), count(*) FILTER (WHERE _sync_deleted), "
        "count(*) FILTER (WHERE _sync_closed_run_id = 'r2') FROM {h}",
    )
    assert versions == [(ROWS + 3, ROWS - 2, 2, 5)]
    # The current versions are the target table.
    with env.target() as conn:
        assert _checksum(conn, n.target_schema, n.history, n.columns, n.key, "_is_current") == _checksum(
            conn, n.target_schema, n.table, n.columns, n.key
        )
    assert env.sync(spec, run_id="r3")[1].inserted == 0  # nothing changed: no version opened or closed
    assert _target(env, n, "SELECT count(*) FROM {h}") == [(ROWS + 3,)]


def test_history_tables_with_long_names_sharing_a_prefix(env: SyncEnv) -> None:
    """Each history table gets its own one-current index, however long its (unicode) name."""
    n = NAMES["unicode"]
    _create(env, n)
    prefix = "ü" * 5 + " history" * 5  # 45 characters, 50 bytes
    for suffix in ("a", "b"):
        spec = _spec(n, sync_id=f"long_{suffix}", target_table=f"t {suffix}", history_table=prefix + suffix)
        assert env.sync(spec, run_id="r1")[1].inserted == ROWS
        assert _target(
            env, n, "SELECT count(*) FROM {x} WHERE _is_current", x=sql.Identifier(n.target_schema, prefix + suffix)
        ) == [(ROWS,)]


# --------------------------------------------------------------------------- soft deletes


def test_soft_deletes_mark_rows_and_repair_soft_deletes(env: SyncEnv, subtests: pytest.Subtests) -> None:
    _for_each(subtests, lambda n: _soft_deletes_mark_rows_and_repair_soft_deletes(env, n))


def _soft_deletes_mark_rows_and_repair_soft_deletes(env: SyncEnv, n: Names) -> None:
    _create(env, n)
    spec = _spec(n, mode="full", cursor_column=None, delete_mode="soft")
    env.sync(spec, run_id="r1")
    _source(env, n, "DELETE FROM {t} WHERE {k} <= 3")
    _source(env, n, "UPDATE {t} SET {v} = 'changed' WHERE {k} = 4")
    assert env.sync(spec, run_id="r2")[1].deleted == 3
    assert _target(env, n, "SELECT count(*) FROM {tt} WHERE _sync_deleted_at IS NOT NULL") == [(3,)]
    _assert_same(env, n, "_sync_deleted_at IS NULL")
    _source(env, n, "INSERT INTO {t} VALUES (2, 'back', 1, {at})", at=_at(0))  # a re-insert clears the mark
    env.sync(spec, run_id="r3")
    _assert_same(env, n, "_sync_deleted_at IS NULL")

    # Reconciliation skips soft-deleted rows; the repair soft-deletes what the source lacks.
    _target(env, n, "INSERT INTO {tt} ({k}, {v}, {u}) VALUES (99, 'extra', {at}) RETURNING 1", at=_at(0))
    _target(env, n, "UPDATE {tt} SET {v} = 'damaged' WHERE {k} = 5 RETURNING 1")
    found = _reconcile(env, spec)
    assert (found.extra_count, found.different_count, found.missing_count) == (1, 1, 0)
    _repair(env, spec, found)
    assert _reconcile(env, spec).equal
    _assert_same(env, n, "_sync_deleted_at IS NULL")
    assert _target(env, n, "SELECT _sync_deleted_at IS NOT NULL FROM {tt} WHERE {k} = 99") == [(True,)]


# --------------------------------------------------------------------------- reconcile and repair


def _reconcile(env: SyncEnv, spec: SyncSpec, **options: Any) -> Any:
    engine = env.source_engine
    try:
        with env.target() as target:
            return reconcile(engine, target, spec, staging=env.staging, **options)
    finally:
        engine.dispose()


def _repair(env: SyncEnv, spec: SyncSpec, result: Any) -> Any:
    engine = env.source_engine
    try:
        with env.target() as target:
            return repair(engine, target, spec, result, run_id="repair", staging=env.staging)
    finally:
        engine.dispose()


def test_reconcile_finds_and_repair_fixes_differences(env: SyncEnv, subtests: pytest.Subtests) -> None:
    _for_each(subtests, lambda n: _reconcile_finds_and_repair_fixes_differences(env, n))


def _reconcile_finds_and_repair_fixes_differences(env: SyncEnv, n: Names) -> None:
    _create(env, n)
    spec = _spec(n)
    env.sync(spec, run_id="r1")
    assert _reconcile(env, spec).equal
    _target(env, n, "UPDATE {tt} SET {v} = 'damaged' WHERE {k} = 1 RETURNING 1")
    _target(env, n, "DELETE FROM {tt} WHERE {k} = 2 RETURNING 1")
    _target(env, n, "INSERT INTO {tt} ({k}, {v}, {u}) VALUES (99, 'extra', {at}) RETURNING 1", at=_at(5))
    for method in ("sql", "python"):
        found = _reconcile(env, spec, method=method, buckets=4)
        assert (found.method, found.missing_count, found.extra_count, found.different_count) == (method, 1, 1, 1)
        assert [k[n.key] for k in found.different] == [1]
    windowed = _reconcile(env, spec, window=(T0, T0 + dt.timedelta(hours=3)), method="sql")
    assert (windowed.missing_count, windowed.different_count, windowed.extra_count) == (1, 1, 0)
    fixed = _repair(env, spec, found)
    assert (fixed.inserted, fixed.updated, fixed.deleted) == (1, 1, 1)
    assert _reconcile(env, spec).equal
    _assert_same(env, n)


# --------------------------------------------------------------------------- quarantine and replay


def test_quarantine_and_replay(env: SyncEnv, subtests: pytest.Subtests) -> None:
    _for_each(subtests, lambda n: _quarantine_and_replay(env, n))


def _quarantine_and_replay(env: SyncEnv, n: Names) -> None:
    _create(env, n)
    _source(env, n, "UPDATE {t} SET {n} = -1 WHERE {k} IN (4, 9)")
    _source(env, n, "UPDATE {t} SET {v} = NULL WHERE {k} = 12")
    spec = _spec(n)
    suite = [
        _expectations().ExpectColumnValuesToBeBetween(column=n.number, min_value=0),
        _expectations().ExpectColumnValuesToNotBeNull(column=n.value),
    ]
    engine = env.source_engine
    try:
        with env.target() as target:
            manifest = extract_for(engine, target, spec, staging=env.staging, run_id="r1")
            gate = validate_manifest(
                manifest,
                suite,
                quarantine=True,
                max_quarantine_fraction=0.5,
                target_conn=target,
                staging=env.staging,
                write_report=False,
            )
            assert gate.quarantined_rows == 3
            assert load_manifest(target, gate.manifest, run_id="r1").inserted == ROWS - 3
    finally:
        engine.dispose()
    assert _target(env, n, "SELECT count(*) FROM {tt}") == [(ROWS - 3,)]
    with env.target() as target:
        quarantined = target.execute(
            sql.SQL("SELECT row_key FROM {} ORDER BY quarantine_id").format(
                sql.Identifier(n.target_schema, QUARANTINE_TABLE)
            )
        ).fetchall()
        assert sorted(r[0][n.key] for r in quarantined) == [4, 9, 12]
        replayed = replay_quarantined(
            target, "hostile", run_id="replay", target_schema=n.target_schema, staging=env.staging
        )
    assert (replayed.pending, replayed.replayed, replayed.inserted) == (3, 3, 3)
    _assert_same(env, n)


# --------------------------------------------------------------------------- backfill windows


def test_backfill_window(env: SyncEnv, subtests: pytest.Subtests) -> None:
    _for_each(subtests, lambda n: _backfill_window(env, n))


def _backfill_window(env: SyncEnv, n: Names) -> None:
    _create(env, n)
    spec = _spec(n)
    env.sync(spec, run_id="r1")
    state = env.state("hostile", n.target_schema)
    # Changed without moving the cursor: invisible to an incremental run, re-synced by a backfill.
    _source(env, n, "UPDATE {t} SET {v} = 'fixed' WHERE {k} BETWEEN 3 AND 6")
    assert env.sync(spec, run_id="r2")[1].updated == 0
    _, backfill = env.sync(spec, run_id="backfill", window=(T0 + dt.timedelta(hours=3), T0 + dt.timedelta(hours=7)))
    assert (backfill.status, backfill.updated) == ("backfilled", 4)
    _assert_same(env, n)
    assert env.state("hostile", n.target_schema) == state  # the watermark stays


# --------------------------------------------------------------------------- schema drift evolve


def test_schema_drift_evolve_with_history(env: SyncEnv, subtests: pytest.Subtests) -> None:
    _for_each(subtests, lambda n: _schema_drift_evolve_with_history(env, n))


def _schema_drift_evolve_with_history(env: SyncEnv, n: Names) -> None:
    _create(env, n)
    spec = _spec(n, schema_drift="evolve", history_table=n.history)
    env.sync(spec, run_id="r1")
    added = sql.Identifier(n.value + " new %s")
    _source(env, n, "ALTER TABLE {t} ADD COLUMN {a} text", a=added)
    _source(env, n, "UPDATE {t} SET {a} = 'x' || {k}, {u} = {at} WHERE {k} <= 5", a=added, at=_at(100))
    _source(env, n, "ALTER TABLE {t} ALTER COLUMN {n} TYPE numeric(20,4)")  # widened
    _, second = env.sync(spec, run_id="r2")
    assert second.updated == 5
    _assert_same(env, n)
    with env.target() as conn:
        history_columns = source_columns(conn, n.history, n.target_schema)
        assert n.value + " new %s" in history_columns
        assert _checksum(conn, n.target_schema, n.history, [*n.columns, n.value + " new %s"], n.key, "_is_current") == (
            _checksum(conn, n.target_schema, n.table, [*n.columns, n.value + " new %s"], n.key)
        )


# --------------------------------------------------------------------------- referential integrity


def test_reference_check(env: SyncEnv, subtests: pytest.Subtests) -> None:
    _for_each(subtests, lambda n: _reference_check(env, n))


def _reference_check(env: SyncEnv, n: Names) -> None:
    _create(env, n)
    parent = n.table + " parent"
    with env.target() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(n.target_schema)))
        conn.execute(
            sql.SQL("CREATE TABLE {} ({} int PRIMARY KEY)").format(
                sql.Identifier(n.target_schema, parent), sql.Identifier(n.value)
            )
        )
        conn.execute(
            sql.SQL("INSERT INTO {} SELECT generate_series(1, {})").format(
                sql.Identifier(n.target_schema, parent), sql.Literal(ROWS - 2)
            )
        )
    reference = Reference(n.key, n.target_schema, parent, n.value)
    engine = env.source_engine
    try:
        with env.target() as target:
            manifest = extract_for(engine, target, _spec(n), staging=env.staging, run_id="r1")
            with pytest.raises(DataError, match=f"2 of {ROWS} rows point to no existing row"):
                check_references(target, manifest, [reference])
            target.execute(
                sql.SQL("INSERT INTO {} VALUES ({}), ({})").format(
                    sql.Identifier(n.target_schema, parent), sql.Literal(ROWS - 1), sql.Literal(ROWS)
                )
            )
            (result,) = check_references(target, manifest, [reference])
            assert result.ok and result.rows_checked == ROWS
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- CDC


def test_cdc_with_history_and_soft_deletes(cdc: CdcEnv, subtests: pytest.Subtests) -> None:
    _for_each(subtests, lambda n: _cdc_with_history_and_soft_deletes(cdc, n))


def _cdc_with_history_and_soft_deletes(cdc: CdcEnv, n: Names) -> None:
    env = cdc.env
    _create(env, n)
    spec = CdcSpec(
        sync_id="hostile_cdc_" + n.slug,
        tables=(f"{n.schema}.{n.table}",),
        target_schema=n.target_schema,
        history=True,
        delete_mode="soft",
    )
    cdc.run(spec, run_id="snapshot")
    _assert_same(env, n)
    _source(env, n, "INSERT INTO {t} VALUES (100, 'new %s', 1, {at})", at=_at(0))
    _source(env, n, "UPDATE {t} SET {v} = 'changed %(x)s' WHERE {k} <= 3")
    _source(env, n, "DELETE FROM {t} WHERE {k} IN (7, 8)")
    _, result = cdc.run(spec, run_id="changes")
    assert result.inserted == 1
    _assert_same(env, n, "_sync_deleted_at IS NULL")
    history = sql.Identifier(n.target_schema, n.table + "_history")
    with env.target() as conn:
        closed = conn.execute(
            sql.SQL("SELECT count(*) FILTER (WHERE _sync_deleted), count(*) FILTER (WHERE _is_current) FROM {}").format(
                history
            )
        ).fetchone()
    assert closed == (2, ROWS + 1 - 2)


# --------------------------------------------------------------------------- quality gate: NULLs, unloaded batches


def _items(env: SyncEnv, rows: int = 10) -> None:
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE items (id int PRIMARY KEY, qty int, price float8, note text, "
            "updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        conn.execute(
            "INSERT INTO items (id, qty, price, note) SELECT g, g, g, 'n' FROM generate_series(1, %s) g", (rows,)
        )


ITEMS = SyncSpec(sync_id="items", source_table="items", cursor_column="updated_at")


def _extract(env: SyncEnv, run_id: str) -> Any:
    engine = env.source_engine
    try:
        with env.target() as target:
            return extract_for(engine, target, ITEMS, staging=env.staging, run_id=run_id)
    finally:
        engine.dispose()


def _gate(env: SyncEnv, manifest: Any, suite: list[Any], **options: Any) -> Any:
    with env.target() as target:
        return validate_manifest(
            manifest, suite, target_conn=target, staging=env.staging, write_report=False, **options
        )


def _replay(env: SyncEnv, run_id: str) -> Any:
    with env.target() as target:
        return replay_quarantined(target, "items", run_id=run_id, staging=env.staging)


def _statuses(env: SyncEnv) -> dict[int, Any]:
    with env.target() as conn:
        rows = conn.execute(f"SELECT (row_key->>'id')::int, replay_status FROM {QUARANTINE_TABLE}").fetchall()
    return dict(rows)


def test_gate_messages_show_null_as_null_and_nan_as_nan(env: SyncEnv) -> None:
    """pandas hands GX a NULL in a numeric column as NaN: the message must still say NULL."""
    _items(env)
    with env.source() as conn:
        conn.execute("UPDATE items SET qty = NULL, price = NULL, note = NULL WHERE id = 3")
        conn.execute("UPDATE items SET price = 'NaN' WHERE id = 5")  # a real NaN, which GX counts as missing
    suite = [
        _expectations().ExpectColumnValuesToNotBeNull(column="qty"),
        _expectations().ExpectColumnValuesToNotBeNull(column="price"),
        _expectations().ExpectColumnValuesToNotBeNull(column="note"),
    ]
    with pytest.raises(QualityError) as failure:
        _gate(env, _extract(env, "r1"), suite)
    lines = str(failure.value).splitlines()[1:]
    assert lines == [
        "  - expect_column_values_to_not_be_null: column 'qty': 1 of 10 rows (10.0%) are NULL; "
        "examples: key=(id=3) value=NULL",
        "  - expect_column_values_to_not_be_null: column 'price': 2 of 10 rows (20.0%) are NULL; "
        "examples: key=(id=3) value=NULL, key=(id=5) value=NaN",
        "  - expect_column_values_to_not_be_null: column 'note': 1 of 10 rows (10.0%) are NULL; "
        "examples: key=(id=3) value=NULL",
    ]
    with env.target() as conn:  # the recorded examples are JSON: null for NULL, "NaN" for the NaN
        [(details,)] = conn.execute("SELECT details FROM _sync_quality_results").fetchall()
    examples = [r["result"]["partial_unexpected_index_list"] for r in details["results"]]
    assert examples == [
        [{"key": {"id": 3}, "value": None}],
        [{"key": {"id": 3}, "value": None}, {"key": {"id": 5}, "value": "NaN"}],
        [{"key": {"id": 3}, "value": None}],
    ]


def test_quarantined_rows_of_a_batch_that_never_loaded_are_not_replayed(env: SyncEnv) -> None:
    """The gate quarantines before the load; a load that fails leaves rows of a batch the target never got."""
    _items(env)
    with env.source() as conn:
        conn.execute("UPDATE items SET qty = -1 WHERE id IN (4, 7)")
    suite = [_expectations().ExpectColumnValuesToBeBetween(column="qty", min_value=0)]
    # The target refuses one of the clean rows (a constraint someone added by hand): the load will fail.
    with env.target() as conn:
        conn.execute(
            "CREATE TABLE items (id int PRIMARY KEY, qty int, price float8, note text, updated_at timestamptz, "
            "_sync_run_id text, _sync_synced_at timestamptz, CONSTRAINT no_two CHECK (id <> 2))"
        )
    first = _gate(env, _extract(env, "r1"), suite, quarantine=True, max_quarantine_fraction=0.5)
    assert first.quarantined_rows == 2
    # Before its batch loads, a replay leaves the rows alone (they are not part of the target yet).
    early = _replay(env, "replay-early")
    assert (early.pending, early.replayed, early.awaiting_load) == (0, 0, 2)
    with pytest.raises(SyncError, match="no_two"), env.target() as target:
        load_manifest(target, first.manifest, run_id="r1")
    assert _statuses(env) == {4: None, 7: None}  # the load may still be retried: not abandoned yet

    # Meanwhile row 7 is deleted and row 4 fixed at the source; the constraint goes; the next run loads.
    with env.source() as conn:
        conn.execute("DELETE FROM items WHERE id = 7")
        conn.execute("UPDATE items SET qty = 4, updated_at = clock_timestamp() WHERE id = 4")
    with env.target() as conn:
        conn.execute("ALTER TABLE items DROP CONSTRAINT no_two")
    second = _gate(env, _extract(env, "r2"), suite, quarantine=True, max_quarantine_fraction=0.5)
    assert second.quarantined_rows == 0
    with env.target() as target:
        assert load_manifest(target, second.manifest, run_id="r2").inserted == 9
    # The next gate run sees the first batch can no longer load (the state moved past its version).
    _gate(env, _extract(env, "r3"), suite, quarantine=True)
    assert _statuses(env) == {4: "abandoned", 7: "abandoned"}
    replay = _replay(env, "replay")
    assert (replay.pending, replay.replayed, replay.awaiting_load) == (0, 0, 0)
    _assert_items_equal(env)  # row 7 was not resurrected, row 4 keeps its fix


def test_replay_takes_only_the_committed_one_of_two_concurrent_batches(env: SyncEnv) -> None:
    """Two runs extract the same rows; one loads, the other is stale: its quarantined rows are abandoned
    (at the replay, with no gate run in between) and do not supersede the committed batch's rows."""
    _items(env)
    with env.source() as conn:
        conn.execute("UPDATE items SET qty = -1 WHERE id = 4")
    suite = [_expectations().ExpectColumnValuesToBeBetween(column="qty", min_value=0)]
    first, second = _extract(env, "a"), _extract(env, "b")
    gated_first = _gate(env, first, suite, quarantine=True, max_quarantine_fraction=0.5)
    gated_second = _gate(env, second, suite, quarantine=True, max_quarantine_fraction=0.5)
    with env.target() as target:
        assert load_manifest(target, gated_first.manifest, run_id="a").status == "applied"
        assert load_manifest(target, gated_second.manifest, run_id="b").status == "stale"
    replay = _replay(env, "replay")
    assert (replay.pending, replay.replayed, replay.superseded, replay.abandoned) == (1, 1, 0, 1)
    with env.target() as conn:
        rows = conn.execute(f"SELECT run_id, replay_status FROM {QUARANTINE_TABLE} ORDER BY run_id").fetchall()
    assert rows == [("a", "replayed"), ("b", "abandoned")]
    _assert_items_equal(env)


def _assert_items_equal(env: SyncEnv) -> None:
    with env.source() as src, env.target() as tgt:
        columns = source_columns(src, "items")
        assert _checksum(tgt, "public", "items", columns, "id") == _checksum(src, "public", "items", columns, "id")
