"""Identifiers are quoted by the drivers' tools end to end (schemas, tables, columns with quotes,
spaces, capitals, unicode, SQL keywords), and keyset paging works for composite, text and uuid keys
across many pages.
"""

from __future__ import annotations

from airflow_sync_provider.core import SyncSpec

from ..conftest import SyncEnv, source_columns, table_checksum

HOSTILE_SCHEMA = 'Sales "EU"'
HOSTILE_TABLE = "Order Items; DROP TABLE x; --"


def test_hostile_identifiers_round_trip(env: SyncEnv) -> None:
    with env.source() as conn:
        conn.execute('CREATE SCHEMA "Sales ""EU"""')
        conn.execute(
            'CREATE TABLE "Sales ""EU"""."Order Items; DROP TABLE x; --" ('
            ' "Order ID" bigint, "select" text, "Ünïcødé 😀" numeric(10,2), "MixedCase" boolean,'
            ' "updated at" timestamptz NOT NULL DEFAULT now(), PRIMARY KEY ("Order ID"))'
        )
        conn.execute(
            'INSERT INTO "Sales ""EU"""."Order Items; DROP TABLE x; --" '
            'SELECT g, $$it\'s "quoted"$$, g / 3.0, g % 2 = 0 FROM generate_series(1, 500) g'
        )
    spec = SyncSpec(
        sync_id="hostile",
        source_table=HOSTILE_TABLE,
        source_schema=HOSTILE_SCHEMA,
        target_schema='Target "Schema"',
        target_table='Copy of "Order Items"',
        cursor_column="updated at",
        batch_rows=100,
    )
    _, first = env.sync(spec, run_id="r1")
    assert first.inserted == 500
    with env.source() as conn:
        conn.execute(
            'UPDATE "Sales ""EU"""."Order Items; DROP TABLE x; --" SET "select" = NULL, "updated at" = now() '
            'WHERE "Order ID" <= 10'
        )
    _, second = env.sync(spec, run_id="r2")
    # Only the ten changed rows come back: the cursor and keyset paging saw through the quoting.
    assert second.updated == 10

    with env.source() as src, env.target() as tgt:
        columns = source_columns(src, HOSTILE_TABLE, HOSTILE_SCHEMA)
        assert table_checksum(tgt, 'Copy of "Order Items"', columns, ["Order ID"], 'Target "Schema"') == (
            table_checksum(src, HOSTILE_TABLE, columns, ["Order ID"], HOSTILE_SCHEMA)
        )
        state = tgt.execute('SELECT version FROM "Target ""Schema"""._sync_state WHERE sync_id = %s', ("hostile",))
        assert state.fetchone() == (2,)


def test_composite_text_and_uuid_keys_page_correctly(env: SyncEnv) -> None:
    """Many small pages over a composite (text, uuid) key with a tied cursor: no row skipped or repeated."""
    with env.source() as conn:
        conn.execute(
            'CREATE TABLE stock (warehouse text COLLATE "C", item uuid, qty int, '
            "updated_at timestamptz NOT NULL, PRIMARY KEY (warehouse, item))"
        )
        # Every row shares one cursor value: only the key tie-break orders the pages.
        conn.execute(
            "INSERT INTO stock SELECT w, md5(w || g)::uuid, g, timestamptz '2026-01-01' "
            "FROM unnest(ARRAY['Berlin', 'berlin', 'Zürich', 'ñ-store', 'A b']) w, generate_series(1, 401) g"
        )
    spec = SyncSpec(sync_id="stock", source_table="stock", cursor_column="updated_at", batch_rows=37)
    manifest, result = env.sync(spec, run_id="r1")
    assert result.inserted == 5 * 401
    assert len(manifest.files) == -(-5 * 401 // 37)
    with env.source() as src, env.target() as tgt:
        columns = ["warehouse", "item", "qty", "updated_at"]
        assert table_checksum(tgt, "stock", columns, ["warehouse", "item"]) == table_checksum(
            src, "stock", columns, ["warehouse", "item"]
        )
    with env.source() as conn:
        conn.execute("UPDATE stock SET qty = -1, updated_at = timestamptz '2026-01-02' WHERE warehouse = 'Zürich'")
    _, second = env.sync(spec, run_id="r2")
    assert (second.inserted, second.updated) == (0, 401)
