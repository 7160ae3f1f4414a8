"""The real-time inventory stream (``RealtimeInventory`` in a ``run_stream`` loop) with writers at
the warehouses and the stores and a checker reading the stores while it runs: no store can ever
observe more sellable stock than exists, only changed SKUs are recomputed, every allocation reaches
every store once, and in the end the centre equals the ground truth.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from airflow_sync_provider.core import StagingArea
from airflow_sync_provider.core.streaming import StopFlag, StreamStats, run_stream
from case_studies import databases, inventory
from case_studies.databases import connect
from sync_dev.local_postgres import LocalPostgres

SCALE = 60


@pytest.fixture
def uris(pg_server: LocalPostgres) -> Iterator[dict[str, str]]:
    prefix = f"rt{uuid.uuid4().hex[:6]}_"
    systems = (*databases.INVENTORY_SOURCES, databases.INVENTORY_TARGET)
    with pg_server.connect() as admin:
        databases.create_databases(admin, prefix, systems)
    found = databases.connection_uris("127.0.0.1", pg_server.port, prefix=prefix)
    yield found
    for system in systems:
        with connect(found[system]) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE database = current_database()"
            )
    with pg_server.connect() as admin:
        for system in systems:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(prefix + system)))


class Business:
    """Writers: receipts at the warehouses, sales within ``catalog_availability`` and cancels at the
    stores, each in its own short transaction, until stopped."""

    def __init__(self, uris: dict[str, str], seed: int) -> None:
        self.uris, self.rng = uris, random.Random(seed)
        self.running = threading.Event()
        self.running.set()
        self.counts = {"receipts": 0, "sales": 0, "refused sales": 0, "cancels": 0}
        self.threads = [
            threading.Thread(target=self._warehouses, daemon=True),
            *(threading.Thread(target=self._store, args=(s,), daemon=True) for s in inventory.STORES),
        ]
        for thread in self.threads:
            thread.start()

    def _warehouses(self) -> None:
        rng = random.Random(self.rng.random())
        conns = {w: connect(self.uris[w]) for w in inventory.WAREHOUSES}
        try:
            while self.running.is_set():
                conns[rng.choice(inventory.WAREHOUSES)].execute(
                    "UPDATE stock SET on_hand = on_hand + %s, updated_at = now() WHERE sku = %s",
                    (rng.randint(1, 5), f"SKU-{rng.randint(1, SCALE):06d}"),
                )
                self.counts["receipts"] += 1
                time.sleep(0.02)
        finally:
            for conn in conns.values():
                conn.close()

    def _store(self, store: str) -> None:
        rng = random.Random(self.rng.random())
        with connect(self.uris[store]) as conn:
            while self.running.is_set():
                if rng.random() < 0.8:
                    self._sell(conn, rng)
                else:
                    cancelled = conn.execute(
                        "UPDATE orders SET status = 'cancelled', updated_at = now() WHERE order_id = ("
                        "SELECT order_id FROM orders WHERE status = 'open' ORDER BY random() LIMIT 1)"
                    ).rowcount
                    self.counts["cancels"] += cancelled
                time.sleep(0.01)

    def _sell(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        """What a store's application does: sell only what ``catalog_availability`` allows, atomically."""
        sku, quantity = f"SKU-{rng.randint(1, SCALE):06d}", rng.randint(1, 6)
        with conn.transaction():
            sold = conn.execute(
                "UPDATE catalog_availability SET available_qty = available_qty - %s "
                "WHERE sku = %s AND available_qty >= %s RETURNING sku",
                (quantity, sku, quantity),
            ).fetchone()
            if sold is None:
                self.counts["refused sales"] += 1
                return
            conn.execute(
                "INSERT INTO orders SELECT coalesce(max(order_id), 0) + 1, %s, %s, 'open', NULL, now(), now() "
                "FROM orders",
                (sku, quantity),
            )
        self.counts["sales"] += 1

    def stop(self) -> None:
        self.running.clear()
        for thread in self.threads:
            thread.join(30)


