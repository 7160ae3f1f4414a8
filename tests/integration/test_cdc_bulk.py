"""The bulk pgoutput decoder stages exactly what the per-message reference stages, case by case.

Every test makes a change stream at a real source, stages it with both decoders (``CdcSpec.decoder``)
from the same committed state, and compares what they staged row for row (values, operations,
commit LSNs, sequence numbers, unchanged-TOAST positions, key-change links) and the batch facts
(changes, transactions, truncates, notes, columns); then the bulk batch is applied and the target
must equal the source.  tests/faults/test_cdc_bulk_property.py does the same for random workloads.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_sync_provider.core.cdc import (
    CdcLoadResult,
    CdcManifest,
    CdcSpec,
    bulk,
    changes_to_staging,
    committed_cdc_state,
    confirm_applied,
    load_cdc_manifest,
    resnapshot_tables,
    slot,
)
from airflow_sync_provider.core.cdc.extract import open_source
from airflow_sync_provider.core.cdc.manifest import SEQ_COLUMN
from airflow_sync_provider.core.errors import SchemaError, SourceUnavailableError, SyncError

from ..conftest import CdcEnv, source_columns, table_checksum


def staged_rows(manifest: CdcManifest) -> dict[str, list[dict[str, Any]]]:
    """Every table's staged rows, in seq order (files may be cut at other rows by the two decoders)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for part in manifest.tables:
        tables = [pq.read_table(f.uri.removeprefix("file://")) for f in part.files]
        if not tables:
            rows[part.source_table] = []
            continue
        table = pa.concat_tables(tables).sort_by(SEQ_COLUMN)
        rows[part.source_table] = table.to_pylist()
    return rows


def _facts(manifest: CdcManifest) -> dict[str, Any]:
    return {
        "changes": manifest.changes,
        "transactions": manifest.transactions,
        "truncates": manifest.truncates,
        "notes": manifest.notes,
        "rows": manifest.rows,
        "columns": {t.source_table: t.columns for t in manifest.tables},
    }


def stage_both(cdc: CdcEnv, spec: CdcSpec) -> CdcManifest:
    """Stage the pending changes with both decoders; assert they agree; return the bulk batch.

    An error must be the same error from both.  (The second read also sees the first read's
    heartbeat, a transaction without rows: it changes no staged row and no fact compared here.)
    """
    engine = cdc.env.source_engine
    try:
        with cdc.env.target() as target:
            state = committed_cdc_state(target, spec)
        outcomes: dict[str, CdcManifest | SyncError] = {}
        for decoder in ("per_message", "bulk"):
            try:
                outcomes[decoder] = changes_to_staging(
                    engine, replace(spec, decoder=decoder), state=state, staging=cdc.env.staging, run_id=decoder
                )
            except SyncError as error:
                outcomes[decoder] = error
    finally:
        engine.dispose()
    reference, mine = outcomes["per_message"], outcomes["bulk"]
    if not isinstance(reference, CdcManifest) or not isinstance(mine, CdcManifest):
        assert (type(mine), str(mine)) == (type(reference), str(reference))
        assert isinstance(mine, SyncError)
        raise mine
    assert _facts(mine) == _facts(reference)
    assert staged_rows(mine) == staged_rows(reference)
    return mine


def apply(cdc: CdcEnv, manifest: CdcManifest, spec: CdcSpec) -> str:
    """Load a staged batch (its position in the same transaction), then confirm the slot."""
    with cdc.env.target() as target:
        result = load_cdc_manifest(target, manifest)
    if result.status in ("applied", "already_applied"):
        engine = cdc.env.source_engine
        try:
            confirm_applied(engine, spec, manifest.end_lsn)
        finally:
            engine.dispose()
    return result.status


def _resnapshot(cdc: CdcEnv, spec: CdcSpec, table: str) -> CdcLoadResult:
    engine = cdc.env.source_engine
    try:
        with cdc.env.target() as target:
            return resnapshot_tables(engine, target, spec, [table], staging=cdc.env.staging)[1]
    finally:
        engine.dispose()


