"""Convergence: after any mix of inserts, updates (incl. key changes) and deletes, one more sync makes
the target equal to the source, checked by a full checksum; a sync with no changes changes nothing.
"""

from __future__ import annotations

import time

import pytest

from airflow_sync_provider.core import SyncSpec

from ..conftest import SyncEnv, source_columns, table_checksum

ROWS = 100_000

SOURCE_DDL = """
CREATE TABLE items (
    id          bigint PRIMARY KEY,
    sku         text NOT NULL,
    name        text,
    qty         integer,
    price       numeric(12, 2),
    weight      double precision,
    active      boolean,
    created     date,
    attrs       jsonb,
    tags        text[],
    payload     bytea,
    uid         uuid,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX items_cursor ON items (updated_at, id);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$;
CREATE TRIGGER items_touch BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION touch();
"""

SEED = """
INSERT INTO items (id, sku, name, qty, price, weight, active, created, attrs, tags, payload, uid, updated_at)
SELECT g,
       'SKU-' || lpad(g::text, 7, '0'),
       CASE WHEN g %% 13 = 0 THEN NULL WHEN g %% 17 = 0 THEN ''
            WHEN g %% 19 = 0 THEN 'quote " comma , nl' || E'\\n' || 'x'
            ELSE 'Ärtikel ' || g || ' 😀 ünïcödé' END,
       CASE WHEN g %% 11 = 0 THEN NULL ELSE (random() * 1000)::int END,
       CASE WHEN g %% 23 = 0 THEN NULL ELSE round((random() * 100000)::numeric, 2) END,
       CASE WHEN g %% 29 = 0 THEN NULL WHEN g %% 31 = 0 THEN 'Infinity'::float8 ELSE random() * 1e6 END,
       CASE WHEN g %% 37 = 0 THEN NULL ELSE g %% 2 = 0 END,
       DATE '2020-01-01' + (g %% 2000),
       CASE WHEN g %% 41 = 0 THEN NULL
            ELSE jsonb_build_object('n', g, 'u', 'ü',
                                    'nested', jsonb_build_object('a', jsonb_build_array(1, 'two', null))) END,
       CASE WHEN g %% 43 = 0 THEN NULL ELSE ARRAY['red', 'green', 'b"lue'] END,
       CASE WHEN g %% 47 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') END,
       md5(g::text)::uuid,
       timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second'
FROM generate_series(1, %(rows)s) g;
"""

MUTATE = """
-- updates of values (the trigger bumps updated_at), incl. to/from NULL
UPDATE items SET qty = coalesce(qty, 0) + 1, name = CASE WHEN name IS NULL THEN 'was null' ELSE NULL END
WHERE id IN (SELECT id FROM items ORDER BY random() LIMIT %(updates)s);
UPDATE items SET attrs = jsonb_set(coalesce(attrs, '{}'), '{changed}', 'true'), price = price * 2
WHERE id IN (SELECT id FROM items ORDER BY random() LIMIT %(updates)s);
-- primary-key changes: the old key must disappear from the target, the new one appear
UPDATE items SET id = id + 10000000 WHERE id IN (SELECT id FROM items ORDER BY random() LIMIT 100);
DELETE FROM items WHERE id IN (SELECT id FROM items ORDER BY random() LIMIT %(deletes)s);
INSERT INTO items (id, sku, name, qty, price, weight, active, created, attrs, tags, payload, uid)
SELECT 20000000 + g, 'NEW-' || g, 'neu ' || g || ' ✓', g, 1.5, -0.0, true, current_date,
       '{"new": true}', '{}', '\\x00', NULL
FROM generate_series(1, %(inserts)s) g;
"""


def _statements(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]


def _seed(env: SyncEnv) -> list[str]:
    with env.source() as conn:
        conn.execute(SOURCE_DDL)
        conn.execute("SELECT setseed(0.42)")
        conn.execute(SEED, {"rows": ROWS})
        return source_columns(conn, "items")


def _assert_converged(env: SyncEnv, columns: list[str]) -> tuple[int, str]:
    with env.source() as src, env.target() as tgt:
        expected = table_checksum(src, "items", columns, ["id"])
        actual = table_checksum(tgt, "items", columns, ["id"])
    assert actual == expected
    return actual


def _target_fingerprint(env: SyncEnv) -> tuple[int, str]:
    """Checksum over every target column, metadata included: changes if any row is touched."""
    with env.target() as tgt:
        return table_checksum(tgt, "items", source_columns(tgt, "items"), ["id"])


@pytest.mark.parametrize(
    "spec_kwargs",
    [
        pytest.param({"mode": "incremental", "cursor_column": "updated_at", "detect_deletes": True}, id="incremental"),
        pytest.param({"mode": "full"}, id="full"),
    ],
)
def test_converges_after_random_changes(env: SyncEnv, spec_kwargs: dict[str, object]) -> None:
    columns = _seed(env)
    spec = SyncSpec(sync_id="items", source_table="items", batch_rows=25_000, **spec_kwargs)  # type: ignore[arg-type]

    started = time.monotonic()
    _, first = env.sync(spec, run_id="run-1")
    initial_seconds = time.monotonic() - started
    assert (first.status, first.inserted, first.updated, first.deleted) == ("applied", ROWS, 0, 0)
    count, _ = _assert_converged(env, columns)
    assert count == ROWS

    with env.source() as conn:
        conn.execute("SELECT setseed(0.7)")
        params = {"updates": 5_000, "deletes": 3_000, "inserts": 7_000}
        for statement in _statements(MUTATE):
            conn.execute(statement, {k: v for k, v in params.items() if f"%({k})s" in statement})
        after_changes = conn.execute("SELECT count(*) FROM items").fetchone()
        moved_row = conn.execute("SELECT count(*) FROM items WHERE id BETWEEN 10000000 AND 19999999").fetchone()
    assert after_changes is not None and moved_row is not None
    moved = moved_row[0]  # re-keyed rows that the random delete did not remove afterwards

    started = time.monotonic()
    manifest, second = env.sync(spec, run_id="run-2")
    change_seconds = time.monotonic() - started
    count, _ = _assert_converged(env, columns)
    assert count == after_changes[0] == ROWS - 3_000 + 7_000
    assert 90 <= moved <= 100
    assert second.inserted == 7_000 + moved  # new rows and the new keys of re-keyed rows
    # deleted rows, whose key was original or re-keyed (never loaded), plus the old keys of moved rows
    assert second.deleted == 3_000 - (100 - moved) + 100
    assert 9_000 <= second.updated <= 10_000  # 2 x 5,000 random picks, some rows picked twice
    if spec.mode == "incremental":
        assert manifest.rows == second.inserted + second.updated  # only changed rows were extracted

    before_third = _target_fingerprint(env)
    _, third = env.sync(spec, run_id="run-3")
    assert (third.inserted, third.updated, third.deleted) == (0, 0, 0)
    assert _target_fingerprint(env) == before_third  # not even metadata columns were touched
    state = env.state("items")
    assert state is not None and state[0] == 3
    print(
        f"\nconvergence[{spec.mode}]: initial {ROWS:,} rows in {initial_seconds:.2f} s; "
        f"changes ({second.inserted:,} ins / {second.updated:,} upd / {second.deleted:,} del) in {change_seconds:.2f} s"
    )
