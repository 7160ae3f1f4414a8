"""Log-based CDC from PostgreSQL: snapshot hand-off, commit-order apply, TOAST, truncates, key changes,
exactly-once effect across crashes, and the guards (with a real server, wal_level=logical).
"""

from __future__ import annotations

import random
import threading
import time
from contextlib import closing
from typing import Any

import pyarrow.parquet as pq
import pytest

from airflow_sync_provider.core.cdc import (
    CdcSpec,
    changes_to_staging,
    committed_cdc_state,
    confirm_applied,
    load_cdc_manifest,
    snapshot_to_staging,
)
from airflow_sync_provider.core.cdc import slot as cdc_slot
from airflow_sync_provider.core.cdc.extract import SnapshotFilter, open_source
from airflow_sync_provider.core.cdc.pgoutput import int_to_lsn, lsn_to_int
from airflow_sync_provider.core.errors import ConfigurationError, DataError, SchemaError, UnsafeOperationError

from ..conftest import CdcEnv

ITEMS_DDL = """
CREATE TABLE items (
    id bigint PRIMARY KEY, sku text NOT NULL, qty integer, price numeric(12, 2), note text,
    attrs jsonb, tags text[], changed_at timestamptz DEFAULT now()
)
"""


def _seed_items(cdc: CdcEnv, rows: int = 1_000) -> None:
    with cdc.env.source() as conn:
        conn.execute(ITEMS_DDL)
        conn.execute(
            "INSERT INTO items (id, sku, qty, price, note, attrs, tags) "
            "SELECT g, 'SKU-' || g, g %% 50, g * 1.25, CASE WHEN g %% 7 = 0 THEN NULL ELSE 'nöte ' || g END, "
            "jsonb_build_object('g', g), ARRAY['a', 'b'] FROM generate_series(1, %s) g",
            (rows,),
        )


def _staged_ids(manifest_tables: Any, table: str) -> list[int]:
    ids: list[int] = []
    for part in manifest_tables:
        if part.source_table == table:
            for staged in part.files:
                ids += [
                    int(v) for v in pq.read_table(staged.uri.removeprefix("file://"), columns=["id"])["id"].to_pylist()
                ]
    return ids


def test_first_run_snapshots_then_changes_flow_in_order(cdc: CdcEnv) -> None:
    _seed_items(cdc)
    spec = CdcSpec(sync_id="items_cdc", tables=("items",))
    _, first = cdc.run(spec, run_id="r1")
    assert (first.kind, first.status, first.inserted) == ("snapshot", "applied", 1_000)
    cdc.assert_converged("items", ["id"])

    with cdc.env.source() as conn:
        conn.execute("UPDATE items SET qty = qty + 1 WHERE id <= 100")
        conn.execute("UPDATE items SET qty = qty + 1 WHERE id <= 10")  # same keys twice: the last wins
        conn.execute("INSERT INTO items (id, sku) SELECT g, 'NEW' FROM generate_series(5001, 5050) g")
        conn.execute("DELETE FROM items WHERE id BETWEEN 200 AND 219")
        conn.execute("UPDATE items SET id = id + 100000 WHERE id BETWEEN 300 AND 304")  # key changes
        conn.execute("INSERT INTO items (id, sku) VALUES (9999, 'gone again')")
        conn.execute("DELETE FROM items WHERE id = 9999")  # inserted and deleted within one batch
    manifest, second = cdc.run(spec, run_id="r2")
    assert manifest.kind == "changes" and manifest.transactions == 7
    assert (second.inserted, second.updated, second.deleted) == (50 + 5, 100, 20 + 5)
    assert cdc.assert_converged("items", ["id"]) == 1_000 + 50 - 20

    _, third = cdc.run(spec, run_id="r3")
    assert third.status == "no_changes"
    state = cdc.slot(spec)
    assert state.confirmed_flush_lsn is not None
    with cdc.env.target() as target:
        position = committed_cdc_state(target, spec)
    assert position is not None and position.version == 2  # the no-change run committed nothing


def test_snapshot_hand_off_with_concurrent_writes_has_no_gap_and_no_duplicate(cdc: CdcEnv) -> None:
    """Slot first, then the snapshot; writers run throughout, and one transaction is open across it.

    Every writer row is either in the snapshot copy or in the first change batch, never both; the
    transaction that was still open when the snapshot was taken is applied from the stream.
    """
    _seed_items(cdc, rows=150_000)
    spec = CdcSpec(sync_id="handoff", tables=("items",), batch_rows=20_000)
    engine = cdc.env.source_engine
    with closing(open_source(engine, spec.sync_id)) as conn:
        tables = cdc_slot.check_source(conn, spec)
        cdc_slot.ensure_publication(conn, spec, tables)
        cdc_slot.ensure_slot(conn, spec)

    open_txn = cdc.env.source(autocommit=False)  # begins after the slot: decoded, and open at the snapshot
    open_txn.execute("UPDATE items SET note = 'committed after the snapshot' WHERE id = 1")
    open_txn.execute("INSERT INTO items (id, sku) VALUES (900000, 'open during snapshot')")

    written: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        next_id = 1_000_000
        with cdc.env.source() as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO items (id, sku) VALUES (%s, 'concurrent')", (next_id,))
                conn.execute("UPDATE items SET qty = -1 WHERE id = %s", (next_id - 1_000_000 + 2,))
                written.append(next_id)
                next_id += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        with cdc.env.target() as target:
            snapshot = snapshot_to_staging(
                engine, spec, state=committed_cdc_state(target, spec), staging=cdc.env.staging, run_id="snap"
            )
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    open_txn.commit()
    open_txn.close()

    in_snapshot = set(_staged_ids(snapshot.tables, "public.items"))
    concurrent = set(written)
    assert 900000 not in in_snapshot  # the open transaction is not in the copy...
    before = concurrent & in_snapshot
    after = concurrent - in_snapshot
    assert before and after, "the writer must have committed both before and after the snapshot"

    with cdc.env.target() as target:
        assert load_cdc_manifest(target, snapshot, keep_staged=True).status == "applied"
        changes = changes_to_staging(
            engine, spec, state=committed_cdc_state(target, spec), staging=cdc.env.staging, run_id="c1"
        )
        staged = _staged_ids(changes.tables, "public.items")
        inserted_ids = {i for i in staged if i >= 1_000_000}
        assert inserted_ids == after  # no gap: every later write is in the stream...
        assert not inserted_ids & in_snapshot  # ...and no duplicate: nothing the copy had is replayed
        assert 900000 in staged  # ...including the transaction that was open across the snapshot
        result = load_cdc_manifest(target, changes)
    assert result.status == "applied" and result.inserted == len(after) + 1
    cdc.assert_converged("items", ["id"])
    engine.dispose()


