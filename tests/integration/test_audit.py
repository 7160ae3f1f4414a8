"""The audit ledger: one append-only row per load, written in the load's transaction."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

from airflow_sync_provider.core import StagingArea, SyncSpec, extract_for, load_manifest
from airflow_sync_provider.core.audit import read_ledger, table_checksum
from airflow_sync_provider.core.cdc import CdcSpec
from airflow_sync_provider.core.staging import staged_schema

from ..conftest import CdcEnv, SyncEnv

SPEC = SyncSpec(sync_id="ledger", source_table="orders", mode="full", batch_rows=500)


def _seed(env: SyncEnv) -> None:
    with env.source() as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, customer text, amount numeric(10, 2))")
        conn.execute("INSERT INTO orders SELECT g, 'c' || g, g * 0.5 FROM generate_series(1, 2000) g")


def _entries(env: SyncEnv) -> list[dict[str, Any]]:
    with env.target() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cursor:
        return cursor.execute("SELECT * FROM _sync_audit ORDER BY entry_id").fetchall()


def test_each_load_appends_one_row_with_counts_and_checksum(env: SyncEnv) -> None:
    _seed(env)
    env.sync(SPEC, run_id="run-1")
    with env.source() as conn:
        conn.execute("UPDATE orders SET amount = amount + 1 WHERE id <= 10")
        conn.execute("DELETE FROM orders WHERE id > 1990")
    engine = env.source_engine
    with env.target() as target:
        stale = extract_for(engine, target, SPEC, staging=StagingArea(env.staging.base_uri), run_id="run-late")
        fresh = extract_for(engine, target, SPEC, staging=env.staging, run_id="run-2")
        load_manifest(target, fresh, keep_staged=True)
        load_manifest(target, fresh)  # an Airflow retry of the committed load
        load_manifest(target, stale)  # overtaken by run-2
    engine.dispose()

    entries = _entries(env)
    summary = [
        (e["run_id"], e["status"], e["inserted"], e["updated"], e["deleted"], e["state_version"]) for e in entries
    ]
    assert summary == [
        ("run-1", "applied", 2000, 0, 0, 1),
        ("run-2", "applied", 0, 10, 10, 2),
        ("run-2", "already_applied", 0, 0, 0, 2),
        ("run-late", "stale", 0, 0, 0, 2),
    ]
    assert entries[0]["rows_staged"] == 2000 and entries[0]["source_table"] == "orders"
    assert entries[0]["target_table"] == "public.orders" and entries[0]["load_seconds"] > 0
    assert "stale manifest" in entries[3]["details"]["message"]
    with env.target() as target:  # a full batch's checksum is the checksum of what the target then held
        schema = staged_schema(fresh.files[0].uri)
        assert entries[1]["batch_checksum"] == table_checksum(target, sql.Identifier("orders"), schema)
        assert entries[0]["batch_checksum"] != entries[1]["batch_checksum"]


def test_the_ledger_refuses_updates_and_deletes(env: SyncEnv) -> None:
    _seed(env)
    env.sync(SPEC, run_id="run-1")
    with env.target() as target:
        for statement in ("UPDATE _sync_audit SET inserted = 0", "DELETE FROM _sync_audit", "TRUNCATE _sync_audit"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                target.execute(statement)
    assert len(_entries(env)) == 1


def test_a_rolled_back_load_leaves_no_ledger_row(env: SyncEnv) -> None:
    _seed(env)
    env.sync(SPEC, run_id="run-1")

    def die(phase: str, facts: dict[str, Any]) -> None:
        if phase == "merged":
            raise RuntimeError("killed before commit")

    with env.source() as conn:
        conn.execute("UPDATE orders SET amount = 0 WHERE id = 1")
    with pytest.raises(RuntimeError):
        env.sync(SPEC, run_id="doomed", observer=die)
    env.sync(SPEC, run_id="retry")
    assert [(e["run_id"], e["updated"]) for e in _entries(env)] == [("run-1", 0), ("retry", 1)]


def test_cdc_runs_are_in_the_ledger_and_read_per_run(cdc: CdcEnv) -> None:
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE stock (sku text PRIMARY KEY, on_hand int)")
        conn.execute("INSERT INTO stock SELECT 'S' || g, g FROM generate_series(1, 100) g")
    spec = CdcSpec(sync_id="stock", tables=("stock",))
    cdc.run(spec, run_id="snap")
    with cdc.env.source() as conn:
        conn.execute("UPDATE stock SET on_hand = 0 WHERE sku = 'S1'")
    cdc.run(spec, run_id="changes")
    cdc.run(spec, run_id="quiet")
    with cdc.env.target() as target:
        ledger = read_ledger(target, sync_id="stock")
    assert [(r["run_id"], [(x["mode"], x["status"], x["updated"]) for x in r["loads"]]) for r in ledger] == [
        ("snap", [("cdc-snapshot", "applied", 0)]),
        ("changes", [("cdc-changes", "applied", 1)]),
        ("quiet", [("cdc-changes", "no_changes", 0)]),
    ]
    assert ledger[1]["loads"][0]["details"]["transactions"] == 1
    assert ledger[0]["loads"][0]["batch_checksum"].startswith("public.stock=100:")
