"""Streaming an incremental table sync (core/streaming.py ``TableStream``, ``SyncTableOperator(stream_for=...)``)
against the real PostgreSQL: rows a writer inserts and updates while the stream runs all arrive, whole
and once, a second stream resumes where the first stopped, an idle stream commits nothing (nor does
one whose new rows ``lag`` holds back), a stop ends it at once, full syncs and backfill runs are
refused, and (a property) any interleaving of writes and batches leaves the target equal to the source,
the probe saying "something to do" exactly when the two differ.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from airflow_sync_provider.core import ConfigurationError, SyncSpec
from airflow_sync_provider.core.streaming import StopFlag, StreamStats, TableStream, check_streamable, run_stream

from ..conftest import SyncEnv, airflow_orders, source_columns, table_checksum

TABLE = "events"
KEY = ["region", "id"]
SPEC = SyncSpec(sync_id="events_stream", source_table=TABLE, cursor_column="updated_at", batch_rows=200)


def _create(conn: psycopg.Connection[Any], table: str = TABLE, rows: int = 300) -> None:
    """A composite-key table stamped by the database clock, with the index the probe uses."""
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (region text, id bigint, qty int NOT NULL, note text, "
            "updated_at timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (region, id))"
        ).format(sql.Identifier(table))
    )
    conn.execute(sql.SQL("CREATE INDEX ON {} (updated_at, region, id)").format(sql.Identifier(table)))
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (region, id, qty, note) "
            "SELECT (ARRAY['eu', 'us', 'ap'])[g %% 3 + 1], g, g %% 10, md5(g::text) FROM generate_series(1, %s) g"
        ).format(sql.Identifier(table)),
        (rows,),
    )


def _checksums(env: SyncEnv, table: str = TABLE) -> tuple[tuple[int, str], tuple[int, str] | None]:
    """(source, target) checksums over every source column (None: no target table yet)."""
    with env.source() as src, env.target() as tgt:
        columns = source_columns(src, table)
        source = table_checksum(src, table, columns, KEY)
        exists = tgt.execute("SELECT to_regclass(%s)", (f"public.{table}",)).fetchone()
        target = table_checksum(tgt, table, columns, KEY) if exists and exists[0] is not None else None
    return source, target


def _wait_converged(env: SyncEnv, timeout: float = 30) -> float:
    started = time.monotonic()
    while True:
        source, target = _checksums(env)
        if source == target:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"target {target} != source {source} after {timeout} s"
        time.sleep(0.05)


def _version(env: SyncEnv, sync_id: str = SPEC.sync_id) -> int:
    state = env.state(sync_id)
    return int(state[0]) if state else 0


def _ledger_rows(env: SyncEnv) -> int:
    with env.target() as conn:
        row = conn.execute("SELECT count(*) FROM _sync_audit").fetchone()
    assert row is not None
    return int(row[0])


def _stream(
    env: SyncEnv, spec: SyncSpec = SPEC, *, stream_for: float, poll_interval: float = 0.05, stop: StopFlag | None = None
) -> tuple[StreamStats, int]:
    """Run a table stream on a pooled engine, as the operator does: its stats and how many source
    connections it opened."""
    engine = sa.create_engine(env.source_url)
    connects = itertools.count()
    sa.event.listen(engine, "connect", lambda *_: next(connects))
    try:
        with env.target() as target:
            stream = TableStream(engine, target, spec, staging=env.staging, run_id="stream")
            try:
                stats = run_stream(
                    stream.step,
                    probe=stream.probe,
                    stream_for=stream_for,
                    poll_interval=poll_interval,
                    stop=stop,
                    probe_first=True,
                )
            finally:
                stream.close()
    finally:
        engine.dispose()
    return stats, next(connects)


@contextmanager
def _streaming(
    env: SyncEnv, spec: SyncSpec = SPEC, *, stream_for: float = 60, poll_interval: float = 0.05
) -> Iterator[tuple[StopFlag, dict[str, Any]]]:
    """Run :func:`_stream` in a thread; yields its stop flag and, once it ended, ``{"stats": ...,
    "connects": ...}``."""
    stop = StopFlag()
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["stats"], out["connects"] = _stream(
                env, spec, stream_for=stream_for, poll_interval=poll_interval, stop=stop
            )
        except BaseException as error:  # the test thread re-raises it
            out["error"] = error

    thread = threading.Thread(target=run, name="table-stream")
    thread.start()
    try:
        yield stop, out
    finally:
        stop.request("test over")
        thread.join(60)
        assert not thread.is_alive()
    if "error" in out:
        raise out["error"]


class Writer:
    """Inserts and updates rows of the source table in small transactions until stopped."""

    def __init__(self, env: SyncEnv, first_id: int) -> None:
        self.env = env
        self.ids = itertools.count(first_id)
        self.inserted = 0
        self.updated = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="writer")

    def _run(self) -> None:
        try:
            with self.env.source() as conn:
                n = 0
                while not self.stop.is_set():
                    with conn.transaction():
                        for _ in range(3):
                            conn.execute(
                                "INSERT INTO events (region, id, qty, note) VALUES (%s, %s, 1, 'new')",
                                (("eu", "us", "ap")[n % 3], next(self.ids)),
                            )
                            self.inserted += 1
                        conn.execute(
                            "UPDATE events SET qty = qty + 1, note = 'updated', updated_at = clock_timestamp() "
                            "WHERE id = %s",
                            (n % 300 + 1,),
                        )
                        self.updated += 1
                    n += 1
                    time.sleep(0.005)
        except BaseException as error:  # the test thread re-raises it
            self.error = error

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.error is not None:
            raise self.error


def test_rows_written_while_the_stream_runs_all_arrive_once_and_a_second_stream_resumes(env: SyncEnv) -> None:
    with env.source() as conn:
        _create(conn)
    with _streaming(env) as (stop, out):
        _wait_converged(env)  # the first batch (the sync never ran) copied the table
        with Writer(env, first_id=10_000) as writer:
            time.sleep(3)
        caught_up = _wait_converged(env)
        stop.request("done")
    stats: StreamStats = out["stats"]
    assert caught_up < 10, caught_up
    assert writer.inserted > 100 and writer.updated > 30
    assert stats.ended == "done"
    assert stats.batches >= 3 and stats.changes >= 300 + writer.inserted
    assert stats.last_lag_seconds is not None and 0 <= stats.last_lag_seconds < 30
    assert out["connects"] <= 4, f"{out['connects']} source connections for {stats.batches} batches"
    with env.target() as tgt:
        row = tgt.execute("SELECT count(*), count(DISTINCT (region, id)) FROM events").fetchone()
    assert row is not None and row[0] == row[1] == 300 + writer.inserted  # no duplicates

    # The same stream again: it resumes from the committed watermark and reads only what changed since.
    version = _version(env)
    with env.source() as conn:
        conn.execute("INSERT INTO events (region, id, qty) SELECT 'eu', g, 7 FROM generate_series(50000, 50024) g")
        conn.execute("UPDATE events SET qty = -1, updated_at = clock_timestamp() WHERE id BETWEEN 1 AND 10")
    with _streaming(env) as (stop, out):
        _wait_converged(env)
        stop.request("done again")
    again: StreamStats = out["stats"]
    assert again.changes == 35 and again.batches >= 1
    assert _version(env) == version + again.batches  # one state version per batch, none per idle poll


def test_an_idle_stream_commits_nothing_and_lag_holds_new_rows_back_without_a_commit(env: SyncEnv) -> None:
    with env.source() as conn:
        _create(conn, rows=50)
    env.sync(SPEC)
    version, ledger = _version(env), _ledger_rows(env)
    idle, _ = _stream(env, stream_for=1.5)
    assert idle.ended == "stream_for elapsed"
    assert idle.batches == 0 and idle.idle_polls >= 10
    assert (_version(env), _ledger_rows(env)) == (version, ledger)

    # New rows younger than ``lag`` are not read by a batch yet: the probe asks the same upper bound,
    # so the stream waits without committing an empty batch per poll.
    lagging = SPEC.with_options(lag=dt.timedelta(minutes=10))
    with env.source() as conn:
        conn.execute("INSERT INTO events (region, id, qty) VALUES ('eu', 9001, 1), ('us', 9002, 2)")
    held, _ = _stream(env, lagging, stream_for=1.5)
    assert held.batches == 0 and held.idle_polls >= 5
    assert (_version(env), _ledger_rows(env)) == (version, ledger)
    # Without the lag the rows are there to sync: the probe says so.
    with _streaming(env, stream_for=60) as (stop, out):
        _wait_converged(env)
        stop.request("synced")
    assert out["stats"].changes == 2


def test_a_stop_ends_the_stream_at_once(env: SyncEnv) -> None:
    with env.source() as conn:
        _create(conn, rows=20)
    with _streaming(env, stream_for=600, poll_interval=60) as (stop, out):
        _wait_converged(env)
        time.sleep(0.2)  # asleep in its 60 s poll
        asked = time.monotonic()
        stop.request("stopped by the test")
    assert time.monotonic() - asked < 5
    assert out["stats"].ended == "stopped by the test"


def test_full_syncs_and_backfill_windows_cannot_stream(env: SyncEnv) -> None:
    full = SyncSpec(sync_id="full_events", source_table=TABLE, mode="full")
    engine = env.source_engine
    try:
        with env.target() as target, pytest.raises(ConfigurationError, match="a full sync cannot stream"):
            TableStream(engine, target, full)
    finally:
        engine.dispose()
    window = (dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    with pytest.raises(ConfigurationError, match=r"backfill of .* cannot stream"):
        check_streamable(SPEC, window=window)
    check_streamable(SPEC)  # an incremental sync's live run may


# ------------------------------------------------------------------------------------- the operator


@pytest.fixture
def connections(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> SyncEnv:
    return airflow_orders(env, monkeypatch, rows=500)


def _orders_equal(env: SyncEnv) -> bool:
    with env.source() as src, env.target() as tgt:
        exists = tgt.execute("SELECT to_regclass('public.orders')").fetchone()
        if not exists or exists[0] is None:
            return False
        columns = source_columns(src, "orders")
        return table_checksum(src, "orders", columns, ["id"]) == table_checksum(tgt, "orders", columns, ["id"])


def _sync_orders(**kwargs: Any) -> Any:
    from airflow_sync_provider.operators.sync import SyncTableOperator

    arguments = {"source_conn_id": "sync_source", "target_conn_id": "sync_target", "cursor_column": "updated_at"}
    return SyncTableOperator(task_id="stream_orders", source_table="orders", **{**arguments, **kwargs})


def test_sync_table_operator_streams_for_its_time_then_returns_its_stats(connections: SyncEnv) -> None:
    operator = _sync_orders(stream_for=3, poll_interval=0.05)
    assert {"stream_for", "poll_interval"} <= set(operator.template_fields)
    out: dict[str, Any] = {}
    started = time.monotonic()
    thread = threading.Thread(target=lambda: out.update(result=operator.execute({"run_id": "stream__1"})))
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not _orders_equal(connections):  # the first batch copied the table
            assert time.monotonic() < deadline, "first batch"
            time.sleep(0.05)
        with connections.source() as conn:
            for n in range(20):
                conn.execute("UPDATE orders SET quantity = quantity + 1, updated_at = now() WHERE id = %s", (n + 1,))
                conn.execute(
                    "INSERT INTO orders (id, customer, quantity, unit_price) VALUES (%s, 'new', 1, 1)", (9000 + n,)
                )
    finally:
        thread.join(30)
    assert not thread.is_alive()
    assert 3 <= time.monotonic() - started < 20
    stats = out["result"]["stream"]
    assert stats["ended"] == "stream_for elapsed"
    assert stats["changes"] >= 500 + 40 and stats["batches"] >= 2
    assert _orders_equal(connections)


def test_sync_table_operator_refuses_to_stream_a_full_sync_or_a_backfill_run() -> None:
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="a full sync cannot stream"):
        _sync_orders(mode="full", cursor_column=None, stream_for="5").execute({"run_id": "stream__2"})
    backfill = {"run_id": "stream__3", "dag_run": _Run({"window_start": "2026-01-01", "window_end": "2026-01-02"})}
    with pytest.raises(AirflowFailException, match=r"backfill of .* cannot stream"):
        _sync_orders(stream_for=5).execute(backfill)


class _Run:
    """The ``dag_run`` of a context, as much of it as ``backfill_window`` reads."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf
        self.run_type = "manual"


