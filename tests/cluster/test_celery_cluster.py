"""The bank reference DAG on a real Airflow cluster: CeleryExecutor, two workers, staging on S3.

Separate processes, as a deployment runs them: api-server (the execution API the workers' tasks
talk to), scheduler, dag-processor, triggerer and two ``airflow celery worker`` processes, each in
its own home and working directory with its own host name (no shared local disk: the split
operators' batches must travel through S3, here ``moto_server`` behind an Airflow ``aws``
connection).  Broker: the Redis of this machine (a dedicated database and key prefix); metadata and
the bank's systems: databases on the suite's embedded PostgreSQL.

One scheduled run proves both claims (one run, not two: each costs about a minute of cluster time):

1. Its tasks run on both workers, some split pipeline crosses machines (an extract on one worker,
   its load on the other), every target ends equal to the master (full rows, masked as each target
   gets them) and nothing is left in the bucket.
2. One worker is SIGKILLed (with its task processes) while its task is inside the load of
   ``loan_management``'s customers: the load has written the table, its SCD2 history and its state
   and waits to append its audit-ledger entry, held there by a lock the test takes on the ledger
   (created beforehand by the engine's own ``ensure_audit_table``: an empty target has no table to
   lock).  The scheduler finds the task lost, its retry runs on the other worker, and the run
   converges: targets equal the master, no duplicates, the bucket empty.  (A cluster policy sets the
   delay between tries to 2 s: the DAG's 30 s would only be waited out.)

A worker killed mid-load in an incremental run (after a day of changes) converges the same way; the
fault-injection suite (tests/faults) kills incremental loads at random points.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from psycopg import sql

from airflow_sync_provider.core.audit import AUDIT_TABLE, ensure_audit_table
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
from sync_dev.local_postgres import LocalPostgres

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
DB_PREFIX = "cluster_"  # the bank's databases on the suite's server


@pytest.fixture(scope="module")
def stack(
    pg_server: LocalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[CeleryCluster, MotoS3, dict[str, str]]]:
    root = tmp_path_factory.mktemp("cluster")
    started = time.monotonic()
    found = databases.connection_uris("127.0.0.1", pg_server.port, prefix=DB_PREFIX)
    uris = {system: uri for system, uri in found.items() if system in SYSTEMS}
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            seeded = pool.submit(_bank_systems, pg_server, uris)  # while the S3 server and the cluster start
            with moto_s3(root, wait=False) as s3:  # it starts while the cluster does
                environment = {
                    **databases.airflow_environment(uris),
                    "AIRFLOW_CONN_STAGING_S3": s3.airflow_connection(),
                    "AIRFLOW__SYNC__STAGING_URI": f"s3://staging_s3@{BUCKET}/{PREFIX}",
                    "AIRFLOW_VAR_SYNC_TOKEN_KEY": KEY,
                }
                # retry_delay: the DAG's 30 s between tries would be idle time here (the claim is where
                # the retry of a lost task runs, not when)
                with celery_cluster(
                    pg_server, root / "airflow", environment=environment, workers=2, concurrency=2, retry_delay=2
                ) as cluster:
                    seeded.result()
                    s3.wait_ready()
                    s3.create_bucket(BUCKET)
                    print(f"cluster up in {time.monotonic() - started:.0f} s")
                    try:
                        yield cluster, s3, uris
                    finally:
                        for name in ("scheduler", "worker-1", "worker-2"):
                            print(f"--- {name} log (tail) ---\n{cluster.log_tail(name, 30)}")
    finally:
        with pg_server.connect() as admin:
            for system in SYSTEMS:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB_PREFIX + system))
                )


def _bank_systems(server: LocalPostgres, uris: dict[str, str]) -> None:
    with server.connect() as admin:
        databases.create_databases(admin, DB_PREFIX, systems=SYSTEMS)
    bank.seed(uris[bank.SOURCE], scale=400)


def test_a_run_spreads_over_both_workers_survives_a_killed_worker_and_converges(
    stack: tuple[CeleryCluster, MotoS3, dict[str, str]],
) -> None:
    cluster, s3, uris = stack
    started = time.monotonic()
    target = "loan_management"
    task_id = f"{target}.load_customers"
    schema = bank.TARGET_SCHEMAS[target]
    with connect(uris[target]) as blocker:
        ensure_audit_table(blocker, schema)
        # Hold the load inside its transaction, at its ledger entry: SHARE keeps writers out.
        blocker.autocommit = False
        blocker.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.Identifier(schema, AUDIT_TABLE)))
        cluster.wait_dag(DAG_ID)
        cluster.unpause(DAG_ID)  # catchup is off: the scheduler creates one run, for the last hour
        run_id = _wait_first_run(cluster)
        victim = _wait_blocked_load(cluster, uris[target], f"{schema}.{AUDIT_TABLE}", run_id, task_id)
        killed = cluster.kill_worker(victim)
        blocker.rollback()
    survivor = ({"worker-1", "worker-2"} - {victim}).pop()
    state = cluster.wait_run(DAG_ID, run_id, timeout=900)
    tasks = cluster.task_instances(DAG_ID, run_id)
    assert state == "success", _failed(cluster, tasks)
    # the killed load's retry ran on the other worker
    tries = cluster.tries(DAG_ID, run_id, task_id)
    assert tries[0][2] == victim and tries[0][1] != "success", tries
    assert tries[-1][1:] == ("success", survivor), tries
    # the run's tasks succeeded on both workers (the victim's before it was killed)
    assert {ti["hostname"] for ti in tasks.values()} == {"worker-1", "worker-2"}, tasks
    # the split pipeline itself crossed machines: some extract and its load ran on different workers
    assert (
        any(
            tasks[f"{name}.extract_customers"]["hostname"] != tasks[f"{name}.load_customers"]["hostname"]
            for name in bank.TARGET_SCHEMAS
        )
        or tasks["loans.extract_loans"]["hostname"] != tasks["loans.load_loans"]["hostname"]
    ), tasks
    _assert_converged(uris, s3)
    print(
        f"killed {victim} ({len(killed)} processes) mid-load; tries of {task_id}: {tries}; "
        f"run: {time.monotonic() - started:.0f} s ({len(tasks)} tasks)"
    )


def _wait_first_run(cluster: CeleryCluster, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster.check_alive()
        with cluster.meta() as conn:
            row = conn.execute("SELECT run_id FROM dag_run WHERE dag_id = %s ORDER BY id LIMIT 1", (DAG_ID,)).fetchone()
        if row:
            return str(row[0])
        time.sleep(0.5)
    raise TimeoutError(f"the scheduler created no run of {DAG_ID}")


def _wait_blocked_load(
    cluster: CeleryCluster, target_uri: str, table: str, run_id: str, task_id: str, timeout: float = 900
) -> str:
    """The worker running ``task_id`` once its load waits on the test's lock on ``table`` (so it is mid-load)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with connect(target_uri) as conn:
            waiting = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND NOT granted", (table,)
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