def test_toast_values_survive_updates_of_other_columns(cdc: CdcEnv) -> None:
    big = "".join(f"{i:08x}" for i in range(4_000))  # 32 kB of incompressible-ish text: stored out of line
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, version int, title text)")
        conn.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")
        conn.execute(
            "INSERT INTO docs VALUES (1, %s, 1, 'one'), (2, %s, 1, 'two'), (3, 'small', 1, 'three')", (big, big[::-1])
        )
    spec = CdcSpec(sync_id="docs", tables=("docs",))
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("UPDATE docs SET version = 2 WHERE id = 1")  # body unchanged: pgoutput omits it
        conn.execute("INSERT INTO docs VALUES (4, %s, 1, 'four')", (big + "4",))
        conn.execute("UPDATE docs SET version = 2 WHERE id = 4")  # inserted and updated in one batch
        conn.execute("UPDATE docs SET id = 20, version = 3 WHERE id = 2")  # key change, body unchanged
    engine = cdc.env.source_engine
    with cdc.env.target() as target:
        manifest = changes_to_staging(
            engine,
            CdcSpec(sync_id="docs", tables=("docs",)),
            state=committed_cdc_state(target, spec),
            staging=cdc.env.staging,
            run_id="c1",
        )
    engine.dispose()
    unchanged = [
        value
        for part in manifest.tables
        for staged in part.files
        for value in pq.read_table(staged.uri.removeprefix("file://"))["_cdc_unchanged"].to_pylist()
    ]
    assert "{2}" in unchanged  # the stream really left the TOASTed body out
    with cdc.env.target() as target:
        load_cdc_manifest(target, manifest)
        bodies = dict(target.execute("SELECT id, length(body) FROM docs").fetchall())
    assert bodies == {1: len(big), 3: 5, 4: len(big) + 1, 20: len(big)}
    cdc.assert_converged("docs", ["id"])


def test_unchanged_toast_without_a_target_row_fails_instead_of_writing_null(cdc: CdcEnv) -> None:
    big = "".join(f"{i:08x}" for i in range(4_000))
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, version int)")
        conn.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")
        conn.execute("INSERT INTO docs VALUES (1, %s, 1)", (big,))
    spec = CdcSpec(sync_id="docs", tables=("docs",))
    cdc.run(spec, run_id="snap")
    with cdc.env.target() as target:
        target.execute("DELETE FROM docs")  # someone removed the row in the target
    with cdc.env.source() as conn:
        conn.execute("UPDATE docs SET version = 2 WHERE id = 1")
    with pytest.raises(DataError, match=r"table='public.docs'.*column='body'.*key=\(id=1\).*unchanged TOAST"):
        cdc.run(spec, run_id="c1")
    with cdc.env.target() as target:
        assert target.execute("SELECT count(*) FROM docs").fetchone() == (0,)
        state = committed_cdc_state(target, spec)
    assert state is not None and state.version == 1


def test_a_diverged_table_is_recovered_by_re_snapshotting_it_alone(cdc: CdcEnv) -> None:
    """The documented recovery for rule=unchanged TOAST value: re-snapshot that table; the others keep
    streaming, a change batch staged before is refused as stale, and a transaction open across the
    re-snapshot is applied once (hand-off per table, as for the initial snapshot)."""
    big = "".join(f"{i:08x}" for i in range(4_000))
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, version int)")
        conn.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")
        conn.execute("INSERT INTO docs SELECT g, %s || g, 1 FROM generate_series(1, 20) g", (big,))
    _seed_items(cdc, rows=100)
    spec = CdcSpec(sync_id="recover", tables=("docs", "items"))
    cdc.run(spec, run_id="snap")
    with cdc.env.target() as target:
        target.execute("DELETE FROM docs WHERE id IN (1, 2)")  # the target copy diverges
    with cdc.env.source() as conn:
        conn.execute("UPDATE docs SET id = 100 WHERE id = 1")
        conn.execute("UPDATE docs SET version = 2 WHERE id = 100")  # body left out: target lacks row 1
        conn.execute("UPDATE docs SET body = 'small' WHERE id = 3")
        conn.execute("UPDATE items SET qty = -1 WHERE id <= 10")
    with pytest.raises(
        DataError, match=r"column='body'.*key=\(id=100\).*rule=unchanged TOAST value.*id=1.*resnapshot_tables"
    ):
        cdc.run(spec, run_id="c1")
    engine = cdc.env.source_engine
    with cdc.env.target() as target:
        staged_before = changes_to_staging(
            engine, spec, state=committed_cdc_state(target, spec), staging=cdc.env.staging, run_id="old"
        )
    open_txn = cdc.env.source(autocommit=False)  # open across the re-snapshot: not in its copy
    open_txn.execute("UPDATE docs SET version = 3 WHERE id = 4")
    open_txn.execute("INSERT INTO items (id, sku) VALUES (5000, 'during')")

    manifest, result = _resnapshot(cdc, spec, ["docs"], run_id="resnap")
    assert (manifest.kind, [t.source_table for t in manifest.tables]) == ("table_snapshot", ["public.docs"])
    assert (result.status, result.inserted, result.updated) == ("applied", 2, 1)  # 2 and 100 back; 3 changed
    open_txn.commit()
    open_txn.close()
    with cdc.env.target() as target:
        assert load_cdc_manifest(target, staged_before).status == "stale"  # read before the re-snapshot
    _, after = cdc.run(spec, run_id="c2")
    assert after.tables["public.items"] == {"inserted": 1, "updated": 10, "deleted": 0}
    assert after.tables["public.docs"] == {"inserted": 0, "updated": 1, "deleted": 0}  # only the open txn
    cdc.assert_converged("docs", ["id"])
    cdc.assert_converged("items", ["id"])
    with cdc.env.source() as conn:  # the table streams on as before
        conn.execute("UPDATE docs SET id = 200 WHERE id = 100")
        conn.execute("UPDATE docs SET version = 9 WHERE id = 200")
    _, later = cdc.run(spec, run_id="c3")
    assert (later.inserted, later.deleted) == (1, 1)
    cdc.assert_converged("docs", ["id"])
    engine.dispose()


def test_truncate_then_inserts_in_one_batch(cdc: CdcEnv) -> None:
    _seed_items(cdc, rows=200)
    spec = CdcSpec(sync_id="trunc", tables=("items",))
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("UPDATE items SET qty = 0 WHERE id = 1")
        conn.execute("TRUNCATE items")
        conn.execute("INSERT INTO items (id, sku) VALUES (1, 'after truncate'), (2, 'also after')")
    _, result = cdc.run(spec, run_id="c1")
    assert result.deleted == 200 and result.inserted == 2
    assert cdc.assert_converged("items", ["id"]) == 2


def test_soft_deletes_mark_rows_and_reinserts_clear_the_mark(cdc: CdcEnv) -> None:
    _seed_items(cdc, rows=50)
    spec = CdcSpec(sync_id="soft", tables=("items",), delete_mode="soft")
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("DELETE FROM items WHERE id <= 5")
        conn.execute("INSERT INTO items (id, sku) VALUES (1, 'back')")
    _, result = cdc.run(spec, run_id="c1")
    assert result.deleted == 4
    with cdc.env.target() as target:
        marked = target.execute("SELECT id FROM items WHERE _sync_deleted_at IS NOT NULL ORDER BY id").fetchall()
        back = target.execute("SELECT sku, _sync_deleted_at FROM items WHERE id = 1").fetchone()
    assert [r[0] for r in marked] == [2, 3, 4, 5]
    assert back == ("back", None)