class Checker:
    """Reads the stores while the stream runs and records every oversell a store could observe."""

    def __init__(self, uris: dict[str, str]) -> None:
        self.uris = uris
        self.observations = 0
        self.violations: list[str] = []
        self.running = threading.Event()
        self.running.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running.is_set():
            self.violations += inventory.observe_oversell(self.uris)
            self.observations += 1

    def stop(self) -> None:
        self.running.clear()
        self.thread.join(30)


def _stream(uris: dict[str, str], staging: StagingArea, stop: StopFlag, out: dict[str, Any], **kwargs: Any) -> None:
    try:
        with inventory.RealtimeInventory(uris, staging=staging, **kwargs) as stream:
            out["stream"] = stream
            out["stats"] = run_stream(stream.step, stream_for=120, poll_interval=0.05, stop=stop)
    except BaseException as error:
        out["error"] = error


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _all_pushed(uris: dict[str, str]) -> bool:
    try:
        with connect(uris[inventory.CENTRAL]) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM inventory.atp_dirty), (SELECT max(seq) FROM inventory.allocation_outbox)"
            ).fetchone()
    except psycopg.errors.UndefinedTable:  # the stream has not prepared the centre yet
        return False
    assert row is not None
    if row[0]:
        return False
    for store in inventory.STORES:
        try:
            with connect(uris[store]) as conn:
                position = conn.execute("SELECT seq FROM _allocation_position").fetchone()
        except psycopg.errors.UndefinedTable:
            return False
        if row[1] is not None and (position is None or position[0] < row[1]):
            return False
    return True


def test_no_store_can_observe_an_oversell_while_the_stream_runs(uris: dict[str, str], tmp_path: Path) -> None:
    inventory.seed(uris, scale=SCALE)
    stop, out = StopFlag(), dict[str, Any]()
    thread = threading.Thread(target=_stream, args=(uris, StagingArea(tmp_path / "staging"), stop, out))
    thread.start()
    try:
        _wait(
            lambda: "error" in out or (_all_pushed(uris) and "stats" not in out and _has_rows(uris)), 120, "first push"
        )
        assert "error" not in out, out.get("error")
        checker = Checker(uris)
        business = Business(uris, seed=16)
        time.sleep(12)
        business.stop()
        _wait(lambda: _all_pushed(uris), 30, "caught up")
        time.sleep(0.5)
        _wait(lambda: _all_pushed(uris), 30, "caught up")
        checker.stop()
    finally:
        stop.request("test over")
        thread.join(60)
    if "error" in out:
        raise out["error"]
    stats: StreamStats = out["stats"]
    assert business.counts["sales"] > 20 and business.counts["receipts"] > 50, business.counts
    assert checker.observations > 20
    assert checker.violations == [], checker.violations[:10]
    assert stats.batches > 5
    # the centre equals the ground truth, and every store shows its allocation minus nothing unseen
    truth = inventory.true_available(uris)
    with connect(uris[inventory.CENTRAL]) as conn:
        atp = dict(conn.execute("SELECT sku, available_to_sell FROM inventory.available_to_promise").fetchall())
        shares = {
            s: dict(
                conn.execute(
                    sql.SQL("SELECT sku, {} FROM inventory.available_to_promise").format(sql.Identifier(f"{s}_qty"))
                ).fetchall()
            )
            for s in inventory.STORES
        }
    assert atp == truth
    for store in inventory.STORES:
        with connect(uris[store]) as conn:
            shown = dict(conn.execute("SELECT sku, available_qty FROM catalog_availability").fetchall())
        assert shown == shares[store], store
    assert inventory.check_no_oversell(uris, against="sources").ok


def _has_rows(uris: dict[str, str]) -> bool:
    try:
        with connect(uris[inventory.STORES[-1]]) as conn:
            row = conn.execute("SELECT count(*) FROM catalog_availability").fetchone()
    except psycopg.errors.UndefinedTable:
        return False
    return bool(row and row[0])


