"""The bank's credit-bureau DAG (``bank_credit_bureau_sync``) end to end with ``dag.test()``: the
operator reads the bureau's API through an Airflow ``http`` connection (bearer token), rides out a
rate limit and an outage, gates and quarantines impossible scores, loads into credit scoring, and
a report the bureau publishes late is picked up by the next run thanks to the lag.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from case_studies import bank
from case_studies.databases import connect
from sync_dev.airflow_sandbox import AirflowSandbox, DagRunOutcome
from sync_dev.api_server import ApiAuthConfig, ApiServer, iso
from sync_dev.local_postgres import LocalPostgres

from ..conftest import case_study_systems

pytestmark = pytest.mark.airflow

TOKEN = "bureau-test-token"
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
WHEN = NOW.replace(minute=0, second=0) - dt.timedelta(hours=2)
CUSTOMERS = 300


@pytest.fixture
def bureau() -> Iterator[ApiServer]:
    reports = bank.bureau_reports(range(1, CUSTOMERS + 1), NOW)
    fresh = bank.bureau_report(CUSTOMERS + 1, NOW - dt.timedelta(minutes=2), random.Random(1))
    with ApiServer(
        {bank.BUREAU_COLLECTION: [*reports, fresh]},
        auth=ApiAuthConfig("bearer", TOKEN),
        keys={bank.BUREAU_COLLECTION: "customer_id"},
    ) as server:
        yield server


@pytest.fixture
def systems(
    pg_server: LocalPostgres, tmp_path: Path, bureau: ApiServer
) -> Iterator[tuple[AirflowSandbox, dict[str, str]]]:
    connection = {"conn_type": "http", "host": bureau.url, "password": TOKEN, "extra": {"auth_type": "bearer"}}
    with case_study_systems(
        pg_server,
        tmp_path,
        prefix=f"api{uuid.uuid4().hex[:6]}_",
        token_key="unused",
        environment={"AIRFLOW_CONN_CREDIT_BUREAU": json.dumps(connection)},
    ) as sandbox:
        yield sandbox


def _assert_success(outcome: DagRunOutcome) -> None:
    log = outcome.log_file.read_text()[-6000:] if outcome.log_file else ""
    assert outcome.ok, (outcome.state, outcome.failed_tasks(), log)


def test_bureau_reports_reach_credit_scoring_with_retries_gate_and_lag(
    systems: tuple[AirflowSandbox, dict[str, str]], bureau: ApiServer
) -> None:
    box, uris = systems
    scoring = uris[bank.BUREAU_TARGET]
    bureau.fail("status", status=429, retry_after="1", match="cursor=")
    bureau.fail("status", status=503, times=2, match="cursor=")
    first = box.run_dag("bank_credit_bureau_sync", WHEN)
    _assert_success(first)
    log = first.log_file.read_text() if first.log_file else ""
    assert "HTTP 429, Retry-After" in log and "HTTP 503" in log

    served = bureau.records(bank.BUREAU_COLLECTION)
    valid, same = bank.bureau_matches(scoring, served)
    assert valid == same == CUSTOMERS + 1 - CUSTOMERS // 97
    with connect(scoring) as conn:
        quarantined = conn.execute(
            "SELECT count(*) FROM scoring._sync_quarantine WHERE sync_id = 'credit_scoring_bureau_reports'"
        ).fetchone()
        watermark = conn.execute(
            "SELECT watermark FROM scoring._sync_state WHERE sync_id = 'credit_scoring_bureau_reports'"
        ).fetchone()
    assert quarantined is not None and quarantined[0] == CUSTOMERS // 97
    assert watermark is not None
    held = dt.datetime.fromisoformat(watermark[0][0]["$datetime"])
    assert held <= dt.datetime.now(dt.UTC) - bank.BUREAU_LAG  # not the fresh report's time: held back

    # published after the first run, stamped 10 minutes ago: inside the lag, so the next run sees it
    late = {**bank.bureau_report(CUSTOMERS + 2, NOW - dt.timedelta(minutes=10), random.Random(2))}
    bureau.upsert(bank.BUREAU_COLLECTION, late)
    changed = bureau.touch(bank.BUREAU_COLLECTION, 5, defaults_24m=3)
    second = box.run_dag("bank_credit_bureau_sync", WHEN + dt.timedelta(hours=1))
    _assert_success(second)
    with connect(scoring) as conn:
        rows = dict(
            conn.execute(
                "SELECT customer_id, defaults_24m FROM scoring.bureau_reports WHERE customer_id IN (5, %s)",
                (CUSTOMERS + 2,),
            ).fetchall()
        )
    assert rows == {5: changed["defaults_24m"], CUSTOMERS + 2: late["defaults_24m"]}
    assert iso(NOW - dt.timedelta(minutes=10)) == late["updated_at"]