def test_multi_table_transactions_land_together_with_the_lsn(cdc: CdcEnv) -> None:
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE stock (sku text, warehouse text, on_hand int, PRIMARY KEY (sku, warehouse))")
        conn.execute("CREATE TABLE reservations (id bigint PRIMARY KEY, sku text, warehouse text, qty int)")
        conn.execute(
            "INSERT INTO stock SELECT 'S' || g, w, 100 FROM generate_series(1, 20) g, unnest(ARRAY['A', 'B']) w"
        )
    spec = CdcSpec(sync_id="inventory", tables=("stock", "public.reservations"))
    cdc.run(spec, run_id="snap")
    with cdc.env.source(autocommit=False) as conn:
        for i in range(1, 11):
            conn.execute("UPDATE stock SET on_hand = on_hand - %s WHERE sku = 'S1' AND warehouse = 'A'", (i,))
            conn.execute("INSERT INTO reservations VALUES (%s, 'S1', 'A', %s)", (i, i))
        conn.commit()
    manifest, result = cdc.run(spec, run_id="c1")
    assert manifest.transactions == 1
    assert result.tables == {
        "public.stock": {"inserted": 0, "updated": 1, "deleted": 0},
        "public.reservations": {"inserted": 10, "updated": 0, "deleted": 0},
    }
    with cdc.env.target() as target:
        on_hand = target.execute("SELECT on_hand FROM stock WHERE sku = 'S1' AND warehouse = 'A'").fetchone()
        reserved = target.execute("SELECT sum(qty) FROM reservations").fetchone()
    assert on_hand == (100 - 55,) and reserved == (55,)


def test_crash_after_commit_before_slot_advance_is_not_applied_twice(cdc: CdcEnv) -> None:
    _seed_items(cdc, rows=100)
    spec = CdcSpec(sync_id="crash1", tables=("items",))
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("UPDATE items SET qty = qty + 1000 WHERE id <= 30")
    engine = cdc.env.source_engine
    with cdc.env.target() as target:
        manifest = changes_to_staging(
            engine, spec, state=committed_cdc_state(target, spec), staging=cdc.env.staging, run_id="c1"
        )
        assert load_cdc_manifest(target, manifest, keep_staged=True).updated == 30
        # the process dies here: the target committed, the slot was never confirmed
        slot_before = cdc.slot(spec).confirmed_flush_lsn
        assert slot_before is not None and slot_before < manifest.end_lsn
        marks_before = target.execute(
            "SELECT md5(string_agg(_sync_run_id || _sync_synced_at::text, ',' ORDER BY id)) FROM items"
        ).fetchone()

        again = changes_to_staging(
            engine, spec, state=committed_cdc_state(target, spec), staging=cdc.env.staging, run_id="c2"
        )
        assert again.changes == 0  # the next read starts past what the target holds
        assert load_cdc_manifest(target, again).status == "no_changes"
        assert load_cdc_manifest(target, manifest).status == "already_applied"  # Airflow retry of the old load
        marks_after = target.execute(
            "SELECT md5(string_agg(_sync_run_id || _sync_synced_at::text, ',' ORDER BY id)) FROM items"
        ).fetchone()
    assert marks_after == marks_before  # not a single row was touched again
    assert (cdc.slot(spec).confirmed_flush_lsn or 0) >= manifest.end_lsn  # confirmed by the next read
    cdc.assert_converged("items", ["id"])
    engine.dispose()


def test_crash_between_apply_and_commit_changes_nothing_and_the_rerun_applies_once(cdc: CdcEnv) -> None:
    _seed_items(cdc, rows=100)
    spec = CdcSpec(sync_id="crash2", tables=("items",))
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("UPDATE items SET qty = qty + 1000 WHERE id <= 30")
        conn.execute("DELETE FROM items WHERE id > 90")

    def die_after_merge(phase: str, facts: dict[str, Any]) -> None:
        if phase == "merged":
            raise RuntimeError("killed between apply and commit")

    before = cdc.checksums("items", ["id"])[1]
    with pytest.raises(RuntimeError, match="killed"):
        cdc.run(spec, run_id="doomed", observer=die_after_merge)
    assert cdc.checksums("items", ["id"])[1] == before  # nothing half-applied is visible
    _, rerun = cdc.run(spec, run_id="rerun")
    assert (rerun.updated, rerun.deleted) == (30, 10)
    cdc.assert_converged("items", ["id"])


def test_schema_changes_at_the_source_stop_the_load_with_a_clear_message(cdc: CdcEnv) -> None:
    _seed_items(cdc, rows=10)
    spec = CdcSpec(sync_id="drift", tables=("items",))
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("ALTER TABLE items ADD COLUMN color text")
        conn.execute("UPDATE items SET color = 'red' WHERE id = 1")
    with pytest.raises(SchemaError, match=r"table='public.items'.*column='color'.*schema drift"):
        cdc.run(spec, run_id="c1")
    with cdc.env.target() as target:
        target.execute("ALTER TABLE items ADD COLUMN color text")
    cdc.run(spec, run_id="c2")
    cdc.assert_converged("items", ["id"])

    with cdc.env.source() as conn:
        conn.execute("ALTER TABLE items DROP COLUMN note")
        conn.execute("UPDATE items SET qty = 7 WHERE id = 2")
    with pytest.raises(SchemaError, match=r"column='note'.*no longer has"):
        cdc.run(spec, run_id="c3")


def test_guards_name_what_to_fix(cdc: CdcEnv) -> None:
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE nokey (id int, v text)")
        conn.execute("CREATE TABLE noident (id int PRIMARY KEY, v text)")
        conn.execute("ALTER TABLE noident REPLICA IDENTITY NOTHING")
        conn.execute("DROP ROLE IF EXISTS cdc_weak")
        conn.execute("CREATE ROLE cdc_weak LOGIN")
    with pytest.raises(SchemaError, match=r"table='public.nokey'.*primary key required"):
        cdc.run(CdcSpec(sync_id="nokey", tables=("nokey",)))
    with pytest.raises(SchemaError, match=r"REPLICA IDENTITY NOTHING"):
        cdc.run(CdcSpec(sync_id="noident", tables=("noident",)))
    with pytest.raises(SchemaError, match=r"table='public.missing'.*does not exist"):
        cdc.run(CdcSpec(sync_id="missing", tables=("missing",)))

    import sqlalchemy as sa

    from airflow_sync_provider.core.cdc import run_cdc_sync

    weak = sa.create_engine(cdc.env.server.url(cdc.env.source_db).replace("postgres@", "cdc_weak@"))
    with cdc.env.target() as target, pytest.raises(ConfigurationError, match=r"REPLICATION privilege"):
        run_cdc_sync(weak, target, CdcSpec(sync_id="weak", tables=("noident",)), staging=cdc.env.staging)
    weak.dispose()


