"""Staging hygiene: committed batches are removed, failed extractions leave nothing behind, and
failed loads keep their files for inspection and retry."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from airflow_sync_provider.core import DataError, SyncError, SyncSpec, extract_for, load_manifest

from .conftest import SyncEnv


def _staged_files(env: SyncEnv) -> list[Path]:
    return sorted(Path(env.staging.base_uri.removeprefix("file://")).rglob("*.parquet"))


def _seed(env: SyncEnv) -> None:
    with env.source() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now())")
        conn.execute("INSERT INTO t (id, v) SELECT g, 'v' || g FROM generate_series(1, 250) g")


def test_committed_batches_are_removed(env: SyncEnv) -> None:
    _seed(env)
    manifest, result = env.sync(SyncSpec(sync_id="t", source_table="t", cursor_column="updated_at", batch_rows=100))
    assert result.inserted == 250 and len(manifest.files) == 3
    assert _staged_files(env) == []


def test_failed_extraction_leaves_no_partial_batch(env: SyncEnv) -> None:
    _seed(env)
    seen: list[int] = []

    def fail_on_third_batch(batch: pd.DataFrame) -> pd.DataFrame:
        seen.append(len(batch))
        if len(seen) == 3:
            raise ValueError("bad batch")
        return batch

    spec = SyncSpec(sync_id="t", source_table="t", cursor_column="updated_at", batch_rows=100)
    with pytest.raises(SyncError, match="batch 3"):
        env.sync(spec, transform=fail_on_third_batch)
    assert seen == [100, 100, 50]  # two batches had been staged before the failure
    assert _staged_files(env) == []


def test_failed_load_keeps_its_files_for_the_retry(env: SyncEnv) -> None:
    _seed(env)
    with env.target() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v varchar(2), updated_at timestamptz)")
    spec = SyncSpec(sync_id="t", source_table="t", cursor_column="updated_at")
    with env.target() as target:
        manifest = extract_for(env.source_engine, target, spec, staging=env.staging, run_id="r")
        with pytest.raises(DataError):
            load_manifest(target, manifest)
        assert len(_staged_files(env)) == 1
        target.execute("ALTER TABLE t ALTER COLUMN v TYPE text")  # the operator fixes the target...
        assert load_manifest(target, manifest).inserted == 250  # ...and retries the same batch
    assert _staged_files(env) == []
