"""Schema drift between runs: every change of the source's columns follows the sync's policy.

Each case commits a first sync, changes the source table's columns (and some rows), and syncs
again under ``evolve``, ``freeze`` (the default) and ``discard``.  A refused change raises a
:class:`SchemaError` naming the sync, the table, the column, the old and new type and the rule,
and leaves the target table and the state row exactly as they were.  The table of cases and
behaviours is in :mod:`airflow_sync_provider.core.drift`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from airflow_sync_provider.core import ConfigurationError, SchemaError, SyncSpec, extract_for, load_manifest
from airflow_sync_provider.core.cdc import CdcSpec
from airflow_sync_provider.core.drift import compare_types, parse_pg_type
from airflow_sync_provider.core.manifest import Manifest

from ..conftest import CdcEnv, SyncEnv, source_columns, table_checksum

SPEC = SyncSpec(sync_id="items", source_table="items", mode="full")
POLICIES = ["evolve", "freeze", "discard"]


def _seed(env: SyncEnv) -> None:
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE items (id integer PRIMARY KEY, qty integer, code varchar(10), note text, "
            "updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        conn.execute(
            "INSERT INTO items (id, qty, code, note) SELECT g, g, 'c' || g, 'n' || g FROM generate_series(1, 20) g"
        )


def _first(env: SyncEnv, spec: SyncSpec) -> tuple[tuple[int, str], Any]:
    _, result = env.sync(spec, run_id="first")
    assert (result.status, result.inserted) == ("applied", 20)
    return _target_snapshot(env), env.state(spec.sync_id)


def _target_snapshot(env: SyncEnv) -> tuple[int, str]:
    with env.target() as conn:
        return table_checksum(conn, "items", source_columns(conn, "items"), ["id"])


def _target_types(env: SyncEnv) -> dict[str, str]:
    with env.target() as conn:
        rows = conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "WHERE a.attrelid = 'items'::regclass AND a.attnum > 0 AND NOT a.attisdropped"
        ).fetchall()
    return {r[0]: r[1] for r in rows}


def _converged(env: SyncEnv, columns: list[str]) -> None:
    with env.source() as src, env.target() as tgt:
        assert table_checksum(tgt, "items", columns, ["id"]) == table_checksum(src, "items", columns, ["id"])


def _refused(env: SyncEnv, spec: SyncSpec, before: tuple[tuple[int, str], Any], pattern: str) -> SchemaError:
    with pytest.raises(SchemaError, match=pattern) as info:
        env.sync(spec, run_id="drifted")
    assert (_target_snapshot(env), env.state(spec.sync_id)) == before  # nothing written
    assert info.value.sync_id == "items" and info.value.table == "public.items"
    assert info.value.rule == f"schema drift: {spec.schema_drift}"
    return info.value


def _source(env: SyncEnv, *statements: str) -> None:
    with env.source() as conn:
        for statement in statements:
            conn.execute(statement)


PREFIX = r"^\[sync='items' table='public.items' column='{column}' rule=schema drift: {policy}\] schema drift: "


# --------------------------------------------------------------------------- column added


@pytest.mark.parametrize("policy", POLICIES)
def test_column_added(env: SyncEnv, policy: str) -> None:
    spec = SPEC.with_options(schema_drift=policy)
    _seed(env)
    before = _first(env, spec)
    _source(
        env, "ALTER TABLE items ADD COLUMN color text NOT NULL DEFAULT 'red'", "UPDATE items SET qty = 0 WHERE id <= 3"
    )
    if policy == "freeze":
        error = _refused(
            env,
            spec,
            before,
            PREFIX.format(column="color", policy="freeze") + r"column 'color' TEXT was added at the source\. "
            r"schema_drift='freeze' keeps the target's columns as they are",
        )
        assert "schema_drift='evolve'" in str(error)
        return
    _, result = env.sync(spec, run_id="drifted")
    assert (result.status, result.updated) == ("applied", 3 if policy == "discard" else 20)
    if policy == "evolve":
        assert _target_types(env)["color"] == "text"  # added as nullable: rows synced before may lack it
        _converged(env, ["id", "qty", "code", "note", "updated_at", "color"])
    else:
        assert "color" not in _target_types(env)
        _converged(env, ["id", "qty", "code", "note", "updated_at"])


def test_evolve_added_column_is_null_in_rows_synced_before_until_they_change(env: SyncEnv) -> None:
    """Incremental: an added column's DEFAULT does not touch the cursor, so old rows keep NULL until they change."""
    spec = SyncSpec(sync_id="items", source_table="items", cursor_column="updated_at", schema_drift="evolve")
    _seed(env)
    _first(env, spec)
    _source(env, "ALTER TABLE items ADD COLUMN color text DEFAULT 'red'")
    _source(env, "UPDATE items SET qty = -1, updated_at = clock_timestamp() WHERE id <= 5")
    _, result = env.sync(spec, run_id="r2")
    assert (result.inserted, result.updated) == (0, 5)
    with env.target() as conn:
        colors = conn.execute("SELECT id <= 5, color, count(*) FROM items GROUP BY 1, 2 ORDER BY 1").fetchall()
    assert colors == [(False, None, 15), (True, "red", 5)]


