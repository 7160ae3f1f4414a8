"""Both case studies end to end: seed the systems, run the reference DAGs with ``dag.test()``,
simulate a round of business, run them again, backfill a past window, and report what happened.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from psycopg import sql

from case_studies import bank, databases, inventory
from case_studies.databases import connect
from sync_dev.airflow_sandbox import AirflowSandbox, DagRunOutcome
from sync_dev.local_postgres import LocalPostgres

TOKEN_KEY = "demo-only-token-key"
_LATENCY = re.compile(r"sellable quantity ([0-9.]+) s after its commit")


class Report:
    def __init__(self) -> None:
        self.ok = True

    def check(self, label: str, passed: bool, detail: str = "") -> None:
        self.ok = self.ok and passed
        print(f"  {label:<58} {'OK' if passed else 'FAILED'}{'  ' + detail if detail else ''}")

    def run(self, label: str, outcome: DagRunOutcome, extra: str = "") -> None:
        failed = outcome.failed_tasks()
        self.ok = self.ok and outcome.ok
        print(
            f"  {label:<24} {outcome.state:<8} {len(outcome.tasks):>2} tasks {outcome.seconds:6.1f} s"
            + (f"  failed: {failed} (log: {outcome.log_file})" if failed or not outcome.ok else "")
            + extra
        )


def _count(uri: str, schema: str, table: str) -> int:
    with connect(uri) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))).fetchone()
    return int(row[0]) if row else 0


def _latency(outcome: DagRunOutcome) -> str:
    text = outcome.log_file.read_text(errors="replace") if outcome.log_file else ""
    found = _LATENCY.findall(text)
    return f"  newest warehouse change -> every store: {float(found[-1]):.1f} s" if found else ""


def inventory_demo(box: AirflowSandbox, uris: Mapping[str, str], scale: int, when: dt.datetime) -> bool:
    report = Report()
    print(f"\nCase study 1: inventory across 2 warehouses (CDC) and 2 online stores (incremental), {scale:,} SKUs")
    seeded = inventory.seed(uris, scale)
    print("  seeded: " + ", ".join(f"{k} {v:,}" for k, v in seeded.items()))
    report.run("run 1 (initial)", box.run_dag("inventory_sync", when))
    changes = inventory.simulate_round(uris, 1, scale)
    print("  simulated: " + ", ".join(f"{v:,} {k}" for k, v in changes.counts.items()))
    second = box.run_dag("inventory_sync", when + dt.timedelta(minutes=5))
    report.run("run 2 (after changes)", second, _latency(second))
    central = uris[inventory.CENTRAL]
    synced = {
        f"{schema}.{table}": _count(central, schema, table)
        for schema, table in (
            ("warehouse_a", "stock"),
            ("warehouse_b", "stock"),
            ("store_web", "orders"),
            ("store_app", "orders"),
            ("inventory", "available_to_promise"),
        )
    }
    print("  central now holds: " + ", ".join(f"{k} {v:,}" for k, v in synced.items()))
    truth = inventory.true_available(uris)
    with connect(central) as conn:
        atp = dict(conn.execute("SELECT sku, available_to_sell FROM inventory.available_to_promise").fetchall())
        gates = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE success) FROM inventory._sync_quality_results"
        ).fetchone()
    report.check(
        "central ATP == ATP recomputed from the sources",
        atp == {k: v for k, v in truth.items() if k in atp} and set(atp) == set(truth),
        f"{len(atp):,} SKUs",
    )
    assert gates is not None
    report.check(
        "quality gate on the ATP batch (keys, quantities, invariant)",
        gates[0] == gates[1] == 2,
        f"{gates[1]}/{gates[0]} runs passed",
    )
    for against in ("central", "sources"):
        result = inventory.check_no_oversell(uris, against)
        report.check(
            f"no store can oversell (checked against the {against})",
            result.ok,
            "; ".join(result.violations[:3])
            or "stores may sell "
            + ", ".join(f"{s} {q:,}" for s, q in result.promised.items())
            + f" of {sum(truth.values()):,} available",
        )
    return report.ok


def bank_demo(box: AirflowSandbox, uris: Mapping[str, str], scale: int, when: dt.datetime) -> bool:
    report = Report()
    source = uris[bank.SOURCE]
    print(
        "\nCase study 2: a bank's customer master -> loan management, credit scoring, fraud detection, "
        f"{scale:,} customers"
    )
    seeded = bank.seed(source, scale, start=when)
    print("  seeded: " + ", ".join(f"{k} {v:,}" for k, v in seeded.items()))
    report.run("run 1 (initial)", box.run_dag("bank_customer_sync", when))
    changes = bank.simulate_round(source, 1)
    print(
        f"  simulated: {changes.updated} profile changes, {changes.new_customers} new customers, "
        f"{changes.erased} erasure request, {changes.balances} balance moves, {changes.new_loans} new loans, "
        f"{changes.repaid} repaid"
    )
    report.run("run 2 (after changes)", box.run_dag("bank_customer_sync", when + dt.timedelta(hours=1)))

    # A backfill: damage credit scoring's copy of one past day, then re-sync exactly that day.
    day = (when - dt.timedelta(days=10)).replace(hour=0, minute=0, second=0, microsecond=0)
    window = (day, day + dt.timedelta(days=1))
    credit = uris["credit_scoring"]
    with connect(credit) as conn:
        damaged = conn.execute(
            "DELETE FROM scoring.customers WHERE updated_at >= %s AND updated_at < %s", window
        ).rowcount
        watermark_before = conn.execute(
            "SELECT version, watermark FROM scoring._sync_state WHERE sync_id = 'credit_scoring_customers'"
        ).fetchone()
    backfill = box.run_dag(
        "bank_customer_sync",
        when + dt.timedelta(hours=2),
        {"window_start": window[0].isoformat(), "window_end": window[1].isoformat()},
    )
    report.run(f"backfill {day:%Y-%m-%d}", backfill, f"  ({damaged} deleted rows of that day to restore)")
    with connect(credit) as conn:
        watermark_after = conn.execute(
            "SELECT version, watermark FROM scoring._sync_state WHERE sync_id = 'credit_scoring_customers'"
        ).fetchone()
    report.check("backfill left the live watermark where it was", watermark_before == watermark_after)

    matches = bank.customers_match_master(uris, TOKEN_KEY)
    for target, (rows, differing) in matches.items():
        report.check(f"{target}: every customer matches the master (after masking)", differing == 0, f"{rows:,} rows")
    for target in ("credit_scoring", "fraud_detection"):
        withheld = [c for c in bank.CUSTOMER_COLUMNS if c not in bank.TARGET_COLUMNS[target]]
        with connect(uris[target]) as conn:
            present = {
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
                    (bank.TARGET_SCHEMAS[target], "customers"),
                )
            }
        report.check(
            f"{target}: has no column it must not get",
            not present & set(withheld),
            f"withheld: {', '.join(withheld)}",
        )
    both, same = bank.tokens_consistent(uris)
    report.check(
        "same customer, same token in credit scoring and fraud", both > 0 and both == same, f"{same:,}/{both:,}"
    )
    history = bank.history_summary(uris["loan_management"])
    report.check(
        "SCD2 history: exactly one current version per customer",
        history.one_current_per_customer,
        f"{history.versions:,} versions, {history.current:,} current, {history.closed_by_delete} closed by erasure",
    )
    gates = bank.gate_results(uris)
    report.check(
        "quality gates passed", all(ok for _, ok, _ in gates), f"{sum(ok for _, ok, _ in gates)}/{len(gates)} gate runs"
    )
    reconciled = bank.last_reconciliations(uris)
    report.check(
        "reconciled with the master after every run (last result)",
        all(counts[1:] == (0, 0, 0) for counts in reconciled.values()) and len(reconciled) == 4,
        ", ".join(f"{k} {v[0]:,} rows equal" for k, v in sorted(reconciled.items())),
    )
    ledger = bank.ledger(uris)
    report.check(
        "audit ledger: one entry per sync per run (2 live + 1 backfill)",
        all([e[1] for e in entries] == ["applied", "applied", "backfilled"] for entries in ledger.values()),
        f"{sum(len(e) for e in ledger.values())} entries for {len(ledger)} syncs",
    )
    return report.ok


def run_case_studies(
    server: LocalPostgres,
    workdir: Path,
    inventory_scale: int = 500,
    bank_scale: int = 300,
    only: Callable[[str], bool] = lambda _: True,
) -> bool:
    started = time.monotonic()
    with server.connect() as admin:
        databases.create_databases(admin)
    uris = databases.connection_uris("127.0.0.1", server.port)
    box = AirflowSandbox(
        workdir / "airflow",
        {
            **databases.airflow_environment(uris),
            "AIRFLOW_VAR_SYNC_TOKEN_KEY": TOKEN_KEY,
            "SYNC_STAGING_DIR": str(workdir / "staging"),
        },
    )
    box.migrate()
    print(f"Airflow: dag.test() of the reference DAGs in {box.home} (SQLite metadata); task logs there")
    when = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=3)
    ok = True
    if only("inventory"):
        ok = inventory_demo(box, uris, inventory_scale, when) and ok
    if only("bank"):
        ok = bank_demo(box, uris, bank_scale, when) and ok
    for system in (*databases.INVENTORY_SOURCES,):  # the CDC slots would hold WAL once the demo is gone
        with connect(uris[system]) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE database = current_database()"
            )
    print(f"  case studies done in {time.monotonic() - started:.1f} s")
    return ok


__all__ = ["TOKEN_KEY", "run_case_studies"]
