"""What a stream keeps between its micro-batches (core/cdc/extract.py ``SourceSession``, in-memory
staging in core/staging.py), against the real PostgreSQL: one source connection serves every batch;
a connection lost between batches is replaced and the stream resumes with nothing lost or applied
twice; a change batch staged in memory lands exactly as the same batch staged as Parquet files, and
leaves nothing behind.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pyarrow as pa
import pytest

from airflow_sync_provider.core import staging as staging_module
from airflow_sync_provider.core.cdc import CdcSpec
from airflow_sync_provider.core.errors import SyncError
from airflow_sync_provider.core.staging import memory_staging, read_staged_table
from airflow_sync_provider.core.streaming import CdcStream

from ..conftest import CdcEnv

SPEC = CdcSpec(sync_id="stock_session", tables=("stock",), batch_rows=200)


def _seed(cdc: CdcEnv, rows: int = 300) -> None:
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE stock (id bigint PRIMARY KEY, qty int NOT NULL, note text)")
        conn.execute("INSERT INTO stock SELECT g, g %% 100, md5(g::text) FROM generate_series(1, %s) g", (rows,))


def _change(src: psycopg.Connection[Any], n: int) -> None:
    """Inserts, updates (the same key twice in one batch) and deletes, in small transactions."""
    with src.transaction():
        src.execute("INSERT INTO stock VALUES (%s, 1, 'new')", (10_000 + n,))
        src.execute("UPDATE stock SET qty = qty + 1 WHERE id %% 40 = %s", (n % 40,))
    src.execute("UPDATE stock SET qty = qty + 7, note = 'again' WHERE id %% 40 = %s", (n % 40,))
    src.execute("DELETE FROM stock WHERE id = %s", (n * 5 + 2,))


def _applied_versions(cdc: CdcEnv, sync_id: str, schema: str = "public") -> list[int]:
    with cdc.env.target() as conn:
        rows = conn.execute(
            f"SELECT state_version FROM {schema}._sync_audit WHERE sync_id = %s AND status = 'applied' ORDER BY 1",
            (sync_id,),
        ).fetchall()
    return [v for (v,) in rows]


def _terminate_source_backends(cdc: CdcEnv, keep: int) -> int:
    """Terminate the source database's client connections but this one and ``keep`` (the writer's)."""
    with cdc.env.source() as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid NOT IN (pg_backend_pid(), %s) AND backend_type = 'client backend'",
            (keep,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_one_source_connection_serves_every_batch_and_a_lost_one_is_replaced(cdc: CdcEnv) -> None:
    _seed(cdc)
    engine = cdc.env.source_engine
    with cdc.env.target() as target:
        stream = CdcStream(engine, target, SPEC, staging=cdc.env.staging)
        try:
            stream.step()  # the snapshot (on a connection of its own)
            with cdc.env.source() as src:
                for n in range(5):  # five batches: probe, read and confirm on the one connection
                    _change(src, n)
                    assert stream.probe()
                    assert stream.step().changes > 0
                assert stream.session.connects == 1
                assert not stream.probe()  # nothing left: an idle peek

                assert (
                    _terminate_source_backends(cdc, src.info.backend_pid) == 1
                )  # the server drops the stream's connection
                _change(src, 5)
                assert stream.probe()  # the lost connection was replaced, the changes seen
                assert stream.step().changes > 0
                assert stream.session.connects == 2

                assert (
                    _terminate_source_backends(cdc, src.info.backend_pid) == 1
                )  # lost again, this time with no probe before
                _change(src, 6)
                assert stream.step().changes > 0  # the ping before the read replaced it
                assert stream.session.connects == 3
        finally:
            stream.close()
            engine.dispose()
    cdc.assert_converged("stock", ["id"])  # nothing lost
    versions = _applied_versions(cdc, SPEC.sync_id)
    assert versions == list(range(1, len(versions) + 1))  # each batch applied once, in order
    assert not cdc.slot(SPEC).active


def test_a_change_batch_staged_in_memory_lands_like_the_parquet_one(cdc: CdcEnv, tmp_path: Any) -> None:
    """Two syncs of the same table (two slots), one staging its change batches in memory and the
    other as Parquet files, given the same changes: the same target rows and the same counts."""
    _seed(cdc)
    with cdc.env.target() as conn:
        conn.execute("CREATE SCHEMA in_memory")
        conn.execute("CREATE SCHEMA on_disk")
    specs = {
        True: CdcSpec(sync_id="stock_mem", tables=("stock",), target_schema="in_memory", batch_rows=50),
        False: CdcSpec(sync_id="stock_disk", tables=("stock",), target_schema="on_disk", batch_rows=50),
    }
    engine = cdc.env.source_engine
    results: dict[bool, list[tuple[int, str]]] = {True: [], False: []}
    with cdc.env.target() as target:
        streams = {
            memory: CdcStream(engine, target, spec, staging=cdc.env.staging, in_memory=memory)
            for memory, spec in specs.items()
        }
        try:
            for stream in streams.values():
                stream.step()  # the snapshots (both on disk)
            with cdc.env.source() as src:
                for n in range(30):
                    _change(src, n)
                src.execute("UPDATE stock SET note = NULL WHERE id % 3 = 0")
            for memory, stream in streams.items():
                outcome = stream.step()
                results[memory].append((outcome.changes, outcome.detail.split()[1]))
        finally:
            for stream in streams.values():
                stream.close()
            engine.dispose()
    assert results[True] == results[False] and results[True][0][0] > 100
    with cdc.env.target() as conn:
        tables = [
            conn.execute(f"SELECT id, qty, note FROM {schema}.stock ORDER BY id").fetchall()
            for schema in ("in_memory", "on_disk")
        ]
        counts = [
            conn.execute(
                f"SELECT rows_inserted, rows_updated, rows_deleted FROM {schema}._sync_state WHERE sync_id = %s",
                (spec.sync_id,),
            ).fetchone()
            for schema, spec in (("in_memory", specs[True]), ("on_disk", specs[False]))
        ]
    assert tables[0] == tables[1]
    assert counts[0] == counts[1]
    with cdc.env.source() as src:
        assert len(tables[0]) == src.execute("SELECT count(*) FROM stock").fetchone()[0]  # type: ignore[index]
    # the memory batch is gone once loaded; the disk one never wrote to memory
    assert not [uri for uri in staging_module._MEMORY_TABLES if "stock_mem" in uri or "stock_disk" in uri]


def test_memory_staging_reads_back_what_was_written_and_removes_it() -> None:
    area = memory_staging("unit")
    uri = f"{area.batch_uri('s', 'm1')}/t-00000.parquet"
    table = pa.table({"id": [1, 2, 3], "v": ["a", None, "c"]})
    with area.open_writer(uri, table.schema) as writer:
        writer.write_table(table.slice(0, 2))
        writer.write_table(table.slice(2))
    assert read_staged_table(uri).equals(table)
    assert read_staged_table(uri, ["v"]).column_names == ["v"]
    assert staging_module.staged_schema(uri) == table.schema
    assert sum(b.num_rows for b in staging_module.iter_staged_batches(uri, 2)) == 3
    assert area.sweep_abandoned("s").removed == ()  # nothing in memory is swept by age
    area.discard(area.batch_uri("s", "m1"))
    with pytest.raises(KeyError):
        read_staged_table(uri)


def test_a_failed_load_frees_the_memory_batch_and_the_next_step_applies_it(cdc: CdcEnv) -> None:
    _seed(cdc)
    engine = cdc.env.source_engine
    with cdc.env.target() as target:
        stream = CdcStream(engine, target, SPEC, staging=cdc.env.staging)
        try:
            stream.step()
            target.execute("ALTER TABLE stock ADD CONSTRAINT small CHECK (qty < 1000)")
            with cdc.env.source() as src:
                src.execute("UPDATE stock SET qty = 5000 WHERE id = 7")
                src.execute("UPDATE stock SET qty = qty + 1 WHERE id = 8")
            with pytest.raises(SyncError):
                stream.step()  # the target refuses the batch: rolled back, position unmoved
            assert not [uri for uri in staging_module._MEMORY_TABLES if SPEC.sync_id in uri]
            target.execute("ALTER TABLE stock DROP CONSTRAINT small")
            assert stream.step().changes == 2  # the slot still held both changes
        finally:
            stream.close()
            engine.dispose()
    cdc.assert_converged("stock", ["id"])
