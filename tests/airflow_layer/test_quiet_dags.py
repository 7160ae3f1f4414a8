"""Quiet runs of every reference DAG, through Airflow (``dag.test()``), as an hourly schedule makes them.

For each DAG in ``dags/``: after a first run, two runs in a row with no source change both succeed
and leave the business columns and the watermarks as they were; a run whose only source changes are
deletes applies them; and (bank) a backfill of an hour in which nothing changed succeeds and changes
nothing.  Before the quiet-run fix (issue 12) the bank DAG failed its gates on every quiet run (the
masking transform did not shape the empty batch) and ``orders_sync`` failed on schema drift.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from case_studies import bank, inventory
from case_studies.databases import connect
from sync_dev.airflow_sandbox import AirflowSandbox, DagRunOutcome
from sync_dev.local_postgres import LocalPostgres

from ..conftest import case_study_systems

pytestmark = pytest.mark.airflow

KEY = "quiet-token-key"
WHEN = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=6)
#: Columns the load writes on every touched row: a quiet run must not touch any row.
METADATA = ("_sync_run_id", "_sync_synced_at", "_sync_deleted_at")


@pytest.fixture
def systems(pg_server: LocalPostgres, tmp_path: Path) -> Iterator[tuple[AirflowSandbox, dict[str, str]]]:
    examples = {"AIRFLOW_CONN_SYNC_SOURCE": "example_source", "AIRFLOW_CONN_SYNC_TARGET": "example_target"}
    prefix = f"q{uuid.uuid4().hex[:6]}_"
    environment = {  # the example DAGs' connections (dags/example_table_sync.py)
        variable: f"postgresql://postgres@127.0.0.1:{pg_server.port}/{prefix + name}"
        for variable, name in examples.items()
    }
    with case_study_systems(
        pg_server,
        tmp_path,
        prefix=prefix,
        token_key=KEY,
        extra_databases=tuple(examples.values()),
        environment=environment,
    ) as sandbox:
        yield sandbox


def _assert_success(outcome: DagRunOutcome) -> None:
    log = outcome.log_file.read_text()[-6000:] if outcome.log_file else ""
    assert outcome.ok, (outcome.state, outcome.failed_tasks(), log)


def _snapshot(uri: str, *, state: bool = True) -> dict[str, Any]:
    """Every user table's rows (metadata columns included) and the sync states' watermarks."""
    tables: dict[str, Any] = {}
    with connect(uri) as conn:
        names = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND c.relname NOT LIKE '\\_sync\\_%' ORDER BY 1, 2"
        ).fetchall()
        for schema, table in names:
            rows = conn.execute(
                sql.SQL("SELECT t::text FROM {} t ORDER BY 1").format(sql.Identifier(schema, table))
            ).fetchall()
            tables[f"{schema}.{table}"] = [r[0] for r in rows]
        if state:
            for (schema,) in conn.execute(
                "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relname = '_sync_state' ORDER BY 1"
            ).fetchall():
                tables[f"{schema}._sync_state"] = conn.execute(
                    sql.SQL("SELECT sync_id, watermark::text FROM {} ORDER BY sync_id").format(
                        sql.Identifier(schema, "_sync_state")
                    )
                ).fetchall()
    return tables


def _quiet_twice(box: AirflowSandbox, dag_id: str, start: dt.datetime, uris: list[str]) -> dt.datetime:
    """Two runs with no source change: both succeed and change nothing the users see."""
    before = [_snapshot(u) for u in uris]
    for hour in (1, 2):
        _assert_success(box.run_dag(dag_id, start + dt.timedelta(hours=hour)))
        assert [_snapshot(u) for u in uris] == before, f"quiet run {hour} of {dag_id} changed a target"
    return start + dt.timedelta(hours=2)


def test_bank_dag_quiet_runs_quiet_backfill_and_deletes_only(systems: tuple[AirflowSandbox, dict[str, str]]) -> None:
    box, uris = systems
    source = uris[bank.SOURCE]
    bank.seed(source, scale=40, start=WHEN - dt.timedelta(days=3))
    _assert_success(box.run_dag("bank_customer_sync", WHEN))
    targets = [uris[t] for t in bank.TARGET_SCHEMAS]
    last = _quiet_twice(box, "bank_customer_sync", WHEN, targets)

    # a backfill of an hour in which no customer changed: succeeds and changes nothing
    before = [_snapshot(u) for u in targets]
    empty_hour = (WHEN - dt.timedelta(days=30), WHEN - dt.timedelta(days=30) + dt.timedelta(hours=1))
    outcome = box.run_dag(
        "bank_customer_sync",
        last + dt.timedelta(hours=1),
        {"window_start": empty_hour[0].isoformat(), "window_end": empty_hour[1].isoformat()},
    )
    _assert_success(outcome)
    assert [_snapshot(u) for u in targets] == before

    # only deletes at the source (an erasure request): they reach every target
    with connect(source) as conn, conn.transaction():
        erased = conn.execute("SELECT min(customer_id) FROM customers").fetchone()
        assert erased is not None
        conn.execute("DELETE FROM loans WHERE customer_id = %s", erased)
        conn.execute("DELETE FROM accounts WHERE customer_id = %s", erased)
        conn.execute("DELETE FROM customers WHERE customer_id = %s", erased)
    _assert_success(box.run_dag("bank_customer_sync", last + dt.timedelta(hours=2)))
    for target, schema in bank.TARGET_SCHEMAS.items():
        with connect(uris[target]) as conn:
            left = conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE customer_id = %s").format(sql.Identifier(schema, "customers")),
                erased,
            ).fetchone()
        assert left == (0,), target
    assert all(differing == 0 and rows > 0 for rows, differing in bank.customers_match_master(uris, KEY).values())


def test_inventory_dags_quiet_runs_and_deletes_only(systems: tuple[AirflowSandbox, dict[str, str]]) -> None:
    box, uris = systems
    inventory.seed(uris, scale=60)
    _assert_success(box.run_dag("inventory_sync", WHEN))
    central = uris[inventory.CENTRAL]
    stores = [uris[s] for s in inventory.STORES]
    last = _quiet_twice(box, "inventory_sync", WHEN, [central, *stores])
    # the on-change variant (same pipeline, started by slot watchers) is quiet too
    before = [_snapshot(u) for u in (central, *stores)]
    _assert_success(box.run_dag("inventory_sync_on_change", last + dt.timedelta(hours=1)))
    assert [_snapshot(u) for u in (central, *stores)] == before

    # only deletes: a discontinued stock row (CDC) and a purged order (key scan)
    with connect(uris["warehouse_a"]) as conn:
        (sku,) = conn.execute("DELETE FROM stock WHERE sku = (SELECT min(sku) FROM stock) RETURNING sku").fetchone()  # type: ignore[misc]
    with connect(uris["store_web"]) as conn:
        (order_id,) = conn.execute(  # type: ignore[misc]
            "DELETE FROM orders WHERE order_id = (SELECT min(order_id) FROM orders) RETURNING order_id"
        ).fetchone()
    _assert_success(box.run_dag("inventory_sync", last + dt.timedelta(hours=2)))
    with connect(central) as conn:
        assert conn.execute("SELECT count(*) FROM warehouse_a.stock WHERE sku = %s", (sku,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM store_web.orders WHERE order_id = %s", (order_id,)).fetchone() == (0,)
        atp = dict(conn.execute("SELECT sku, available_to_sell FROM inventory.available_to_promise").fetchall())
    assert atp == inventory.true_available(uris)
    for against in ("central", "sources"):
        check = inventory.check_no_oversell(uris, against=against)
        assert check.ok, check.violations


def test_example_dags_quiet_runs_and_deletes_only(systems: tuple[AirflowSandbox, dict[str, str]]) -> None:
    """``dags/example_table_sync.py``: the README's complete example (with its ``add_total`` transform)."""
    box, uris = systems
    with connect(uris["example_source"]) as conn:
        conn.execute(
            "CREATE TABLE orders (id int PRIMARY KEY, quantity int NOT NULL, unit_price numeric(12, 2) NOT NULL, "
            "updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        conn.execute(
            "INSERT INTO orders (id, quantity, unit_price) "
            "SELECT g, g % 5 + 1, (g * 0.75)::numeric(12, 2) FROM generate_series(1, 100) g"
        )
    target = uris["example_target"]
    for dag_id in ("orders_sync", "orders_sync_split"):
        _assert_success(box.run_dag(dag_id, WHEN))
    with connect(target) as conn:
        assert conn.execute("SELECT count(*), sum(total) FROM orders").fetchone() == (
            100,
            conn.execute("SELECT sum(quantity * unit_price) FROM orders").fetchone()[0],  # type: ignore[index]
        )
    before = _snapshot(target)
    for hour in (1, 2):
        for dag_id in ("orders_sync", "orders_sync_split"):
            _assert_success(box.run_dag(dag_id, WHEN + dt.timedelta(hours=hour)))
        assert _snapshot(target) == before, f"quiet run {hour} changed the target"

    with connect(uris["example_source"]) as conn:
        conn.execute("DELETE FROM orders WHERE id > 95")
    for dag_id in ("orders_sync", "orders_sync_split"):
        _assert_success(box.run_dag(dag_id, WHEN + dt.timedelta(hours=3)))
    with connect(target) as conn:
        assert conn.execute("SELECT count(*), max(id) FROM orders").fetchone() == (95, 95)  # hard deletes
        soft = conn.execute(  # the split DAG soft-deletes
            "SELECT count(*) FILTER (WHERE _sync_deleted_at IS NOT NULL), count(*) FROM orders_full_copy"
        ).fetchone()
    assert soft == (5, 100)