def test_wal_level_guard_on_a_server_without_logical_decoding() -> None:
    """The machine's own PostgreSQL (127.0.0.1:5432) usually runs with wal_level=replica."""
    import psycopg

    try:
        conn = psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=2", autocommit=True
        )
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 to check the wal_level guard against: {error}")
    with conn:
        level = conn.execute("SHOW wal_level").fetchone()
        if level == ("logical",):
            pytest.skip("the PostgreSQL on 127.0.0.1:5432 already has wal_level=logical")
        with pytest.raises(ConfigurationError, match=r"wal_level=.*CDC needs wal_level=logical"):
            cdc_slot.check_source(conn, CdcSpec(sync_id="wal", tables=("anything",)))


def test_retained_wal_limit_and_missing_slot(cdc: CdcEnv) -> None:
    _seed_items(cdc, rows=10)
    spec = CdcSpec(sync_id="limits", tables=("items",))
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("INSERT INTO items (id, sku) SELECT g, 'x' FROM generate_series(100, 3000) g")
    with pytest.raises(UnsafeOperationError, match=r"bytes of WAL retained.*max_retained_wal_bytes"):
        cdc.run(CdcSpec(sync_id="limits", tables=("items",), max_retained_wal_bytes=1_000), run_id="c1")
    with cdc.env.source() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (spec.slot_name,))
    with pytest.raises(SchemaError, match=r"slot 'sync_limits' is missing.*new initial snapshot"):
        cdc.run(spec, run_id="c2")


def test_a_dropped_publication_fails_instead_of_losing_changes(cdc: CdcEnv) -> None:
    """PostgreSQL decodes nothing while the publication is missing (it only warns): refuse to go on."""
    _seed_items(cdc, rows=10)
    spec = CdcSpec(sync_id="pubgone", tables=("items",))
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("DROP PUBLICATION sync_pubgone")
        conn.execute("INSERT INTO items (id, sku) VALUES (100, 'written while unpublished')")
    with pytest.raises(SchemaError, match=r"publication 'sync_pubgone' is missing.*new initial snapshot"):
        cdc.run(spec, run_id="c1")
    with cdc.env.source() as conn:
        conn.execute("CREATE PUBLICATION sync_pubgone FOR TABLE items")  # recreated by hand: still refused?
        conn.execute("ALTER PUBLICATION sync_pubgone DROP TABLE items")
    with pytest.raises(SchemaError, match=r"does not include public.items"):
        cdc.run(spec, run_id="c2")
    with cdc.env.target() as target:
        target.execute("DELETE FROM _sync_state WHERE sync_id = 'pubgone'")  # the documented reset
    _, reset = cdc.run(spec, run_id="reset")
    assert reset.kind == "snapshot"
    cdc.assert_converged("items", ["id"])


def test_a_quiet_publication_on_a_busy_database_does_not_retain_wal(cdc: CdcEnv) -> None:
    """Runs that find nothing to apply still confirm the slot past the unpublished WAL (heartbeat)."""
    _seed_items(cdc, rows=10)
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE busy (id int PRIMARY KEY, v text)")
    spec = CdcSpec(sync_id="quiet", tables=("items",))
    cdc.run(spec, run_id="snap")
    for round_ in range(3):
        with cdc.env.source() as conn:
            conn.execute(
                "INSERT INTO busy SELECT g, repeat('x', 200) FROM generate_series(%s::int, %s::int) g",
                (round_ * 20_000, round_ * 20_000 + 19_999),
            )
        written_up_to = cdc.slot(spec).current_lsn
        _, result = cdc.run(spec, run_id=f"quiet-{round_}")
        assert result.status == "no_changes"
        assert (cdc.slot(spec).confirmed_flush_lsn or 0) > written_up_to
    with cdc.env.source() as conn:
        conn.execute("SELECT pg_log_standby_snapshot()")  # what the server logs every 15 s when busy
    assert cdc.slot(spec).retained_bytes > 10_000_000
    cdc.run(spec, run_id="quiet-3")
    cdc.run(spec, run_id="quiet-4")
    assert cdc.slot(spec).retained_bytes < 100_000  # the WAL of the busy table is released
    with cdc.env.source() as conn:
        conn.execute("UPDATE items SET qty = 99 WHERE id = 1")
    _, changed = cdc.run(spec, run_id="after-quiet")
    assert changed.updated == 1
    cdc.assert_converged("items", ["id"])


