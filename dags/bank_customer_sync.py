"""A bank's customer master synced to loan management, credit scoring and fraud detection (case study 2).

Every hour, from ``core_banking`` (customers, accounts, loans):

* each target gets the customer data it needs, in its own schema, masked before it is staged:
  ``loan_management.lending`` in full plus an **SCD type 2 history** (``customers_history``) for
  audit; ``credit_scoring.scoring`` without contact data, with the national id as a keyed token
  and the birth year only; ``fraud_detection.fraud`` with contact data and the same token;
* every customer batch passes a Great Expectations **gate** (exact column set, so no personal
  field a target must not have can slip through; unique ids; e-mail, ISO country, date and token
  formats) and the loans a **referential-integrity gate** (each loan's customer exists in loan
  management) before anything is loaded;
* after the loads, each target is **reconciled** with the master (keyed hash buckets over the
  columns it holds as the master does), and every load leaves an entry in the append-only audit
  ledger (``_sync_audit``) of its target.

Backfills: the schedule has real hourly data intervals, so ``airflow backfill create --dag-id
bank_customer_sync --from-date 2026-11-01T00:00:00+00:00 --to-date 2026-11-01T23:00:00+00:00``
(both dates inclusive: ``--to-date`` is the start of the last hour; ``2026-11-02`` would add a 25th
run) re-syncs exactly the rows whose ``updated_at`` falls in each run's hour, idempotently, and leaves
the live watermark where it is.  A manual run with ``{"window_start": ..., "window_end": ...}`` in
its conf does the same for any window.

Connections: ``core_banking`` (source), ``loan_management``, ``credit_scoring``,
``fraud_detection`` (PostgreSQL targets).  Variable ``sync_token_key``: the tokenisation secret.
No database is touched when this file is parsed.

The same file defines ``bank_credit_bureau_sync``: credit reports from the bureau's REST API
(connection ``credit_bureau``) into credit scoring, gated and quarantined like the customers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pandas as pd
from airflow.sdk import DAG, TaskGroup, Variable, chain

from airflow_sync_provider.assets import table_asset
from airflow_sync_provider.operators.api import ApiToStagingOperator
from airflow_sync_provider.operators.quality import DataQualityGateOperator, ReferentialIntegrityGateOperator
from airflow_sync_provider.operators.reconcile import ReconcileOperator
from airflow_sync_provider.operators.sync import (
    ExtractToStagingOperator,
    LoadStagedToPostgresOperator,
    SyncTableOperator,
)
from case_studies.bank import (
    BUREAU_COLUMNS,
    BUREAU_CONN,
    BUREAU_ENDPOINT,
    BUREAU_EXPECTATIONS,
    BUREAU_LAG,
    BUREAU_TABLE,
    BUREAU_TARGET,
    HISTORY_TABLE,
    LOAN_EXPECTATIONS,
    PASSTHROUGH,
    SOURCE,
    TARGET_SCHEMAS,
    customer_expectations,
    masking_for,
)

try:  # Airflow 3.1+: the SDK re-exports the timetables
    from airflow.sdk import CronDataIntervalTimetable
except ImportError:  # pragma: no cover - Airflow 3.0
    from airflow.timetables.interval import CronDataIntervalTimetable  # type: ignore[no-redef,attr-defined]


def masked(target: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The target's masking, with the secret read when a batch is masked (never at parse time)."""

    def transform(batch: pd.DataFrame) -> pd.DataFrame:
        mask = masking_for(target, Variable.get("sync_token_key"))
        return mask(batch) if mask is not None else batch

    transform.__name__ = f"mask_for_{target}"
    return transform


