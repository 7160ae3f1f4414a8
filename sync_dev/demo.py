"""The demo behind ``make demo``: both case studies end to end on an embedded PostgreSQL, no Docker.

It starts a throw-away PostgreSQL (wal_level=logical), creates and seeds the case studies'
databases, registers their Airflow connections, runs the two reference DAGs with ``dag.test()``
(inventory across warehouses and stores; a bank's customer master to three systems), simulates a
round of changes, runs them again, backfills a past window, and reports what was synced, the gate
and reconciliation results and the business invariants.

Then the real-time inventory variant (``inventory_sync_realtime``): one streaming task runs for a
short while as warehouses receive stock and stores sell, while a checker reads the stores; it
reports the stream's latency (warehouse commit -> every store) and that no store could oversell.

Then the device case study (``device_inventory_sync``): simulated RFID gates and scanners publish
stock movements over MQTT to a private Mosquitto (with resends, late sends and garbage); the DAG
drains them and the net movement per warehouse and SKU, and in available-to-promise, is checked
against what the devices did.

Then the REST API source (``sync_dev/api_demo.py``): the bank's credit bureau, reachable only over
its API (rate limited, an outage, reports published late), synced into credit scoring by
``bank_credit_bureau_sync``.

Then the engine on its own: a 200,000-row table synced incrementally (changes, a no-op run, a
checksum), a SQLite source with a full refresh and soft deletes, and changes streamed from
PostgreSQL's WAL (CDC).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import logging
import os
import random
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

from airflow_sync_provider.core import LoadResult, StagingArea, SyncSpec, run_sync
from airflow_sync_provider.core.cdc import CdcSpec, run_cdc_sync
from sync_dev.local_postgres import LocalPostgres, local_postgres


def _checksum(
    conn: psycopg.Connection[Any], table: str, columns: list[str], key: tuple[str, ...] | list[str] = ("id",)
) -> tuple[int, str]:
    row = conn.execute(
        sql.SQL("SELECT count(*), md5(coalesce(string_agg(({})::text, E'\\n' ORDER BY {}), '')) FROM {}").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(map(sql.Identifier, key)),
            sql.Identifier(table),
        )
    ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def _line(label: str, result: LoadResult, seconds: float) -> str:
    return (
        f"  {label:<22} {result.rows_staged:>8,} staged {result.inserted:>8,} inserted {result.updated:>7,} updated "
        f"{result.deleted:>6,} deleted  v{result.version}  {seconds:5.2f} s"
    )


COLUMNS = ["id", "customer", "sku", "quantity", "unit_price", "status", "note", "updated_at"]


def postgres_demo(server: LocalPostgres, rows: int, staging: StagingArea) -> bool:
    source_db, target_db = server.create_database("demo_source"), server.create_database("demo_target")
    with server.connect(source_db) as src:
        src.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, sku text, quantity int, "
            "unit_price numeric(12,2), status text, note text, "
            "updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        src.execute("CREATE INDEX orders_cursor ON orders (updated_at, id)")
        src.execute(
            "INSERT INTO orders (id, customer, sku, quantity, unit_price, status, note) "
            "SELECT g, 'customer-' || (g %% 5000), 'SKU-' || (g %% 800), 1 + g %% 9, (g %% 1000) / 4.0, "
            "(ARRAY['new','paid','shipped'])[1 + g %% 3], CASE WHEN g %% 10 = 0 THEN NULL ELSE 'Grüße 😀 #' || g END "
            "FROM generate_series(1, %s::bigint) g",
            (rows,),
        )
    spec = SyncSpec(sync_id="demo_orders", source_table="orders", cursor_column="updated_at", detect_deletes=True)
    engine = sa.create_engine(server.url(source_db), poolclass=sa.NullPool)
    print(f"\nPostgreSQL -> PostgreSQL: table orders ({rows:,} rows), incremental by (updated_at, id) + deletes")
    with server.connect(target_db) as target:
        started = time.monotonic()
        _, first = run_sync(engine, target, spec, staging=staging, run_id="demo-initial")
        print(_line("initial sync", first, time.monotonic() - started))
        with server.connect(source_db) as src:
            src.execute("UPDATE orders SET status = 'cancelled', updated_at = clock_timestamp() WHERE id % 50 = 0")
            src.execute("DELETE FROM orders WHERE id % 97 = 0")
            src.execute(
                "INSERT INTO orders (id, customer, sku, quantity, unit_price, status) "
                "SELECT g, 'new customer', 'SKU-1', 1, 9.99, 'new' FROM generate_series(%s::bigint, %s::bigint) g",
                (rows + 1, rows + rows // 20),
            )
        started = time.monotonic()
        _, second = run_sync(engine, target, spec, staging=staging, run_id="demo-changes")
        print(_line("after changes", second, time.monotonic() - started))
        started = time.monotonic()
        _, third = run_sync(engine, target, spec, staging=staging, run_id="demo-nothing-new")
        print(_line("no changes", third, time.monotonic() - started))
        with server.connect(source_db) as src:
            expected = _checksum(src, "orders", COLUMNS)
        actual = _checksum(target, "orders", COLUMNS)
        state = target.execute("SELECT version, watermark FROM _sync_state WHERE sync_id = 'demo_orders'").fetchone()
    engine.dispose()
    same = expected == actual
    print(f"  checksum source {expected[1]} ({expected[0]:,} rows) | target {actual[1]} ({actual[0]:,} rows)")
    print(f"  target == source: {'YES' if same else 'NO'}; state version {state[0] if state else '?'}")
    return same and (third.inserted, third.updated, third.deleted) == (0, 0, 0)


def sqlite_demo(server: LocalPostgres, workdir: Path, staging: StagingArea) -> bool:
    path = workdir / "shop.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, price NUMERIC(10,2), "
            "stock INTEGER, updated_at DATETIME NOT NULL)"
        )
        db.executemany(
            "INSERT INTO products VALUES (?, ?, ?, ?, datetime('now', '-1 minute'))",
            [(i, f"Produkt {i} ✓", f"{i % 100}.50", i % 17) for i in range(1, 2001)],
        )
    spec = SyncSpec(sync_id="demo_products", source_table="products", mode="full", delete_mode="soft")
    engine = sa.create_engine(f"sqlite:///{path}")
    print("\nSQLite -> PostgreSQL: table products (2,000 rows), full refresh with soft deletes")
    target_db = server.create_database("demo_target_sqlite")
    with server.connect(target_db) as target:
        started = time.monotonic()
        _, first = run_sync(engine, target, spec, staging=staging, run_id="demo-sqlite-1")
        print(_line("initial sync", first, time.monotonic() - started))
        with sqlite3.connect(path) as db:
            db.execute("DELETE FROM products WHERE id <= 10")
            db.execute("UPDATE products SET stock = stock + 100 WHERE id BETWEEN 11 AND 30")
        started = time.monotonic()
        _, second = run_sync(engine, target, spec, staging=staging, run_id="demo-sqlite-2")
        print(_line("after changes", second, time.monotonic() - started))
        marked = target.execute("SELECT count(*) FROM products WHERE _sync_deleted_at IS NOT NULL").fetchone()
    engine.dispose()
    ok = (second.updated, second.deleted) == (20, 10) and marked == (10,)
    kept = marked[0] if marked else "?"
    print(f"  soft-deleted rows kept and marked in the target: {kept}; OK: {'YES' if ok else 'NO'}")
    return ok


def cdc_demo(server: LocalPostgres, staging: StagingArea) -> bool:
    """Log-based CDC: snapshot, then inserts/updates/deletes/key changes streamed from the WAL."""
    source_db, target_db = server.create_database("demo_cdc_source"), server.create_database("demo_cdc_target")
    with server.connect(source_db) as src:
        src.execute("CREATE TABLE stock (sku text, warehouse text, on_hand int NOT NULL, PRIMARY KEY (sku, warehouse))")
        src.execute("CREATE TABLE reservations (id bigint PRIMARY KEY, sku text, warehouse text, qty int)")
        src.execute(
            "INSERT INTO stock SELECT 'SKU-' || g, w, 100 FROM generate_series(1, 20000) g, unnest(ARRAY['A', 'B']) w"
        )
    spec = CdcSpec(sync_id="demo_stock", tables=("stock", "reservations"))
    engine = sa.create_engine(server.url(source_db), poolclass=sa.NullPool)
    print("\nPostgreSQL WAL (pgoutput) -> PostgreSQL: tables stock (40,000 rows) + reservations, change data capture")
    try:
        with server.connect(target_db) as target:
            started = time.monotonic()
            _, snapshot = run_cdc_sync(engine, target, spec, staging=staging, run_id="demo-cdc-1")
            print(f"  initial snapshot      {snapshot.inserted:>8,} inserted  {time.monotonic() - started:5.2f} s")
            with server.connect(source_db) as src:
                with src.transaction():  # a reservation and its stock change commit together
                    src.execute(
                        "INSERT INTO reservations SELECT g, 'SKU-' || g, 'A', 2 FROM generate_series(1, 5000) g"
                    )
                    src.execute(
                        "UPDATE stock SET on_hand = on_hand - 2 WHERE warehouse = 'A' AND sku IN "
                        "(SELECT sku FROM reservations)"
                    )
                src.execute("DELETE FROM stock WHERE warehouse = 'B' AND sku LIKE 'SKU-1%%'")
                src.execute("UPDATE stock SET warehouse = 'C' WHERE sku = 'SKU-2' AND warehouse = 'B'")  # key change
            started = time.monotonic()
            manifest, changes = run_cdc_sync(engine, target, spec, staging=staging, run_id="demo-cdc-2")
            print(
                f"  changes from the WAL  {manifest.changes:>8,} changes in {manifest.transactions} transactions: "
                f"{changes.inserted:,} inserted {changes.updated:,} updated {changes.deleted:,} deleted  "
                f"{time.monotonic() - started:5.2f} s"
            )
            with server.connect(source_db) as src:
                src.execute("UPDATE stock SET on_hand = 7 WHERE sku = 'SKU-3' AND warehouse = 'A'")
            committed = time.monotonic()
            run_cdc_sync(engine, target, spec, staging=staging, run_id="demo-cdc-3")
            latency = time.monotonic() - committed
            with server.connect(source_db) as src:
                same = all(
                    _checksum(src, t, cols, key) == _checksum(target, t, cols, key)
                    for t, cols, key in (
                        ("stock", ["sku", "warehouse", "on_hand"], ["sku", "warehouse"]),
                        ("reservations", ["id", "sku", "warehouse", "qty"], ["id"]),
                    )
                )
    finally:
        engine.dispose()
        with server.connect(source_db) as src:
            src.execute("SELECT pg_drop_replication_slot(%s)", (spec.slot_name,))
    print(f"  one change, source commit -> target commit (no scheduler in between): {latency:.2f} s")
    print(f"  target == source (both tables): {'YES' if same else 'NO'}")
    return same


def _business(uris: dict[str, str], running: threading.Event, counts: dict[str, int]) -> None:
    """Receipts at the warehouses and sales within each store's ``catalog_availability`` (~40/s)."""
    from case_studies import inventory
    from case_studies.databases import connect

    rng = random.Random(16)
    conns = {name: connect(uris[name]) for name in (*inventory.WAREHOUSES, *inventory.STORES)}
    try:
        while running.is_set():
            sku = f"SKU-{rng.randint(1, 200):06d}"
            if rng.random() < 0.5:
                conns[rng.choice(inventory.WAREHOUSES)].execute(
                    "UPDATE stock SET on_hand = on_hand + %s, updated_at = now() WHERE sku = %s",
                    (rng.randint(1, 9), sku),
                )
                counts["receipts"] += 1
            else:
                store = conns[rng.choice(inventory.STORES)]
                with store.transaction():
                    sold = store.execute(
                        "UPDATE catalog_availability SET available_qty = available_qty - 1 "
                        "WHERE sku = %s AND available_qty >= 1 RETURNING sku",
                        (sku,),
                    ).fetchone()
                    if sold:
                        store.execute(
                            "INSERT INTO orders SELECT coalesce(max(order_id), 0) + 1, %s, 1, 'open', NULL, "
                            "now(), now() FROM orders",
                            (sku,),
                        )
                        counts["sales"] += 1
            time.sleep(0.025)
    finally:
        for conn in conns.values():
            conn.close()