def test_convergence_under_a_concurrent_random_workload(cdc: CdcEnv) -> None:
    """Writers (inserts, updates incl. key changes, deletes, multi-table transactions, one long
    transaction that commits last) run while the sync runs repeatedly; then target == source."""
    with cdc.env.source() as conn:
        conn.execute(ITEMS_DDL)
        conn.execute(
            "CREATE TABLE moves (id bigint PRIMARY KEY, item_id bigint, delta int, at timestamptz DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO items (id, sku, qty, price, note) SELECT g, 'SKU-' || g, 10, 1.5, repeat('n', g % 300) "
            "FROM generate_series(1, 20000) g"
        )
    spec = CdcSpec(sync_id="workload", tables=("items", "moves"), batch_rows=2_000, max_changes=5_000)
    cdc.run(spec, run_id="snap")
    stop = threading.Event()
    errors: list[BaseException] = []

    def workload(seed: int) -> None:
        rng = random.Random(seed)
        next_id = 1_000_000 * (seed + 1)
        try:
            with cdc.env.source() as conn:
                while not stop.is_set():
                    choice = rng.random()
                    target = rng.randint(1, 25_000)
                    with conn.transaction():
                        if choice < 0.35:
                            conn.execute("INSERT INTO items (id, sku, qty) VALUES (%s, 'w', %s)", (next_id, seed))
                            next_id += 1
                        elif choice < 0.65:
                            conn.execute(
                                "UPDATE items SET qty = qty + 1, note = %s WHERE id = %s", (f"s{seed}", target)
                            )
                        elif choice < 0.75:
                            conn.execute(
                                "UPDATE items SET id = %s WHERE id = %s", (next_id, target)
                            )  # primary-key change
                            next_id += 1
                        elif choice < 0.85:
                            conn.execute("DELETE FROM items WHERE id = %s", (target,))
                        else:  # a multi-table transaction
                            conn.execute("UPDATE items SET qty = qty - 1 WHERE id = %s", (target,))
                            conn.execute(
                                "INSERT INTO moves (id, item_id, delta) VALUES (%s, %s, -1)", (next_id, target)
                            )
                            next_id += 1
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    long_txn = cdc.env.source(autocommit=False)
    # rows no writer touches (writers block on locked rows, and this one commits only after them)
    long_txn.execute(
        "INSERT INTO items (id, sku, note) SELECT g, 'L', 'long transaction' FROM generate_series(500000, 500010) g"
    )
    long_txn.execute("INSERT INTO moves (id, item_id, delta) VALUES (1, 500000, 0)")
    threads = [threading.Thread(target=workload, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    runs = 0
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            cdc.run(spec, run_id=f"during-{runs}")
            runs += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    long_txn.commit()  # commits last, with the oldest start
    long_txn.close()
    assert not errors, errors
    while True:
        manifest, _ = cdc.run(spec, run_id=f"after-{runs}")
        runs += 1
        if manifest.transactions == 0:
            break
    items = cdc.assert_converged("items", ["id"])
    moves = cdc.assert_converged("moves", ["id"])
    with cdc.env.target() as target:
        late = target.execute("SELECT count(*) FROM items WHERE note = 'long transaction'").fetchone()
    assert late == (11,)  # the transaction that started first and committed last is there
    assert runs >= 3 and items > 0 and moves > 0
    print(f"\ncdc workload: {runs} runs, items={items:,}, moves={moves:,}")


def test_apply_rate_for_100k_changes(cdc: CdcEnv) -> None:
    """A figure for the notes (not a timed assertion): read + apply of 100k changes."""
    with cdc.env.source() as conn:
        conn.execute(ITEMS_DDL)
        conn.execute("INSERT INTO items (id, sku, qty) SELECT g, 'SKU-' || g, 0 FROM generate_series(1, 50000) g")
    spec = CdcSpec(sync_id="rate", tables=("items",))
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        for low in range(0, 50_000, 5_000):  # 50k updates in 10 transactions...
            conn.execute("UPDATE items SET qty = qty + 1 WHERE id > %s AND id <= %s", (low, low + 5_000))
        conn.execute("INSERT INTO items (id, sku, qty) SELECT g, 'N', 1 FROM generate_series(100001, 150000) g")
        slot_name = spec.slot_name
        started = time.monotonic()
        raw = conn.execute(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
            "'publication_names', %s)",
            (slot_name, spec.publication),
        ).fetchone()
        raw_seconds = time.monotonic() - started
    engine = cdc.env.source_engine
    with cdc.env.target() as target:
        started = time.monotonic()
        manifest = changes_to_staging(
            engine, spec, state=committed_cdc_state(target, spec), staging=cdc.env.staging, run_id="c"
        )
        extract_seconds = time.monotonic() - started
        result = load_cdc_manifest(target, manifest)
        total = time.monotonic() - started
    confirm_applied(engine, spec, lsn_to_int(result.end_lsn))
    engine.dispose()
    assert manifest.changes == 100_000 and (result.inserted, result.updated) == (50_000, 50_000)
    cdc.assert_converged("items", ["id"])
    assert raw is not None
    print(
        f"\ncdc 100k changes: slot read (server-side decode, count only) {raw[0]:,} messages in {raw_seconds:.2f} s "
        f"({100_000 / raw_seconds:,.0f} changes/s); extract+stage {extract_seconds:.2f} s, apply "
        f"{total - extract_seconds:.2f} s, end to end {100_000 / total:,.0f} changes/s; final LSN {result.end_lsn}"
    )


def test_snapshot_filter_places_32_bit_xids_in_the_right_epoch() -> None:
    epoch = 3 << 32
    snapshot = SnapshotFilter(f"{epoch + 100}:{epoch + 110}:{epoch + 103},{epoch + 105}")
    assert snapshot.visible(99) and snapshot.visible(104)
    assert not snapshot.visible(103) and not snapshot.visible(110) and not snapshot.visible(200)
    wrapped = SnapshotFilter(f"{epoch - 5}:{epoch + 5}:")  # xmin in the previous epoch
    assert wrapped.visible(2**32 - 3) and wrapped.visible(4) and not wrapped.visible(5)
    assert int_to_lsn(lsn_to_int("16/B374D848")) == "16/B374D848"


def test_schema_drift_evolve_follows_added_and_dropped_columns(cdc: CdcEnv) -> None:
    _seed_items(cdc, rows=10)
    spec = CdcSpec(sync_id="evolve", tables=("items",), schema_drift="evolve")
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("ALTER TABLE items ADD COLUMN color text")
        conn.execute("UPDATE items SET color = 'red' WHERE id = 1")
    cdc.run(spec, run_id="c1")  # the target gains the column in the load's transaction
    cdc.assert_converged("items", ["id"])

    with cdc.env.source() as conn:
        conn.execute("ALTER TABLE items DROP COLUMN note")
        conn.execute("UPDATE items SET qty = 7 WHERE id = 2")
        conn.execute("INSERT INTO items (id, sku, qty, color) VALUES (1000, 'SKU-NEW', 1, 'blue')")
    _, result = cdc.run(spec, run_id="c2")
    assert (result.inserted, result.updated) == (1, 1)
    cdc.assert_converged("items", ["id"])  # compares the source's columns: note is gone there
    with cdc.env.target() as target:  # kept in the target, NULL for rows written after the drop
        assert target.execute("SELECT note IS NULL FROM items WHERE id = 1000").fetchone() == (True,)
        assert target.execute("SELECT count(note) FROM items").fetchone() != (0,)
    with pytest.raises(ConfigurationError, match="schema_drift must be one of"):
        CdcSpec(sync_id="x", tables=("items",), schema_drift="ignore")  # type: ignore[arg-type]


def test_scd2_history_of_a_cdc_table(cdc: CdcEnv) -> None:
    _seed_items(cdc, rows=50)
    spec = CdcSpec(sync_id="hist", tables=("items",), history=True)
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("UPDATE items SET qty = qty + 1 WHERE id IN (1, 2)")
        conn.execute("UPDATE items SET qty = qty + 1 WHERE id = 1")  # two changes, one new version
        conn.execute("DELETE FROM items WHERE id = 3")
        conn.execute("INSERT INTO items (id, sku, qty) VALUES (100, 'SKU-100', 5)")
        conn.execute("UPDATE items SET id = 200 WHERE id = 4")  # a key change
    cdc.run(spec, run_id="c1")
    cdc.run(spec, run_id="c2")  # nothing new: no version
    cdc.assert_converged("items", ["id"])
    with cdc.env.target() as target:
        versions = dict(target.execute("SELECT id, count(*) FROM items_history GROUP BY id ORDER BY id").fetchall())
        current = target.execute("SELECT count(*), count(DISTINCT id) FROM items_history WHERE _is_current").fetchone()
        closed_by_delete = target.execute("SELECT id FROM items_history WHERE _sync_deleted ORDER BY id").fetchall()
        same = target.execute(
            "SELECT count(*) FROM items t JOIN items_history h ON h.id = t.id AND h._is_current "
            "WHERE (t.sku, t.qty, t.note) IS NOT DISTINCT FROM (h.sku, h.qty, h.note)"
        ).fetchone()
    assert (versions[1], versions[2], versions[3], versions[5]) == (2, 2, 1, 1)
    assert versions[100] == 1 and versions[200] == 1
    assert current == (50, 50)  # 50 - 1 deleted + 1 inserted; the moved key counts once
    assert closed_by_delete == [(3,), (4,)]
    assert same == (50,)  # the current versions are the target's rows


def _toast_body(seed: str, kilobytes: int = 128) -> str:
    """~``kilobytes`` kB of hex text: compressible only ~2x, so stored out of line (TOASTed)."""
    import hashlib

    chunks = (hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(kilobytes * 1024 // 64))
    return "".join(chunks)


def _toast_table(cdc: CdcEnv, rows: dict[int, str]) -> CdcSpec:
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int, body text)")
        for key, body in rows.items():
            conn.execute("INSERT INTO t VALUES (%s, 0, %s)", (key, body))
    spec = CdcSpec(sync_id="toastkeys", tables=("t",))
    _, snapshot = cdc.run(spec, run_id="snap")
    assert snapshot.kind == "snapshot"
    return spec


def test_issue13_key_chain_then_unchanged_toast_update_takes_the_moved_rows_value(cdc: CdcEnv) -> None:
    """Issue 13, repro 1: 1->201, 3->1, then an update of v on id=1 whose body is left out as unchanged.

    The body of id=1 is B's (the row that moved in), not A's (the row the target held at id=1).
    """
    body_a, body_b = _toast_body("A"), _toast_body("B")
    spec = _toast_table(cdc, {1: body_a, 3: body_b})
    with cdc.env.source() as conn:
        conn.execute("UPDATE t SET id = 201 WHERE id = 1")
        conn.execute("UPDATE t SET id = 1 WHERE id = 3")
        conn.execute("UPDATE t SET v = 6 WHERE id = 1")
    manifest, result = cdc.run(spec, run_id="c1", keep_staged=True)
    unchanged = [
        value
        for part in manifest.tables
        for staged in part.files
        for value in pq.read_table(staged.uri.removeprefix("file://"))["_cdc_unchanged"].to_pylist()
    ]
    assert unchanged.count("{3}") == 3  # the stream left every body out
    assert result.status == "applied"
    cdc.assert_converged("t", ["id"])
    with cdc.env.target() as target:
        rows = dict(target.execute("SELECT id, (v, md5(body)) FROM t").fetchall())
    assert set(rows) == {1, 201}
    with cdc.env.source() as conn:
        assert dict(conn.execute("SELECT id, (v, md5(body)) FROM t").fetchall()) == rows
    _, again = cdc.run(spec, run_id="c2")
    assert again.status == "no_changes"


def test_issue13_key_change_then_unchanged_toast_update_applies(cdc: CdcEnv) -> None:
    """Issue 13, repro 2: 1->2, then an update of v on id=2 (body unchanged) in the same batch."""
    spec = _toast_table(cdc, {1: _toast_body("A")})
    with cdc.env.source() as conn:
        conn.execute("UPDATE t SET id = 2 WHERE id = 1")
        conn.execute("UPDATE t SET v = 9 WHERE id = 2")
    _, result = cdc.run(spec, run_id="c1")
    assert (result.status, result.inserted, result.deleted) == ("applied", 1, 1)
    cdc.assert_converged("t", ["id"])


def test_unchanged_toast_through_swaps_chains_deletes_and_reinserts_in_one_batch(cdc: CdcEnv) -> None:
    """Identity followed in commit order: a swap via a spare key, a chain of moves, a delete and a
    re-insert of a key, a multi-row transaction, all with bodies left out as unchanged."""
    bodies = {k: _toast_body(f"row{k}", 16) for k in (1, 2, 3, 4, 5)}
    spec = _toast_table(cdc, bodies)
    with cdc.env.source() as conn:
        with conn.transaction():  # swap 1 <-> 2 through 100, then touch both
            conn.execute("UPDATE t SET id = 100 WHERE id = 1")
            conn.execute("UPDATE t SET id = 1 WHERE id = 2")
            conn.execute("UPDATE t SET id = 2 WHERE id = 100")
            conn.execute("UPDATE t SET v = v + 1 WHERE id IN (1, 2)")
        conn.execute("UPDATE t SET id = 30 WHERE id = 3")  # a chain 3 -> 30 -> 300 -> 3000
        conn.execute("UPDATE t SET v = 7 WHERE id = 30")
        conn.execute("UPDATE t SET id = 300 WHERE id = 30")
        conn.execute("UPDATE t SET id = 3000, v = 8 WHERE id = 300")
        conn.execute("DELETE FROM t WHERE id = 4")  # a delete, then a new row at the same key
        conn.execute("INSERT INTO t VALUES (4, 40, %s)", (_toast_body("new4", 16),))
        conn.execute("UPDATE t SET v = 41 WHERE id = 4")
        conn.execute("DELETE FROM t WHERE id = 5")  # ...and a row moved onto a freed key
        conn.execute("UPDATE t SET id = 5 WHERE id = 4")
        conn.execute("UPDATE t SET v = 50 WHERE id = 5")
    _, result = cdc.run(spec, run_id="c1")
    assert result.status == "applied"
    cdc.assert_converged("t", ["id"])
    with cdc.env.target() as target:
        bodies_now = dict(target.execute("SELECT id, body FROM t").fetchall())
    assert bodies_now == {1: bodies[2], 2: bodies[1], 3000: bodies[3], 5: _toast_body("new4", 16)}


def _other_encoding_source(cdc: CdcEnv, encoding: str) -> tuple[CdcEnv, str]:
    """A CdcEnv whose source is a new database in ``encoding`` (C locale) on the test server."""
    from psycopg import sql

    from ..conftest import SyncEnv

    name = f"{cdc.env.source_db}_{encoding.lower()}"
    with cdc.env.server.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(
            sql.SQL("CREATE DATABASE {} WITH ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0").format(
                sql.Identifier(name), sql.Literal(encoding)
            )
        )
    return CdcEnv(SyncEnv(cdc.env.server, name, cdc.env.target_db, cdc.env.staging)), name


def _drop_source(cdc: CdcEnv, name: str) -> None:
    from psycopg import sql

    with cdc.env.server.connect(name) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s", (name,)
        )
    with cdc.env.server.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _same_rows(cdc: CdcEnv, table: str) -> None:
    """Source rows (read with client_encoding UTF8: text, not bytes, converted) == target rows."""
    import psycopg
    from psycopg import sql

    query = sql.SQL("SELECT id, name, v FROM {} ORDER BY id").format(sql.Identifier(table))
    with (
        psycopg.connect(cdc.env.server.dsn(cdc.env.source_db) + " client_encoding=UTF8") as src,
        cdc.env.target() as tgt,
    ):
        assert src.execute(query).fetchall() == tgt.execute(query).fetchall()


def test_sql_ascii_source_streams_ascii_and_utf8_text(cdc: CdcEnv) -> None:
    """Issue 13: psycopg returns SQL_ASCII text as bytes, so CDC refused with "wal_level=b'logical'"."""
    ascii_cdc, name = _other_encoding_source(cdc, "SQL_ASCII")
    try:
        with ascii_cdc.env.source() as conn:
            assert conn.execute("SHOW wal_level").fetchone() == (b"logical",)  # what the guard used to compare
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, name text, v int)")
            conn.execute(
                "INSERT INTO t VALUES (1, 'plain', 1), (2, convert_from(%s, 'SQL_ASCII'), 1)", ("nöte €".encode(),)
            )
        spec = CdcSpec(sync_id="sqlascii", tables=("t",))
        _, snapshot = ascii_cdc.run(spec, run_id="snap")
        assert (snapshot.kind, snapshot.inserted) == ("snapshot", 2)
        with ascii_cdc.env.source() as conn:
            conn.execute("UPDATE t SET v = 2")
            conn.execute("INSERT INTO t VALUES (3, convert_from(%s, 'SQL_ASCII'), 3)", ("ünï".encode(),))
        _, changes = ascii_cdc.run(spec, run_id="c1")
        assert (changes.inserted, changes.updated) == (1, 2)
        _same_rows(ascii_cdc, "t")
        with cdc.env.target() as target_conn:
            assert dict(target_conn.execute("SELECT id, name FROM t").fetchall()) == {1: "plain", 2: "nöte €", 3: "ünï"}

        # A value that is not UTF-8 (a Latin-1 é) cannot be known for what it is: fail, saying why.
        with ascii_cdc.env.source() as conn:
            conn.execute("INSERT INTO t VALUES (4, convert_from(%s, 'SQL_ASCII'), 4)", (b"caf\xe9",))
        with pytest.raises(DataError, match=r"table='public.t' column='name'.*SQL_ASCII.*not valid UTF-8"):
            ascii_cdc.run(spec, run_id="c2")
        with ascii_cdc.env.source() as conn:  # the documented fix: convert the value at the source
            conn.execute(
                "UPDATE t SET name = convert_from(convert(convert_to(name, 'SQL_ASCII'), 'LATIN1', 'UTF8'), "
                "'SQL_ASCII') WHERE id = 4"
            )
        with pytest.raises(DataError, match=r"SQL_ASCII"):  # the bad change is still in the stream...
            ascii_cdc.run(spec, run_id="c3")
        with cdc.env.target() as target_conn:  # ...so a table re-snapshot is the way past it
            assert target_conn.execute("SELECT count(*) FROM t").fetchone() == (3,)
        _, resnapshot = _resnapshot(ascii_cdc, spec, ["t"])
        assert (resnapshot.kind, resnapshot.status, resnapshot.inserted) == ("table_snapshot", "applied", 1)
        _, after = ascii_cdc.run(spec, run_id="c4")
        assert after.status in ("no_changes", "applied") and after.inserted == after.updated == 0
        _same_rows(ascii_cdc, "t")
        with cdc.env.target() as target_conn:
            assert target_conn.execute("SELECT name FROM t WHERE id = 4").fetchone() == ("café",)
    finally:
        _drop_source(cdc, name)


def _resnapshot(cdc: CdcEnv, spec: CdcSpec, tables: list[str], **kwargs: Any) -> Any:
    from airflow_sync_provider.core.cdc import resnapshot_tables

    engine = cdc.env.source_engine
    try:
        with cdc.env.target() as target:
            return resnapshot_tables(engine, target, spec, tables, staging=cdc.env.staging, **kwargs)
    finally:
        engine.dispose()


def test_sql_ascii_snapshot_with_a_non_utf8_value_fails_saying_why(cdc: CdcEnv) -> None:
    ascii_cdc, name = _other_encoding_source(cdc, "SQL_ASCII")
    try:
        with ascii_cdc.env.source() as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, name text, v int)")
            conn.execute("INSERT INTO t VALUES (1, convert_from(%s, 'SQL_ASCII'), 1)", (b"caf\xe9",))
        with pytest.raises(DataError, match=r"table='public.t'.*SQL_ASCII.*not valid UTF-8"):
            ascii_cdc.run(CdcSpec(sync_id="sqlascii2", tables=("t",)), run_id="snap")
    finally:
        _drop_source(cdc, name)


