"""Case study 1: inventory across warehouses and online stores, without overselling.

Systems (one database each, see :mod:`.databases`):

* ``warehouse_a``, ``warehouse_b``: ``stock(sku, on_hand, reserved)`` per warehouse, changed by the
  warehouse system (receipts, picks, shipments).  Streamed to the centre by **CDC**.
* ``store_web``, ``store_app``: each store's ``orders`` (``open`` -> ``released`` to a warehouse,
  which reserves the stock -> ``shipped``, or ``cancelled``), synced **incrementally**; and
  ``catalog_availability``, the quantity the store may sell, which the centre **pushes back**.
* ``inventory_central``: the synced copies (schemas ``warehouse_a``, ``warehouse_b``, ``store_web``,
  ``store_app``) and ``inventory.available_to_promise``.

Available-to-promise per SKU = on hand - reserved (all warehouses) - open orders (all stores).  It
is split between the stores by fixed shares, rounded down, so that the stores together can never
promise more than exists: a store sells at most its own allocation, and decrements it as it sells.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import psycopg
from psycopg import sql

from case_studies.databases import connect, copy_rows

WAREHOUSES = ("warehouse_a", "warehouse_b")
STORES = ("store_web", "store_app")
#: Share of the available-to-promise quantity each store may sell (sum <= 1).
STORE_SHARES: Mapping[str, float] = {"store_web": 0.6, "store_app": 0.4}
CENTRAL = "inventory_central"

STOCK_COLUMNS = (
    "sku text PRIMARY KEY, on_hand integer NOT NULL, reserved integer NOT NULL, updated_at timestamptz NOT NULL"
)
ORDER_COLUMNS = (
    "order_id bigint PRIMARY KEY, sku text NOT NULL, quantity integer NOT NULL, status text NOT NULL, "
    "warehouse text, placed_at timestamptz NOT NULL, updated_at timestamptz NOT NULL"
)
ATP_COLUMNS = (
    "sku text PRIMARY KEY, on_hand bigint, reserved bigint, open_orders bigint, atp bigint, "
    "available_to_sell bigint, store_web_qty bigint, store_app_qty bigint, allocated_total bigint"
)


def _create_sources(uris: Mapping[str, str]) -> None:
    for warehouse in WAREHOUSES:
        with connect(uris[warehouse]) as conn:
            conn.execute(sql.SQL("CREATE TABLE stock ({}, CHECK (reserved BETWEEN 0 AND on_hand))").format(_STOCK))
    for store in STORES:
        with connect(uris[store]) as conn:
            conn.execute(sql.SQL("CREATE TABLE orders ({})").format(_ORDERS))
            conn.execute("CREATE INDEX orders_cursor ON orders (updated_at, order_id)")
            conn.execute("CREATE TABLE catalog (sku text PRIMARY KEY, title text NOT NULL, price numeric(10,2))")


_STOCK, _ORDERS = sql.SQL(STOCK_COLUMNS), sql.SQL(ORDER_COLUMNS)


def prepare_central(conn: psycopg.Connection[Any]) -> None:
    """Idempotent DDL of the centre: the synced tables' schemas, the ATP table and the views over them.

    Run by the DAG's first task (never at parse time).  The sync creates missing tables itself, but
    the views need their tables to exist before the first sync.
    """
    ident = sql.Identifier
    for schema in (*WAREHOUSES, *STORES, "inventory"):
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident(schema)))
    for warehouse in WAREHOUSES:
        conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(ident(warehouse, "stock"), _STOCK))
    for store in STORES:
        conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(ident(store, "orders"), _ORDERS))
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS inventory.available_to_promise ({})").format(sql.SQL(ATP_COLUMNS)))
    from airflow_sync_provider.core.catalog import table_exists

    stock_parts: list[sql.Composable] = [
        sql.SQL("SELECT sku, on_hand, reserved FROM {}").format(ident(w, "stock")) for w in WAREHOUSES
    ]
    # The devices' net movements (device_inventory_sync owns that table) count once it exists;
    # until then the view is exactly the warehouses' stock.  Re-run after the device DAG's first run.
    if table_exists(conn, "devices", "on_hand_delta"):
        stock_parts.append(sql.SQL("SELECT sku, delta, 0 FROM devices.on_hand_delta"))
    stock = sql.SQL(" UNION ALL ").join(stock_parts)
    orders = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT sku, quantity FROM {} WHERE status = 'open'").format(ident(s, "orders")) for s in STORES
    )
    conn.execute(
        sql.SQL(
            "CREATE OR REPLACE VIEW inventory.atp_inputs AS "
            "WITH stock AS (SELECT sku, sum(on_hand)::bigint AS on_hand, sum(reserved)::bigint AS reserved "
            "FROM ({}) s GROUP BY sku), "
            "open_orders AS (SELECT sku, sum(quantity)::bigint AS open_orders FROM ({}) o GROUP BY sku) "
            "SELECT stock.sku, stock.on_hand, stock.reserved, "
            "coalesce(open_orders.open_orders, 0)::bigint AS open_orders "
            "FROM stock LEFT JOIN open_orders USING (sku)"
        ).format(stock, orders)
    )
    for store in STORES:
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE VIEW {} AS SELECT sku, {} AS available_qty FROM inventory.available_to_promise"
            ).format(ident("inventory", f"allocation_{store}"), ident(f"{store}_qty"))
        )


def compute_atp(batch: pd.DataFrame) -> pd.DataFrame:
    """The pandas transform between extract and load: available-to-promise and the store allocations."""
    out = batch.copy()
    out["atp"] = out["on_hand"] - out["reserved"] - out["open_orders"]
    out["available_to_sell"] = out["atp"].clip(lower=0)
    total = out["available_to_sell"].astype("float64")
    allocated = pd.Series(0, index=out.index, dtype="int64")
    for store in STORES:
        # floor(): the stores' shares never add up to more than is there
        out[f"{store}_qty"] = (total * STORE_SHARES[store]).map(math.floor).astype("int64")
        allocated += out[f"{store}_qty"]
    out["allocated_total"] = allocated
    return out


#: The gate on the ATP batch: keys, non-negative quantities, and the no-oversell invariant.
ATP_EXPECTATIONS: list[dict[str, Any]] = [
    {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "sku"}},
    {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "sku"}},
    *(
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": c, "min_value": 0}}
        for c in ("on_hand", "reserved", "open_orders", "store_web_qty", "store_app_qty")
    ),
    {
        "type": "expect_column_pair_values_a_to_be_greater_than_b",
        "kwargs": {"column_A": "available_to_sell", "column_B": "allocated_total", "or_equal": True},
    },
    {  # open orders beyond the stock: a backorder to act on, not a reason to stop the sync
        "type": "expect_column_values_to_be_between",
        "kwargs": {"column": "atp", "min_value": 0},
        "meta": {"severity": "warn"},
    },
]


# --------------------------------------------------------------------------- data


def _skus(scale: int) -> list[str]:
    return [f"SKU-{n:06d}" for n in range(1, scale + 1)]


def seed(uris: Mapping[str, str], scale: int = 500, seed_value: int = 7) -> dict[str, int]:
    """Create and fill the source systems: ``scale`` SKUs, stock in both warehouses, order history.

    Deterministic for a given ``seed_value``; history spreads over the 30 days before now.
    """
    rng = random.Random(seed_value)
    _create_sources(uris)
    now = dt.datetime.now(dt.UTC)
    skus = _skus(scale)
    counts: dict[str, int] = {}
    for warehouse in WAREHOUSES:
        rows = [(s, rng.randint(0, 200), 0, now - dt.timedelta(days=30)) for s in skus if rng.random() < 0.85]
        with connect(uris[warehouse]) as conn:
            copy_rows(conn, "stock", ("sku", "on_hand", "reserved", "updated_at"), rows)
        counts[f"{warehouse}.stock"] = len(rows)
    order_id = 0
    for store in STORES:
        rows_o: list[tuple[Any, ...]] = []
        for _ in range(scale * 2):
            order_id += 1
            placed = now - dt.timedelta(days=30) + dt.timedelta(seconds=rng.randint(0, 29 * 86400))
            status = rng.choice(("shipped", "shipped", "shipped", "cancelled"))
            shipped_from = rng.choice(WAREHOUSES) if status == "shipped" else None
            rows_o.append((order_id, rng.choice(skus), rng.randint(1, 3), status, shipped_from, placed, placed))
        catalog = [(s, f"Product {s[-6:]}", round(rng.uniform(2, 400), 2)) for s in skus]
        with connect(uris[store]) as conn:
            copy_rows(
                conn,
                "orders",
                ("order_id", "sku", "quantity", "status", "warehouse", "placed_at", "updated_at"),
                rows_o,
            )
            copy_rows(conn, "catalog", ("sku", "title", "price"), catalog)
        counts[f"{store}.orders"] = len(rows_o)
    return counts


@dataclass
class RoundSummary:
    """What one simulated round changed at the sources (for the demo's report)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n


def simulate_round(uris: Mapping[str, str], round_no: int = 1, scale: int = 500, seed_value: int = 7) -> RoundSummary:
    """A realistic round of business at the sources: receipts, orders, releases, shipments, cancels.

    Stores sell only within their current ``catalog_availability`` and decrement it as they sell
    (what a store's own application does between two pushes).  Deterministic per round.
    """
    rng = random.Random(seed_value * 1000 + round_no)
    summary = RoundSummary()
    skus = _skus(scale)
    changes = max(scale // 10, 5)
    warehouses = {w: connect(uris[w]) for w in WAREHOUSES}
    stores = {s: connect(uris[s]) for s in STORES}
    try:
        for _ in range(changes):  # goods received
            warehouse = rng.choice(WAREHOUSES)
            warehouses[warehouse].execute(
                "INSERT INTO stock (sku, on_hand, reserved, updated_at) VALUES (%s, %s, 0, now()) "
                "ON CONFLICT (sku) DO UPDATE SET on_hand = stock.on_hand + excluded.on_hand, updated_at = now()",
                (rng.choice(skus), rng.randint(5, 50)),
            )
            summary.add("stock receipts")
        next_id = 1 + max(
            int(s.execute("SELECT coalesce(max(order_id), 0) FROM orders").fetchone()[0])  # type: ignore[index]
            for s in stores.values()
        )
        for conn in stores.values():  # new orders, within what the store may sell
            available = _store_availability(conn)
            for sku in rng.sample(sorted(available), min(changes, len(available))):
                quantity = min(rng.randint(1, 4), available[sku])
                if quantity <= 0:
                    continue
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO orders VALUES (%s, %s, %s, 'open', NULL, now(), now())",
                        (next_id, sku, quantity),
                    )
                    conn.execute(
                        "UPDATE catalog_availability SET available_qty = available_qty - %s WHERE sku = %s",
                        (quantity, sku),
                    )
                next_id += 1
                summary.add("orders placed")
        for conn in stores.values():  # open orders released to a warehouse, which reserves them
            opened = conn.execute("SELECT order_id, sku, quantity FROM orders WHERE status = 'open' ORDER BY order_id")
            for order_id, sku, quantity in opened.fetchall():
                if rng.random() < 0.5:
                    continue
                for warehouse in rng.sample(WAREHOUSES, len(WAREHOUSES)):
                    reserved = (
                        warehouses[warehouse]
                        .execute(
                            "UPDATE stock SET reserved = reserved + %s, updated_at = now() "
                            "WHERE sku = %s AND on_hand - reserved >= %s RETURNING sku",
                            (quantity, sku, quantity),
                        )
                        .fetchone()
                    )
                    if reserved:
                        conn.execute(
                            "UPDATE orders SET status = 'released', warehouse = %s, updated_at = now() "
                            "WHERE order_id = %s",
                            (warehouse, order_id),
                        )
                        summary.add("orders released")
                        break
            released = conn.execute(
                "SELECT order_id, sku, quantity, warehouse FROM orders WHERE status = 'released' ORDER BY order_id"
            ).fetchall()
            for order_id, sku, quantity, warehouse in released:  # shipped: stock leaves the warehouse
                if rng.random() < 0.4:
                    warehouses[warehouse].execute(
                        "UPDATE stock SET on_hand = on_hand - %s, reserved = reserved - %s, updated_at = now() "
                        "WHERE sku = %s",
                        (quantity, quantity, sku),
                    )
                    conn.execute(
                        "UPDATE orders SET status = 'shipped', updated_at = now() WHERE order_id = %s", (order_id,)
                    )
                    summary.add("orders shipped")
            cancelled = conn.execute(
                "UPDATE orders SET status = 'cancelled', updated_at = now() WHERE order_id IN ("
                "SELECT order_id FROM orders WHERE status = 'open' ORDER BY order_id LIMIT %s) RETURNING order_id",
                (max(changes // 10, 1),),
            ).rowcount
            summary.add("orders cancelled", cancelled)
            purged = conn.execute(  # the store purges old cancelled orders: hard deletes to detect
                "DELETE FROM orders WHERE order_id IN (SELECT order_id FROM orders WHERE status = 'cancelled' "
                "AND placed_at < now() - interval '20 days' ORDER BY order_id LIMIT %s)",
                (max(changes // 5, 1),),
            ).rowcount
            summary.add("cancelled orders purged", purged)
        for conn in warehouses.values():  # a SKU discontinued in one warehouse
            gone = conn.execute(
                "DELETE FROM stock WHERE sku = (SELECT sku FROM stock WHERE reserved = 0 ORDER BY md5(sku || %s) "
                "LIMIT 1)",
                (str(round_no),),
            ).rowcount
            summary.add("stock rows discontinued", gone)
    finally:
        for conn in (*warehouses.values(), *stores.values()):
            conn.close()
    return summary


def _store_availability(conn: psycopg.Connection[Any]) -> dict[str, int]:
    exists = conn.execute("SELECT to_regclass('public.catalog_availability')").fetchone()
    if not exists or exists[0] is None:
        return {}
    rows = conn.execute("SELECT sku, available_qty FROM catalog_availability WHERE available_qty > 0").fetchall()
    return {sku: int(qty) for sku, qty in rows}


# --------------------------------------------------------------------------- checks


@dataclass
class AvailabilityCheck:
    """The no-oversell invariant, checked across the systems."""

    skus: int
    violations: list[str]
    #: units each store may sell, over all SKUs
    promised: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.violations


def _atp_from(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute("SELECT sku, available_to_sell FROM inventory.available_to_promise").fetchall()
    return {sku: int(qty) for sku, qty in rows}


def true_available(uris: Mapping[str, str]) -> dict[str, int]:
    """Available-to-sell computed from the source systems themselves (the ground truth)."""
    on_hand: dict[str, int] = {}
    for warehouse in WAREHOUSES:
        with connect(uris[warehouse]) as conn:
            for sku, free in conn.execute("SELECT sku, on_hand - reserved FROM stock"):
                on_hand[sku] = on_hand.get(sku, 0) + int(free)
    for store in STORES:
        with connect(uris[store]) as conn:
            for sku, quantity in conn.execute(
                "SELECT sku, sum(quantity) FROM orders WHERE status = 'open' GROUP BY sku"
            ):
                on_hand[sku] = on_hand.get(sku, 0) - int(quantity)
    return {sku: max(qty, 0) for sku, qty in on_hand.items()}


def check_no_oversell(uris: Mapping[str, str], against: str = "central") -> AvailabilityCheck:
    """Every store's sellable quantity, and their sum, within what is available per SKU.

    ``against="central"`` compares with the centre's ATP table (what the DAG checks after a push);
    ``"sources"`` with the ground truth recomputed from the warehouses and stores.
    """
    if against == "central":
        with connect(uris[CENTRAL]) as conn:
            available = _atp_from(conn)
    else:
        available = true_available(uris)
    promised: dict[str, dict[str, int]] = {}
    for store in STORES:
        with connect(uris[store]) as conn:
            for sku, qty in _store_availability(conn).items():
                promised.setdefault(sku, {})[store] = qty
    violations = []
    for sku, by_store in sorted(promised.items()):
        limit = available.get(sku, 0)
        total = sum(by_store.values())
        if total > limit:
            shown = ", ".join(f"{s}={q}" for s, q in sorted(by_store.items()))
            violations.append(f"{sku}: stores may sell {total} ({shown}) but only {limit} are available")
    per_store = {store: sum(by_store.get(store, 0) for by_store in promised.values()) for store in STORES}
    return AvailabilityCheck(skus=len(available), violations=violations, promised=per_store)


def stock_freshness(central_uri: str) -> float | None:
    """Seconds from the newest warehouse change synced to the centre to now (None: no stock yet).

    Measured right after the push, it is the run's end-to-end latency for that change: committed in
    a warehouse -> streamed -> in the ATP -> in every store's sellable quantity.
    """
    newest = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT max(updated_at) FROM {}").format(sql.Identifier(w, "stock")) for w in WAREHOUSES
    )
    with connect(central_uri) as conn:
        row = conn.execute(
            sql.SQL("SELECT extract(epoch FROM now() - max(m)) FROM ({}) t(m)").format(newest)
        ).fetchone()
    return None if row is None or row[0] is None else round(float(row[0]), 3)


# --------------------------------------------------------------------------- real time


_DIRTY_FUNCTION = """
CREATE OR REPLACE FUNCTION inventory.mark_atp_dirty() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO inventory.atp_dirty SELECT sku FROM inventory.available_to_promise;
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO inventory.atp_dirty VALUES (OLD.sku);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO inventory.atp_dirty VALUES (NEW.sku);
    END IF;
    RETURN NULL;
END $$
"""


def prepare_realtime(conn: psycopg.Connection[Any]) -> None:
    """Idempotent DDL of the real-time variant, on top of :func:`prepare_central`.

    * ``inventory.atp_dirty``: the SKUs whose inputs changed, written by triggers on the synced
      copies in the same transaction as each micro-batch's apply, so only those are recomputed;
    * ``inventory.allocation_outbox``: each recomputed allocation with a sequence number, the queue
      the stores are pushed from (a store applies entries past its own position, exactly once);
    * ``inventory.push_position``: a copy of each store's position (the store's own is authoritative),
      to prune the outbox.
    """
    prepare_central(conn)
    # no unique key: the warehouses' applies run at once and must not wait on each other's marks
    conn.execute("CREATE TABLE IF NOT EXISTS inventory.atp_dirty (sku text NOT NULL)")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS inventory.allocation_outbox (seq bigserial PRIMARY KEY, sku text NOT NULL, "
        "store_web_qty bigint NOT NULL, store_app_qty bigint NOT NULL, discontinued boolean NOT NULL)"
    )
    conn.execute("CREATE TABLE IF NOT EXISTS inventory.push_position (store text PRIMARY KEY, seq bigint NOT NULL)")
    conn.execute(_DIRTY_FUNCTION)
    ident = sql.Identifier
    for table in (*(ident(w, "stock") for w in WAREHOUSES), *(ident(s, "orders") for s in STORES)):
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER atp_dirty AFTER INSERT OR UPDATE OR DELETE ON {} "
                "FOR EACH ROW EXECUTE FUNCTION inventory.mark_atp_dirty()"
            ).format(table)
        )
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER atp_dirty_truncate AFTER TRUNCATE ON {} "
                "FOR EACH STATEMENT EXECUTE FUNCTION inventory.mark_atp_dirty()"
            ).format(table)
        )


def prepare_store(conn: psycopg.Connection[Any]) -> None:
    """The store's side of the push: its sellable quantities and its position in the outbox."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS catalog_availability (sku text PRIMARY KEY, available_qty bigint NOT NULL)"
    )
    conn.execute("CREATE TABLE IF NOT EXISTS _allocation_position (one boolean PRIMARY KEY, seq bigint NOT NULL)")
    conn.execute("INSERT INTO _allocation_position VALUES (true, 0) ON CONFLICT DO NOTHING")


#: A store's sellable quantity per SKU: its allocation minus what it sold that the centre has not
#: seen yet (its orders whose id the centre's copy lacks): the store already decremented those from
#: the old value, and the new allocation does not count them.  Cancelled orders consume nothing.
#: Minus ``excess`` too: what the other stores sold unseen beyond their own new allocation (their
#: value stops at 0, so without it that part would be promised again here).
_STORE_VALUES = """
WITH pushed(sku, qty, discontinued, excess) AS (
    SELECT * FROM unnest(%(skus)s::text[], %(qtys)s::bigint[], %(gone)s::bool[], %(excess)s::bigint[])
),
unseen AS (
    SELECT sku, sum(quantity) AS quantity FROM orders
    WHERE sku = ANY(%(skus)s) AND status <> 'cancelled' AND NOT (order_id = ANY(%(known)s::bigint[]))
    GROUP BY sku
)
SELECT pushed.sku, greatest(pushed.qty - coalesce(unseen.quantity, 0) - pushed.excess, 0)::bigint AS qty,
    pushed.discontinued
FROM pushed LEFT JOIN unseen USING (sku)
"""


@dataclass
class PushBatch:
    """Outbox entries a store has not applied: the newest per SKU, and the sequence to record."""

    store: str
    skus: list[str]
    quantities: list[int]
    discontinued: list[bool]
    known_orders: list[int]
    upto: int


class RealtimeInventory:
    """One micro-batch of ``inventory_sync_realtime``: the step of a stream (see core/streaming.py).

    In order: finish any push an earlier (killed) run left; sync the stores' orders (incremental,
    only when an order changed past the watermark: :class:`~airflow_sync_provider.core.streaming.TableStream`);
    stream the warehouses' stock (CDC, only when their slots hold changes); recompute ATP for the SKUs
    the triggers marked, gate it with :data:`ATP_EXPECTATIONS` (Great Expectations, the same suite as
    the batch DAGs), write it and its outbox entries in one central transaction; then push the new
    allocations to every store in two passes: first every store only lowers (``least``), then every
    store takes its new value and its position, in one store transaction each.  Orders are synced
    before stock: a release reserves at the warehouse before the store marks the order released, so
    the centre sees the order as open or the reservation (or both: under-promising), never neither.
    """

    def __init__(
        self,
        uris: Mapping[str, str],
        *,
        staging: Any = None,
        run_id: str = "realtime",
        logger: Any = None,
        gate: bool = True,
    ) -> None:
        import sqlalchemy as sa

        from airflow_sync_provider.core import StagingArea, SyncSpec
        from airflow_sync_provider.core.cdc import CdcSpec
        from airflow_sync_provider.core.streaming import CdcStream, TableStream

        self.uris = dict(uris)
        self.staging = staging if staging is not None else StagingArea()
        self.run_id = run_id
        self.log = logger
        self.central = connect(uris[CENTRAL])
        prepare_realtime(self.central)
        self.stores = {s: connect(uris[s]) for s in STORES}
        for conn in self.stores.values():
            prepare_store(conn)
        url = {k: v.replace("postgres://", "postgresql+psycopg://", 1) for k, v in uris.items()}
        self.engines = {k: sa.create_engine(url[k], poolclass=sa.NullPool) for k in (*WAREHOUSES, *STORES)}
        self.stock_targets = {w: connect(uris[CENTRAL]) for w in WAREHOUSES}
        self.stock = {
            w: CdcStream(
                self.engines[w],
                self.stock_targets[w],
                CdcSpec(sync_id=f"{w}_stock", tables=("stock",), target_schema=w),
                staging=self.staging,
                run_id=run_id,
                logger=logger,
            )
            for w in WAREHOUSES
        }
        self.orders = {
            s: SyncSpec(sync_id=f"{s}_orders", source_table="orders", target_schema=s, cursor_column="updated_at")
            for s in STORES
        }
        self.order_streams = {
            s: TableStream(self.engines[s], self.central, spec, staging=self.staging, run_id=run_id, logger=logger)
            for s, spec in self.orders.items()
        }
        self._gate: Any = None
        if gate:
            from airflow_sync_provider.core.quality.engine import GxEngine
            from airflow_sync_provider.core.quality.suite import load_suite, plan_checks

            # Built once per stream (context, asset, suite); each batch validates only its changed SKUs.
            # GX's cost is per expectation and call, hardly per row, and the stream acts only on the
            # errors: the warn-only expectations (backorders) are left out of the per-batch suite.
            engine = GxEngine()
            checks = [c for c in plan_checks(load_suite(ATP_EXPECTATIONS)) if c.severity == "error"]
            self._gate = (engine, engine.suite(checks), checks)

    def __enter__(self) -> RealtimeInventory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for orders in self.order_streams.values():
            orders.close()
        for stream in self.stock.values():
            stream.close()
        for conn in (self.central, *self.stock_targets.values(), *self.stores.values()):
            conn.close()
        for engine in self.engines.values():
            engine.dispose()

    # ---- the micro-batch

    def step(self) -> Any:
        """One micro-batch; returns a :class:`~airflow_sync_provider.core.streaming.BatchOutcome`."""
        from airflow_sync_provider.core.streaming import BatchOutcome

        pushed = self.push()  # what a killed run committed centrally but did not push yet
        changes, snapshot = 0, False
        for orders in self.order_streams.values():  # before the stock (see the class docstring)
            changes += orders.step().changes if orders.probe() else 0
        for outcome in self._stream_stock():
            changes += outcome.changes
            snapshot = snapshot or outcome.detail.startswith("snapshot")
        skus = self.recompute()
        pushed += self.push()
        lag = self._stock_lag(skus) if skus and not snapshot else None  # a snapshot's rows are old, not late
        return BatchOutcome(changes + pushed, lag_seconds=lag, detail=f"{len(skus)} SKUs recomputed")

    def _stream_stock(self) -> list[Any]:
        """Each warehouse's CDC batch (when its slot holds changes), the warehouses at once: each has its
        own connection to the centre, and the row triggers append to an unkeyed table, so they never wait
        on each other."""
        from concurrent.futures import ThreadPoolExecutor

        from airflow_sync_provider.core.streaming import BatchOutcome

        def one(stream: Any) -> Any:
            return stream.step() if stream.probe() else BatchOutcome(0)

        with ThreadPoolExecutor(max_workers=len(self.stock), thread_name_prefix="stock") as pool:
            return list(pool.map(one, self.stock.values()))

    def recompute(self) -> list[str]:
        """ATP and allocations for the marked SKUs, gated, with their outbox entries: one transaction."""
        with self.central.transaction():
            skus = sorted({r[0] for r in self.central.execute("DELETE FROM inventory.atp_dirty RETURNING sku")})
            if not skus:
                return []
            rows = self.central.execute(
                "SELECT sku, on_hand, reserved, open_orders FROM inventory.atp_inputs WHERE sku = ANY(%s)", (skus,)
            ).fetchall()
            frame = compute_atp(pd.DataFrame(rows, columns=["sku", "on_hand", "reserved", "open_orders"]))
            self._check(frame)
            # One statement per table over arrays (unnest), not a statement per SKU: a 1,000/s batch
            # recomputes hundreds of SKUs.
            columns = [c.split()[0] for c in ATP_COLUMNS.split(", ")]
            types = [c.split()[1] for c in ATP_COLUMNS.split(", ")]
            self.central.execute(
                sql.SQL(
                    "INSERT INTO inventory.available_to_promise ({}) SELECT * FROM unnest({}) "
                    "ON CONFLICT (sku) DO UPDATE SET {}"
                ).format(
                    sql.SQL(", ").join(map(sql.Identifier, columns)),
                    sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sql.SQL(t)) for t in types),
                    sql.SQL(", ").join(
                        sql.SQL("{} = excluded.{}").format(sql.Identifier(c), sql.Identifier(c)) for c in columns[1:]
                    ),
                ),
                [frame[c].tolist() for c in columns],
            )
            present = set(frame["sku"])
            gone = [sku for sku in skus if sku not in present]
            if gone:
                self.central.execute("DELETE FROM inventory.available_to_promise WHERE sku = ANY(%s)", (gone,))
            self.central.execute(
                "INSERT INTO inventory.allocation_outbox (sku, store_web_qty, store_app_qty, discontinued) "
                "SELECT sku, web, app, gone FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bool[]) "
                "WITH ORDINALITY AS e(sku, web, app, gone, n) ORDER BY n",
                (
                    [*frame["sku"].tolist(), *gone],
                    [*frame["store_web_qty"].tolist(), *(0 for _ in gone)],
                    [*frame["store_app_qty"].tolist(), *(0 for _ in gone)],
                    [*(False for _ in range(len(frame))), *(True for _ in gone)],
                ),
            )
        return skus

    def _check(self, frame: pd.DataFrame) -> None:
        if self._gate is None or frame.empty:
            return
        from airflow_sync_provider.core.quality.outcomes import QualityError

        engine, suite, checks = self._gate
        results = engine.validate(suite, frame, {"result_format": "BOOLEAN_ONLY"})  # half the cost of SUMMARY
        failed = [c.label for c in checks if not results[c.index].success]
        if failed:
            raise QualityError(f"ATP of {len(frame)} SKUs failed the gate: {', '.join(failed)}; nothing was pushed")

    # ---- the push

    def push(self) -> int:
        """Push pending outbox entries to every store: lower everywhere first, then raise."""
        batches = [b for b in (self._pending(store) for store in STORES) if b is not None]
        for batch in batches:
            self._apply(batch, final=False)
        for batch in batches:
            self._apply(batch, final=True)
            self.central.execute(
                "INSERT INTO inventory.push_position VALUES (%s, %s) "
                "ON CONFLICT (store) DO UPDATE SET seq = greatest(push_position.seq, excluded.seq)",
                (batch.store, batch.upto),
            )
        if batches:
            self.central.execute(
                "DELETE FROM inventory.allocation_outbox WHERE seq <= (SELECT min(seq) FROM inventory.push_position "
                "HAVING count(*) = %s)",
                (len(STORES),),
            )
        return sum(len(b.skus) for b in batches)

    def _pending(self, store: str) -> PushBatch | None:
        row = self.stores[store].execute("SELECT seq FROM _allocation_position").fetchone()
        position = int(row[0]) if row else 0
        rows = self.central.execute(
            sql.SQL(
                "SELECT DISTINCT ON (sku) sku, {}, discontinued, seq FROM inventory.allocation_outbox "
                "WHERE seq > %s ORDER BY sku, seq DESC"
            ).format(sql.Identifier(f"{store}_qty")),
            (position,),
        ).fetchall()
        if not rows:
            return None
        skus = [r[0] for r in rows]
        known = self.central.execute(
            sql.SQL("SELECT order_id FROM {} WHERE sku = ANY(%s)").format(sql.Identifier(store, "orders")), (skus,)
        ).fetchall()
        return PushBatch(
            store,
            skus,
            [int(r[1]) for r in rows],
            [bool(r[2]) for r in rows],
            [int(k[0]) for k in known],
            max(int(r[3]) for r in rows),
        )

    def _apply(self, batch: PushBatch, *, final: bool) -> None:
        conn = self.stores[batch.store]
        params = {
            "skus": batch.skus,
            "qtys": batch.quantities,
            "gone": batch.discontinued,
            "known": batch.known_orders,
            "excess": self._excess_elsewhere(batch),
        }
        with conn.transaction():
            # lock first, read the store's orders after: a sale either committed before (and is
            # counted) or waits for this transaction and decrements the new value
            conn.execute(
                "SELECT sku FROM catalog_availability WHERE sku = ANY(%s) ORDER BY sku FOR UPDATE", (batch.skus,)
            )
            values = sql.SQL(_STORE_VALUES)
            if not final:
                conn.execute(
                    sql.SQL(
                        "UPDATE catalog_availability c SET available_qty = v.qty FROM ({}) v "
                        "WHERE c.sku = v.sku AND c.available_qty > v.qty"
                    ).format(values),
                    params,
                )
                return
            conn.execute(
                sql.SQL(
                    "INSERT INTO catalog_availability (sku, available_qty) SELECT sku, qty FROM ({}) v "
                    "WHERE NOT v.discontinued ON CONFLICT (sku) DO UPDATE SET available_qty = excluded.available_qty"
                ).format(values),
                params,
            )
            conn.execute(
                "DELETE FROM catalog_availability WHERE sku = ANY(%s)",
                ([s for s, gone in zip(batch.skus, batch.discontinued, strict=True) if gone],),
            )
            conn.execute("UPDATE _allocation_position SET seq = greatest(seq, %s)", (batch.upto,))

    def _excess_elsewhere(self, batch: PushBatch) -> list[int]:
        """Per SKU of ``batch``, what the other stores sold that the centre has not seen beyond their
        allocation (the centre's current one, which the outbox entries pushed with it equal).

        Such a store shows 0 and the centre still counts those units as available, so they must come
        off this store's value.  Once a store's first pass ran it cannot sell beyond its allocation,
        so read in the second pass this no longer grows; in the first pass it only lowers more.
        """
        excess = [0] * len(batch.skus)
        for other in STORES:
            if other == batch.store:
                continue
            known = self.central.execute(
                sql.SQL("SELECT order_id FROM {} WHERE sku = ANY(%s)").format(sql.Identifier(other, "orders")),
                (batch.skus,),
            ).fetchall()
            allocation = dict(
                self.central.execute(
                    sql.SQL("SELECT sku, {} FROM inventory.available_to_promise WHERE sku = ANY(%s)").format(
                        sql.Identifier(f"{other}_qty")
                    ),
                    (batch.skus,),
                ).fetchall()
            )
            rows = (
                self.stores[other]
                .execute(
                    "SELECT sku, sum(quantity) FROM orders WHERE sku = ANY(%s) AND status <> 'cancelled' "
                    "AND NOT (order_id = ANY(%s::bigint[])) GROUP BY sku",
                    (batch.skus, [int(k[0]) for k in known]),
                )
                .fetchall()
            )
            unseen = {sku: int(qty) for sku, qty in rows}
            for i, sku in enumerate(batch.skus):
                excess[i] += max(unseen.get(sku, 0) - int(allocation.get(sku, 0)), 0)
        return excess

    def _stock_lag(self, skus: list[str]) -> float | None:
        """Seconds from the newest stock change of these SKUs (its ``updated_at``) to now: in every store."""
        newest = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT max(updated_at) FROM {} WHERE sku = ANY(%(skus)s)").format(sql.Identifier(w, "stock"))
            for w in WAREHOUSES
        )
        row = self.central.execute(
            sql.SQL("SELECT extract(epoch FROM clock_timestamp() - max(m)) FROM ({}) t(m)").format(newest),
            {"skus": skus},
        ).fetchone()
        return None if row is None or row[0] is None else round(float(row[0]), 3)


def observe_oversell(
    uris: Mapping[str, str], attempts: int = 5, *, between: Callable[[], None] | None = None
) -> list[str]:
    """What a store can observe right now, checked against the ground truth: the violations.

    The stores are read first (each its sellable quantities and open orders in one snapshot), twice
    for the first one, until its whole state (quantities, open orders, its orders' newest change and
    its push position) did not change around the other's read, so both held at one moment.  Equal
    quantities are not enough: a cancel the centre pushed to the other store, then a sale of what the
    first store's share rose by, leave its quantities as they were but its open orders not (the old
    ones would count the cancelled order against the units the other store now shows).  The
    warehouses are read after, so a receipt in between can only raise the truth (no false alarm).
    Meant for writers that receive stock, sell within ``catalog_availability`` and cancel orders
    (releases reserve at the warehouse before the store marks the order: read in this order, they
    would look like stock counted twice).  ``between`` runs after the first read (for tests).
    """

    def read_store(store: str) -> tuple[dict[str, int], dict[str, int], tuple[Any, ...]]:
        with connect(uris[store]) as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            shown = _store_availability(conn)
            open_orders = dict(
                conn.execute("SELECT sku, sum(quantity) FROM orders WHERE status = 'open' GROUP BY sku").fetchall()
            )
            # every sale or cancel moves the orders' newest change, every push the position
            orders = conn.execute("SELECT count(*), max(updated_at) FROM orders").fetchone()
            pushed = conn.execute("SELECT to_regclass('public._allocation_position') IS NOT NULL").fetchone()
            if pushed and pushed[0]:
                pushed = conn.execute("SELECT max(seq) FROM _allocation_position").fetchone()
            version = (*(orders or ()), *(pushed or ()))
        return shown, {k: int(v) for k, v in open_orders.items()}, version

    first, rest = STORES[0], STORES[1:]
    for attempt in range(attempts):
        reads = {first: read_store(first)}
        if between is not None and attempt == 0:
            between()
        reads.update({s: read_store(s) for s in rest})
        if read_store(first) == reads[first]:
            break
    else:
        return []  # the first store kept moving: no consistent moment observed this time
    free: dict[str, int] = {}
    for warehouse in WAREHOUSES:
        with connect(uris[warehouse]) as conn:
            for sku, qty in conn.execute("SELECT sku, on_hand - reserved FROM stock"):
                free[sku] = free.get(sku, 0) + int(qty)
    violations = []
    for sku in sorted({sku for shown, _, _ in reads.values() for sku in shown}):
        truth = free.get(sku, 0) - sum(open_orders.get(sku, 0) for _, open_orders, _ in reads.values())
        promised = sum(shown.get(sku, 0) for shown, _, _ in reads.values())
        if promised > max(truth, 0):
            shown_by = ", ".join(f"{s}={r[0].get(sku, 0)} open {r[1].get(sku, 0)}" for s, r in reads.items())
            violations.append(
                f"{sku}: stores may sell {promised} but only {max(truth, 0)} are available "
                f"({shown_by}; warehouses free {free.get(sku, 0)})"
            )
    return violations


__all__ = [
    "ATP_EXPECTATIONS",
    "CENTRAL",
    "STORES",
    "STORE_SHARES",
    "WAREHOUSES",
    "AvailabilityCheck",
    "RealtimeInventory",
    "check_no_oversell",
    "compute_atp",
    "observe_oversell",
    "prepare_central",
    "prepare_realtime",
    "prepare_store",
    "seed",
    "simulate_round",
    "stock_freshness",
    "true_available",
]