def test_freeze_is_the_default_and_a_human_acknowledges_by_making_the_target_match(env: SyncEnv) -> None:
    assert SPEC.schema_drift == "freeze"
    _seed(env)
    before = _first(env, SPEC)
    _source(env, "ALTER TABLE items ADD COLUMN color text", "UPDATE items SET color = 'blue'")
    _refused(env, SPEC, before, r"column 'color' TEXT was added")
    with env.target() as conn:
        conn.execute("ALTER TABLE items ADD COLUMN color text")
    assert env.sync(SPEC, run_id="acknowledged")[1].updated == 20
    _converged(env, ["id", "qty", "code", "note", "updated_at", "color"])


# --------------------------------------------------------------------------- column dropped


@pytest.mark.parametrize("policy", POLICIES)
def test_column_dropped(env: SyncEnv, policy: str) -> None:
    spec = SPEC.with_options(schema_drift=policy)
    _seed(env)
    before = _first(env, spec)
    _source(env, "ALTER TABLE items DROP COLUMN note", "INSERT INTO items (id, qty, code) VALUES (21, 21, 'new')")
    if policy == "freeze":
        _refused(
            env,
            spec,
            before,
            PREFIX.format(column="note", policy="freeze")
            + r"the source table no longer has column 'note' TEXT \(dropped or renamed\)\.",
        )
        return
    _, result = env.sync(spec, run_id="drifted")
    assert (result.status, result.inserted, result.updated) == ("applied", 1, 0)
    with env.target() as conn:
        notes = conn.execute("SELECT id, note FROM items WHERE id IN (1, 21) ORDER BY id").fetchall()
    assert notes == [(1, "n1"), (21, None)]  # kept for old rows, NULL in rows inserted from now on
    _converged(env, ["id", "qty", "code", "updated_at"])


@pytest.mark.parametrize("policy", ["evolve", "discard"])
def test_dropped_column_that_is_not_null_in_the_target(env: SyncEnv, policy: str) -> None:
    spec = SPEC.with_options(schema_drift=policy)
    _seed(env)
    before = _first(env, spec)
    with env.target() as conn:
        conn.execute("ALTER TABLE items ALTER COLUMN note SET NOT NULL")
    before = (_target_snapshot(env), before[1])
    _source(env, "ALTER TABLE items DROP COLUMN note", "INSERT INTO items (id, qty, code) VALUES (21, 21, 'new')")
    if policy == "discard":  # discard changes no DDL: a NOT NULL column cannot take the NULLs
        _refused(env, spec, before, r"no longer has column 'note' TEXT.*or, for a dropped column, is NOT NULL")
        return
    _, result = env.sync(spec, run_id="drifted")  # evolve drops the NOT NULL
    assert result.inserted == 1
    with env.target() as conn:
        assert conn.execute("SELECT note FROM items WHERE id = 21").fetchone() == (None,)