def test_latin1_source_is_converted_to_utf8(cdc: CdcEnv) -> None:
    """pgoutput sends text in the reading session's client encoding: read as UTF-8, it converts."""
    latin_cdc, name = _other_encoding_source(cdc, "LATIN1")
    try:
        with latin_cdc.env.source() as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, name text, v int)")
            conn.execute("INSERT INTO t VALUES (1, 'café', 1)")
        spec = CdcSpec(sync_id="latin1", tables=("t",))
        latin_cdc.run(spec, run_id="snap")
        with latin_cdc.env.source() as conn:
            conn.execute("INSERT INTO t VALUES (2, 'naïve ÿ', 2)")
            conn.execute("UPDATE t SET name = name || ' à' WHERE id = 1")
        _, changes = latin_cdc.run(spec, run_id="c1")
        assert (changes.inserted, changes.updated) == (1, 1)
        with cdc.env.target() as target_conn:
            assert dict(target_conn.execute("SELECT id, name FROM t").fetchall()) == {1: "café à", 2: "naïve ÿ"}
        _same_rows(latin_cdc, "t")
    finally:
        _drop_source(cdc, name)


def test_staged_files_are_cut_by_bytes_within_and_across_transactions(cdc: CdcEnv) -> None:
    """batch_bytes bounds memory: wide rows are written out every ~batch_bytes, one transaction or many."""
    spec = _toast_table(cdc, {1: _toast_body("first", 16)})
    spec = CdcSpec(sync_id=spec.sync_id, tables=spec.tables, batch_bytes=60_000)
    with cdc.env.source() as conn:
        with conn.transaction():  # one transaction of ~320 kB
            for key in range(100, 120):
                conn.execute("INSERT INTO t VALUES (%s, 1, %s)", (key, _toast_body(f"big{key}", 16)))
        for key in range(200, 210):  # ten transactions of ~16 kB
            conn.execute("INSERT INTO t VALUES (%s, 1, %s)", (key, _toast_body(f"small{key}", 16)))
        conn.execute("UPDATE t SET v = 2 WHERE id >= 100")  # bodies left out: small messages
    manifest, result = cdc.run(spec, run_id="c1")
    files = [f.rows for part in manifest.tables for f in part.files]
    assert sum(files) == 20 + 10 + 30 and len(files) >= 8  # ~500 kB of bodies in files of ~60 kB
    assert max(files[:-1]) <= 4  # 16 kB rows, four a file (the last holds the small updates)
    assert (result.inserted, result.updated) == (30, 0)
    cdc.assert_converged("t", ["id"])


