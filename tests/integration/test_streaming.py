"""Streaming CDC (core/streaming.py) against the real PostgreSQL: every change made while the loop
runs arrives, an idle loop writes nothing on the source, a stop requested inside a batch ends the
loop after that batch's one transaction, and the loop never outlives ``stream_for``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from airflow_sync_provider.core.cdc import CdcSpec
from airflow_sync_provider.core.cdc.pgoutput import lsn_to_int
from airflow_sync_provider.core.streaming import BatchOutcome, CdcStream, StopFlag, StreamStats, run_stream

from ..conftest import CdcEnv

SPEC = CdcSpec(sync_id="stock_stream", tables=("stock",), batch_rows=500)


def _seed(cdc: CdcEnv, rows: int = 500) -> None:
    with cdc.env.source() as conn:
        conn.execute("CREATE TABLE stock (id bigint PRIMARY KEY, qty int NOT NULL, note text)")
        conn.execute("INSERT INTO stock SELECT g, g %% 100, md5(g::text) FROM generate_series(1, %s) g", (rows,))


@contextmanager
def _streaming(
    cdc: CdcEnv, *, stream_for: float, poll_interval: float = 0.05, stop: StopFlag | None = None, **kwargs: Any
) -> Iterator[tuple[StopFlag, dict[str, Any]]]:
    """Run a CDC stream in a thread; yields its stop flag and, once it ended, ``{"stats": ...}``."""
    stop = stop or StopFlag()
    out: dict[str, Any] = {}

    def run() -> None:
        engine = cdc.env.source_engine
        try:
            with cdc.env.target() as target:
                stream = CdcStream(engine, target, SPEC, staging=cdc.env.staging, run_id="stream", **kwargs)
                try:
                    out["stats"] = run_stream(
                        stream.step, probe=stream.probe, stream_for=stream_for, poll_interval=poll_interval, stop=stop
                    )
                finally:
                    stream.close()
        except BaseException as error:  # the test thread re-raises it
            out["error"] = error
        finally:
            engine.dispose()

    thread = threading.Thread(target=run, name="stream")
    thread.start()
    try:
        yield stop, out
    finally:
        stop.request("test over")
        thread.join(60)
        assert not thread.is_alive()
    if "error" in out:
        raise out["error"]


def _wait_converged(cdc: CdcEnv, timeout: float = 30) -> float:
    started = time.monotonic()
    while True:
        try:
            source, target = cdc.checksums("stock", ["id"])
        except psycopg.errors.UndefinedTable:  # the snapshot has not created it yet
            source, target = (0, ""), (-1, "")
        if source == target:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"target {target} != source {source} after {timeout} s"
        time.sleep(0.05)


def _wal_lsn(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return lsn_to_int(row[0])


def test_changes_made_while_the_stream_runs_all_arrive_in_order(cdc: CdcEnv) -> None:
    _seed(cdc)
    with _streaming(cdc, stream_for=60) as (stop, out), cdc.env.source() as src:
        _wait_converged(cdc)  # the first batch took the snapshot
        for n in range(60):  # inserts, updates and deletes in many small transactions
            with src.transaction():
                src.execute("INSERT INTO stock VALUES (%s, 1, 'new')", (10_000 + n,))
                src.execute("UPDATE stock SET qty = qty + 1 WHERE id %% 50 = %s", (n % 50,))
                src.execute("DELETE FROM stock WHERE id = %s", (n * 7 + 1,))
            time.sleep(0.01)
        caught_up = _wait_converged(cdc)
        stop.request("done")
    stats: StreamStats = out["stats"]
    assert caught_up < 5, caught_up
    assert stats.batches >= 2 and stats.changes >= 180
    assert stats.ended == "done"
    slot = cdc.slot(SPEC)
    assert not slot.active  # nothing holds the slot once the stream ended


def test_an_idle_stream_writes_nothing_on_the_source(cdc: CdcEnv) -> None:
    """Idle polls peek at the slot: no heartbeat transaction, hence no WAL, per poll."""
    _seed(cdc)
    with _streaming(cdc, stream_for=60):
        _wait_converged(cdc)
        time.sleep(0.5)  # past the snapshot batch
        confirmed = cdc.slot(SPEC).confirmed_flush_lsn
        written: list[int] = []
        with cdc.env.source() as src:
            # The WAL is the whole server's: another test database's autovacuum can land in a window
            # (7.6 kB once in a full run), so up to three windows; a batch per poll fails every one.
            for _ in range(3):
                before = _wal_lsn(src)
                time.sleep(2.0)  # ~40 polls
                written.append(_wal_lsn(src) - before)
                if written[-1] < 2_000:
                    break
        assert cdc.slot(SPEC).confirmed_flush_lsn == confirmed, "an idle poll ran a batch: the slot moved"
    # a batch per poll would commit ~40 heartbeat messages (each a WAL record and a flush)
    assert min(written) < 2_000, f"the idle stream wrote {written} bytes of WAL per 2 s window"


def test_a_busy_database_lets_the_idle_stream_advance_its_slot(cdc: CdcEnv) -> None:
    """WAL written by unpublished tables is not retained forever: past ``idle_advance_bytes`` a
    batch runs, whose heartbeat lets the slot move."""
    _seed(cdc)
    with _streaming(cdc, stream_for=60, idle_advance_bytes=256 * 1024), cdc.env.source() as src:
        _wait_converged(cdc)
        src.execute("CREATE TABLE noise (id int, pad text)")
        src.execute("INSERT INTO noise SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g")  # ~5 MB
        noise_end = cdc.slot(SPEC).current_lsn
        # What the stream controls: a batch runs and confirms past the others' WAL.
        deadline = time.monotonic() + 10
        while (cdc.slot(SPEC).confirmed_flush_lsn or 0) < noise_end:
            assert time.monotonic() < deadline, cdc.slot(SPEC).describe()
            time.sleep(0.1)
        # The server then moves the slot's restart point at the next running-transactions record it
        # decodes (written every 15 s, or at a checkpoint): ask for one instead of waiting for it.
        src.execute("CHECKPOINT")
        deadline = time.monotonic() + 30
        while cdc.slot(SPEC).retained_bytes > 1024 * 1024:
            assert time.monotonic() < deadline, cdc.slot(SPEC).describe()
            time.sleep(0.1)


def test_a_stop_requested_inside_a_batch_ends_the_stream_after_its_transaction(cdc: CdcEnv) -> None:
    _seed(cdc)

    class StopWhileLoading:
        """A logger that asks the stream to stop when the load of a change batch says something."""

        def __init__(self, stop: StopFlag) -> None:
            self.stop, self.armed = stop, False

        def info(self, msg: str, /, *args: Any) -> None:
            if self.armed and "stock" in (msg % args if args else msg):
                self.stop.request("stopped mid-batch")

        def warning(self, msg: str, /, *args: Any) -> None:
            self.info(msg, *args)

    stop = StopFlag()
    logger = StopWhileLoading(stop)
    with _streaming(cdc, stream_for=60, stop=stop, logger=logger) as (_, out):
        _wait_converged(cdc)
        logger.armed = True
        with cdc.env.source() as src:
            src.execute("UPDATE stock SET qty = qty + 1000")
        deadline = time.monotonic() + 20
        while not stop.requested:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stopped_at = time.monotonic()
    stats: StreamStats = out["stats"]
    assert stats.ended == "stopped mid-batch"
    assert time.monotonic() - stopped_at < 5
    # the batch in flight finished its transaction: all of it is there, once
    _wait_converged(cdc, timeout=0.1)
    with cdc.env.target() as conn:
        applied = conn.execute(
            "SELECT state_version FROM _sync_audit WHERE sync_id = %s AND status = 'applied' ORDER BY 1",
            (SPEC.sync_id,),
        ).fetchall()
    assert [v for (v,) in applied] == list(range(1, len(applied) + 1))
    # and the next stream resumes from the committed position
    with _streaming(cdc, stream_for=60), cdc.env.source() as src:
        src.execute("INSERT INTO stock VALUES (99999, 5, 'after')")
        _wait_converged(cdc)


def test_the_stream_ends_by_itself_after_stream_for_even_while_changes_keep_coming(cdc: CdcEnv) -> None:
    _seed(cdc)
    writing = threading.Event()
    writing.set()

    def writer() -> None:
        with cdc.env.source() as src:
            n = 0
            while writing.is_set():
                src.execute("UPDATE stock SET qty = qty + 1 WHERE id = %s", (n % 500 + 1,))
                n += 1
                time.sleep(0.005)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        started = time.monotonic()
        with _streaming(cdc, stream_for=3) as (_, out):
            while "stats" not in out and time.monotonic() - started < 30:
                time.sleep(0.05)
        took = time.monotonic() - started
    finally:
        writing.clear()
        thread.join()
    stats: StreamStats = out["stats"]
    assert stats.ended == "stream_for elapsed"
    assert 3 <= took < 8, took
    assert stats.batches >= 3  # it kept applying while the changes came


def test_run_stream_sleeps_only_when_idle_and_logs_throughput() -> None:
    """The loop itself, with a scripted step and clock: catch-up without sleeping, poll when idle."""
    lines: list[str] = []

    class Log:
        def info(self, msg: str, /, *args: Any) -> None:
            lines.append(msg % args if args else msg)

        def warning(self, msg: str, /, *args: Any) -> None:
            self.info(msg, *args)

    outcomes = iter([BatchOutcome(5, lag_seconds=0.2), BatchOutcome(3, lag_seconds=0.4)])
    calls: list[float] = []
    now = [0.0]

    def step() -> BatchOutcome:
        calls.append(now[0])
        now[0] += 0.1
        return next(outcomes, BatchOutcome(0))

    class Stop(StopFlag):
        def wait(self, seconds: float) -> bool:
            now[0] += seconds
            return False

    stats = run_stream(
        step, stream_for=10, poll_interval=2, stop=Stop(), logger=Log(), log_every=5, clock=lambda: now[0]
    )
    assert calls[:3] == [0.0, 0.1, 0.2]  # no sleep after a batch that applied changes
    assert calls[3] - calls[2] >= 2  # then one poll interval per idle poll
    assert stats.changes == 8 and stats.batches == 2 and stats.max_lag_seconds == 0.4
    assert stats.ended == "stream_for elapsed" and 10 <= stats.seconds < 12.5
    assert any("8 changes in 2 batches" in line for line in lines), lines