def test_only_the_changed_skus_are_recomputed_and_pushed(uris: dict[str, str], tmp_path: Path) -> None:
    inventory.seed(uris, scale=SCALE)
    with inventory.RealtimeInventory(uris, staging=StagingArea(tmp_path / "staging"), gate=False) as stream:
        first = stream.step()
        assert first.changes > 0
        assert stream.step().changes == 0  # nothing changed: nothing recomputed, nothing pushed
        with connect(uris["warehouse_a"]) as conn:
            sku = conn.execute("SELECT sku FROM stock ORDER BY sku LIMIT 1").fetchone()
            assert sku is not None
            conn.execute("UPDATE stock SET on_hand = on_hand + 50, updated_at = now() WHERE sku = %s", sku)
        with connect(uris[inventory.STORES[0]]) as conn:
            before = conn.execute("SELECT seq FROM _allocation_position").fetchone()
        outcome = stream.step()
        assert outcome.detail == "1 SKUs recomputed"
        assert outcome.lag_seconds is not None and outcome.lag_seconds < 5
        for store in inventory.STORES:  # one outbox entry, pushed to each store once
            with connect(uris[store]) as conn:
                position = conn.execute("SELECT seq FROM _allocation_position").fetchone()
            assert position == ((before[0] if before else 0) + 1,)
    for store in inventory.STORES:
        with connect(uris[store]) as conn:
            shown = conn.execute("SELECT available_qty FROM catalog_availability WHERE sku = %s", sku).fetchone()
        with connect(uris[inventory.CENTRAL]) as conn:
            share = conn.execute(
                sql.SQL("SELECT {} FROM inventory.available_to_promise WHERE sku = %s").format(
                    sql.Identifier(f"{store}_qty")
                ),
                sku,
            ).fetchone()
        assert shown == share


def test_a_push_left_by_a_killed_run_is_applied_once_by_the_next(uris: dict[str, str], tmp_path: Path) -> None:
    """The central commit happened, the push did not (the process died): the next batch pushes it,
    and pushing it again changes nothing (the store's position says it has it)."""
    inventory.seed(uris, scale=SCALE)
    staging = StagingArea(tmp_path / "staging")
    with inventory.RealtimeInventory(uris, staging=staging, gate=False) as stream:
        stream.step()
        with connect(uris["warehouse_b"]) as conn:
            conn.execute("UPDATE stock SET on_hand = on_hand + 7, updated_at = now()")
        for store, spec in stream.orders.items():  # the step, up to the central commit
            from airflow_sync_provider.core import run_sync

            run_sync(stream.engines[store], stream.central, spec, staging=staging)
        for cdc in stream.stock.values():
            cdc.step()
        assert stream.recompute()
    with connect(uris[inventory.CENTRAL]) as conn:
        pending = conn.execute("SELECT max(seq) FROM inventory.allocation_outbox").fetchone()
    with inventory.RealtimeInventory(uris, staging=staging, gate=False) as stream:
        assert stream.push() > 0
        assert stream.push() == 0
    for store in inventory.STORES:
        with connect(uris[store]) as conn:
            assert conn.execute("SELECT seq FROM _allocation_position").fetchone() == pending
    assert inventory.check_no_oversell(uris, against="sources").ok