with DAG(
    dag_id="bank_customer_sync",
    schedule=CronDataIntervalTimetable("@hourly", timezone="UTC"),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["sync", "case-study", "bank"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": dt.timedelta(seconds=30)},
):
    extracts: dict[str, Any] = {}
    loads: dict[str, Any] = {}
    reconciles = []
    for target, schema in TARGET_SCHEMAS.items():
        with TaskGroup(group_id=target):
            customer_spec: dict[str, Any] = {
                "sync_id": f"{target}_customers",
                "source_table": "customers",
                "target_schema": schema,
                "cursor_column": "updated_at",
                "detect_deletes": True,  # erasure requests reach every system
            }
            extract = ExtractToStagingOperator(
                task_id="extract_customers",
                source_conn_id=SOURCE,
                target_conn_id=target,
                transform=masked(target) if target != "loan_management" else None,
                history_table=HISTORY_TABLE if target == "loan_management" else None,
                **customer_spec,
            )
            gate = DataQualityGateOperator(
                task_id="gate_customers",
                manifest=extract.output,
                target_conn_id=target,
                expectations=customer_expectations(target),
            )
            outlets = [table_asset(target, schema, "customers")]
            if target == "loan_management":
                outlets.append(table_asset(target, schema, HISTORY_TABLE))
            load = LoadStagedToPostgresOperator(
                task_id="load_customers", manifest=gate.output, target_conn_id=target, outlets=outlets
            )
            reconcile = ReconcileOperator(
                task_id="reconcile_customers",
                source_conn_id=SOURCE,
                target_conn_id=target,
                columns=PASSTHROUGH[target],
                **customer_spec,
            )
            chain(extract, gate, load, reconcile)
            extracts[target], loads[target] = extract, load
            reconciles.append(reconcile)

    with TaskGroup(group_id="loans"):
        extract_loans = ExtractToStagingOperator(
            task_id="extract_loans",
            source_conn_id=SOURCE,
            target_conn_id="loan_management",
            sync_id="loan_management_loans",
            source_table="loans",
            target_schema="lending",
            cursor_column="updated_at",
            detect_deletes=True,
        )
        gate_loans = DataQualityGateOperator(
            task_id="gate_loans",
            manifest=extract_loans.output,
            target_conn_id="loan_management",
            expectations=LOAN_EXPECTATIONS,
        )
        refs = ReferentialIntegrityGateOperator(
            task_id="loans_point_to_customers",
            manifest=gate_loans.output,
            target_conn_id="loan_management",
            references={"customer_id": "lending.customers.customer_id"},
        )
        load_loans = LoadStagedToPostgresOperator(
            task_id="load_loans",
            manifest=refs.output,
            target_conn_id="loan_management",
            outlets=[table_asset("loan_management", "lending", "loans")],
        )
        reconcile_loans = ReconcileOperator(
            task_id="reconcile_loans",
            source_conn_id=SOURCE,
            target_conn_id="loan_management",
            sync_id="loan_management_loans",
            source_table="loans",
            target_schema="lending",
            cursor_column="updated_at",
        )
        chain(extract_loans, gate_loans, refs, load_loans, reconcile_loans)
    # Loans are read before the customers and checked after the customers are loaded: a loan can
    # only name a customer created before it, so that customer is in the later customer batch.
    # (A customer erased between the two reads fails the gate for one run, until the loan's own
    # deletion is synced: loudly, never as an orphan in loan management.)
    extracts["loan_management"] << extract_loans
    loads["loan_management"] >> refs

    for target in ("credit_scoring", "fraud_detection"):
        SyncTableOperator(
            task_id=f"accounts_to_{target}",
            source_conn_id=SOURCE,
            target_conn_id=target,
            sync_id=f"{target}_accounts",
            source_table="accounts",
            target_schema=TARGET_SCHEMAS[target],
            cursor_column="updated_at",
            detect_deletes=True,
            outlets=[table_asset(target, TARGET_SCHEMAS[target], "accounts")],
        )


# --------------------------------------------------------------------------- the credit bureau's API
with DAG(
    dag_id="bank_credit_bureau_sync",
    schedule=CronDataIntervalTimetable("@hourly", timezone="UTC"),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["sync", "case-study", "bank", "api"],
    doc_md="""Credit reports from the bureau's REST API into credit scoring (``scoring.bureau_reports``).

Connection ``credit_bureau`` (``http``: base URL and bearer token).  Incremental by ``updated_at``
(``updated_since=``), cursor pagination, rate limits and outages retried (``Retry-After``
honoured); the watermark is held back 15 minutes because the bureau publishes some reports late.
A gate quarantines reports with an impossible score before the load.  Backfill runs re-sync their
hour through ``updated_since``/``updated_before`` without moving the watermark.""",
    default_args={"retries": 2, "retry_delay": dt.timedelta(seconds=30)},
):
    bureau = ApiToStagingOperator(
        task_id="fetch_bureau_reports",
        sync_id="credit_scoring_bureau_reports",
        http_conn_id=BUREAU_CONN,
        endpoint=BUREAU_ENDPOINT,
        target_conn_id=BUREAU_TARGET,
        target_schema=TARGET_SCHEMAS[BUREAU_TARGET],
        target_table=BUREAU_TABLE,
        primary_key=["customer_id"],
        records_path="items",
        query_params={"limit": 200},
        paginator={"type": "cursor", "cursor_path": "meta.next_cursor", "param": "cursor"},
        columns=list(BUREAU_COLUMNS),
        cursor_field="updated_at",
        cursor_param="updated_since",
        cursor_end_param="updated_before",
        lag=BUREAU_LAG,
    )
    bureau_gate = DataQualityGateOperator(
        task_id="gate_bureau_reports",
        manifest=bureau.output,
        target_conn_id=BUREAU_TARGET,
        expectations=BUREAU_EXPECTATIONS,
        quarantine=True,
        max_quarantine_fraction=0.05,
    )
    LoadStagedToPostgresOperator(
        task_id="load_bureau_reports",
        manifest=bureau_gate.output,
        target_conn_id=BUREAU_TARGET,
        outlets=[table_asset(BUREAU_TARGET, TARGET_SCHEMAS[BUREAU_TARGET], BUREAU_TABLE)],
    )
