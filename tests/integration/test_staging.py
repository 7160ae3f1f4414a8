"""Staging hygiene: committed batches are removed, failed extractions leave nothing behind,
failed loads keep their files for inspection and retry, and what a killed process left is swept by
a later run once it is old enough (unless a load may still apply it)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from airflow_sync_provider import staging_location
from airflow_sync_provider.core import ConfigurationError, DataError, SyncError, SyncSpec, extract_for, load_manifest
from airflow_sync_provider.core import staging as staging_module
from airflow_sync_provider.core.cdc import CdcSpec, changes_to_staging
from airflow_sync_provider.core.cdc import committed_cdc_state as committed_state
from airflow_sync_provider.core.staging import StagingArea, filesystem_for, names_connection
from airflow_sync_provider.operators.common import staging_area
from sync_dev.cluster import MotoS3, moto_s3

from ..conftest import CdcEnv, SyncEnv

#: Runs one sync in a child process (argv: source URL, target DSN, staging folder, sync id,
#: batch rows) so the test can SIGKILL it in the middle of the extraction.
_CHILD = """
import sys
import psycopg
import sqlalchemy as sa
from airflow_sync_provider.core import StagingArea, SyncSpec, run_sync

source_url, target_dsn, staging_dir, sync_id, batch_rows = sys.argv[1:]
spec = SyncSpec(sync_id=sync_id, source_table="big", cursor_column="updated_at", batch_rows=int(batch_rows))
engine = sa.create_engine(source_url, poolclass=sa.NullPool)
with psycopg.connect(target_dsn, autocommit=True) as target:
    run_sync(engine, target, spec, staging=StagingArea(staging_dir), run_id="doomed")