def test_the_checker_sees_a_cancel_and_a_sale_that_leave_the_first_store_unchanged(
    uris: dict[str, str], tmp_path: Path
) -> None:
    """Between the checker's two reads of the first store it cancels an order the centre knew, the
    stream pushes the freed units, and it sells what its share rose by: its sellable quantities read
    the same, its open orders do not.  No store can sell more than exists (5 free, 1 + 2 + 2 sold or
    sellable), so the checker must not report an oversell: it may not combine the first read's open
    orders with the second store's quantities."""
    inventory.seed(uris, scale=SCALE)
    web, app = inventory.STORES
    sku = "SKU-000001"
    for warehouse, on_hand in zip(inventory.WAREHOUSES, (5, 0), strict=True):
        with connect(uris[warehouse]) as conn:
            conn.execute("DELETE FROM stock WHERE sku = %s", (sku,))
            conn.execute(
                "INSERT INTO stock (sku, on_hand, reserved, updated_at) VALUES (%s, %s, 0, now())", (sku, on_hand)
            )
    with connect(uris[web]) as conn:  # an open order of 3 placed before the stream: 5 - 3 = 2 to promise
        conn.execute(
            "INSERT INTO orders SELECT max(order_id) + 1, %s, 3, 'open', NULL, now(), now() FROM orders", (sku,)
        )
        order = conn.execute("SELECT max(order_id) FROM orders").fetchone()
    with inventory.RealtimeInventory(uris, staging=StagingArea(tmp_path / "staging"), gate=False) as stream:
        stream.step()

        def shown(store: str) -> int:
            with connect(uris[store]) as conn:
                row = conn.execute("SELECT available_qty FROM catalog_availability WHERE sku = %s", (sku,)).fetchone()
            return int(row[0]) if row else 0

        assert (shown(web), shown(app)) == (1, 0)  # floor(0.6 * 2), floor(0.4 * 2)
        done: list[bool] = []

        def cancel_push_and_sell() -> None:
            if done:
                return
            done.append(True)
            with connect(uris[web]) as conn:
                conn.execute("UPDATE orders SET status = 'cancelled', updated_at = now() WHERE order_id = %s", order)
            stream.step()  # 5 to promise: 3 at the web store, 2 at the app
            with connect(uris[web]) as conn, conn.transaction():
                conn.execute("UPDATE catalog_availability SET available_qty = available_qty - 2 WHERE sku = %s", (sku,))
                conn.execute(
                    "INSERT INTO orders SELECT max(order_id) + 1, %s, 2, 'open', NULL, now(), now() FROM orders", (sku,)
                )

        violations = inventory.observe_oversell(uris, between=cancel_push_and_sell)
        assert done
        assert (shown(web), shown(app)) == (1, 2)  # 3 sellable, 2 sold: the 5 that exist
        assert inventory.true_available(uris)[sku] == 3
        assert violations == [], violations


def test_what_a_store_sold_unseen_beyond_its_new_share_is_not_promised_again(
    uris: dict[str, str], tmp_path: Path
) -> None:
    """The app store sells its whole share after the centre synced its orders; the web store's sale,
    seen, lowers the ATP below what the app sold.  The app shows 0 (its value stops there), and the
    web store must not get the units the app already sold: 10 exist, 9 sold, 1 sellable."""
    inventory.seed(uris, scale=SCALE)
    web, app = inventory.STORES
    sku = "SKU-000001"
    for warehouse, on_hand in zip(inventory.WAREHOUSES, (10, 0), strict=True):
        with connect(uris[warehouse]) as conn:
            conn.execute("DELETE FROM stock WHERE sku = %s", (sku,))
            conn.execute(
                "INSERT INTO stock (sku, on_hand, reserved, updated_at) VALUES (%s, %s, 0, now())", (sku, on_hand)
            )

    def sell(store: str, quantity: int) -> None:
        with connect(uris[store]) as conn, conn.transaction():
            sold = conn.execute(
                "UPDATE catalog_availability SET available_qty = available_qty - %s "
                "WHERE sku = %s AND available_qty >= %s",
                (quantity, sku, quantity),
            ).rowcount
            assert sold == 1, (store, quantity)
            conn.execute(
                "INSERT INTO orders SELECT max(order_id) + 1, %s, %s, 'open', NULL, now(), now() FROM orders",
                (sku, quantity),
            )

    def shown(store: str) -> int:
        with connect(uris[store]) as conn:
            row = conn.execute("SELECT available_qty FROM catalog_availability WHERE sku = %s", (sku,)).fetchone()
        return int(row[0]) if row else 0

    from airflow_sync_provider.core import run_sync

    staging = StagingArea(tmp_path / "staging")
    with inventory.RealtimeInventory(uris, staging=staging, gate=False) as stream:
        stream.step()
        assert (shown(web), shown(app)) == (6, 4)
        sell(web, 5)
        for store, spec in stream.orders.items():  # the micro-batch syncs the orders ...
            run_sync(stream.engines[store], stream.central, spec, staging=staging)
        sell(app, 4)  # ... then the app sells its share, unseen
        assert stream.recompute() == [sku]  # 10 - 5 = 5: 3 for the web store, 2 for the app
        stream.push()
    assert inventory.true_available(uris)[sku] == 1
    assert (shown(web), shown(app)) == (1, 0)
    assert inventory.observe_oversell(uris) == []
