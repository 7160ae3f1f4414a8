"""The quality gate: Great Expectations suites on staged batches, against the real PostgreSQL.

Extract -> gate -> load with the real engine: a failing batch changes nothing, warnings pass and
are recorded, quarantine splits off exactly the failing rows (the rest loads and the watermark
moves), the threshold fails the run with nothing written, replay merges fixed rows (but never over
a newer version), bad suites fail clearly, empty batches pass, and multi-file batches are validated
file by file with the counts combined.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pytest

from airflow_sync_provider.core import ConfigurationError, SyncError, SyncSpec, extract_for, load_manifest
from airflow_sync_provider.core.manifest import Manifest, ManifestColumn, StagedFile
from airflow_sync_provider.core.quality import (
    QUARANTINE_TABLE,
    QualityError,
    replay_quarantined,
    validate_manifest,
)
from airflow_sync_provider.core.schema import pg_type_for_arrow
from airflow_sync_provider.core.staging import StagingArea, filesystem_for

from ..conftest import SyncEnv, make_orders, source_columns, table_checksum

E = gx.expectations
SPEC: dict[str, Any] = {"sync_id": "orders", "source_table": "orders", "cursor_column": "updated_at"}


def change(env: SyncEnv, statement: str, *params: Any) -> None:
    with env.source() as conn:
        conn.execute(statement, params)


def extract(env: SyncEnv, run_id: str = "run1", **spec: Any) -> Manifest:
    engine = env.source_engine
    try:
        with env.target() as target:
            return extract_for(engine, target, SyncSpec(**{**SPEC, **spec}), staging=env.staging, run_id=run_id)
    finally:
        engine.dispose()


def gate(env: SyncEnv, manifest: Manifest, suite: Any, **kwargs: Any) -> Any:
    with env.target() as target:
        return validate_manifest(manifest, suite, target_conn=target, staging=env.staging, **kwargs)


def load(env: SyncEnv, manifest: Manifest, run_id: str = "run1") -> Any:
    with env.target() as target:
        return load_manifest(target, manifest, run_id=run_id)


def orders_suite() -> list[Any]:
    return [
        E.ExpectColumnValuesToBeBetween(column="quantity", min_value=0, max_value=10000),
        E.ExpectColumnValuesToNotBeNull(column="customer"),
        E.ExpectColumnValuesToMatchRegex(column="customer", regex=r"^customer \d+$", meta={"severity": "warn"}),
    ]


def fetch(env: SyncEnv, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with env.target() as conn:
        return conn.execute(query, params).fetchall()


def target_exists(env: SyncEnv, table: str) -> bool:
    return fetch(env, "SELECT to_regclass(%s)", f"public.{table}")[0][0] is not None


def snapshot(env: SyncEnv) -> tuple[Any, ...]:
    with env.source() as src, env.target() as tgt:
        return table_checksum(tgt, "orders", source_columns(src, "orders"), ["id"]), env.state("orders")


def quality_rows(env: SyncEnv) -> list[tuple[Any, ...]]:
    return fetch(env, "SELECT run_id, success, rows, quarantined_rows, summary, details FROM _sync_quality_results")


# --------------------------------------------------------------------------- block / warn


def test_a_failing_batch_blocks_the_load_and_changes_nothing(env: SyncEnv) -> None:
    make_orders(env)
    change(env, "UPDATE orders SET quantity = -5 WHERE id IN (17, 250, 999)")
    manifest = extract(env)

    with pytest.raises(QualityError) as failure:
        gate(env, manifest, orders_suite())
    message = str(failure.value)
    assert message.splitlines()[0] == (
        "[sync='orders' table='public.orders' rule=expect_column_values_to_be_between] column 'quantity': "
        "3 of 1,000 rows (0.3%) outside [0, 10000]; examples: key=(id=17) value=-5, key=(id=250) value=-5, "
        "key=(id=999) value=-5"
    )
    assert message.splitlines()[1].startswith("report: file://") and message.endswith("quality_report.html")
    # Nothing reached the target: no table, no state; the failed validation is on record.
    assert not target_exists(env, "orders") and env.state("orders") is None
    ((run_id, success, rows, quarantined, summary, details),) = quality_rows(env)
    assert (run_id, success, rows, quarantined) == ("run1", False, 1_000, 0)
    between = summary["results"][0]
    assert (between["expectation"], between["column"], between["unexpected_count"]) == (
        "expect_column_values_to_be_between",
        "quantity",
        3,
    )
    assert between["example_keys"] == [{"id": 17}, {"id": 250}, {"id": 999}]
    assert details["results"][0]["result"]["partial_unexpected_index_list"][0] == {"key": {"id": 17}, "value": -5}
    # The readable report sits next to the staged batch and names the failing rule.
    fs, path = filesystem_for(f"{manifest.staging_dir}/quality_report.html")
    with fs.open_input_stream(path) as stream:
        report = stream.read().decode()
    assert "FAILED" in report and "expect_column_values_to_be_between" in report and "key=(id=250)" in report

    # Fixed at the source, the next run passes and loads.
    change(env, "UPDATE orders SET quantity = 5, updated_at = clock_timestamp() WHERE quantity < 0")
    manifest = extract(env, "run2")
    result = gate(env, manifest, orders_suite(), run_id="run2")
    assert result.success and result.manifest.files == manifest.files
    assert load(env, result.manifest, "run2").inserted == 1_000


def test_warn_only_failures_pass_and_are_recorded(env: SyncEnv, caplog: pytest.LogCaptureFixture) -> None:
    make_orders(env)
    change(env, "UPDATE orders SET customer = 'VIP ' || id WHERE id IN (3, 4)")
    manifest = extract(env)
    with caplog.at_level(logging.WARNING, logger="airflow_sync_provider"):
        result = gate(env, manifest, orders_suite())
    assert result.success and [o.type for o in result.warnings] == ["expect_column_values_to_match_regex"]
    assert any("quality warning [rule=expect_column_values_to_match_regex]" in r.message for r in caplog.records)
    assert "column 'customer': 2 of 1,000 rows (0.2%) do not match regex" in caplog.text
    assert "key=(id=3) value='VIP 3'" in caplog.text
    # The manifest to load is the same batch, with a one-line quality note the load records.
    assert result.manifest.files == manifest.files and "1 warning(s)" in result.manifest.notes[-1]
    summary = result.summary()
    assert len(json.dumps(summary)) < 3_000 and summary["warnings"] == 1 and summary["success"]
    ((_, success, _, _, recorded, _),) = quality_rows(env)
    assert success and recorded["warnings"] == 1
    # A severities mapping overrides the expectation's own severity (and a typo is refused).
    with pytest.raises(QualityError, match="match_regex"):
        validate_manifest(
            manifest, orders_suite(), severities={"expect_column_values_to_match_regex:customer": "error"}
        )
    with pytest.raises(ConfigurationError, match="severity must be 'error' or 'warn'"):
        validate_manifest(manifest, orders_suite(), severities={"expect_column_values_to_not_be_null": "fatal"})
    assert load(env, result.manifest).inserted == 1_000
    # Once loaded, the staged files are gone: validating them again says so instead of crashing.
    with pytest.raises(SyncError, match="does not exist: the batch was loaded already"):
        validate_manifest(manifest, orders_suite())


# --------------------------------------------------------------------------- quarantine


def quarantine_setup(env: SyncEnv) -> Manifest:
    make_orders(env)
    change(env, "UPDATE orders SET quantity = -5 WHERE id IN (17, 250, 999)")
    change(env, "UPDATE orders SET customer = NULL WHERE id = 500")
    change(env, "UPDATE orders SET customer = 'VIP ' || id WHERE id IN (3, 4)")  # warn only: stays in the load
    return extract(env, batch_rows=300)


def test_quarantine_splits_off_exactly_the_failing_rows_and_the_rest_loads(env: SyncEnv) -> None:
    manifest = quarantine_setup(env)
    assert len(manifest.files) == 4

    result = gate(env, manifest, orders_suite(), quarantine=True, max_quarantine_fraction=0.01, chunk_rows=128)
    assert result.success and result.quarantined_rows == 4
    new = result.manifest
    assert (new.manifest_id, new.base_version, new.watermark_high) == (
        manifest.manifest_id,
        manifest.base_version,
        manifest.watermark_high,
    )
    assert new.rows == 996 and {f.uri for f in new.files}.isdisjoint(f.uri for f in manifest.files)
    assert "4 row(s) quarantined (0.4%)" in new.notes[-1]

    rows = fetch(
        env, f"SELECT row_key, failed_rules, row, run_id, replayed_at FROM {QUARANTINE_TABLE} ORDER BY quarantine_id"
    )
    assert sorted(r[0]["id"] for r in rows) == [17, 250, 500, 999]
    by_id = {r[0]["id"]: r for r in rows}
    assert by_id[17][1] == ["expect_column_values_to_be_between(quantity): outside [0, 10000]"]
    assert by_id[500][1] == ["expect_column_values_to_not_be_null(customer): are NULL"]
    assert by_id[17][2] | {"updated_at": None} == {
        "id": 17,
        "customer": "customer 17",
        "quantity": -5,
        "unit_price": "9.99",
        "updated_at": None,
    }
    assert all(r[3] == "run1" and r[4] is None for r in rows)

    # A retried gate task (same batch) writes the same files and does not quarantine the rows twice.
    again = gate(env, manifest, orders_suite(), quarantine=True, max_quarantine_fraction=0.01)
    assert again.manifest.files == new.files
    assert fetch(env, f"SELECT count(*) FROM {QUARANTINE_TABLE}")[0][0] == 4

    # The load merges the clean rows and moves the watermark; quarantined rows are not in the target.
    loaded = load(env, new)
    assert (loaded.status, loaded.inserted, loaded.version) == ("applied", 996, 1)
    assert env.state("orders")[1] == manifest.watermark_high  # type: ignore[index]
    ids = {r[0] for r in fetch(env, "SELECT id FROM orders")}
    assert len(ids) == 996 and ids.isdisjoint({17, 250, 500, 999}) and {3, 4} <= ids
    # The next run does not extract them again: they are recorded, not lost, and wait for a replay.
    assert extract(env, "run2").rows == 0


def test_quarantine_above_the_threshold_fails_and_writes_nothing(env: SyncEnv) -> None:
    manifest = quarantine_setup(env)
    with pytest.raises(QualityError) as failure:
        gate(env, manifest, orders_suite(), quarantine=True, max_quarantine_fraction=0.003)
    message = str(failure.value)
    assert message.startswith(
        "[sync='orders' table='public.orders' rule=max_quarantine_fraction] 4 of 1,000 rows (0.4%) fail row-level "
        "expectations, more than max_quarantine_fraction 0.30% allows; nothing was quarantined or loaded:"
    )
    assert "expect_column_values_to_not_be_null: column 'customer': 1 of 1,000 rows (0.1%) are NULL" in message
    assert fetch(env, f"SELECT count(*) FROM {QUARANTINE_TABLE}")[0][0] == 0
    assert not target_exists(env, "orders") and env.state("orders") is None
    assert [(r[1], r[3]) for r in quality_rows(env)] == [(False, 0)]


def test_replay_merges_fixed_rows_but_never_over_a_newer_version(env: SyncEnv) -> None:
    manifest = quarantine_setup(env)
    result = gate(env, manifest, orders_suite(), quarantine=True, max_quarantine_fraction=0.01)
    load(env, result.manifest)
    # Later, id 250 is corrected at the source and a normal sync merges that newer version.
    change(env, "UPDATE orders SET quantity = 3, updated_at = clock_timestamp() WHERE id = 250")
    assert load(env, extract(env, "run2"), "run2").inserted == 1
    state = env.state("orders")

    def fix_quantity(rows: pd.DataFrame) -> pd.DataFrame:
        return rows.assign(quantity=rows["quantity"].abs())

    with env.target() as target:
        first = replay_quarantined(
            target, "orders", run_id="replay1", fix=fix_quantity, suite=orders_suite(), staging=env.staging
        )
    assert (first.pending, first.replayed, first.inserted) == (4, 2, 2)
    assert [s["key"] for s in first.skipped_newer] == [{"id": 250}]
    assert [(s["key"], s["reason"]) for s in first.still_pending] == [
        ({"id": 500}, "expect_column_values_to_not_be_null(customer)")
    ]
    rows = dict(fetch(env, "SELECT id, quantity FROM orders WHERE id IN (17, 250, 500, 999)"))
    assert rows == {17: 5, 250: 3, 999: 5}  # 250 keeps the later sync's version
    assert fetch(env, "SELECT _sync_run_id FROM orders WHERE id = 17") == [("replay1",)]
    assert env.state("orders") == state  # a replay never moves the watermark
    statuses = dict(fetch(env, f"SELECT (row_key->>'id')::int, replay_status FROM {QUARANTINE_TABLE}"))
    assert statuses == {17: "replayed", 250: "skipped_newer", 500: None, 999: "replayed"}

    # Fixed in SQL this time (the row column is what a replay reads), then replayed.
    with env.target() as conn:
        conn.execute(
            f"UPDATE {QUARANTINE_TABLE} SET row = jsonb_set(row, '{{customer}}', '\"customer 500\"') "
            "WHERE row_key = '{\"id\": 500}'"
        )
    with env.target() as target:
        second = replay_quarantined(target, "orders", run_id="replay2", suite=orders_suite(), staging=env.staging)
    assert (second.pending, second.replayed, second.inserted, second.still_pending) == (1, 1, 1, ())
    assert fetch(env, "SELECT customer, quantity FROM orders WHERE id = 500") == [("customer 500", 500 % 7)]
    with env.target() as target:
        assert replay_quarantined(target, "orders", run_id="replay3", staging=env.staging).pending == 0
    assert env.state("orders") == state
    replays = [r[4] for r in quality_rows(env) if r[4].get("kind") == "replay"]
    assert [(r["replayed"], r["skipped_newer"]) for r in replays] == [(2, 1), (1, 0), (0, 0)]


# --------------------------------------------------------------------------- bad input, empty, multi-file


def staged_manifest(tmp_path: Path, tables: list[pa.Table], sync_id: str = "synthetic") -> Manifest:
    """A manifest for Parquet files written directly (no database involved)."""
    staging = StagingArea(tmp_path / "staging")
    manifest_id = f"m-{uuid.uuid4().hex[:8]}"
    staging_dir = staging.batch_uri(sync_id, manifest_id)
    files = []
    for number, table in enumerate(tables):
        uri = f"{staging_dir}/part-{number:05d}.parquet"
        writer = staging.open_writer(uri, table.schema)
        writer.write_table(table)
        writer.close()
        files.append(StagedFile(uri=uri, rows=table.num_rows))
    return Manifest(
        sync_id=sync_id,
        run_id="synthetic",
        manifest_id=manifest_id,
        mode="incremental",
        source_table="orders",
        target_schema="public",
        target_table="orders",
        primary_key=("id",),
        cursor_column=None,
        columns=tuple(ManifestColumn(f.name, pg_type_for_arrow(f.type)) for f in tables[0].schema),
        files=tuple(files),
        rows=sum(t.num_rows for t in tables),
        base_version=0,
        watermark_low=None,
        watermark_high=None,
        staging_dir=staging_dir,
    )


def small_batch(tmp_path: Path) -> Manifest:
    return staged_manifest(tmp_path, [pa.table({"id": [1, 2, 3], "quantity": [1, 2, 3]})])


def test_bad_suites_fail_with_clear_configuration_errors(tmp_path: Path) -> None:
    manifest = small_batch(tmp_path)
    with pytest.raises(ConfigurationError) as unknown:
        validate_manifest(manifest, [E.ExpectColumnValuesToNotBeNull(column="qty")])
    assert str(unknown.value).startswith(
        "[sync='synthetic' table='public.orders' column='qty' rule=expect_column_values_to_not_be_null] the staged "
        "batch has no such column: expect_column_values_to_not_be_null (expectation #1) names column 'qty'. "
        "Batch columns: id, quantity"
    )

    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "orders", "expectations": [\n  {"type": "expect_column_values_to_not_be_null",,}]}')
    with pytest.raises(ConfigurationError, match=r"suite file '.*broken.json' is not valid JSON: .* at line 2"):
        validate_manifest(manifest, str(broken))
    with pytest.raises(ConfigurationError, match="does not exist"):
        validate_manifest(manifest, str(tmp_path / "missing.json"))

    unknown_type = tmp_path / "unknown_type.json"
    unknown_type.write_text(json.dumps({"name": "s", "expectations": [{"type": "expect_it_to_be_nice", "kwargs": {}}]}))
    with pytest.raises(ConfigurationError, match=r"expectation #1 \(expect_it_to_be_nice\) is not a valid expectation"):
        validate_manifest(manifest, unknown_type)
    bad_kwargs = tmp_path / "bad_kwargs.json"
    bad_kwargs.write_text(
        json.dumps({"name": "s", "expectations": [{"type": "expect_column_values_to_be_between", "kwargs": {}}]})
    )
    with pytest.raises(ConfigurationError, match=r"expect_column_values_to_be_between\) is not a valid expectation"):
        validate_manifest(manifest, bad_kwargs)
    with pytest.raises(ConfigurationError, match="suite is empty"):
        validate_manifest(manifest, [])
    with pytest.raises(ConfigurationError, match="not a GX expectation"):
        validate_manifest(manifest, ["expect_column_values_to_not_be_null"])

    # GX's own suite JSON works, severities in meta included; so does a gx.ExpectationSuite.
    suite = gx.ExpectationSuite(
        name="orders",
        expectations=[E.ExpectColumnValuesToBeBetween(column="quantity", max_value=2, meta={"severity": "warn"})],
    )
    good = tmp_path / "suite.json"
    good.write_text(json.dumps(suite.to_json_dict()))
    for given in (good, suite):
        result = validate_manifest(manifest, given, write_report=False)
        assert result.success and [(o.severity, o.unexpected_count) for o in result.outcomes] == [("warn", 1)]


def test_an_empty_batch_passes_and_is_recorded_as_empty(env: SyncEnv) -> None:
    make_orders(env, rows=10)
    env.sync(SyncSpec(**SPEC))
    manifest = extract(env, "run2")
    assert manifest.rows == 0 and manifest.files == ()
    result = gate(env, manifest, [*orders_suite(), E.ExpectTableRowCountToBeBetween(min_value=1)], run_id="run2")
    assert result.success and result.empty and result.outcomes == ()
    assert result.manifest.notes[-1].startswith("quality: empty batch")
    ((run_id, success, rows, _, summary, _),) = quality_rows(env)
    assert (run_id, success, rows, summary["empty"]) == ("run2", True, 0, True)
    assert load(env, result.manifest, "run2").status == "applied"
    # The suite is still checked against the batch's columns, empty or not.
    with pytest.raises(ConfigurationError, match="'qty'"):
        gate(env, manifest, [E.ExpectColumnValuesToNotBeNull(column="qty")])


def test_a_multi_file_batch_is_validated_per_file_and_the_results_combined(env: SyncEnv) -> None:
    make_orders(env)
    change(env, "UPDATE orders SET quantity = -1 WHERE id <= 60")  # 24% of the first file, 6% of the batch
    change(env, "UPDATE orders SET customer = NULL WHERE id IN (100, 600)")
    change(env, "UPDATE orders SET customer = 'customer 10' WHERE id = 900")  # duplicate across files
    manifest = extract(env, batch_rows=250)
    assert [f.rows for f in manifest.files] == [250, 250, 250, 250]
    suite = [
        E.ExpectColumnValuesToBeBetween(column="quantity", min_value=0, mostly=0.9, meta={"severity": "warn"}),
        E.ExpectColumnValuesToNotBeNull(column="customer", meta={"severity": "warn"}),
        E.ExpectColumnValuesToBeUnique(column="customer", meta={"severity": "warn"}),
        E.ExpectColumnMeanToBeBetween(column="quantity", min_value=0, max_value=10),
        E.ExpectTableRowCountToEqual(value=1_000),
    ]
    per_chunk = gate(env, manifest, suite, chunk_rows=100)
    between, not_null, unique, mean, count = per_chunk.outcomes
    # Counts of the four files (three chunks each) add up to the batch's.
    assert sorted(between.per_file) == [f.uri.rsplit("/", 1)[1] for f in manifest.files]
    assert sum(f["element_count"] for f in between.per_file.values()) == 1_000 == between.element_count
    assert [f["unexpected_count"] for f in between.per_file.values()] == [60, 0, 0, 0]
    assert [f["unexpected_count"] for f in not_null.per_file.values()] == [1, 0, 1, 0]
    # mostly=0.9 is decided on the totals (6% bad: passes), though the first file alone would fail.
    assert (between.unexpected_count, between.success) == (60, True)
    assert (not_null.unexpected_count, not_null.success) == (2, False)
    # Batch-level expectations see every row: a duplicate split across files is found.
    assert (unique.unexpected_count, sorted(e["key"]["id"] for e in unique.examples)) == (2, [10, 900])
    assert count.success and count.observed_value == 1_000 and mean.success
    # Same verdicts as validating the whole batch in one GX batch.
    whole = gate(env, manifest, suite, chunk_rows=1_000_000)
    assert [(o.success, o.unexpected_count, o.observed_value) for o in whole.outcomes] == [
        (o.success, o.unexpected_count, o.observed_value) for o in per_chunk.outcomes
    ]
    assert [len(r[5]["results"][0]["per_file"]) for r in quality_rows(env)] == [4, 4]


# --------------------------------------------------------------------------- Airflow layer


class FakeTaskInstance:
    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


@pytest.fixture
def connections(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> SyncEnv:
    port = env.server.port
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_SOURCE", f"postgres://postgres@127.0.0.1:{port}/{env.source_db}")
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_TARGET", f"postgres://postgres@127.0.0.1:{port}/{env.target_db}")
    monkeypatch.setenv("SYNC_STAGING_DIR", str(Path(env.staging.base_uri.removeprefix("file://"))))
    return env


def test_gate_operator_between_extract_and_load(connections: SyncEnv, tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_sync_provider.get_provider_info import get_provider_info
    from airflow_sync_provider.operators.quality import DataQualityGateOperator
    from airflow_sync_provider.operators.sync import ExtractToStagingOperator, LoadStagedToPostgresOperator

    env = connections
    assert "airflow_sync_provider.operators.quality" in get_provider_info()["operators"][0]["python-modules"]
    make_orders(env)
    extract_args = {"source_conn_id": "sync_source", "target_conn_id": "sync_target", "batch_rows": 400, **SPEC}
    first = ExtractToStagingOperator(task_id="extract", **extract_args).execute({"run_id": "r1"})  # type: ignore[arg-type]
    LoadStagedToPostgresOperator(task_id="load", manifest=first, target_conn_id="sync_target").execute(
        {"run_id": "r1"}  # type: ignore[arg-type]
    )
    before = snapshot(env)

    change(env, "UPDATE orders SET quantity = -5, updated_at = clock_timestamp() WHERE id IN (8, 9)")
    manifest = ExtractToStagingOperator(task_id="extract", **extract_args).execute({"run_id": "r2"})  # type: ignore[arg-type]
    suite_file = tmp_path / "orders_suite.json"
    suite_file.write_text(json.dumps(gx.ExpectationSuite(name="orders", expectations=orders_suite()).to_json_dict()))
    ti = FakeTaskInstance()
    blocking = DataQualityGateOperator(
        task_id="quality", manifest=json.dumps(manifest), target_conn_id="sync_target", suite_path=str(suite_file)
    )
    with pytest.raises(AirflowFailException, match=r"column 'quantity': 2 of 2 rows \(100.0%\) outside \[0, 10000\]"):
        blocking.execute({"run_id": "r2", "ti": ti})  # type: ignore[arg-type]
    assert ti.pushed["quality"]["failed"] == 1
    assert snapshot(env) == before  # target and watermark unchanged

    passing = DataQualityGateOperator(
        task_id="quality",
        manifest=manifest,
        target_conn_id="sync_target",
        expectations=orders_suite(),
        severities={"expect_column_values_to_be_between": "warn"},
    )
    gated = passing.execute({"run_id": "r2", "ti": ti})  # type: ignore[arg-type]
    assert gated["manifest_id"] == manifest["manifest_id"] and gated["notes"][-1].startswith("quality: passed")
    assert ti.pushed["quality"]["warnings"] == 1 and len(json.dumps(gated)) < 5_000
    result = LoadStagedToPostgresOperator(task_id="load", manifest=gated, target_conn_id="sync_target").execute(
        {"run_id": "r2"}  # type: ignore[arg-type]
    )
    assert (result["status"], result["updated"], result["version"]) == ("applied", 2, 2)

    with pytest.raises(AirflowFailException, match="exactly one of expectations"):
        DataQualityGateOperator(task_id="q", manifest=manifest, target_conn_id="sync_target").execute(
            {"run_id": "r3"}  # type: ignore[arg-type]
        )


# --------------------------------------------------------------------------- speed


@pytest.mark.slow
def test_validation_speed_on_a_million_rows(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("speed measurement: run with -m slow")
    rows, files = 1_000_000, 4
    rng = np.random.default_rng(7)
    tables = []
    for number in range(files):
        size = rows // files
        ids = np.arange(number * size, (number + 1) * size)
        quantity = rng.integers(0, 100, size).astype(np.int32)
        quantity[ids % 100_000 == 17] = -5  # 10 bad rows
        tables.append(
            pa.table(
                {
                    "id": ids,
                    "customer": pa.array([f"customer {i}" for i in ids]),
                    "quantity": quantity,
                    "unit_price": rng.random(size) * 100,
                    "status": pa.array(rng.choice(["new", "paid", "shipped"], size)),
                }
            )
        )
    manifest = staged_manifest(tmp_path, tables, sync_id="speed")
    suite = [
        E.ExpectColumnValuesToBeBetween(column="quantity", min_value=0, max_value=10000, meta={"severity": "warn"}),
        E.ExpectColumnValuesToNotBeNull(column="customer"),
        E.ExpectColumnValuesToBeInSet(column="status", value_set=["new", "paid", "shipped"]),
        E.ExpectColumnValuesToMatchRegex(column="customer", regex=r"^customer \d+$"),
        E.ExpectColumnValuesToBeBetween(column="unit_price", min_value=0, max_value=100),
    ]
    validate_manifest(small_batch(tmp_path), suite[:1], write_report=False)  # GX import and warm-up
    started = time.perf_counter()
    result = validate_manifest(manifest, suite)
    seconds = time.perf_counter() - started
    assert result.success and result.outcomes[0].unexpected_count == 10
    print(
        f"\nquality gate: {rows:,} rows in {files} staged files, {len(suite)} expectations: {seconds:.2f} s "
        f"({rows / seconds:,.0f} rows/s)"
    )


def test_quarantine_needs_the_target_connection(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="quarantine needs the target connection"):
        validate_manifest(small_batch(tmp_path), orders_suite()[:1], quarantine=True)
    with pytest.raises(ConfigurationError, match="max_quarantine_fraction must be between 0 and 1"):
        validate_manifest(small_batch(tmp_path), orders_suite()[:1], max_quarantine_fraction=5)


def test_gate_tables_are_append_only(env: SyncEnv, tmp_path: Path) -> None:
    result = gate(env, small_batch(tmp_path), [E.ExpectColumnValuesToNotBeNull(column="id")])
    assert result.success
    with env.target() as conn, pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        conn.execute("DELETE FROM _sync_quality_results")
