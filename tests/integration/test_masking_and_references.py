"""Masking/tokenisation transforms and the referential-integrity gate, on a real sync."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_sync_provider.core import SyncSpec
from airflow_sync_provider.core.errors import ConfigurationError, DataError
from airflow_sync_provider.core.masking import TOKEN_PATTERN, drop, mask_email, masking_transform, tokenize, year_only
from airflow_sync_provider.core.references import Reference, check_references
from airflow_sync_provider.core.sync import extract_for

from ..conftest import SyncEnv


def test_masking_rules_rename_tokenise_and_drop() -> None:
    frame = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "national_id": ["X1", "X2", None],
            "birth_date": [dt.date(1980, 5, 17), dt.date(1999, 12, 31), None],
            "email": ["jane.doe@bank.example", "no-at-sign", None],
            "phone": ["+1", "+2", "+3"],
        }
    )
    mask = masking_transform(
        {
            "national_id": ("national_id_token", tokenize("k1")),
            "birth_date": ("birth_year", year_only),
            "email": mask_email,
            "phone": drop,
        }
    )
    out = mask(frame)
    assert list(out.columns) == ["id", "national_id_token", "birth_year", "email"]
    tokens = out["national_id_token"].tolist()
    assert re.match(TOKEN_PATTERN, tokens[0]) and re.match(TOKEN_PATTERN, tokens[1]) and pd.isna(tokens[2])
    assert tokens[0] != tokens[1]
    assert out["birth_year"].tolist()[:2] == [1980, 1999] and pd.isna(out["birth_year"].tolist()[2])
    assert out["email"].tolist()[:2] == ["j***@bank.example", "***"]
    # same value and key -> same token (systems can match); another key -> another token
    assert masking_transform({"national_id": tokenize("k1")})(frame)["national_id"][0] == tokens[0]
    assert masking_transform({"national_id": tokenize("k2")})(frame)["national_id"][0] != tokens[0]
    assert "X1" not in out.to_string()


def test_masking_refuses_unknown_columns_and_an_empty_key() -> None:
    with pytest.raises(ConfigurationError, match=r"\['ssn'\]"):
        masking_transform({"ssn": drop})(pd.DataFrame({"id": [1]}))
    with pytest.raises(ConfigurationError, match="secret key"):
        tokenize("")


def _loans(env: SyncEnv, customers: list[int], loans: list[tuple[int, int]]) -> None:
    with env.source() as conn:
        conn.execute("CREATE TABLE loans (loan_id int PRIMARY KEY, customer_id int, updated_at timestamptz NOT NULL)")
        for loan_id, customer_id in loans:
            conn.execute("INSERT INTO loans VALUES (%s, %s, now())", (loan_id, customer_id))
    with env.target() as conn:
        conn.execute("CREATE SCHEMA lending")
        conn.execute("CREATE TABLE lending.customers (customer_id int PRIMARY KEY)")
        for customer_id in customers:
            conn.execute("INSERT INTO lending.customers VALUES (%s)", (customer_id,))


def _manifest(env: SyncEnv) -> Any:
    spec = SyncSpec(sync_id="loans", source_table="loans", target_schema="lending", cursor_column="updated_at")
    engine = env.source_engine
    try:
        with env.target() as target:
            return extract_for(engine, target, spec, staging=env.staging, run_id="r1")
    finally:
        engine.dispose()


def test_reference_gate_names_the_orphan_rows_and_loads_nothing(env: SyncEnv) -> None:
    _loans(env, customers=[1, 2], loans=[(10, 1), (11, 2), (12, 99), (13, None), (14, 98)])  # type: ignore[list-item]
    manifest = _manifest(env)
    reference = Reference.parse("customer_id", "lending.customers.customer_id")
    with env.target() as conn, pytest.raises(DataError) as caught:
        check_references(conn, manifest, [reference])
    message = str(caught.value)
    assert "2 of 5 rows point to no existing row" in message
    assert "loan_id=12, customer_id=99" in message and "loan_id=14, customer_id=98" in message
    assert (
        "rule=referential integrity" in message and "table='lending.loans'" in message and "key=(loan_id=12)" in message
    )
    with env.target() as conn:
        assert conn.execute("SELECT to_regclass('lending.loans')").fetchone() == (None,)


def test_reference_gate_passes_clean_batches_and_checks_its_arguments(env: SyncEnv) -> None:
    _loans(env, customers=[1, 2], loans=[(10, 1), (11, 2)])
    manifest = _manifest(env)
    with env.target() as conn:
        (result,) = check_references(conn, manifest, [Reference.parse("customer_id", "lending.customers.customer_id")])
        assert result.ok and result.rows_checked == 2
        with pytest.raises(ConfigurationError, match="no column 'client_id'"):
            check_references(conn, manifest, [Reference("client_id", "lending", "customers", "customer_id")])
    with pytest.raises(ConfigurationError, match=r"schema\.table\.column"):
        Reference.parse("customer_id", "customers")


def test_reference_gate_operator_fails_the_task_without_retry(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_sync_provider.operators.quality import ReferentialIntegrityGateOperator

    _loans(env, customers=[1], loans=[(10, 1), (11, 5)])
    manifest = _manifest(env)
    monkeypatch.setenv("AIRFLOW_CONN_LENDING", f"postgres://postgres@127.0.0.1:{env.server.port}/{env.target_db}")
    operator = ReferentialIntegrityGateOperator(
        task_id="refs",
        manifest=manifest.to_dict(),
        target_conn_id="lending",
        references={"customer_id": "lending.customers.customer_id"},
    )
    with pytest.raises(AirflowFailException, match=r"1 of 2 rows point to no existing row.*loan_id=11"):
        operator.execute({"run_id": "r1"})  # type: ignore[arg-type]