def test_a_spilled_transaction_is_taken_back_when_the_batch_must_end_before_it(cdc: CdcEnv) -> None:
    """A big transaction written out mid-way, then a column change of another table in it: the batch
    ends before that transaction, and its files are gone from the batch."""
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE small (id int PRIMARY KEY, v int)")
        conn.execute("CREATE TABLE wide (id int PRIMARY KEY, body text)")
    spec = CdcSpec(sync_id="spill", tables=("small", "wide"), batch_bytes=50_000, schema_drift="evolve")
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("INSERT INTO small VALUES (1, 1)")
        with conn.transaction():
            for key in range(20):
                conn.execute("INSERT INTO wide VALUES (%s, %s)", (key, _toast_body(f"w{key}", 16)))
            conn.execute("ALTER TABLE small ADD COLUMN note text")
            conn.execute("INSERT INTO small VALUES (2, 2, 'after the change')")
    manifest, first = cdc.run(spec, run_id="c1", keep_staged=True)
    assert manifest.transactions == 1 and first.tables == {"public.small": {"inserted": 1, "updated": 0, "deleted": 0}}
    wide = next(t for t in manifest.tables if t.source_table == "public.wide")
    assert wide.files == () and wide.rows == 0
    from pathlib import Path

    folder = Path(cdc.env.staging.batch_uri(spec.sync_id, manifest.manifest_id).removeprefix("file://"))
    assert folder.is_dir() and not list(folder.glob("*wide*"))  # files of the taken-back transaction: deleted
    _, second = cdc.run(spec, run_id="c2")
    assert second.tables["public.wide"]["inserted"] == 20
    cdc.assert_converged("small", ["id"])
    cdc.assert_converged("wide", ["id"])


