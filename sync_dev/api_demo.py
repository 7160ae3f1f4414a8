"""The demo's API section: the bank's credit bureau, reachable only over its REST API.

Our API server (``sync_dev.api_server``) plays the bureau: bearer token, cursor pagination, a rate
limit, an outage, a few reports with impossible scores, one report published late.  The reference
DAG ``bank_credit_bureau_sync`` runs twice with ``dag.test()``; the section reports what reached
credit scoring, what the gate quarantined, that the late report was caught thanks to the lag, and
(when the bank case study ran before it) what credit scoring decides from customers and reports.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import time
from pathlib import Path

import psycopg
from psycopg import sql

from case_studies import bank, databases
from case_studies.databases import connect
from sync_dev.airflow_sandbox import AirflowSandbox
from sync_dev.api_server import ApiAuthConfig, ApiServer
from sync_dev.local_postgres import LocalPostgres

TOKEN = "demo-only-bureau-token"
SYNC_ID = "credit_scoring_bureau_reports"


def _scoring_database(server: LocalPostgres) -> tuple[str, bool]:
    """The credit-scoring database of the bank case study if it ran (its customers are there), else a new one."""
    uri = databases.connection_uris("127.0.0.1", server.port)[bank.BUREAU_TARGET]
    with contextlib.suppress(psycopg.OperationalError):  # no bank case study in this run: a database of our own
        with connect(uri) as conn:
            found = conn.execute("SELECT to_regclass('scoring.customers')").fetchone()
        if found and found[0] is not None:
            return uri, True
    name = server.create_database("demo_api_credit_scoring")
    return f"postgres://postgres@127.0.0.1:{server.port}/{name}", False


def api_demo(server: LocalPostgres, workdir: Path, customers: int = 300) -> bool:
    print("\nREST API source: the bank's credit bureau -> credit scoring (bank_credit_bureau_sync)")
    started = time.monotonic()
    scoring, has_customers = _scoring_database(server)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    when = now.replace(minute=0, second=0) - dt.timedelta(hours=2)
    reports = bank.bureau_reports(range(1, customers + 1), now)
    fresh = bank.bureau_report(customers + 1, now - dt.timedelta(minutes=2), random.Random(1))
    ok = True

    def check(label: str, passed: bool, detail: str = "") -> None:
        nonlocal ok
        ok = ok and passed
        print(f"  {label:<58} {'OK' if passed else 'FAILED'}{'  ' + detail if detail else ''}")

    with ApiServer(
        {bank.BUREAU_COLLECTION: [*reports, fresh]},
        auth=ApiAuthConfig("bearer", TOKEN),
        keys={bank.BUREAU_COLLECTION: "customer_id"},
    ) as bureau:
        connection = {"conn_type": "http", "host": bureau.url, "password": TOKEN, "extra": {"auth_type": "bearer"}}
        box = AirflowSandbox(
            workdir / "airflow-api",
            {
                "AIRFLOW_CONN_CREDIT_BUREAU": json.dumps(connection),
                "AIRFLOW_CONN_CREDIT_SCORING": scoring,
                "SYNC_STAGING_DIR": str(workdir / "staging-api"),
            },
        )
        with box:
            box.migrate()
            bureau.rate_limit = (1, 1.0)  # 1 request a second: the bureau's plan
            bureau.fail("status", status=503, times=2, match="cursor=")
            first = box.run_dag("bank_credit_bureau_sync", when)
            print(f"  run 1 (initial)          {first.state:<8} {len(first.tasks):>2} tasks {first.seconds:6.1f} s")
            ok = ok and first.ok
            log = first.log_file.read_text(errors="replace") if first.log_file else ""
            print(
                f"  the bureau served {len(reports) + 1:,} reports, pages of 200; retries: "
                f"{log.count('HTTP 429, Retry-After')} rate-limit waits (Retry-After), "
                f"{log.count('HTTP 503, backoff')} outage backoffs"
            )
            valid, same = bank.bureau_matches(scoring, bureau.records(bank.BUREAU_COLLECTION))
            check("credit scoring holds every valid report exactly", valid == same, f"{same:,}/{valid:,}")
            with connect(scoring) as conn:
                row = conn.execute(
                    sql.SQL("SELECT count(*) FROM {} WHERE sync_id = %s").format(
                        sql.Identifier("scoring", "_sync_quarantine")
                    ),
                    (SYNC_ID,),
                ).fetchone()
                state = conn.execute(
                    "SELECT watermark FROM scoring._sync_state WHERE sync_id = %s", (SYNC_ID,)
                ).fetchone()
            bad = sum(1 for r in reports if not 300 <= r["score"]["value"] <= 850)
            check("the gate quarantined the impossible scores", row is not None and row[0] == bad, f"{bad} reports")
            held = dt.datetime.fromisoformat(state[0][0]["$datetime"]) if state else now
            check(
                "watermark held back by the lag (15 min)",
                held <= dt.datetime.now(dt.UTC) - bank.BUREAU_LAG,
                f"{held:%H:%M:%S}, newest report {now - dt.timedelta(minutes=2):%H:%M:%S}",
            )

            late = bank.bureau_report(customers + 2, now - dt.timedelta(minutes=10), random.Random(2))
            bureau.upsert(bank.BUREAU_COLLECTION, late)
            changed = bureau.touch(bank.BUREAU_COLLECTION, 7, defaults_24m=2)
            second = box.run_dag("bank_credit_bureau_sync", when + dt.timedelta(hours=1))
            print(f"  run 2 (late + changed)   {second.state:<8} {len(second.tasks):>2} tasks {second.seconds:6.1f} s")
            ok = ok and second.ok
            with connect(scoring) as conn:
                got = dict(
                    conn.execute(
                        "SELECT customer_id, defaults_24m FROM scoring.bureau_reports WHERE customer_id IN (7, %s)",
                        (customers + 2,),
                    ).fetchall()
                )
            check(
                "a report published 10 min late was caught by the next run",
                got.get(customers + 2) == late["defaults_24m"],
            )
            check("a changed report was updated", got.get(7) == changed["defaults_24m"])
    if has_customers:
        decisions = bank.credit_decisions(scoring)
        print("  credit scoring decides: " + ", ".join(f"{k} {v:,}" for k, v in decisions.items()))
    print(f"  {'OK' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return ok


__all__ = ["api_demo"]
