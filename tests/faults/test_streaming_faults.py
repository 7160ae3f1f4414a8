"""Streaming CDC under faults: a streaming process SIGKILLed mid-stream (while a writer keeps
committing), and the source server restarted mid-stream.  Each time the next stream resumes from
the committed position; in the end the target equals the source, every committed batch was applied
once (one audit row per state version), and no row ever went back to an older image.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from airflow_sync_provider.core import StagingArea
from airflow_sync_provider.core.cdc import CdcSpec
from airflow_sync_provider.core.errors import SyncError
from airflow_sync_provider.core.streaming import CdcStream, StopFlag, run_stream
from sync_dev.local_postgres import LocalPostgres, local_postgres

from ..conftest import SyncEnv, record_fault_trial, source_columns, table_checksum

SPEC = CdcSpec(sync_id="stock_stream", tables=("stock",), batch_rows=500)
ROOT = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent(
    """
    import sys
    import sqlalchemy as sa, psycopg
    from airflow_sync_provider.core import StagingArea
    from airflow_sync_provider.core.cdc import CdcSpec
    from airflow_sync_provider.core.streaming import CdcStream, run_stream
    source_url, target_dsn, staging = sys.argv[1:4]
    spec = CdcSpec(sync_id="stock_stream", tables=("stock",), batch_rows=500)
    engine = sa.create_engine(source_url, poolclass=sa.pool.NullPool)
    with psycopg.connect(target_dsn) as target:
        stream = CdcStream(engine, target, spec, staging=StagingArea(staging), run_id="child")
        print("streaming", flush=True)
        run_stream(stream.step, probe=stream.probe, stream_for=120, poll_interval=0.02)
    """
)


class Writer:
    """Commits small transactions to the source until stopped: updates (version + 1), inserts, deletes."""

    def __init__(self, dsn: str, rng: random.Random) -> None:
        self.dsn, self.rng = dsn, rng
        self.running = threading.Event()
        self.running.set()
        self.commits = 0
        self.errors = 0
        self.thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        next_id = 100_000
        while self.running.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    while self.running.is_set():
                        with conn.transaction():
                            conn.execute(
                                "UPDATE stock SET qty = qty + 1, version = version + 1 WHERE id %% 97 = %s",
                                (self.rng.randrange(97),),
                            )
                            conn.execute("INSERT INTO stock VALUES (%s, 1, 1)", (next_id,))
                            conn.execute("DELETE FROM stock WHERE id = %s", (self.rng.randrange(1, 2_000),))
                        next_id += 1
                        self.commits += 1
                        time.sleep(0.003)
            except psycopg.OperationalError:  # the source restarts: write again once it is back
                self.errors += 1
                time.sleep(0.2)

    def stop(self) -> None:
        self.running.clear()
        self.thread.join(30)


def _seed(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE stock (id bigint PRIMARY KEY, qty int NOT NULL, version int NOT NULL)")
    conn.execute("INSERT INTO stock SELECT g, g % 100, 1 FROM generate_series(1, 2000) g")


def _watch_target(conn: psycopg.Connection[Any]) -> None:
    """Log every row image the target receives, to see a replay of an older image."""
    conn.execute("CREATE TABLE applied (seq bigserial PRIMARY KEY, id bigint, version int)")
    conn.execute(
        "CREATE FUNCTION log_applied() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO applied (id, version) VALUES (NEW.id, NEW.version); RETURN NULL; END $$"
    )
    conn.execute(
        "CREATE TRIGGER log_applied AFTER INSERT OR UPDATE ON stock FOR EACH ROW EXECUTE FUNCTION log_applied()"
    )


def _stream_once(source_url: str, target_dsn: str, staging: StagingArea, stream_for: float) -> None:
    engine = sa.create_engine(source_url, poolclass=sa.NullPool)
    try:
        with psycopg.connect(target_dsn) as target:
            stream = CdcStream(engine, target, SPEC, staging=staging, run_id="in-process")
            try:
                run_stream(stream.step, probe=stream.probe, stream_for=stream_for, poll_interval=0.02)
            finally:
                stream.close()
    finally:
        engine.dispose()


def _catch_up(source_url: str, source_dsn: str, target_dsn: str, staging: StagingArea) -> None:
    """Stream until the target equals the source (the writer has stopped)."""
    deadline = time.monotonic() + 60
    while True:
        _stream_once(source_url, target_dsn, staging, stream_for=0.5)
        if not _problems(source_dsn, target_dsn, strict=False):
            return
        assert time.monotonic() < deadline, _problems(source_dsn, target_dsn, strict=False)


def _problems(source_dsn: str, target_dsn: str, *, strict: bool = True) -> list[str]:
    problems = []
    with psycopg.connect(source_dsn, autocommit=True) as src, psycopg.connect(target_dsn, autocommit=True) as tgt:
        columns = source_columns(src, "stock")
        source, target = table_checksum(src, "stock", columns, ["id"]), table_checksum(tgt, "stock", columns, ["id"])
        if source != target:
            problems.append(f"target {target} != source {source}")
        if not strict:
            return problems
        versions = [
            v
            for (v,) in tgt.execute(
                "SELECT state_version FROM _sync_audit WHERE sync_id = %s AND status = 'applied' ORDER BY 1",
                (SPEC.sync_id,),
            )
        ]
        if versions != list(range(1, len(versions) + 1)):
            problems.append(f"applied state versions are not 1..n once each: {versions[:20]}...")
        backwards = tgt.execute(
            "SELECT count(*) FROM (SELECT version < lag(version) OVER (PARTITION BY id ORDER BY seq) AS back "
            "FROM applied) a WHERE back"
        ).fetchone()
        if backwards and backwards[0]:
            problems.append(f"{backwards[0]} row images older than one already applied were applied again")
    return problems


@pytest.mark.parametrize("trials", [3])
def test_sigkill_of_a_streaming_process_mid_stream(env: SyncEnv, trials: int, tmp_path: Path) -> None:
    rng = random.Random(16)
    with env.source() as conn:
        _seed(conn)
    source_dsn, target_dsn = env.server.dsn(env.source_db), env.server.dsn(env.target_db)
    _stream_once(env.source_url, target_dsn, env.staging, stream_for=0)  # the snapshot
    with env.target() as conn:
        _watch_target(conn)
    writer = Writer(source_dsn, rng)
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "dags")])}
    try:
        for _ in range(trials):
            child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, env.source_url, target_dsn, env.staging.base_uri],
                env=environ,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None and child.stdout.readline().strip() == "streaming", child.stderr
            time.sleep(rng.uniform(1.0, 3.0))  # mid-stream: batches are being applied
            os.kill(child.pid, signal.SIGKILL)
            child.wait(30)
            assert child.returncode == -signal.SIGKILL
            with env.target() as conn:  # the killed stream had applied batches
                applied = conn.execute("SELECT count(*) FROM applied").fetchone()
            assert applied is not None and applied[0] > 0
            record_fault_trial("sigkill streaming process", failed=False, detail="mid-stream")
    finally:
        writer.stop()
    assert writer.commits > 100
    _catch_up(env.source_url, source_dsn, target_dsn, env.staging)
    problems = _problems(source_dsn, target_dsn)
    record_fault_trial("sigkill streaming process", failed=bool(problems), detail="converged after restarts")
    assert not problems, problems


@pytest.fixture
def spare_source() -> Iterator[LocalPostgres]:
    """A server of its own for the source, to restart without disturbing the session's."""
    with local_postgres() as server:
        yield server


