"""The bank reference DAG on a real Airflow cluster: CeleryExecutor, two workers, staging on S3.

Separate processes, as a deployment runs them: api-server (the execution API the workers' tasks
talk to), scheduler, dag-processor, triggerer and two ``airflow celery worker`` processes, each in
its own home and working directory with its own host name (no shared local disk: the split
operators' batches must travel through S3, here ``moto_server`` behind an Airflow ``aws``
connection).  Broker: the Redis of this machine (a dedicated database and key prefix); metadata and
the bank's systems: an embedded PostgreSQL.

1. A scheduled run: its tasks ran on both workers, every target equals the master (full rows,
   masked as each target gets them), nothing is left in the bucket.
2. A second run after a day of changes: one worker is SIGKILLed (with its task processes) while
   its task is inside the load of ``loan_management``'s customers (held there by a lock the test
   takes on the target table); the scheduler finds the task lost, its retry runs on the other
   worker, and the run converges: targets equal the master, no duplicates, the bucket empty.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg import sql

from case_studies import bank, databases
from case_studies.databases import connect
from sync_dev.cluster import (
    CeleryCluster,
    MotoS3,
    celery_cluster,
    celery_provider_installed,
    moto_s3,
    redis_available,
)
from sync_dev.local_postgres import LocalPostgres, local_postgres

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(1500),  # a loaded 2-CPU machine runs the 19 tasks of a run in minutes (see the report)
    pytest.mark.skipif(
        not celery_provider_installed(), reason="the celery provider (airflow celery worker) is missing"
    ),
    pytest.mark.skipif(not redis_available(), reason="no Redis on 127.0.0.1:6379 to serve as the Celery broker"),
]

DAG_ID = "bank_customer_sync"
KEY = "cluster-token-key"
BUCKET = "sync-staging"
PREFIX = "batches"
SYSTEMS = (bank.SOURCE, *bank.TARGET_SCHEMAS)
BANK_LOADS = (*(f"{target}.load_customers" for target in bank.TARGET_SCHEMAS), "loans.load_loans")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CeleryCluster, MotoS3, dict[str, str]]]:
    root = tmp_path_factory.mktemp("cluster")
    with local_postgres(root / "pg") as server, moto_s3(root) as s3:
        uris = _bank_systems(server)
        s3.create_bucket(BUCKET)
        environment = {
            **databases.airflow_environment(uris),
            "AIRFLOW_CONN_STAGING_S3": s3.airflow_connection(),
            "AIRFLOW__SYNC__STAGING_URI": f"s3://staging_s3@{BUCKET}/{PREFIX}",
            "AIRFLOW_VAR_SYNC_TOKEN_KEY": KEY,
        }
        with celery_cluster(server, root / "airflow", environment=environment, workers=2, concurrency=2) as cluster:
            try:
                yield cluster, s3, uris
            finally:
                for name in ("scheduler", "worker-1", "worker-2"):
                    print(f"--- {name} log (tail) ---\n{cluster.log_tail(name, 30)}")


def _bank_systems(server: LocalPostgres) -> dict[str, str]:
    with server.connect() as admin:
        databases.create_databases(admin, systems=SYSTEMS)
    uris = {k: v for k, v in databases.connection_uris("127.0.0.1", server.port).items() if k in SYSTEMS}
    bank.seed(uris[bank.SOURCE], scale=400)
    return uris


def test_a_run_spreads_over_both_workers_and_leaves_staging_empty(
    stack: tuple[CeleryCluster, MotoS3, dict[str, str]],
) -> None:
    cluster, s3, uris = stack
    started = time.monotonic()
    cluster.wait_dag(DAG_ID)
    cluster.unpause(DAG_ID)  # catchup is off: the scheduler creates one run, for the last hour
    run_id = _wait_first_run(cluster)
    state = cluster.wait_run(DAG_ID, run_id, timeout=900)
    tasks = cluster.task_instances(DAG_ID, run_id)
    assert state == "success", _failed(cluster, tasks)
    assert {ti["hostname"] for ti in tasks.values()} == {"worker-1", "worker-2"}, tasks
    # the split pipeline itself crossed machines: some extract and its load ran on different workers
    assert (
        any(
            tasks[f"{target}.extract_customers"]["hostname"] != tasks[f"{target}.load_customers"]["hostname"]
            for target in bank.TARGET_SCHEMAS
        )
        or tasks["loans.extract_loans"]["hostname"] != tasks["loans.load_loans"]["hostname"]
    ), tasks
    _assert_converged(uris, s3)
    print(f"first run: {time.monotonic() - started:.0f} s ({len(tasks)} tasks)")


def test_a_worker_killed_mid_load_is_retried_on_the_other_and_converges(
    stack: tuple[CeleryCluster, MotoS3, dict[str, str]],
) -> None:
    cluster, s3, uris = stack
    started = time.monotonic()
    bank.simulate_round(uris[bank.SOURCE], 1)
    run_id = "manual__worker_killed"
    target = "loan_management"
    task_id = f"{target}.load_customers"
    with connect(uris[target]) as blocker:
        # Hold the load inside its transaction: SHARE lets readers in and keeps writers out.
        blocker.autocommit = False
        blocker.execute(
            sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.Identifier(bank.TARGET_SCHEMAS[target], "customers"))
        )
        cluster.trigger(DAG_ID, run_id)
        victim = _wait_blocked_load(cluster, uris[target], run_id, task_id)
        killed = cluster.kill_worker(victim)
        blocker.rollback()
    survivor = ({"worker-1", "worker-2"} - {victim}).pop()
    state = cluster.wait_run(DAG_ID, run_id, timeout=900)
    tasks = cluster.task_instances(DAG_ID, run_id)
    assert state == "success", _failed(cluster, tasks)
    tries = cluster.tries(DAG_ID, run_id, task_id)
    assert tries[0][2] == victim and tries[0][1] != "success", tries
    assert tries[-1][1:] == ("success", survivor), tries
    _assert_converged(uris, s3)
    print(
        f"killed {victim} ({len(killed)} processes) mid-load; tries of {task_id}: {tries}; "
        f"second run: {time.monotonic() - started:.0f} s"
    )


def _wait_first_run(cluster: CeleryCluster, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check_alive()
        with cluster.meta() as conn:
            row = conn.execute("SELECT run_id FROM dag_run WHERE dag_id = %s ORDER BY id LIMIT 1", (DAG_ID,)).fetchone()
        if row:
            return str(row[0])
        time.sleep(1)
    raise TimeoutError(f"the scheduler created no run of {DAG_ID}")


def _wait_blocked_load(cluster: CeleryCluster, target_uri: str, run_id: str, task_id: str, timeout: float = 900) -> str:
    """The worker running ``task_id`` once its load waits on the test's lock (so it is mid-load)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with connect(target_uri) as conn:
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            ).fetchone()
        ti = cluster.task_instances(DAG_ID, run_id).get(task_id, {})
        if waiting and waiting[0] and ti.get("state") == "running" and ti.get("hostname"):
            return str(ti["hostname"])
        assert cluster.run_state(DAG_ID, run_id) not in ("success", "failed"), cluster.task_instances(DAG_ID, run_id)
        time.sleep(0.5)
    raise TimeoutError(f"{task_id} never reached its load: {cluster.task_instances(DAG_ID, run_id)}")


