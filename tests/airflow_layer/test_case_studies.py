"""The two reference DAGs run end to end with ``dag.test()`` on real PostgreSQL databases, with
generated data and a round of simulated changes in between; the assertions are the business
outcomes (no overselling; every target customer equals the master after masking; SCD2 has one
current row per customer; one ledger entry per run; a backfill re-syncs its window only).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from case_studies import bank, databases, inventory
from case_studies.databases import connect
from sync_dev.airflow_sandbox import AirflowSandbox, DagRunOutcome
from sync_dev.local_postgres import LocalPostgres

from ..conftest import case_study_systems

pytestmark = pytest.mark.airflow

KEY = "test-token-key"
WHEN = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=5)


@pytest.fixture
def systems(pg_server: LocalPostgres, tmp_path: Path) -> Iterator[tuple[AirflowSandbox, dict[str, str]]]:
    with case_study_systems(pg_server, tmp_path, prefix=f"cs{uuid.uuid4().hex[:6]}_", token_key=KEY) as sandbox:
        yield sandbox


def _assert_success(outcome: DagRunOutcome) -> None:
    log = outcome.log_file.read_text()[-6000:] if outcome.log_file else ""
    assert outcome.ok, (outcome.state, outcome.failed_tasks(), log)


def test_inventory_dag_never_lets_the_stores_oversell(systems: tuple[AirflowSandbox, dict[str, str]]) -> None:
    box, uris = systems
    inventory.seed(uris, scale=120)
    _assert_success(box.run_dag("inventory_sync", WHEN))
    first = inventory.check_no_oversell(uris, against="sources")
    assert first.ok, first.violations
    assert all(first.promised[s] > 0 for s in inventory.STORES)  # the push reached both stores

    changes = inventory.simulate_round(uris, 1, scale=120)
    assert changes.counts["orders placed"] > 0 and changes.counts["stock receipts"] > 0
    second = box.run_dag("inventory_sync", WHEN + dt.timedelta(minutes=5))
    _assert_success(second)

    # the centre equals the ground truth recomputed from the warehouses and stores
    truth = inventory.true_available(uris)
    with connect(uris[inventory.CENTRAL]) as conn:
        atp = dict(conn.execute("SELECT sku, available_to_sell FROM inventory.available_to_promise").fetchall())
        runs = conn.execute(
            "SELECT sync_id, count(*) FROM inventory._sync_audit GROUP BY sync_id ORDER BY sync_id"
        ).fetchall()
    assert atp == truth
    assert runs == [("available_to_promise", 2)]
    for against in ("central", "sources"):
        check = inventory.check_no_oversell(uris, against=against)
        assert check.ok, check.violations
    # a store's sellable quantity never exceeds its share, and never the central availability
    for store in inventory.STORES:
        with connect(uris[store]) as conn:
            shown = dict(conn.execute("SELECT sku, available_qty FROM catalog_availability").fetchall())
        assert set(shown) == set(atp)
        assert all(shown[sku] <= atp[sku] * inventory.STORE_SHARES[store] for sku in shown)
    # the run logged its latency (source commit -> stores)
    assert "after its commit" in (second.log_file.read_text() if second.log_file else "")


def test_bank_dag_masks_keeps_history_reconciles_and_backfills(systems: tuple[AirflowSandbox, dict[str, str]]) -> None:
    box, uris = systems
    source = uris[bank.SOURCE]
    bank.seed(source, scale=80, start=WHEN)
    _assert_success(box.run_dag("bank_customer_sync", WHEN))
    bank.simulate_round(source, 1)
    _assert_success(box.run_dag("bank_customer_sync", WHEN + dt.timedelta(hours=1)))

    # every target equals the master after its masking, and holds no column it must not get
    assert all(differing == 0 and rows > 0 for rows, differing in bank.customers_match_master(uris, KEY).values())
    for target in ("credit_scoring", "fraud_detection"):
        with connect(uris[target]) as conn:
            columns = {
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = %s AND table_name = 'customers'",
                    (bank.TARGET_SCHEMAS[target],),
                )
            }
        assert "national_id" not in columns and "first_name" not in columns
        assert set(bank.TARGET_COLUMNS[target]) <= columns
    both, same = bank.tokens_consistent(uris)
    assert both > 0 and both == same

    history = bank.history_summary(uris["loan_management"])
    assert history.one_current_per_customer and history.closed_by_delete == 1
    assert history.versions > history.current  # the round's profile changes opened new versions

    # reconciliation ran for every customer target and the loans, and found nothing different
    reconciled = bank.last_reconciliations(uris)
    assert set(reconciled) == {f"{t}_customers" for t in bank.TARGET_SCHEMAS} | {"loan_management_loans"}
    assert all(counts[1:] == (0, 0, 0) for counts in reconciled.values())
    assert all(ok for _, ok, _ in bank.gate_results(uris))

    # A backfill of one past day: damage that day in credit scoring (and one row outside it).
    day = (WHEN - dt.timedelta(days=12)).replace(hour=0)
    window = (day, day + dt.timedelta(days=1))
    with connect(uris["credit_scoring"]) as conn:
        deleted = conn.execute(
            "DELETE FROM scoring.customers WHERE updated_at >= %s AND updated_at < %s RETURNING customer_id", window
        ).fetchall()
        outside = conn.execute(
            "UPDATE scoring.customers SET segment = 'tampered' WHERE customer_id = ("
            "SELECT min(customer_id) FROM scoring.customers WHERE updated_at < %s) RETURNING customer_id",
            (window[0],),
        ).fetchone()
        state_before = conn.execute("SELECT version, watermark FROM scoring._sync_state").fetchall()
    assert deleted and outside
    outcome = box.run_dag(
        "bank_customer_sync",
        WHEN + dt.timedelta(hours=2),
        {"window_start": window[0].isoformat(), "window_end": window[1].isoformat()},
    )
    # the window is restored, but reconciliation (whole table) still catches the row outside it
    assert outcome.tasks["credit_scoring.reconcile_customers"] == "failed"
    with connect(uris["credit_scoring"]) as conn:
        restored = conn.execute(
            "SELECT count(*) FROM scoring.customers WHERE customer_id = ANY(%s)", ([r[0] for r in deleted],)
        ).fetchone()
        tampered = conn.execute("SELECT segment FROM scoring.customers WHERE customer_id = %s", outside).fetchone()
        state_after = conn.execute("SELECT version, watermark FROM scoring._sync_state").fetchall()
    assert restored == (len(deleted),)
    assert tampered == ("tampered",)  # outside the window: not touched by the backfill
    assert state_after == state_before  # the live watermark did not move

    ledger = bank.ledger(uris)
    assert set(ledger) == {
        *(f"{t}_customers" for t in bank.TARGET_SCHEMAS),
        "loan_management_loans",
        "credit_scoring_accounts",
        "fraud_detection_accounts",
    }
    for entries in ledger.values():  # one entry per sync per run
        assert [(mode, status) for mode, status, _ in entries][2] == ("backfill", "backfilled")
        assert [status for _, status, _ in entries[:2]] == ["applied", "applied"]
        assert len(entries) == 3


def test_case_study_dags_parse_without_a_database_and_declare_their_assets(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import BundleDagBag

    from sync_dev import DAGS_FOLDER

    for system in databases.ALL_SYSTEMS:  # connections that point nowhere: parsing must not try them
        monkeypatch.setenv(f"AIRFLOW_CONN_{system.upper()}", "postgres://nobody@127.0.0.1:1/nowhere")
    monkeypatch.delenv("AIRFLOW_VAR_SYNC_TOKEN_KEY", raising=False)  # read when a batch is masked, not at parse
    bag = BundleDagBag(dag_folder=str(DAGS_FOLDER), bundle_path=DAGS_FOLDER)  # as the dag-processor parses
    assert bag.import_errors == {}
    # the DAGs' helper package is imported by them, never parsed as DAG files (dags/.airflowignore)
    parsed = {Path(file).relative_to(DAGS_FOLDER).as_posix() for file in bag.file_last_changed}
    assert {"bank_customer_sync.py", "case_study_data.py", "inventory_sync.py"} <= parsed
    assert not [file for file in parsed if file.startswith("case_studies/")]
    inventory_dag, bank_dag = bag.dags["inventory_sync"], bag.dags["bank_customer_sync"]
    # the bank's schedule has real hourly intervals, so `airflow backfill create` windows are real
    assert type(bank_dag.timetable).__name__ == "CronDataIntervalTimetable"
    # the on-change variant is the same pipeline, started by the warehouses' slot watchers
    on_change = bag.dags["inventory_sync_on_change"]
    assert {t.task_id for t in on_change.tasks} == {t.task_id for t in inventory_dag.tasks}
    (watched,) = on_change.timetable.asset_condition.objects
    assert [w.trigger.sync_id for w in watched.watchers] == ["warehouse_a_stock", "warehouse_b_stock"]
    written = {asset.name for dag in (inventory_dag, bank_dag) for task in dag.tasks for asset in task.outlets}
    assert {
        "inventory_central.inventory.available_to_promise",
        "store_web.public.catalog_availability",
        "store_app.public.catalog_availability",
        "inventory_central.warehouse_a.stock",
        "loan_management.lending.customers",
        "loan_management.lending.customers_history",
        "credit_scoring.scoring.customers",
        "fraud_detection.fraud.customers",
        "loan_management.lending.loans",
    } <= written
    gates = [t.task_id for t in bank_dag.tasks if "gate" in t.task_id or "point_to" in t.task_id]
    assert len(gates) == 5  # a GX gate per customer target and the loans, and the reference gate
