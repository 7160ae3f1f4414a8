"""Exactly-once effect: a load killed between merge and commit changes nothing; the retry applies the
batch once; a committed manifest re-applied is a no-op; stale manifests and concurrent loads of one
sync never double-apply or move the state backward.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest

from airflow_sync_provider.core import StagingArea, SyncSpec, extract_for, load_manifest

from ..conftest import SyncEnv, source_columns, table_checksum

SPEC = SyncSpec(sync_id="orders", source_table="orders", cursor_column="updated_at", batch_rows=2_000)


def _seed(env: SyncEnv, rows: int = 10_000) -> None:
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text, amount numeric(12,2), "
            "updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        conn.execute(
            "INSERT INTO orders (id, customer, amount) SELECT g, 'c' || (g %% 97), g / 10.0 "
            "FROM generate_series(1, %s) g",
            (rows,),
        )


def _change_source(env: SyncEnv) -> None:
    with env.source() as conn:
        conn.execute("UPDATE orders SET amount = amount + 1, updated_at = clock_timestamp() WHERE id % 10 = 0")
        conn.execute(
            "INSERT INTO orders (id, customer, amount) SELECT g, 'new', 1 FROM generate_series(100001, 101500) g"
        )


def _checksums(env: SyncEnv) -> tuple[tuple[int, str], tuple[int, str]]:
    with env.source() as src, env.target() as tgt:
        columns = source_columns(src, "orders")
        return table_checksum(src, "orders", columns, ["id"]), table_checksum(tgt, "orders", columns, ["id"])


def _expected_watermark(env: SyncEnv) -> list[Any]:
    with env.source() as conn:
        row = conn.execute("SELECT updated_at, id FROM orders ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
    assert row is not None
    return [{"$datetime": row[0].isoformat()}, row[1]]


def _assert_consistent(env: SyncEnv, version: int) -> None:
    """Target equals source, no duplicates, and the state's watermark is the source's newest row."""
    source, target = _checksums(env)
    assert target == source
    with env.target() as conn:
        duplicates = conn.execute("SELECT count(*) - count(DISTINCT id) FROM orders").fetchone()
    assert duplicates == (0,)
    state = env.state("orders")
    assert state is not None
    assert state[0] == version
    assert state[1] == _expected_watermark(env)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import sqlalchemy as sa, psycopg
    from airflow_sync_provider.core import StagingArea, SyncSpec, run_sync

    source_url, target_dsn, staging, phase = sys.argv[1:5]
    spec = SyncSpec(sync_id="orders", source_table="orders", cursor_column="updated_at", batch_rows=2_000)

    def observer(current, facts):
        if current == phase:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no rollback from the client side

    with psycopg.connect(target_dsn) as target:
        run_sync(sa.create_engine(source_url), target, spec, staging=StagingArea(staging), observer=observer)
    sys.exit(3)  # must not be reached
    """
)


@pytest.mark.parametrize("phase", ["staged", "merged"])
def test_killed_load_changes_nothing_and_retry_applies_once(env: SyncEnv, phase: str) -> None:
    _seed(env)
    env.sync(SPEC, run_id="first")
    _, before = _checksums(env)
    state_before = env.state("orders")
    _change_source(env)

    process = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_SCRIPT,
            env.source_url,
            env.server.dsn(env.target_db),
            env.staging.base_uri,
            phase,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]

    _, after_kill = _checksums(env)
    assert after_kill == before  # the merged rows were never visible
    assert env.state("orders") == state_before  # nor the new watermark

    _, retry = env.sync(SPEC, run_id="retry")
    assert retry.status == "applied"
    assert retry.inserted == 1_500
    assert retry.updated == 1_000
    _assert_consistent(env, version=2)


def test_exception_between_merge_and_commit_rolls_back_everything(env: SyncEnv) -> None:
    _seed(env)
    env.sync(SPEC, run_id="first")
    _, before = _checksums(env)
    state_before = env.state("orders")
    _change_source(env)

    def fail_after_merge(phase: str, facts: dict[str, Any]) -> None:
        if phase == "merged":
            assert facts["inserted"] == 1_500  # the merge did run inside the transaction
            raise RuntimeError("injected failure between merge and commit")

    with pytest.raises(RuntimeError, match="injected failure"):
        env.sync(SPEC, run_id="doomed", observer=fail_after_merge)
    assert _checksums(env)[1] == before
    assert env.state("orders") == state_before

    env.sync(SPEC, run_id="retry")
    _assert_consistent(env, version=2)


def test_committed_manifest_reloaded_is_a_noop(env: SyncEnv) -> None:
    """An Airflow retry of a load task whose first try committed must not apply twice."""
    _seed(env)
    with env.target() as target:
        manifest = extract_for(env.source_engine, target, SPEC, staging=env.staging, run_id="r1")
        first = load_manifest(target, manifest, keep_staged=True)
        _, after_first = _checksums(env)
        again = load_manifest(target, manifest)
    assert (first.status, first.inserted) == ("applied", 10_000)
    assert (again.status, again.inserted, again.version) == ("already_applied", 0, 1)
    assert _checksums(env)[1] == after_first
    _assert_consistent(env, version=1)


def test_stale_manifest_is_skipped_with_a_clear_message(env: SyncEnv, caplog: pytest.LogCaptureFixture) -> None:
    _seed(env)
    env.sync(SPEC, run_id="first")
    _change_source(env)
    with env.target() as target:
        old = extract_for(env.source_engine, target, SPEC, staging=env.staging, run_id="old")
        newer = extract_for(env.source_engine, target, SPEC, staging=env.staging, run_id="newer")
        assert load_manifest(target, newer).status == "applied"
        _, after_newer = _checksums(env)
        with caplog.at_level("WARNING"):
            stale = load_manifest(target, old)
    assert stale.status == "stale"
    assert "stale manifest" in stale.message and newer.manifest_id in stale.message
    assert any("stale manifest" in r.getMessage() for r in caplog.records)
    assert _checksums(env)[1] == after_newer
    _assert_consistent(env, version=2)


def test_concurrent_loads_of_one_sync_are_serialised(env: SyncEnv) -> None:
    """Two runs extracted from the same state load at once: exactly one applies, no deadlock."""
    _seed(env)
    env.sync(SPEC, run_id="first")
    _change_source(env)
    with env.target() as target:
        manifests = [
            extract_for(env.source_engine, target, SPEC, staging=env.staging, run_id=f"run-{i}") for i in range(4)
        ]
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(manifests))

    def load(manifest_json: str) -> None:
        from airflow_sync_provider.core.manifest import Manifest

        try:
            with env.target() as conn:
                barrier.wait(timeout=30)
                results.append(load_manifest(conn, Manifest.from_dict(manifest_json), keep_staged=True).status)
        except BaseException as error:  # collected and re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=load, args=(m.to_json(),)) for m in manifests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == ["applied", "stale", "stale", "stale"]
    _assert_consistent(env, version=2)


def test_manifest_round_trips_through_json(env: SyncEnv) -> None:
    """XCom carries the manifest as JSON: it must be small and lose nothing."""
    from airflow_sync_provider.core.manifest import Manifest

    _seed(env, rows=5_000)
    with env.target() as target:
        manifest = extract_for(env.source_engine, target, SPEC, staging=StagingArea(env.staging.base_uri), run_id="x")
    text = manifest.to_json()
    assert Manifest.from_dict(json.loads(text)) == manifest
    assert len(text) < 4_000  # paths, counts and the range: never rows
    assert manifest.rows == 5_000 and len(manifest.files) == 3