def realtime_demo(server: LocalPostgres, workdir: Path, stream_seconds: int = 20) -> bool:
    """``inventory_sync_realtime`` with ``dag.test()``: a short stream while the business goes on."""
    from case_studies import databases, inventory
    from case_studies.databases import connect
    from sync_dev.airflow_sandbox import AirflowSandbox

    print(
        f"\nReal time: inventory_sync_realtime streams for {stream_seconds} s while warehouses receive and stores sell"
    )
    started = time.monotonic()
    prefix = "rt_"
    systems = (*databases.INVENTORY_SOURCES, databases.INVENTORY_TARGET)
    with server.connect() as admin:
        databases.create_databases(admin, prefix, systems)
    uris = databases.connection_uris("127.0.0.1", server.port, prefix=prefix)
    inventory.seed(uris, scale=200)
    box = AirflowSandbox(
        workdir / "airflow-realtime",
        {**databases.airflow_environment(uris), "SYNC_STAGING_DIR": str(workdir / "staging-realtime")},
    )
    box.migrate()
    outcome: dict[str, Any] = {}
    conf = {"stream_seconds": stream_seconds, "poll_interval": 0.2, "log_every": 5}
    when = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    run = threading.Thread(target=lambda: outcome.update(run=box.run_dag("inventory_sync_realtime", when, conf)))
    run.start()
    while run.is_alive():  # the writers start once the stream has pushed to the stores
        with connect(uris[inventory.STORES[-1]]) as conn:
            row = conn.execute("SELECT to_regclass('public._allocation_position')").fetchone()
            if row and row[0] and (conn.execute("SELECT seq FROM _allocation_position").fetchone() or (0,))[0]:
                break
        time.sleep(0.5)
    running, counts = threading.Event(), {"receipts": 0, "sales": 0}
    running.set()
    writer = threading.Thread(target=_business, args=(uris, running, counts))
    writer.start()
    observations, violations = 0, 0
    while run.is_alive():
        violations += len(inventory.observe_oversell(uris))
        observations += 1
    running.clear()
    writer.join()
    result = outcome.get("run")
    log = result.log_file.read_text(errors="replace") if result and result.log_file else ""
    lags = re.findall(r"every store: p50 ([0-9.]+|None) s, p95 ([0-9.]+|None) s", log)
    ok = bool(result and result.ok) and violations == 0 and observations > 0
    print(f"  run                      {result.state if result else 'crashed':<8} {time.monotonic() - started:6.1f} s")
    print(f"  business while streaming {counts['receipts']} receipts, {counts['sales']} sales")
    if lags:
        print(f"  warehouse commit -> every store: p50 {lags[-1][0]} s, p95 {lags[-1][1]} s (per micro-batch)")
    print(f"  checker: {observations} observations of the stores, {violations} oversell   {'OK' if ok else 'FAILED'}")
    for system in databases.INVENTORY_SOURCES:  # the CDC slots would hold WAL once the demo is gone
        with connect(uris[system]) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE database = current_database()"
            )
    return ok


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Airflow connections as ``AIRFLOW_CONN_*`` variables for a while; what was there before comes back."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def devices_demo(server: LocalPostgres, workdir: Path, rounds: int = 2, events: int = 500) -> bool:
    """``device_inventory_sync``'s tasks against a private Mosquitto and simulated devices."""
    from case_studies import inventory
    from sync_dev.device_simulator import Fleet, mosquitto_binary, private_mosquitto, publish

    print("\nDevices: RFID gates and scanners publish stock movements over MQTT; device_inventory_sync drains them")
    try:
        import paho.mqtt.client  # noqa: F401  (the MQTT adapter's client)
    except ImportError:
        print("  SKIPPED: paho-mqtt is not installed (pip install paho-mqtt)")
        return True
    if mosquitto_binary() is None:
        print("  SKIPPED: no MQTT broker can be started (the mosquitto binary is missing: apt-get install mosquitto)")
        return True
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        try:
            broker = stack.enter_context(private_mosquitto(workdir / "mosquitto"))
        except (OSError, RuntimeError) as error:
            print(f"  SKIPPED: the private Mosquitto did not start ({error})")
            return True
        central = server.create_database("demo_devices_central")
        mqtt = {"conn_type": "mqtt", "host": "127.0.0.1", "port": broker.port, "extra": {"client_id": "demo-central"}}
        connections = {
            "AIRFLOW_CONN_WAREHOUSE_DEVICES": json.dumps(mqtt),
            "AIRFLOW_CONN_INVENTORY_CENTRAL": f"postgres://postgres@127.0.0.1:{server.port}/{central}",
            "SYNC_STAGING_DIR": str(workdir / "staging-devices"),
            # The tasks run in this process, where their logger sets up Airflow's logging: at the demo's
            # level (the engine's lines with --verbose; else only errors, not "execute() outside the Task
            # Runner" nor the quarantine warnings the summary below counts).
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO" if logging.getLogger().level <= logging.INFO else "ERROR",
        }
        stack.enter_context(_environment(connections))
        module = importlib.import_module("device_inventory_sync")
        drain = module.device_inventory_sync.get_task("drain_movements")

        def run_dag_tasks(run_id: str) -> dict[str, Any]:
            """The DAG's two tasks in this process (as its test does; a dag.test() run costs ~1 min here)."""
            result = dict(drain.execute({"run_id": run_id}))
            with server.connect(central) as conn:
                module.refresh_net_on_hand(conn)
            return result

        run_dag_tasks("demo__0")  # opens the persistent session the devices fill
        fleet = Fleet(skus=50, seed=3)
        messages, inserted = 0, 0
        for round_number in range(1, rounds + 1):
            batch = fleet.round(events)
            publish(batch, port=broker.port)
            messages += len(batch)
            inserted += int(run_dag_tasks(f"demo__{round_number}")["inserted"])
        with server.connect(central) as conn:
            net = dict(
                ((row[0], row[1]), row[2])
                for row in conn.execute("SELECT warehouse, sku, delta FROM devices.on_hand_delta").fetchall()
            )
            stored = conn.execute("SELECT count(*), count(DISTINCT event_id) FROM devices.stock_movements").fetchone()
            quarantine = conn.execute("SELECT count(*) FROM devices._sync_event_quarantine").fetchone()
            inventory.prepare_central(conn)  # the inventory DAG's first task: ATP now reads the devices
            atp = {row[0]: row[1] for row in conn.execute("SELECT sku, on_hand FROM inventory.atp_inputs").fetchall()}
    per_sku: dict[str, int] = {}
    for (_, sku), delta in fleet.expected.items():
        per_sku[sku] = per_sku.get(sku, 0) + delta
    ok = (
        inserted == fleet.sent_events
        and net == fleet.expected
        and stored == (fleet.sent_events, fleet.sent_events)
        and atp == per_sku
    )
    print(
        f"  devices sent             {fleet.sent_events:,} movements in {messages:,} messages "
        f"from {len(fleet.devices)} devices ({fleet.duplicates} resends, {fleet.late} late, {fleet.garbage} garbage)"
    )
    print(
        f"  central stored           {(stored or (0,))[0]:,} movements ({inserted:,} inserted by {rounds} runs), "
        f"{(quarantine or (0,))[0]} quarantined"
    )
    print(f"  net movement per (warehouse, SKU) == what the devices did: {'YES' if net == fleet.expected else 'NO'}")
    print(f"  available-to-promise on-hand per SKU == devices' net: {'YES' if atp == per_sku else 'NO'}")
    print(f"  {'OK' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="rows in the demo orders table")
    parser.add_argument("--skus", type=int, default=500, help="SKUs in the inventory case study")
    parser.add_argument("--customers", type=int, default=300, help="customers in the bank case study")
    parser.add_argument(
        "--only",
        choices=("all", "case-studies", "inventory", "bank", "realtime", "devices", "api", "engine"),
        default="all",
        help="run one part",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (Airflow home, task logs)")
    parser.add_argument("--verbose", action="store_true", help="show the engine's progress log lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="sync-demo-"))
    ok = True
    with local_postgres() as server:
        print(f"embedded PostgreSQL on 127.0.0.1:{server.port} (binaries: {server.bindir})")
        if args.only in ("all", "case-studies", "inventory", "bank"):
            from sync_dev.case_study_demo import run_case_studies

            ok = run_case_studies(
                server,
                workdir,
                args.skus,
                args.customers,
                only=lambda part: args.only in ("all", "case-studies", part),
            )
        if args.only in ("all", "realtime"):
            ok = realtime_demo(server, workdir) and ok
        if args.only in ("all", "devices"):
            ok = devices_demo(server, workdir) and ok
        if args.only in ("all", "api"):  # the REST API source (issue 18): sync_dev/api_demo.py
            from sync_dev.api_demo import api_demo

            ok = api_demo(server, workdir, args.customers) and ok
        if args.only in ("all", "engine"):
            print("\nThe engine on its own")
            staging = StagingArea(workdir / "staging")
            ok = postgres_demo(server, args.rows, staging) and ok
            ok = sqlite_demo(server, workdir, staging) and ok
            ok = cdc_demo(server, staging) and ok
    if args.keep:
        print(f"\nwork folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nDEMO {'PASSED' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