def catch_up(
    cdc: CdcEnv, spec: CdcSpec, tables: list[tuple[str, list[str]]], limit: int = 60, *, recover: bool = False
) -> int:
    """Stage with both decoders and apply until nothing is pending; the targets must equal the sources.

    ``recover``: a table whose columns changed between two row changes of one transaction (which
    both decoders refuse alike) is re-snapshotted alone, the documented recovery.
    """
    batches = 0
    while True:
        try:
            manifest = stage_both(cdc, spec)
        except SchemaError as error:
            if error.rule != "schema change inside a transaction" or not recover:
                raise
            result = _resnapshot(cdc, spec, error.table or "")
            assert result.status == "applied"
            continue
        status = apply(cdc, manifest, spec)
        if status == "no_changes" or (manifest.transactions == 0 and not manifest.notes):
            break
        batches += 1
        assert batches < limit, f"still not caught up after {limit} batches"
    for table, key in tables:
        with cdc.env.source() as src, cdc.env.target() as tgt:
            # A column added at the source reaches the target with the table's next change: compare
            # the columns the target has (all of them once a change has followed the ALTER).
            columns = [c for c in source_columns(src, table) if c in source_columns(tgt, table)]
            assert table_checksum(tgt, table, columns, key) == table_checksum(src, table, columns, key), table
    return batches


def _start(cdc: CdcEnv, ddl: list[str], tables: tuple[str, ...], **options: Any) -> CdcSpec:
    with cdc.env.source() as conn:
        for statement in ddl:
            conn.execute(statement)
    spec = CdcSpec(sync_id="bulk_eq", tables=tables, **options)
    _, snapshot = cdc.run(spec, run_id="snapshot")
    assert snapshot.kind == "snapshot"
    return spec


def _source(cdc: CdcEnv, *statements: str | tuple[str, tuple[Any, ...]]) -> None:
    """Each argument one transaction (a tuple: a statement with parameters; a str may hold several)."""
    with cdc.env.source() as conn:
        for statement in statements:
            if isinstance(statement, tuple):
                conn.execute(statement[0], statement[1])
            else:
                with conn.transaction():
                    for part in statement.split(";"):
                        if part.strip():
                            conn.execute(part)


TOAST = "CREATE TABLE t (id int PRIMARY KEY, v int, note text, body text)"


def test_inserts_updates_deletes_and_nulls_of_many_types(cdc: CdcEnv) -> None:
    spec = _start(
        cdc,
        [
            "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",  # a user type: a Type message before its Relation
            "CREATE TABLE typed (id bigint PRIMARY KEY, i2 smallint, i4 int, f8 float8, n numeric(20, 6), "
            "b boolean, d date, ts timestamp, tz timestamptz, iv interval, u uuid, j jsonb, js json, by bytea, "
            "arr int[], txt text, vc varchar(10), ch char(3), m mood, ip inet, bits bit(4), e text)",
        ],
        ("typed",),
    )
    _source(
        cdc,
        "INSERT INTO typed SELECT g, g, g * 10, g / 3.0, g * 1.5, g % 2 = 0, date '2026-01-01' + g, "
        "timestamp '2026-01-01' + g * interval '1 hour', now(), g * interval '1 minute', gen_random_uuid(), "
        "jsonb_build_object('g', g, 'q', 'x\"y'), '[1, 2]', decode('00ff' || lpad(g::text, 4, '0'), 'hex'), "
        "ARRAY[g, NULL], E'tab\\there, quote \" and comma, newline\\n', 'vc' || g, 'c', 'ok', '10.0.0.1', "
        "B'1010', '' FROM generate_series(1, 300) g",
        "UPDATE typed SET txt = NULL, n = NULL, j = NULL, e = NULL WHERE id % 3 = 0",
        "INSERT INTO typed (id) VALUES (1000)",  # NULL in every other column
        "UPDATE typed SET m = 'happy', txt = 'ünïcödé ✓ 𝄞' WHERE id % 5 = 0",
        "DELETE FROM typed WHERE id % 7 = 0",
    )
    assert catch_up(cdc, spec, [("typed", ["id"])]) >= 0