# --------------------------------------------------------------------------- column renamed


@pytest.mark.parametrize("policy", POLICIES)
def test_column_renamed(env: SyncEnv, policy: str, caplog: pytest.LogCaptureFixture) -> None:
    spec = SPEC.with_options(schema_drift=policy)
    _seed(env)
    before = _first(env, spec)
    _source(env, "ALTER TABLE items RENAME COLUMN note TO remark", "UPDATE items SET remark = 'r' || id WHERE id = 1")
    if policy == "freeze":
        error = _refused(env, spec, before, r"column='remark, note' rule=schema drift: freeze\]")
        assert "column 'remark' TEXT was added at the source (looks like 'note' renamed)" in str(error)
        assert "no longer has column 'note' TEXT" in str(error)
        return
    with caplog.at_level("WARNING"):
        _, result = env.sync(spec, run_id="drifted")
    assert any("looks like 'note' renamed" in r.getMessage() for r in caplog.records)
    types = _target_types(env)
    assert "note" in types  # never dropped: its values stay
    with env.target() as conn:
        row = conn.execute("SELECT * FROM items WHERE id = 1").fetchone()
    assert row is not None
    if policy == "evolve":
        assert "remark" in types and result.updated == 20
        _converged(env, ["id", "qty", "code", "remark", "updated_at"])
    else:
        assert "remark" not in types and result.updated == 0


# --------------------------------------------------------------------------- type widened / narrowed / changed


@pytest.mark.parametrize("policy", POLICIES)
def test_type_widened(env: SyncEnv, policy: str) -> None:
    spec = SPEC.with_options(schema_drift=policy)
    _seed(env)
    before = _first(env, spec)
    _source(
        env,
        "ALTER TABLE items ALTER COLUMN qty TYPE bigint, ALTER COLUMN code TYPE varchar(50)",
        "UPDATE items SET qty = 5000000000, code = repeat('x', 40) WHERE id = 7",
    )
    if policy == "evolve":
        _, result = env.sync(spec, run_id="drifted")
        assert result.updated == 1
        types = _target_types(env)
        assert (types["qty"], types["code"]) == ("bigint", "character varying(50)")
        _converged(env, ["id", "qty", "code", "note", "updated_at"])
        return
    why = "keeps the target's columns as they are" if policy == "freeze" else "cannot hold every value of the new type"
    error = _refused(
        env,
        spec,
        before,
        rf"column='qty, code' rule=schema drift: {policy}\] schema drift: column 'qty' changed type at the source "
        r"from INTEGER to BIGINT \(widened\); column 'code' changed type at the source from VARCHAR\(10\) to "
        r"VARCHAR\(50\) \(widened\)\. ",
    )
    assert why in str(error)


def test_discard_keeps_syncing_a_widened_column_the_target_already_holds(env: SyncEnv) -> None:
    spec = SPEC.with_options(schema_drift="discard")
    _seed(env)
    _first(env, spec)
    with env.target() as conn:
        conn.execute("ALTER TABLE items ALTER COLUMN code TYPE text")  # the target was made wider by hand
    _source(env, "ALTER TABLE items ALTER COLUMN code TYPE varchar(50)", "UPDATE items SET code = repeat('y', 45)")
    assert env.sync(spec, run_id="drifted")[1].updated == 20
    assert _target_types(env)["code"] == "text"
    _converged(env, ["id", "qty", "code", "note", "updated_at"])