"""


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


# --------------------------------------------------------------------------- abandoned batches


def _staging_root(env: SyncEnv) -> Path:
    return Path(env.staging.base_uri.removeprefix("file://"))


def _batch_dirs(env: SyncEnv, sync_id: str) -> list[Path]:
    root = _staging_root(env) / sync_id
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def _age(folder: Path, by: dt.timedelta) -> None:
    """Set the mtime of a folder and everything in it ``by`` into the past."""
    then = time.time() - by.total_seconds()
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (then, then))


def _folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def test_a_sigkilled_extraction_is_swept_by_a_later_run(env: SyncEnv, caplog: pytest.LogCaptureFixture) -> None:
    rows = 100_000
    with env.source() as conn:
        conn.execute("CREATE TABLE big (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now())")
        conn.execute(
            "INSERT INTO big (id, v) SELECT g, md5(g::text) || md5((-g)::text) FROM generate_series(1, %s) g", (rows,)
        )
    spec = SyncSpec(sync_id="big", source_table="big", cursor_column="updated_at")

    # 1. A run is killed (SIGKILL: no exception handler, no finally) while it stages 500-row files.
    staging_dir = _staging_root(env)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, env.source_url, env.server.dsn(env.target_db), str(staging_dir), "big", "500"],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        while len(list(staging_dir.glob("big/*/part-*.parquet"))) < 5:
            if child.poll() is not None:
                pytest.fail(f"the child ended before it was killed: {child.stderr and child.stderr.read()!r}")
            assert time.monotonic() < deadline, "the child staged no files in 120 s"
            time.sleep(0.005)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        if child.stderr:
            child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    [abandoned] = _batch_dirs(env, "big")
    assert not (abandoned / "manifest.json").exists()  # killed mid-extraction: it never finished
    files, size = _folder_size(abandoned)
    assert files >= 5 and size > 0
    assert env.state("big") is None  # nothing was committed

    # 2. A run within the age keeps it (it could be a live extraction), and stages a pending batch.
    with env.target() as target:
        pending = extract_for(env.source_engine, target, spec, staging=env.staging, run_id="pending")
    assert abandoned.exists()
    pending_dir = _staging_root(env) / "big" / pending.manifest_id
    assert (pending_dir / "manifest.json").exists()

    # 3. A day and an hour later the next run removes the abandoned folder, says so, and keeps the
    #    young pending batch; the sync itself is unaffected.
    _age(abandoned, dt.timedelta(hours=25))  # the default age is 24 hours
    with caplog.at_level(logging.INFO, logger="airflow_sync_provider"):
        _, result = env.sync(spec, run_id="next")
    assert not abandoned.exists()
    assert pending_dir.exists() and (pending_dir / "manifest.json").exists()
    assert result.status == "applied" and result.inserted == rows
    [message] = [r.getMessage() for r in caplog.records if "abandoned staged batch" in r.getMessage()]
    assert f"removed 1 abandoned staged batch(es) untouched for over 24 h: {files} file(s), {size} bytes" in message
    assert abandoned.as_uri() in message
    print(f"swept {files} file(s), {size} bytes left by the SIGKILLed run: {abandoned.name}")


def test_an_old_batch_a_load_may_still_apply_is_kept_and_a_stale_one_goes(
    env: SyncEnv, caplog: pytest.LogCaptureFixture
) -> None:
    _seed(env)
    spec = SyncSpec(sync_id="t", source_table="t", cursor_column="updated_at")
    week = dt.timedelta(days=7)
    with env.target() as target:
        # Extracted, then its load waited a week (a failed gate fixed late, say): still loadable.
        first = extract_for(env.source_engine, target, spec, staging=env.staging, run_id="r1")
        first_dir = _staging_root(env) / "t" / first.manifest_id
        _age(first_dir, week)
        with caplog.at_level(logging.INFO, logger="airflow_sync_provider"):
            second = extract_for(env.source_engine, target, spec, staging=env.staging, run_id="r2")
        assert first_dir.exists()
        assert any(
            "kept 1 staged batch(es)" in r.getMessage() and first_dir.as_uri() in r.getMessage() for r in caplog.records
        )
        assert load_manifest(target, first).inserted == 250  # the kept batch loads
    assert not first_dir.exists()  # removed by its own load
    # The second batch was extracted at version 0, version 1 is committed: its load would be a
    # no-op; once old it is swept.
    second_dir = _staging_root(env) / "t" / second.manifest_id
    _age(second_dir, week)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="airflow_sync_provider"):
        env.sync(spec, run_id="r3")
    assert not second_dir.exists()
    assert any(
        second_dir.as_uri() in r.getMessage() and "removed 1 abandoned" in r.getMessage() for r in caplog.records
    )
    assert _batch_dirs(env, "t") == []


def test_sweep_keeps_young_and_kept_folders_and_reports_what_it_removed(tmp_path: Path) -> None:
    staging = StagingArea(tmp_path, abandoned_after=dt.timedelta(hours=6))
    assert staging.sweep_abandoned("s") == staging.sweep_abandoned("s", older_than=dt.timedelta(0))  # no folder yet
    root = tmp_path / "s"
    for name, payload in [("old", b"x" * 100), ("kept", b"y" * 10), ("young", b"z")]:
        (root / name / "sub").mkdir(parents=True)
        (root / name / "part-00000.parquet").write_bytes(payload)
        (root / name / "sub" / "part-00000.parquet").write_bytes(payload)
    (root / "stray.txt").write_bytes(b"not a batch")
    _age(root / "old", dt.timedelta(hours=7))
    _age(root / "kept", dt.timedelta(hours=7))
    _age(root / "young", dt.timedelta(hours=5))
    result = staging.sweep_abandoned("s", keep={"kept"})
    assert result.removed == ((root / "old").as_uri(),)
    assert (result.files, result.bytes) == (2, 200)
    assert sorted(p.name for p in root.iterdir()) == ["kept", "stray.txt", "young"]
    # older_than=0: everything not kept is abandoned (the age check is what kept "young").
    result = staging.sweep_abandoned("s", older_than=dt.timedelta(0), keep={"kept"})
    assert result.removed == ((root / "young").as_uri(),) and (result.files, result.bytes) == (2, 2)
    with pytest.raises(ValueError):
        StagingArea(tmp_path, abandoned_after=dt.timedelta(seconds=-1))


def test_a_cdc_run_sweeps_abandoned_batches_and_keeps_one_a_load_may_still_apply(
    cdc: CdcEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env = cdc.env
    with env.source() as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, sku text)")
        conn.execute("INSERT INTO items SELECT g, 's' || g FROM generate_series(1, 50) g")
    spec = CdcSpec(sync_id="sweep_cdc", tables=("items",))
    cdc.run(spec, run_id="snapshot")
    with env.source() as conn:
        conn.execute("UPDATE items SET sku = 'changed' WHERE id <= 5")
    engine = env.source_engine
    try:
        with env.target() as target:
            staged = changes_to_staging(
                engine, spec, state=committed_state(target, spec), staging=env.staging, run_id="never-loaded"
            )
    finally:
        engine.dispose()
    pending = Path(staged.staging_dir.removeprefix("file://"))
    abandoned = _staging_root(env) / "sweep_cdc" / "20260101T000000-killed"  # a killed run: files, no manifest
    abandoned.mkdir(parents=True)
    (abandoned / "part-00000.parquet").write_bytes(b"x" * 1000)
    for folder in (pending, abandoned):
        _age(folder, dt.timedelta(days=2))

    caplog.set_level(logging.INFO)
    _, result = cdc.run(spec, run_id="next")
    assert result.status == "applied" and result.updated == 5
    assert not abandoned.exists()
    assert pending.exists()  # its changes were not committed when the sweep ran: a load could apply it
    assert any("abandoned staged batch" in r.getMessage() for r in caplog.records)

    _age(pending, dt.timedelta(days=2))
    _, quiet = cdc.run(spec, run_id="after")
    assert quiet.status == "no_changes"
    assert not pending.exists()  # now covered by the committed position: nothing would apply it
    cdc.assert_converged("items", ["id"])


# --------------------------------------------------------------------------- object storage (S3, moto)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """moto's S3 server on localhost, with the Airflow connections ``stage_s3`` (pyarrow's S3 client)
    and ``stage_fsspec`` (botocore ``config_kwargs``: only fsspec honours them) pointing at it."""
    with moto_s3(tmp_path_factory.mktemp("moto")) as server, pytest.MonkeyPatch.context() as patch:
        server.create_bucket("stage")
        connection = json.loads(server.airflow_connection())
        patch.setenv("AIRFLOW_CONN_STAGE_S3", json.dumps(connection))
        connection["extra"]["config_kwargs"] = {"retries": {"max_attempts": 2}}
        patch.setenv("AIRFLOW_CONN_STAGE_FSSPEC", json.dumps(connection))
        staging_location.filesystem.cache_clear()
        yield server
        staging_location.filesystem.cache_clear()


def _s3_files(s3: MotoS3, prefix: str) -> list[str]:
    return [key for key in s3.keys("stage", prefix) if not key.endswith("/")]  # not the directory markers


@pytest.mark.parametrize(("conn_id", "filesystem"), [("stage_s3", "S3FileSystem"), ("stage_fsspec", "PyFileSystem")])
def test_a_batch_staged_through_a_connection_loads_and_leaves_the_bucket_empty(
    env: SyncEnv, s3: MotoS3, conn_id: str, filesystem: str
) -> None:
    _seed(env)
    staging = StagingArea(f"s3://{conn_id}@stage/{conn_id}")
    assert not staging.is_local
    assert type(filesystem_for(staging.base_uri)[0]).__name__ == filesystem
    spec = SyncSpec(sync_id="t", source_table="t", cursor_column="updated_at", batch_rows=100)
    with env.target() as target:
        manifest = extract_for(env.source_engine, target, spec, staging=staging, run_id="r")
        assert manifest.staging_dir.startswith(f"s3://{conn_id}@stage/{conn_id}/t/")  # the URI, not credentials
        staged = _s3_files(s3, f"{conn_id}/")
        assert len(staged) == 4 and f"{conn_id}/t/{manifest.manifest_id}/manifest.json" in staged
        assert load_manifest(target, manifest).inserted == 250
    assert _s3_files(s3, f"{conn_id}/") == []  # removed once committed
    with env.target() as target:
        assert target.execute("SELECT count(*) FROM t").fetchone() == (250,)


@pytest.mark.parametrize("conn_id", ["stage_s3", "stage_fsspec"])
def test_sweep_ages_batches_by_the_object_store_times(s3: MotoS3, conn_id: str) -> None:
    staging = StagingArea(f"s3://{conn_id}@stage/sweep-{conn_id}")
    schema = pa.schema([("id", pa.int64())])
    for batch in ("killed", "kept"):
        with staging.open_writer(f"{staging.batch_uri('s', batch)}/part-00000.parquet", schema) as writer:
            writer.write_table(pa.table({"id": list(range(10))}))
    assert staging.sweep_abandoned("s", older_than=dt.timedelta(hours=1)).removed == ()  # young: kept
    result = staging.sweep_abandoned("s", older_than=dt.timedelta(0), keep={"kept"})
    assert result.removed == (staging.batch_uri("s", "killed"),) and result.files == 1 and result.bytes > 0
    assert _s3_files(s3, f"sweep-{conn_id}/") == [f"sweep-{conn_id}/s/kept/part-00000.parquet"]


def test_a_connection_uri_without_the_airflow_layer_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging_module, "_RESOLVERS", [])
    with pytest.raises(ConfigurationError, match="names the connection 'aws_default'"):
        filesystem_for("s3://aws_default@bucket/prefix/x.parquet")
    assert names_connection("s3://key:secret@bucket/p") is None  # pyarrow's own credentials form
    assert names_connection("file:///tmp/x") is None and names_connection("s3://bucket/p") is None


@pytest.mark.parametrize(
    ("executor", "staging", "refused"),
    [
        ("CeleryExecutor", "/tmp/staging", True),
        ("airflow.providers.cncf.kubernetes.executors.kubernetes_executor.KubernetesExecutor", "/tmp/s", True),
        ("LocalExecutor,CeleryExecutor", "/tmp/staging", False),  # the first one is the default
        ("LocalExecutor", "/tmp/staging", False),
        ("CeleryExecutor", "s3://aws_default@bucket/prefix", False),
        ("CeleryExecutor", "gs://bucket/prefix", False),
    ],
)
def test_split_operators_refuse_local_staging_on_a_remote_executor(
    monkeypatch: pytest.MonkeyPatch, executor: str, staging: str, refused: bool
) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
    monkeypatch.setenv("AIRFLOW__SYNC__STAGING_URI", staging)
    if refused:
        with pytest.raises(ConfigurationError, match=r"set \[sync\] staging_uri .*s3://aws_default@"):
            staging_area(None, split=True)
    else:
        assert staging_area(None, split=True).base_uri.endswith(staging.rsplit("/", 1)[-1])
    assert staging_area(None).base_uri  # one task (extract and load together): any location
    assert staging_area(None, split=True, executor="LocalExecutor")  # the task's own executor decides