def test_source_restart_mid_stream_ends_the_stream_and_the_next_one_resumes(
    env: SyncEnv, spare_source: LocalPostgres
) -> None:
    source_db = spare_source.create_database("restart_source")
    source_dsn, target_dsn = spare_source.dsn(source_db), env.server.dsn(env.target_db)
    source_url = spare_source.url(source_db)
    with spare_source.connect(source_db) as conn:
        _seed(conn)
    _stream_once(source_url, target_dsn, env.staging, stream_for=0)
    with env.target() as conn:
        _watch_target(conn)
    writer = Writer(source_dsn, random.Random(7))
    outcome: dict[str, Any] = {}

    def stream() -> None:
        try:
            _stream_once(source_url, target_dsn, env.staging, stream_for=60)
            outcome["ended"] = "normally"
        except (SyncError, psycopg.OperationalError) as error:
            outcome["ended"] = type(error).__name__

    thread = threading.Thread(target=stream)
    try:
        thread.start()
        time.sleep(1.5)
        spare_source.stop("immediate")  # a crash: clients cut off, no checkpoint
        spare_source.start()
        thread.join(60)
        assert not thread.is_alive()
        time.sleep(1.0)  # the writer commits again
    finally:
        writer.stop()
    # the stream did not carry on as if nothing happened: it ended with the source's error
    assert outcome.get("ended") in ("SourceUnavailableError", "OperationalError", "SyncError"), outcome
    assert writer.errors >= 1
    _catch_up(source_url, source_dsn, target_dsn, env.staging)
    problems = _problems(source_dsn, target_dsn)
    with spare_source.connect(source_db) as conn:
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
    record_fault_trial("source restart mid-stream", failed=bool(problems), detail=outcome.get("ended"))
    assert not problems, problems


def test_a_stop_flag_set_from_another_thread_cuts_a_poll_short(env: SyncEnv) -> None:
    with env.source() as conn:
        _seed(conn)
    stop = StopFlag()
    engine = env.source_engine
    with env.target() as target:
        stream = CdcStream(engine, target, SPEC, staging=env.staging)
        threading.Timer(1.0, stop.request, args=("killed",)).start()
        started = time.monotonic()
        stats = run_stream(stream.step, probe=stream.probe, stream_for=60, poll_interval=30, stop=stop)
        stream.close()
    engine.dispose()
    assert stats.ended == "killed"
    assert time.monotonic() - started < 5  # not the 30 s poll interval