def _assert_converged(uris: dict[str, str], s3: MotoS3) -> None:
    """Targets equal the master (full rows; customers as each target gets them), staging is empty."""
    matches = bank.customers_match_master(uris, KEY)
    assert all(rows > 0 and differing == 0 for rows, differing in matches.values()), matches
    source = uris[bank.SOURCE]
    copies = [("loan_management", "lending", "loans")]
    copies += [(name, bank.TARGET_SCHEMAS[name], "accounts") for name in ("credit_scoring", "fraud_detection")]
    for name, schema, table in copies:
        columns = _source_columns(source, table)
        expected = _fingerprint(source, "public", table, columns)
        assert expected[0] == expected[1] > 0, (table, expected)
        assert _fingerprint(uris[name], schema, table, columns) == expected, name  # no duplicates either
    files = [key for key in s3.keys(BUCKET, f"{PREFIX}/") if not key.endswith("/")]
    assert files == [], files  # every batch was removed after its load (directory markers may stay)


def _fingerprint(uri: str, schema: str, table: str, columns: list[str]) -> tuple[int, int, str]:
    """(rows, distinct keys, md5 of the rows in key order) over ``columns`` (the first is the key)."""
    query = sql.SQL("SELECT count(*), count(DISTINCT {k}), md5(string_agg(({c})::text, '|' ORDER BY {k})) FROM {t}")
    with connect(uri) as conn:
        row = conn.execute(
            query.format(
                k=sql.Identifier(columns[0]),
                c=sql.SQL(", ").join(map(sql.Identifier, columns)),
                t=sql.Identifier(schema, table),
            )
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), str(row[2])


def _source_columns(uri: str, table: str) -> list[str]:
    with connect(uri) as conn:
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s "
            "ORDER BY ordinal_position",
            (table,),
        ).fetchall()
    return [row[0] for row in rows]


def _failed(cluster: CeleryCluster, tasks: dict[str, dict[str, Any]]) -> str:
    bad = {task: ti for task, ti in tasks.items() if ti["state"] != "success"}
    return f"{bad}\n{cluster.log_tail('scheduler', 40)}"