def test_unchanged_toast_values_and_key_changes(cdc: CdcEnv) -> None:
    spec = _start(cdc, [TOAST, "ALTER TABLE t ALTER COLUMN body SET STORAGE EXTERNAL"], ("t",))
    big = "x" * 5_000
    _source(
        cdc,
        (f"INSERT INTO t SELECT g, 0, 'n', '{big}' || g FROM generate_series(1, 20) g", ()),
        "UPDATE t SET v = v + 1 WHERE id <= 10",  # body left out as unchanged TOAST
        "UPDATE t SET id = id + 100 WHERE id <= 3",  # key changes: an old key, then the new row
        "UPDATE t SET id = 1 WHERE id = 15; UPDATE t SET v = 9 WHERE id = 1",  # a key reused, then touched
        "UPDATE t SET note = NULL, id = -id WHERE id BETWEEN 4 AND 6",
        "DELETE FROM t WHERE id = 7; INSERT INTO t VALUES (7, 1, 'again', NULL)",
    )
    manifest = stage_both(cdc, spec)
    rows = staged_rows(manifest)["public.t"]
    assert any(r["_cdc_unchanged"] == "{4}" for r in rows)  # the TOAST marker is staged by position
    assert sum(r["_cdc_moved_from"] is not None for r in rows) == 3 + 1 + 3
    assert apply(cdc, manifest, spec) == "applied"
    catch_up(cdc, spec, [("t", ["id"])])


def test_replica_identity_full_fills_unchanged_values_from_the_old_row(cdc: CdcEnv) -> None:
    spec = _start(
        cdc,
        [TOAST, "ALTER TABLE t ALTER COLUMN body SET STORAGE EXTERNAL", "ALTER TABLE t REPLICA IDENTITY FULL"],
        ("t",),
    )
    _source(
        cdc,
        ("INSERT INTO t SELECT g, 0, 'n', repeat('y', 4000) || g FROM generate_series(1, 10) g", ()),
        "UPDATE t SET v = 5 WHERE id <= 4",  # old row whole: the left-out body is the old one
        "UPDATE t SET id = 50 WHERE id = 1",  # a key change found by comparing the old and new key
        "UPDATE t SET id = id WHERE id = 2",  # no key change
        "DELETE FROM t WHERE id = 3",
    )
    manifest = stage_both(cdc, spec)
    rows = staged_rows(manifest)["public.t"]
    assert all(r["_cdc_unchanged"] is None for r in rows)
    assert sum(r["_cdc_moved_from"] is not None for r in rows) == 1
    catch_up(cdc, spec, [("t", ["id"])])


def test_several_tables_in_one_batch_and_a_composite_key(cdc: CdcEnv) -> None:
    spec = _start(
        cdc,
        [
            "CREATE TABLE a (id int PRIMARY KEY, v text)",
            "CREATE TABLE b (k1 int, k2 text, v numeric, PRIMARY KEY (k1, k2))",
            "CREATE TABLE other (id int PRIMARY KEY)",  # not in the sync: its rows are left out
        ],
        ("a", "b"),
    )
    _source(
        cdc,
        "INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 50) g; "
        "INSERT INTO b SELECT g % 5, 'k' || g, g FROM generate_series(1, 50) g; INSERT INTO other VALUES (1)",
        "UPDATE b SET k2 = k2 || '!' WHERE k1 = 1; UPDATE a SET v = NULL WHERE id < 5",
        "DELETE FROM b WHERE k1 = 2; INSERT INTO other VALUES (2); DELETE FROM a WHERE id > 45",
    )
    catch_up(cdc, spec, [("a", ["id"]), ("b", ["k1", "k2"])])


def test_truncates_origins_and_logical_messages(cdc: CdcEnv) -> None:
    spec = _start(
        cdc,
        ["CREATE TABLE a (id int PRIMARY KEY, v text)", "CREATE TABLE b (id int PRIMARY KEY, v text)"],
        ("a", "b"),
    )
    with cdc.env.source() as conn:
        conn.execute("SELECT pg_replication_origin_create('bulk_eq_origin')")
    try:
        _source(
            cdc,
            "INSERT INTO a SELECT g, 'a' FROM generate_series(1, 20) g; INSERT INTO b VALUES (1, 'b')",
            "SELECT pg_logical_emit_message(true, 'someone.else', 'hello'); UPDATE a SET v = 'm' WHERE id = 1",
            "SELECT pg_logical_emit_message(false, 'someone.else', 'not in a transaction')",
            "TRUNCATE a; INSERT INTO a VALUES (100, 'after')",
            "TRUNCATE a, b",
            # a transaction replicated from elsewhere: pgoutput sends an Origin message with it
            "SELECT pg_replication_origin_session_setup('bulk_eq_origin'); INSERT INTO b VALUES (2, 'from afar'); "
            "SELECT pg_replication_origin_session_reset()",
        )
        manifest = stage_both(cdc, spec)
        assert len(manifest.truncates) == 3
        catch_up(cdc, spec, [("a", ["id"]), ("b", ["id"])])
    finally:
        with cdc.env.source() as conn:
            conn.execute("SELECT pg_replication_origin_drop('bulk_eq_origin')")