@pytest.mark.parametrize("policy", POLICIES)
def test_type_narrowed(env: SyncEnv, policy: str) -> None:
    spec = SPEC.with_options(schema_drift=policy)
    _seed(env)
    before = _first(env, spec)
    _source(
        env,
        "ALTER TABLE items ALTER COLUMN code TYPE varchar(5), ALTER COLUMN qty TYPE smallint",
        "UPDATE items SET code = 'abcde' WHERE id = 2",
    )
    if policy == "discard":  # the (wider) target holds every value of the narrower type
        assert env.sync(spec, run_id="drifted")[1].updated == 1
        types = _target_types(env)
        assert (types["code"], types["qty"]) == ("character varying(10)", "integer")
        _converged(env, ["id", "qty", "code", "note", "updated_at"])
        return
    error = _refused(
        env,
        spec,
        before,
        rf"column='qty, code' rule=schema drift: {policy}\] schema drift: column 'qty' changed type at the source "
        r"from INTEGER to SMALLINT \(narrowed\); column 'code' changed type at the source from VARCHAR\(10\) to "
        r"VARCHAR\(5\) \(narrowed\)\. ",
    )
    if policy == "evolve":
        assert "a narrowed or changed type cannot be applied to the target automatically" in str(error)


@pytest.mark.parametrize("policy", POLICIES)
def test_type_changed(env: SyncEnv, policy: str) -> None:
    spec = SPEC.with_options(schema_drift=policy)
    _seed(env)
    before = _first(env, spec)
    _source(env, "ALTER TABLE items ALTER COLUMN qty TYPE text USING 'q' || qty")
    _refused(
        env,
        spec,
        before,
        PREFIX.format(column="qty", policy=policy)
        + r"column 'qty' changed type at the source from INTEGER to TEXT \(changed\)\. ",
    )


# --------------------------------------------------------------------------- declaration and units


def test_policy_is_validated_and_travels_in_the_manifest(env: SyncEnv) -> None:
    with pytest.raises(ConfigurationError, match=r"schema_drift must be one of evolve, freeze, discard, not 'grow'"):
        SPEC.with_options(schema_drift="grow")
    _seed(env)
    with env.target() as target:
        manifest = extract_for(
            env.source_engine, target, SPEC.with_options(schema_drift="evolve"), staging=env.staging, run_id="m"
        )
        assert Manifest.from_dict(manifest.to_json()).schema_drift == "evolve"
        legacy = manifest.to_dict()
        del legacy["schema_drift"]  # written before the policy existed: loads as the fail-safe default
        assert Manifest.from_dict(legacy).schema_drift == "freeze"
        assert load_manifest(target, replace(manifest, schema_drift="freeze")).inserted == 20


def test_a_target_made_by_hand_with_other_types_is_not_drift(env: SyncEnv) -> None:
    """Types are judged against the recorded source columns, never against a hand-made target."""
    _seed(env)
    with env.target() as conn:
        conn.execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, qty numeric, code text, note varchar(100), "
            "updated_at timestamptz)"
        )
    assert env.sync(SPEC, run_id="first")[1].inserted == 20
    _source(env, "UPDATE items SET qty = 99 WHERE id = 1")
    assert env.sync(SPEC, run_id="second")[1].updated == 1


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("INTEGER", "integer", "same"),
        ("VARCHAR(10)", "character varying(10)", "same"),
        ("VARCHAR", "text", "same"),
        ("SMALLINT", "INTEGER", "widened"),
        ("INTEGER", "BIGINT", "widened"),
        ("BIGINT", "NUMERIC", "widened"),
        ("INTEGER", "NUMERIC(12, 2)", "widened"),
        ("BIGINT", "NUMERIC(12, 2)", "changed"),
        ("NUMERIC(12, 2)", "NUMERIC(14, 4)", "widened"),
        ("NUMERIC(12, 2)", "NUMERIC(12, 4)", "changed"),
        ("NUMERIC(12, 2)", "NUMERIC", "widened"),
        ("NUMERIC", "NUMERIC(38, 10)", "narrowed"),
        ("REAL", "DOUBLE PRECISION", "widened"),
        ("VARCHAR(10)", "VARCHAR(50)", "widened"),
        ("character varying(50)", "VARCHAR(10)", "narrowed"),
        ("VARCHAR(10)", "TEXT", "widened"),
        ("VARCHAR(10)[]", "TEXT[]", "widened"),
        ("VARCHAR(10)[]", "TEXT", "changed"),
        ("TIMESTAMP(3) WITHOUT TIME ZONE", "TIMESTAMP WITHOUT TIME ZONE", "widened"),
        ("TIMESTAMP WITHOUT TIME ZONE", "TIMESTAMP WITH TIME ZONE", "changed"),
        ("INTEGER", "TEXT", "changed"),
        ("JSON", "JSONB", "changed"),
        ("BIGINT", "INTEGER", "narrowed"),
    ],
)
def test_type_comparison(old: str, new: str, expected: str) -> None:
    assert compare_types(old, new) == expected
    assert str(parse_pg_type("CHARACTER VARYING(40)[]")) == "varchar(40)[]"