# -------------------------------------------------------------------------------------- property

_tables = itertools.count()
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.integers(1, 5)),
        st.tuples(st.just("update"), st.integers(0, 60)),
        st.tuples(st.just("delete_none"), st.just(0)),  # a no-op statement: nothing to sync
        st.tuples(st.just("step"), st.just(0)),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS)
def test_any_interleaving_of_writes_and_batches_converges(env: SyncEnv, operations: list[tuple[str, int]]) -> None:
    """Before every batch the probe says "something to do" exactly when target and source differ;
    a batch then applies changes exactly then; at the end the target equals the source."""
    table = f"prop_{next(_tables)}"
    spec = SyncSpec(sync_id=table, source_table=table, cursor_column="updated_at", batch_rows=7)
    ids = itertools.count(1_000)
    engine = sa.create_engine(env.source_url)
    try:
        with env.source() as src, env.target() as target:
            _create(src, table, rows=12)
            stream = TableStream(engine, target, spec, staging=env.staging, run_id="property")
            try:
                assert stream.probe() and stream.step().changes == 12  # the first batch
                for operation, value in [*operations, ("step", 0)]:
                    if operation == "insert":
                        src.execute(
                            sql.SQL(
                                "INSERT INTO {} (region, id, qty) SELECT 'ap', g, 0 FROM unnest(%s::bigint[]) g"
                            ).format(sql.Identifier(table)),
                            ([next(ids) for _ in range(value)],),
                        )
                    elif operation == "update":
                        src.execute(
                            sql.SQL(
                                "UPDATE {} SET qty = qty + 1, updated_at = clock_timestamp() WHERE id %% 13 = %s %% 13"
                            ).format(sql.Identifier(table)),
                            (value,),
                        )
                    elif operation == "delete_none":
                        src.execute(sql.SQL("DELETE FROM {} WHERE id < 0").format(sql.Identifier(table)))
                    else:
                        source, synced = _checksums(env, table)
                        pending = stream.probe()
                        assert pending == (source != synced), (source, synced)
                        if pending:
                            assert stream.step().changes > 0
                        source, synced = _checksums(env, table)
                        assert source == synced
            finally:
                stream.close()
    finally:
        engine.dispose()