def test_a_relation_change_mid_batch_ends_the_batch_before_it(cdc: CdcEnv) -> None:
    spec = _start(cdc, ["CREATE TABLE a (id int PRIMARY KEY, v text)"], ("a",), schema_drift="evolve")
    _source(
        cdc,
        "INSERT INTO a SELECT g, 'a' FROM generate_series(1, 20) g",
        "ALTER TABLE a ADD COLUMN w int",
        "INSERT INTO a VALUES (21, 'b', 7); UPDATE a SET w = 1 WHERE id < 3",
        "ALTER TABLE a DROP COLUMN v; UPDATE a SET w = 2 WHERE id = 5",
    )
    first = stage_both(cdc, spec)
    assert first.transactions == 1 and any("changed" in note for note in first.notes)  # the ALTER has no rows
    catch_up(cdc, spec, [("a", ["id"])])


def test_a_relation_change_between_two_rows_of_one_transaction_fails_alike(cdc: CdcEnv) -> None:
    spec = _start(cdc, ["CREATE TABLE a (id int PRIMARY KEY, v text)"], ("a",), schema_drift="evolve")
    _source(cdc, "INSERT INTO a VALUES (1, 'x'); ALTER TABLE a ADD COLUMN w int; INSERT INTO a VALUES (2, 'y', 3)")
    with pytest.raises(SchemaError, match="between two of its row changes"):
        stage_both(cdc, spec)


def test_transactions_in_the_snapshot_are_skipped_by_xid(cdc: CdcEnv) -> None:
    """The snapshot hand-off: a transaction the snapshot saw is skipped; one it did not is applied."""
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO a SELECT g, 'a' FROM generate_series(1, 10) g")
    spec = CdcSpec(sync_id="bulk_eq", tables=("a",))
    with cdc.env.source() as conn:  # the slot exists before the snapshot: these are in both
        conn.execute("CREATE PUBLICATION sync_bulk_eq FOR TABLE a")
        conn.execute("SELECT pg_create_logical_replication_slot('sync_bulk_eq', 'pgoutput')")
        conn.execute("UPDATE a SET v = 'before the snapshot' WHERE id <= 5")
        conn.execute("INSERT INTO a VALUES (11, 'before')")
    _, snapshot = cdc.run(spec, run_id="snapshot")
    assert snapshot.kind == "snapshot"
    _source(cdc, "UPDATE a SET v = 'after' WHERE id > 8", "DELETE FROM a WHERE id = 1")
    manifest = stage_both(cdc, spec)
    assert manifest.transactions == 2  # the two before the snapshot skipped
    catch_up(cdc, spec, [("a", ["id"])])


@pytest.mark.parametrize("max_batch_bytes", [1, 2_000])
def test_byte_limits_cut_the_batch_at_the_same_commit(cdc: CdcEnv, max_batch_bytes: int) -> None:
    spec = _start(
        cdc,
        ["CREATE TABLE a (id int PRIMARY KEY, v text)"],
        ("a",),
        max_batch_bytes=max_batch_bytes,
        batch_rows=7,
        batch_bytes=1_500,
    )
    _source(
        cdc,
        *[f"INSERT INTO a SELECT g, repeat('v', 40) FROM generate_series({k}, {k + 9}) g" for k in range(0, 90, 10)],
    )
    first = stage_both(cdc, spec)
    assert 0 < first.transactions < 9
    assert len([f for t in first.tables for f in t.files]) > 1 or first.transactions == 1
    catch_up(cdc, spec, [("a", ["id"])])