def test_a_long_step_is_never_silent() -> None:
    """The load and the slot read log what runs at least every interval, even inside one statement."""
    from airflow_sync_provider.core.cdc.watch import Watch

    lines: list[str] = []

    class Collect:
        def info(self, msg: str, /, *args: Any) -> None:
            lines.append(msg % args)

        def warning(self, msg: str, /, *args: Any) -> None:
            lines.append(msg % args)

    with Watch(Collect(), "sync s: load", interval=0.05) as watch:
        watch.phase("merging (public.t)")
        time.sleep(0.32)
    assert len(lines) >= 4
    assert all(line.startswith("sync s: load: still merging (public.t) (") for line in lines)
    count = len(lines)
    time.sleep(0.15)
    assert len(lines) == count  # stopped with the block


def test_begin_and_commit_fields_read_what_decode_reads() -> None:
    import struct

    from airflow_sync_provider.core.cdc import pgoutput

    begin = b"B" + struct.pack(">QqI", 0x16_B374D848, 123_456, 4_000_000_001)
    commit = b"C" + struct.pack(">bQQq", 0, 0x16_B374D848, 0x16_B374D900, 123_456)
    decoded_begin, decoded_commit = pgoutput.decode(begin), pgoutput.decode(commit)
    assert isinstance(decoded_begin, pgoutput.Begin) and isinstance(decoded_commit, pgoutput.Commit)
    assert pgoutput.begin_fields(begin) == (decoded_begin.final_lsn, decoded_begin.xid)
    assert pgoutput.commit_fields(commit) == (decoded_commit.commit_lsn, decoded_commit.end_lsn)
    with pytest.raises(pgoutput.DecodeError):
        pgoutput.begin_fields(begin[:9])


def test_the_snapshot_of_a_wide_table_is_paged_by_bytes(cdc: CdcEnv) -> None:
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int, body text)")
        for key in range(1, 31):
            conn.execute("INSERT INTO t VALUES (%s, 0, %s)", (key, _toast_body(f"s{key}", 16)))
    spec = CdcSpec(sync_id="widesnap", tables=("t",), batch_bytes=100_000)
    manifest, result = cdc.run(spec, run_id="snap", keep_staged=True)
    assert (manifest.kind, result.inserted) == ("snapshot", 30)
    files = [f.rows for f in manifest.tables[0].files]
    assert len(files) >= 5 and max(files) <= 4  # ~16 kB rows, pages of ~100 kB / 2
    cdc.assert_converged("t", ["id"])


def test_identity_following_with_hostile_names(cdc: CdcEnv) -> None:
    """The identity links and the value resolution quote every name (a % in a name, parameters bound)."""
    with cdc.env.source() as conn:
        conn.execute('CREATE TABLE "we%ird ""t""" ("i%d" int PRIMARY KEY, "v %s" int, "bo%(x)sdy" text)')
        conn.execute('ALTER TABLE "we%ird ""t""" ALTER COLUMN "bo%(x)sdy" SET STORAGE EXTERNAL')
        for key in (1, 3):
            conn.execute('INSERT INTO "we%%ird ""t""" VALUES (%s, 0, %s)', (key, _toast_body(f"h{key}", 8)))
    spec = CdcSpec(sync_id="hostile_toast", tables=('we%ird "t"',))
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute('UPDATE "we%ird ""t""" SET "i%d" = 201 WHERE "i%d" = 1')  # no parameters: % as is
        conn.execute('UPDATE "we%ird ""t""" SET "i%d" = 1 WHERE "i%d" = 3')
        conn.execute('UPDATE "we%ird ""t""" SET "v %s" = 6 WHERE "i%d" = 1')
        conn.execute('DELETE FROM "we%ird ""t""" WHERE "i%d" = 201')
    _, result = cdc.run(spec, run_id="c1")
    assert (result.status, result.deleted) == ("applied", 1)
    cdc.assert_converged('we%ird "t"', ["i%d"])


def test_a_column_change_between_two_changes_of_one_transaction_fails_instead_of_stalling(cdc: CdcEnv) -> None:
    """INSERT; ALTER TABLE; INSERT in one transaction cannot be staged in one shape.  Ending the batch
    before it (as for a change between transactions) would leave every run empty for ever; it fails,
    naming the recovery: re-snapshot that table."""
    _seed_items(cdc, rows=10)
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE other (id int PRIMARY KEY, v int)")
    spec = CdcSpec(sync_id="midtxn", tables=("items", "other"), schema_drift="evolve")
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("INSERT INTO other VALUES (1, 1)")  # a transaction before it: applied
        with conn.transaction():
            conn.execute("INSERT INTO items (id, sku) VALUES (100, 'before the change')")
            conn.execute("ALTER TABLE items ADD COLUMN color text")
            conn.execute("INSERT INTO items (id, sku, color) VALUES (101, 'after', 'red')")
            conn.execute("INSERT INTO other VALUES (2, 2)")
    _, first = cdc.run(spec, run_id="c1")  # ends before that transaction
    assert first.tables == {"public.other": {"inserted": 1, "updated": 0, "deleted": 0}}
    with pytest.raises(SchemaError, match=r"table='public.items'.*between two of its row changes.*resnapshot_tables"):
        cdc.run(spec, run_id="c2")
    _, resnapshot = _resnapshot(cdc, spec, ["items"])
    assert resnapshot.inserted == 2
    _, after = cdc.run(spec, run_id="c3")
    assert after.tables == {"public.other": {"inserted": 1, "updated": 0, "deleted": 0}}  # items: skipped
    cdc.assert_converged("items", ["id"])
    cdc.assert_converged("other", ["id"])