def test_evolve_keeps_the_history_table_in_step(env: SyncEnv) -> None:
    """With an SCD2 history table, ``evolve`` adds and widens its columns too (same transaction)."""
    spec = SyncSpec(
        sync_id="items", source_table="items", cursor_column="updated_at", history_table="items_history"
    ).with_options(schema_drift="evolve")
    _seed(env)
    _first(env, spec)
    _source(
        env,
        "ALTER TABLE items ADD COLUMN color text DEFAULT 'red', ALTER COLUMN qty TYPE bigint",
        "UPDATE items SET qty = 5000000000, updated_at = clock_timestamp() WHERE id <= 2",
    )
    assert env.sync(spec, run_id="drifted")[1].updated == 2
    with env.target() as conn:
        current = conn.execute(
            "SELECT id, qty, color FROM items_history WHERE _is_current AND id <= 3 ORDER BY id"
        ).fetchall()
        qty_type = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'items_history'::regclass AND attname = 'qty'"
        ).fetchone()
    assert current == [(1, 5000000000, "red"), (2, 5000000000, "red"), (3, 3, None)]
    assert qty_type == ("bigint",)


def test_cdc_batches_follow_the_default_freeze(cdc: CdcEnv) -> None:
    """CDC loads go through the same check: a type changed between change batches fails clearly (the
    snapshot's column plan and pgoutput name types differently, so only like is compared with like)."""
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, qty integer, pos point)")
        conn.execute("INSERT INTO items SELECT g, g, point(g, g) FROM generate_series(1, 20) g")
    spec = CdcSpec(sync_id="items_cdc", tables=("items",))
    cdc.run(spec, run_id="snapshot")
    with cdc.env.source() as conn:  # pgoutput calls the column POINT, the snapshot planned TEXT: not drift
        conn.execute("UPDATE items SET qty = -1 WHERE id = 1")
    assert cdc.run(spec, run_id="changes")[1].updated == 1
    with cdc.env.source() as conn:
        conn.execute("ALTER TABLE items ALTER COLUMN qty TYPE bigint")
        conn.execute("UPDATE items SET qty = 5000000000 WHERE id = 2")
    with pytest.raises(
        SchemaError,
        match=r"^\[sync='items_cdc' table='public.items' column='qty' rule=schema drift: freeze\] schema drift: "
        r"column 'qty' changed type at the source from INTEGER to BIGINT \(widened\)\.",
    ):
        cdc.run(spec, run_id="retyped")
    with cdc.env.target() as conn:  # acknowledged by making the target match
        conn.execute("ALTER TABLE items ALTER COLUMN qty TYPE bigint")
    cdc.run(spec, run_id="acknowledged")
    cdc.assert_converged("items", ["id"])