@pytest.mark.parametrize("whole", [True, False])
def test_parts_split_anywhere_decode_the_same(cdc: CdcEnv, monkeypatch: pytest.MonkeyPatch, whole: bool) -> None:
    """Parts of a few messages: transactions, key changes and relation messages span part boundaries
    (parts cut from one fetch, or fetched one by one)."""
    monkeypatch.setattr(bulk, "PART_BYTES", 300)
    monkeypatch.setattr(bulk, "WHOLE_READ_WAL_BYTES", 2**62 if whole else 0)
    spec = _start(cdc, [TOAST], ("t",), schema_drift="evolve")
    _source(
        cdc,
        "INSERT INTO t SELECT g, g, 'n' || g, NULL FROM generate_series(1, 40) g",
        "UPDATE t SET id = id + 1000 WHERE id % 4 = 0; DELETE FROM t WHERE id % 5 = 0",
        "ALTER TABLE t ADD COLUMN w int",
        "UPDATE t SET w = id WHERE id < 20",
    )
    catch_up(cdc, spec, [("t", ["id"])])


def test_parts_arrive_in_stream_order_and_add_up(cdc: CdcEnv) -> None:
    """The parts concatenate to the messages the per-message read yields, in the same order."""
    spec = _start(cdc, [TOAST], ("t",))
    _source(cdc, "INSERT INTO t SELECT g, g, repeat('n', g), NULL FROM generate_series(1, 200) g")
    engine = cdc.env.source_engine
    try:
        with open_source(engine, spec.sync_id) as conn:
            _, upto = slot.emit_heartbeat(conn)
            one_by_one = list(slot.read_changes(conn, spec, upto))
            fetched = list(slot.read_change_parts(conn, spec, upto, part_bytes=1_000))
            cut = list(slot.read_change_parts(conn, spec, upto, part_bytes=1_000, whole=True))
    finally:
        engine.dispose()
    for parts in (fetched, cut):
        assert len(parts) > 5
        assert all(sum(p.lengths.tolist()) <= 1_000 or len(p.lengths) == 1 for p in parts)
        joined = [p.data[s : s + n] for p in parts for s, n in zip(p.starts.tolist(), p.lengths.tolist(), strict=True)]
        assert joined == one_by_one


def test_decoder_must_be_known() -> None:
    with pytest.raises(Exception, match="decoder must be"):
        CdcSpec(sync_id="x", tables=("a",), decoder="fast")  # type: ignore[arg-type]


def test_the_default_decoder_is_bulk() -> None:
    assert CdcSpec(sync_id="x", tables=("a",)).decoder == "bulk"


@pytest.mark.parametrize("decoder", ["bulk", "per_message"])
def test_a_source_lost_mid_read_is_source_unavailable_and_the_rerun_catches_up(cdc: CdcEnv, decoder: str) -> None:
    """The read's backend is terminated while the slot is being decoded (as a source restart would):
    the run fails with SourceUnavailableError (a retry may succeed), not a raw driver error, and the
    next run applies everything exactly once."""
    spec = _start(cdc, [TOAST], ("t",), decoder=decoder)
    _source(
        cdc,
        *[
            f"INSERT INTO t SELECT g, g, repeat('n', 50), NULL FROM generate_series({k}, {k + 9999}) g"
            for k in range(0, 60_000, 10_000)
        ],
    )
    stop = threading.Event()
    killed: list[int] = []

    def terminate_the_read() -> None:
        with cdc.env.source() as conn:
            while not stop.is_set() and not killed:
                rows = conn.execute(  # the read's cursor, while it declares or fetches
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND state = 'active' AND position(%s in query) > 0",
                    (f"cdc_{spec.slot_name}",),
                ).fetchall()
                for (pid,) in rows:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    killed.append(pid)
                time.sleep(0.005)

    watcher = threading.Thread(target=terminate_the_read)
    watcher.start()
    try:
        with pytest.raises(SourceUnavailableError, match="failed"):
            cdc.run(spec, run_id="lost")
    finally:
        stop.set()
        watcher.join()
    assert killed
    _, result = cdc.run(spec, run_id="again")
    assert (result.status, result.inserted) == ("applied", 60_000)
    cdc.assert_converged("t", ["id"])
