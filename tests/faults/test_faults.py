"""Fault injection: kills, dropped connections, server restarts, concurrent and stale runs, lost slots.

Every fault is injected at many randomised points; after each one the run is retried and the test
checks, by checksum, that the target equals the source, that no row is duplicated, and that the
state row is consistent (its version equals the number of applied loads in the audit ledger, its
manifest is the last applied one, and its watermark is the source's newest row).  Each trial is
counted per fault class; the terminal summary and ``tests/.fault_summary.json`` report the number
of trials and of trials with a lost or duplicated row (which must be 0).

The CI variant runs a few dozen trials in total; the soak variant (``@pytest.mark.slow``, deselected
by default) runs five times as many: ``make pytest PYTEST_ARGS="-m slow -k faults"``.
``SYNC_FAULT_SEED=<n>`` replays one sequence of random kill points (the seed is printed).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from airflow_sync_provider.core import StagingArea, SyncError, SyncSpec, extract_for, load_manifest, run_sync
from airflow_sync_provider.core.cdc import (
    CdcSpec,
    changes_to_staging,
    committed_cdc_state,
    load_cdc_manifest,
    run_cdc_sync,
)
from airflow_sync_provider.core.errors import SchemaError, SourceUnavailableError
from airflow_sync_provider.core.state import read_state
from airflow_sync_provider.core.values import decode_row
from sync_dev.local_postgres import LocalPostgres, local_postgres

from ..conftest import CdcEnv, SyncEnv, record_fault_trial, source_columns, table_checksum

FORK = multiprocessing.get_context("fork")
SEED = int(os.environ.get("SYNC_FAULT_SEED", random.randrange(2**31)))
SPEC = SyncSpec(
    sync_id="orders", source_table="orders", cursor_column="updated_at", detect_deletes=True, batch_rows=300
)
CHILD_APP = "sync-fault-child"


def _trials(ci: int) -> Any:
    """The CI count, and a soak variant with five times as many trials (deselected by default)."""
    return pytest.mark.parametrize(
        "trials", [pytest.param(ci, id="ci"), pytest.param(ci * 5, id="soak", marks=pytest.mark.slow)]
    )


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    seed = SEED + sum(map(ord, request.node.name))
    print(f"fault seed: SYNC_FAULT_SEED={SEED} (this test: {seed})")
    return random.Random(seed)


# --------------------------------------------------------------------------- the table and its checks


def _seed_orders(conn: psycopg.Connection[Any], rows: int = 3_000) -> None:
    conn.execute(
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer text, amount numeric(12,2), note text, "
        "updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    conn.execute(
        "INSERT INTO orders (id, customer, amount, note) SELECT g, 'c' || (g %% 97), g / 10.0, repeat('x', g %% 50) "
        "FROM generate_series(1, %s) g",
        (rows,),
    )


class Mutator:
    """Random inserts, updates and deletes at the source between trials."""

    def __init__(self, rng: random.Random, next_id: int = 100_000) -> None:
        self.rng = rng
        self.next_id = next_id

    def __call__(self, conn: psycopg.Connection[Any], table: str = "orders") -> None:
        rng = self.rng
        ident = psycopg.sql.Identifier(table)
        conn.execute(
            psycopg.sql.SQL(
                "UPDATE {} SET amount = amount + 1, note = md5(random()::text), updated_at = clock_timestamp() "
                "WHERE id %% %s = %s"
            ).format(ident),
            (rng.choice([3, 4, 5]), rng.randrange(3)),
        )
        count = rng.randrange(100, 400)
        conn.execute(
            psycopg.sql.SQL(
                "INSERT INTO {} (id, customer, amount) SELECT g, 'new', 1 FROM generate_series(%s, %s) g"
            ).format(ident),
            (self.next_id, self.next_id + count - 1),
        )
        self.next_id += count
        conn.execute(
            psycopg.sql.SQL("DELETE FROM {} WHERE id %% %s = %s").format(ident),
            (rng.choice([41, 53, 67]), rng.randrange(41)),
        )


def _two_at_once(run_once: Callable[[str], str], prefix: str) -> tuple[list[str], list[BaseException], bool]:
    """Start two runs at the same moment (a barrier); return their statuses, errors, and whether one hung."""
    barrier = threading.Barrier(2)
    results: list[str] = []
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            barrier.wait(10)
            results.append(run_once(name))
        except BaseException as error:  # reported by the caller, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(f"{prefix}-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results, errors, any(thread.is_alive() for thread in threads)


def _problems(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    spec: SyncSpec,
    *,
    source_table: str = "orders",
) -> list[str]:
    """Everything that is wrong after a retry: lost/extra/duplicated rows and an inconsistent state."""
    problems = []
    columns = source_columns(source, source_table)
    expected = table_checksum(source, source_table, columns, ["id"])
    actual = table_checksum(target, spec.target_table, columns, ["id"])
    if actual != expected:
        problems.append(f"target {actual} != source {expected}")
    row = target.execute(
        psycopg.sql.SQL("SELECT count(*) - count(DISTINCT id) FROM {}").format(
            psycopg.sql.Identifier(spec.target_table)
        )
    ).fetchone()
    if row != (0,):
        problems.append(f"{row} duplicated keys")
    state = read_state(target, spec.target_schema, spec.state_table, spec.sync_id)
    if state is None:
        return [*problems, "no state row"]
    ledger = target.execute(
        "SELECT state_version, manifest_id FROM _sync_audit WHERE sync_id = %s AND status = 'applied' "
        "ORDER BY state_version",
        (spec.sync_id,),
    ).fetchall()
    if [v for v, _ in ledger] != list(range(1, state.version + 1)):
        problems.append(f"state version {state.version} but applied loads {[v for v, _ in ledger]}")
    elif ledger and ledger[-1][1] != state.last_manifest_id:
        problems.append(f"state manifest {state.last_manifest_id} is not the last applied {ledger[-1][1]}")
    if spec.mode == "incremental":
        newest = source.execute(
            psycopg.sql.SQL("SELECT {}, id FROM {} ORDER BY 1 DESC, 2 DESC LIMIT 1").format(
                psycopg.sql.Identifier(spec.cursor_column or ""), psycopg.sql.Identifier(source_table)
            )
        ).fetchone()
        assert isinstance(state.watermark, list)
        if newest is not None and decode_row(state.watermark) != tuple(newest):
            problems.append(f"watermark {state.watermark} is not the newest source row {newest}")
    return problems


def _target_snapshot(target: psycopg.Connection[Any], spec: SyncSpec) -> tuple[Any, ...]:
    """Target rows (all columns, metadata included) and the state row: must not move on a failed run."""
    columns = source_columns(target, spec.target_table)
    state = read_state(target, spec.target_schema, spec.state_table, spec.sync_id)
    return table_checksum(target, spec.target_table, columns, ["id"]), state


def _wait_for_backends_gone(server: LocalPostgres, application_name: str, timeout: float = 30) -> None:
    """A killed client's backends roll back and exit once they notice the closed socket."""
    deadline = time.monotonic() + timeout
    with server.connect() as conn:
        while conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, f"backends of {application_name} still alive after {timeout} s"
            time.sleep(0.05)


def _with_app(url_or_dsn: str, application_name: str) -> str:
    if "://" in url_or_dsn:
        return f"{url_or_dsn}{'&' if '?' in url_or_dsn else '?'}application_name={application_name}"
    return f"{url_or_dsn} application_name={application_name}"


# --------------------------------------------------------------------------- SIGKILL of a sync process

PHASES = ("extracted", "staged", "merged", "committed")


def _sync_child(
    source_url: str, target_dsn: str, staging_uri: str, spec: SyncSpec, kill_phase: str | None, stamps: Any
) -> None:
    """Runs in a forked child: one ``run_sync``, stamping when each phase is reached."""
    code = 1
    try:

        class StampingLog:
            def info(self, msg: str, /, *args: Any) -> None:
                if "extracted from" in msg % args if args else msg:
                    stamps[1] = time.monotonic()
                    if kill_phase == "extracted":
                        os.kill(os.getpid(), signal.SIGKILL)

            def warning(self, msg: str, /, *args: Any) -> None:
                return None

        def observer(phase: str, facts: dict[str, Any]) -> None:
            stamps[1 + PHASES.index(phase)] = time.monotonic()
            if phase == kill_phase:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no rollback from the client side

        engine = sa.create_engine(source_url, poolclass=sa.NullPool)
        with psycopg.connect(target_dsn) as target:
            stamps[0] = time.monotonic()
            run_sync(
                engine,
                target,
                spec,
                staging=StagingArea(staging_uri),
                run_id=f"child-{os.getpid()}",
                logger=StampingLog(),
                observer=observer,
            )
        stamps[5] = time.monotonic()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _reached(stamps: Any) -> str:
    """Where a killed child was: the last phase it had reached."""
    names = ["extract", "load (COPY)", "load (merge + state write)", "state written, before commit", "after commit"]
    done = [i for i in range(1, 5) if stamps[i] > 0]
    return names[max(done) if done else 0]


def _run_child(env: SyncEnv, spec: SyncSpec, kill_phase: str | None, kill_after: float | None) -> tuple[int, Any]:
    stamps = FORK.Array("d", 6, lock=False)
    child = FORK.Process(
        target=_sync_child,
        args=(
            _with_app(env.source_url, CHILD_APP),
            _with_app(env.server.dsn(env.target_db), CHILD_APP),
            env.staging.base_uri,
            spec,
            kill_phase,
            stamps,
        ),
    )
    child.start()
    if kill_after is not None:
        deadline = time.monotonic() + 30
        while stamps[0] == 0 and child.is_alive():  # count from the start of the run, not of the process
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(kill_after)
        if child.is_alive():
            os.kill(child.pid or 0, signal.SIGKILL)
    child.join(60)
    assert child.exitcode is not None, "the sync child hung"
    return child.exitcode, stamps


@_trials(24)
def test_sigkill_during_extract_load_and_state_update(env: SyncEnv, rng: random.Random, trials: int) -> None:
    """A sync process SIGKILLed at a random moment; the retry converges exactly."""
    mutate = Mutator(rng)
    with env.source() as conn:
        _seed_orders(conn)
    assert _run_child(env, SPEC, None, None)[0] == 0  # the initial sync
    with env.source() as conn:
        mutate(conn)
    code, stamps = _run_child(env, SPEC, None, None)  # calibration: how long the phases of a trial take
    assert code == 0
    extract_end, total = stamps[1] - stamps[0], stamps[5] - stamps[0]
    where: dict[str, int] = {}
    for trial in range(trials):
        with env.source() as conn:
            mutate(conn)
        with env.target() as conn:
            before = _target_snapshot(conn, SPEC)
        window = ["extract", "load", "state", "phase"][trial % 4]
        if window == "extract":
            code, stamps = _run_child(env, SPEC, None, rng.uniform(0, extract_end))
        elif window == "load":
            code, stamps = _run_child(env, SPEC, None, rng.uniform(extract_end, total * 0.9))
        elif window == "state":  # after the state row and the ledger row are written, before COMMIT
            code, stamps = _run_child(env, SPEC, "merged", None)
        else:
            code, stamps = _run_child(env, SPEC, rng.choice(PHASES), None)
        reached = _reached(stamps) if code != 0 else "finished before the kill"
        if code == 0:  # the kill came too late: aim by how long this run took
            extract_end, total = stamps[1] - stamps[0], stamps[5] - stamps[0]
        where[reached] = where.get(reached, 0) + 1
        _wait_for_backends_gone(env.server, CHILD_APP)
        with env.target() as conn:
            after_kill = _target_snapshot(conn, SPEC)
        state_before, state_after = before[1], after_kill[1]
        half_applied = state_after.version == state_before.version and after_kill != before
        _, retry = env.sync(SPEC, run_id=f"retry-{trial}")
        with env.source() as src, env.target() as tgt:
            problems = _problems(src, tgt, SPEC)
        if half_applied:
            problems.append("the killed run left target rows changed without a new state version")
        record_fault_trial("sigkill table sync", failed=bool(problems), detail=reached)
        assert not problems, (trial, reached, problems)
        assert retry.status == "applied"
    print(f"kill points reached: {where}")
    assert len(where) >= 3  # the random points did land in several phases


# --------------------------------------------------------------------------- connections terminated mid-COPY


@dataclass
class Terminator:
    """Terminates, after ``delay``, the first active backend of ``dbname`` whose query matches ``pattern``."""

    server: LocalPostgres
    dbname: str
    pattern: str
    delay: float
    terminated_query: str | None = None

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.server.connect() as conn:
            while not self.stop.is_set():
                row = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s AND state = 'active' AND query ILIKE %s "
                    "AND pid <> pg_backend_pid()",
                    (self.dbname, self.pattern),
                ).fetchone()
                if row is None:
                    time.sleep(0.002)
                    continue
                time.sleep(self.delay)
                query = conn.execute(
                    "SELECT left(query, 60) FROM pg_stat_activity WHERE pid = %s AND state = 'active'", row
                ).fetchone()
                if conn.execute("SELECT pg_terminate_backend(%s)", row).fetchone() == (True,):
                    self.terminated_query = query[0] if query else "(idle in transaction)"
                    return
                # That backend was gone before the delay ran out (a short query on its own connection,
                # e.g. the NULL-cursor check): wait for the next matching query instead of giving up.

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(10)


SLOW_TARGET = """
CREATE FUNCTION slow_check(numeric) RETURNS boolean LANGUAGE plpgsql VOLATILE AS
  $$ BEGIN PERFORM pg_sleep(0.0005); RETURN true; END $$;
CREATE DOMAIN slow_amount AS numeric(12,2) CHECK (slow_check(VALUE));
CREATE TABLE orders (id bigint PRIMARY KEY, customer text, amount slow_amount, note text, updated_at timestamptz);
"""


@_trials(6)
def test_target_connection_terminated_mid_copy(env: SyncEnv, rng: random.Random, trials: int) -> None:
    """``pg_terminate_backend`` of the load's connection at a random point of its COPY (made slow by a
    domain CHECK on the target): the run fails, nothing is visible, the retry converges."""
    mutate = Mutator(rng)
    with env.source() as conn:
        _seed_orders(conn, rows=1_000)
    with env.target() as conn:
        conn.execute(SLOW_TARGET)
    env.sync(SPEC, run_id="first")
    errors: dict[str, int] = {}
    for trial in range(trials):
        with env.source() as conn:
            mutate(conn)
        with env.target() as conn:
            before = _target_snapshot(conn, SPEC)
        terminator = Terminator(env.server, env.target_db, "COPY %", rng.uniform(0, 0.15))
        try:
            env.sync(SPEC, run_id=f"doomed-{trial}")
            outcome = "finished"
        except (SyncError, psycopg.OperationalError) as error:
            outcome = type(error).__name__
        finally:
            terminator.finish()
        errors[outcome] = errors.get(outcome, 0) + 1
        with env.target() as conn:
            unchanged = _target_snapshot(conn, SPEC) == before
        env.sync(SPEC, run_id=f"retry-{trial}")
        with env.source() as src, env.target() as tgt:
            problems = _problems(src, tgt, SPEC)
        if outcome != "finished" and not unchanged:
            problems.append("a failed load left changes visible")
        record_fault_trial("target conn killed mid-COPY", failed=bool(problems), detail=outcome)
        assert not problems, (trial, terminator.terminated_query, problems)
    assert sum(n for k, n in errors.items() if k != "finished") >= trials // 2, errors


# STABLE (not VOLATILE), so the view is flattened and the function runs only for the rows a page returns.
SLOW_SOURCE_VIEW = """
CREATE FUNCTION slow_text(text) RETURNS text LANGUAGE plpgsql STABLE AS
  $$ BEGIN PERFORM pg_sleep(0.0005); RETURN $1; END $$;
CREATE VIEW orders_slow AS SELECT id, customer, amount, slow_text(note) AS note, updated_at FROM orders;
"""


@_trials(6)
def test_source_connection_terminated_mid_extract(env: SyncEnv, rng: random.Random, trials: int) -> None:
    """``pg_terminate_backend`` of the extraction's source connection while it reads pages: a clear
    SyncError, target and state untouched, the retry converges."""
    mutate = Mutator(rng)
    spec = SPEC.with_options(source_table="orders_slow", target_table="orders", primary_key=("id",))
    with env.source() as conn:
        _seed_orders(conn, rows=1_000)
        conn.execute(SLOW_SOURCE_VIEW)
    env.sync(spec, run_id="first")
    errors: dict[str, int] = {}
    for trial in range(trials):
        with env.source() as conn:
            mutate(conn)
        with env.target() as conn:
            before = _target_snapshot(conn, spec)
        terminator = Terminator(env.server, env.source_db, "%orders_slow%", rng.uniform(0, 0.15))
        try:
            env.sync(spec, run_id=f"doomed-{trial}")
            outcome = "finished"
        except SyncError as error:
            outcome = type(error).__name__
            assert str(error).startswith("[sync='orders' table='orders_slow'] extraction failed: "), error
            # a lost source connection is retryable: operators let Airflow retry it (not AirflowFailException)
            assert isinstance(error, SourceUnavailableError), type(error)
        finally:
            terminator.finish()
        errors[outcome] = errors.get(outcome, 0) + 1
        with env.target() as conn:
            unchanged = _target_snapshot(conn, spec) == before
        env.sync(spec, run_id=f"retry-{trial}")
        with env.source() as src, env.target() as tgt:
            problems = _problems(src, tgt, spec)
        if outcome != "finished" and not unchanged:
            problems.append("a failed extraction changed the target")
        record_fault_trial("source conn killed mid-extract", failed=bool(problems), detail=outcome)
        assert not problems, (trial, terminator.terminated_query, problems)
    assert sum(n for k, n in errors.items() if k != "finished") >= trials // 2, errors


# --------------------------------------------------------------------------- server restarts


@pytest.fixture(scope="module")
def spare_server() -> Iterator[LocalPostgres]:
    """A second server to restart (and to misconfigure) without disturbing the session's."""
    with local_postgres() as server:
        yield server


def _restart_in(server: LocalPostgres, delay: float) -> threading.Thread:
    def restart() -> None:
        time.sleep(delay)
        server.stop("immediate")  # a crash: no checkpoint, clients cut off
        server.start()

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    return thread


@_trials(4)
def test_target_server_restarted_during_a_run(
    env: SyncEnv, spare_server: LocalPostgres, rng: random.Random, trials: int
) -> None:
    mutate = Mutator(rng)
    target_db = spare_server.create_database(f"restart_target_{os.getpid()}")
    with env.source() as conn:
        _seed_orders(conn, rows=1_000)
    with spare_server.connect(target_db) as conn:
        conn.execute(SLOW_TARGET)
    engine = env.source_engine

    def sync(run_id: str) -> Any:
        with spare_server.connect(target_db) as target:
            return run_sync(engine, target, SPEC, staging=env.staging, run_id=run_id)[1]

    sync("first")
    with env.source() as conn:
        mutate(conn)
    started = time.monotonic()
    sync("calibration")  # as long as a trial's run takes
    duration = time.monotonic() - started
    outcomes: dict[str, int] = {}
    for trial in range(trials):
        with env.source() as conn:
            mutate(conn)
        restart = _restart_in(spare_server, rng.uniform(0, duration))
        try:
            sync(f"doomed-{trial}")
            outcome = "finished"
        except (SyncError, psycopg.OperationalError) as error:
            outcome = type(error).__name__
        restart.join(120)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert sync(f"retry-{trial}").status == "applied"
        with env.source() as src, spare_server.connect(target_db) as tgt:
            problems = _problems(src, tgt, SPEC)
        record_fault_trial("target server restart", failed=bool(problems), detail=outcome)
        assert not problems, (trial, outcome, problems)
    engine.dispose()
    print(f"outcomes of the interrupted runs: {outcomes}")


# --------------------------------------------------------------------------- concurrent and stale runs


@_trials(4)
def test_two_runs_of_one_sync_at_once(env: SyncEnv, rng: random.Random, trials: int) -> None:
    """Both runs extract and load at the same moment: serialised by the state row, no deadlock, no error."""
    mutate = Mutator(rng)
    with env.source() as conn:
        _seed_orders(conn)
    statuses: dict[str, int] = {}
    for trial in range(trials + 1):  # the first trial races on creating the target and state tables
        if trial:
            with env.source() as conn:
                mutate(conn)
        results, errors, hung = _two_at_once(lambda name: env.sync(SPEC, run_id=name)[1].status, f"t{trial}")
        key = "+".join(sorted(results))
        statuses[key] = statuses.get(key, 0) + 1
        # A run that extracted from an older version is a no-op ("stale"); whatever it left for later
        # is the next run's: run once more, then compare.
        problems = [] if "applied" in results else ["neither run applied"]
        env.sync(SPEC, run_id=f"after-{trial}")
        with env.source() as src, env.target() as tgt:
            problems += _problems(src, tgt, SPEC)
        problems += [f"hung: {hung}"] if hung else []
        problems += [repr(e) for e in errors]
        record_fault_trial("two concurrent runs", failed=bool(problems), detail=key)
        assert not problems, (trial, results, problems)
    print(f"statuses of the concurrent pairs: {statuses}")


@_trials(4)
def test_stale_manifest_loaded_after_a_newer_run(
    env: SyncEnv, rng: random.Random, trials: int, caplog: pytest.LogCaptureFixture
) -> None:
    mutate = Mutator(rng)
    with env.source() as conn:
        _seed_orders(conn)
    env.sync(SPEC, run_id="first")
    for trial in range(trials):
        with env.source() as conn:
            mutate(conn)
        with env.target() as target:
            old = extract_for(env.source_engine, target, SPEC, staging=env.staging, run_id=f"old-{trial}")
        for newer in range(rng.randrange(1, 3)):
            with env.source() as conn:
                mutate(conn)
            env.sync(SPEC, run_id=f"newer-{trial}-{newer}")
        with env.target() as target:
            before = _target_snapshot(target, SPEC)
            caplog.clear()
            with caplog.at_level("WARNING"):
                result = load_manifest(target, old)
            after = _target_snapshot(target, SPEC)
        with env.source() as src, env.target() as tgt:
            problems = _problems(src, tgt, SPEC)
        logged = [r.getMessage() for r in caplog.records if "stale manifest" in r.getMessage()]
        if result.status != "stale" or after != before:
            problems.append(f"stale manifest was not a no-op: {result.status}")
        if not logged or old.manifest_id not in logged[0]:
            problems.append("no clear log line for the stale manifest")
        record_fault_trial("stale manifest", failed=bool(problems))
        assert not problems, (trial, problems)


# --------------------------------------------------------------------------- CDC


def _seed_stock(conn: psycopg.Connection[Any], rows: int = 2_000) -> None:
    conn.execute("CREATE TABLE stock (id bigint PRIMARY KEY, qty int NOT NULL, note text)")
    conn.execute("INSERT INTO stock SELECT g, g %% 100, md5(g::text) FROM generate_series(1, %s) g", (rows,))


class StockMutator:
    def __init__(self, rng: random.Random) -> None:
        self.rng, self.next_id = rng, 100_000

    def __call__(self, conn: psycopg.Connection[Any]) -> None:
        rng = self.rng
        for _ in range(rng.randrange(2, 5)):  # several transactions
            with conn.transaction():
                conn.execute(
                    "UPDATE stock SET qty = qty + 1 WHERE id %% %s = %s", (rng.choice([5, 7, 9]), rng.randrange(5))
                )
                count = rng.randrange(50, 300)
                conn.execute(
                    "INSERT INTO stock SELECT g, 1, 'new' FROM generate_series(%s, %s) g",
                    (self.next_id, self.next_id + count - 1),
                )
                self.next_id += count
                conn.execute("DELETE FROM stock WHERE id %% %s = %s", (rng.choice([31, 37]), rng.randrange(31)))


def _cdc_child(source_url: str, target_dsn: str, staging_uri: str, spec: CdcSpec, kill_phase: str | None) -> None:
    code = 1
    try:

        def observer(phase: str, facts: dict[str, Any]) -> None:
            if phase == kill_phase:
                os.kill(os.getpid(), signal.SIGKILL)

        engine = sa.create_engine(source_url, poolclass=sa.NullPool)
        with psycopg.connect(target_dsn) as target:
            run_cdc_sync(engine, target, spec, staging=StagingArea(staging_uri), run_id="child", observer=observer)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _cdc_problems(cdc: CdcEnv, spec: CdcSpec) -> list[str]:
    problems = []
    source, target = cdc.checksums("stock", ["id"])
    if source != target:
        problems.append(f"target {target} != source {source}")
    with cdc.env.target() as conn:
        state = read_state(conn, spec.target_schema, spec.state_table, spec.sync_id)
        assert state is not None
        versions = conn.execute(
            "SELECT state_version FROM _sync_audit WHERE sync_id = %s AND status = 'applied' ORDER BY 1",
            (spec.sync_id,),
        ).fetchall()
    if [v for (v,) in versions] != list(range(1, state.version + 1)):
        problems.append(f"state version {state.version} but applied loads {versions}")
    return problems


@_trials(8)
def test_sigkill_during_a_cdc_run(cdc: CdcEnv, rng: random.Random, trials: int) -> None:
    """A CDC run killed while reading the slot, applying, after its commit but before confirming the
    slot: the retry applies every change once (the LSN committed with the data filters replays)."""
    mutate = StockMutator(rng)
    spec = CdcSpec(sync_id="stock_cdc", tables=("stock",), batch_rows=500)
    with cdc.env.source() as conn:
        _seed_stock(conn)
    cdc.run(spec, run_id="snapshot")
    app = CHILD_APP + "-cdc"
    for trial in range(trials):
        with cdc.env.source() as conn:
            mutate(conn)
        kill_phase = rng.choice(["merged", "committed", None, None])
        child = FORK.Process(
            target=_cdc_child,
            args=(
                _with_app(cdc.env.source_url, app),
                _with_app(cdc.env.server.dsn(cdc.env.target_db), app),
                cdc.env.staging.base_uri,
                spec,
                kill_phase,
            ),
        )
        started = time.monotonic()
        child.start()
        if kill_phase is None:
            time.sleep(rng.uniform(0, 0.6))
            if child.is_alive():
                os.kill(child.pid or 0, signal.SIGKILL)
        child.join(60)
        assert child.exitcode is not None
        where = kill_phase or ("finished" if child.exitcode == 0 else f"at {time.monotonic() - started:.1f} s")
        _wait_for_backends_gone(cdc.env.server, app)
        cdc.run(spec, run_id=f"retry-{trial}")
        problems = _cdc_problems(cdc, spec)
        record_fault_trial("sigkill CDC run", failed=bool(problems), detail=kill_phase or "random time")
        assert not problems, (trial, where, problems)


@_trials(3)
def test_two_cdc_runs_at_once_and_a_stale_cdc_batch(
    cdc: CdcEnv, rng: random.Random, trials: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Two CDC runs of one sync at the same moment share the slot and the state row: no error, no
    deadlock, every change once; a batch read before a newer commit loads as a logged no-op."""
    mutate = StockMutator(rng)
    spec = CdcSpec(sync_id="stock_cdc", tables=("stock",), batch_rows=500)
    with cdc.env.source() as conn:
        _seed_stock(conn)
    cdc.run(spec, run_id="snapshot")
    for trial in range(trials):
        with cdc.env.source() as conn:
            mutate(conn)
        results, errors, hung = _two_at_once(lambda name: cdc.run(spec, run_id=name)[1].status, f"c{trial}")
        problems = [repr(e) for e in errors] + (["hung"] if hung else [])
        problems += [] if "applied" in results else [f"neither run applied: {results}"]

        # A batch staged now, loaded after a newer run committed: a no-op that says so.
        with cdc.env.source() as conn:
            mutate(conn)
        engine = cdc.env.source_engine
        with cdc.env.target() as target:
            old = changes_to_staging(
                engine, spec, state=committed_cdc_state(target, spec), staging=cdc.env.staging, run_id="old"
            )
        engine.dispose()
        cdc.run(spec, run_id=f"newer-{trial}")
        with cdc.env.target() as target:
            before = table_checksum(target, "stock", ["id", "qty", "note"], ["id"])
            caplog.clear()
            with caplog.at_level("INFO"):
                stale = load_cdc_manifest(target, old)
            after = table_checksum(target, "stock", ["id", "qty", "note"], ["id"])
        if stale.status not in ("stale", "already_applied") or after != before:
            problems.append(f"old CDC batch was not a no-op: {stale.status}")
        if not any(old.manifest_id in r.getMessage() for r in caplog.records):
            problems.append("no log line names the skipped CDC batch")
        problems += _cdc_problems(cdc, spec)
        record_fault_trial("two concurrent CDC runs", failed=bool(problems), detail="+".join(sorted(results)))
        record_fault_trial("stale CDC batch", failed=bool(problems), detail=stale.status)
        assert not problems, (trial, results, problems)


def test_cdc_slot_dropped_between_runs_is_a_clear_error(cdc: CdcEnv) -> None:
    """A dropped slot lost the changes in between: refuse with the recovery, never stream on silently;
    the documented recovery (reset the state row: a new initial snapshot) converges."""
    spec = CdcSpec(sync_id="stock_cdc", tables=("stock",))
    with cdc.env.source() as conn:
        _seed_stock(conn, rows=500)
    cdc.run(spec, run_id="snapshot")
    with cdc.env.source() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (spec.slot_name,))
        conn.execute("UPDATE stock SET qty = -1 WHERE id <= 10")
    with cdc.env.target() as conn:
        before = (
            table_checksum(conn, "stock", ["id", "qty", "note"], ["id"]),
            read_state(conn, "public", "_sync_state", spec.sync_id),
        )
    with pytest.raises(SchemaError, match=r"replication slot 'sync_stock_cdc' is missing.*new initial snapshot"):
        cdc.run(spec, run_id="after-drop")
    with cdc.env.target() as conn:
        after = (
            table_checksum(conn, "stock", ["id", "qty", "note"], ["id"]),
            read_state(conn, "public", "_sync_state", spec.sync_id),
        )
        assert after == before
        conn.execute("DELETE FROM _sync_state WHERE sync_id = %s", (spec.sync_id,))  # the documented reset
    cdc.run(spec, run_id="resnapshot")
    problems = [] if cdc.checksums("stock", ["id"])[0] == cdc.checksums("stock", ["id"])[1] else ["not converged"]
    record_fault_trial("CDC slot dropped", failed=bool(problems), detail="SchemaError, then reset + re-snapshot")
    assert not problems


def _spare_cdc_env(spare: LocalPostgres, name: str) -> tuple[str, sa.Engine]:
    db = spare.create_database(f"{name}_{os.getpid()}")
    return db, sa.create_engine(spare.url(db), poolclass=sa.NullPool)


def _drop_slots(server: LocalPostgres, db: str) -> None:
    with server.connect(db) as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (db,)).fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def test_cdc_slot_invalidated_by_max_slot_wal_keep_size_is_a_clear_error(
    env: SyncEnv, spare_server: LocalPostgres
) -> None:
    spec = CdcSpec(sync_id="inval", tables=("stock",))
    db, engine = _spare_cdc_env(spare_server, "invalidated")
    try:
        with spare_server.connect(db) as conn:
            _seed_stock(conn, rows=200)
        with env.target() as target:
            run_cdc_sync(engine, target, spec, staging=env.staging, run_id="snapshot")
        with spare_server.connect(db) as conn:
            conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
            conn.execute("SELECT pg_reload_conf()")
            time.sleep(0.3)
            for _ in range(4):  # more WAL than the slot may keep, then a checkpoint invalidates it
                conn.execute("UPDATE stock SET qty = qty + 1")
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            status = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (spec.slot_name,))
            assert status.fetchone() == ("lost",)
        with env.target() as target:
            before = read_state(target, "public", "_sync_state", spec.sync_id)
            with pytest.raises(SchemaError, match=r"replication slot 'sync_inval' was invalidated \(wal_status=lost\)"):
                run_cdc_sync(engine, target, spec, staging=env.staging, run_id="after")
            assert read_state(target, "public", "_sync_state", spec.sync_id) == before
        record_fault_trial("CDC slot invalidated", failed=False, detail="SchemaError (slot invalidated)")
    finally:
        with spare_server.connect() as conn:
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")
        _drop_slots(spare_server, db)
        engine.dispose()


@_trials(3)
def test_cdc_source_restarted_mid_stream(
    env: SyncEnv, spare_server: LocalPostgres, rng: random.Random, trials: int
) -> None:
    """The CDC source crashes while a run reads its slot: the run fails (or had finished); the retry,
    with the slot as the crash left it, applies every change exactly once."""
    spec = CdcSpec(sync_id="restart_cdc", tables=("stock",), batch_rows=1_000)
    db, engine = _spare_cdc_env(spare_server, "cdc_restart")
    mutate = StockMutator(rng)

    def run(run_id: str) -> Any:
        with env.target() as target:
            return run_cdc_sync(engine, target, spec, staging=env.staging, run_id=run_id)[1]

    def problems() -> list[str]:
        with spare_server.connect(db) as src, env.target() as tgt:
            columns = ["id", "qty", "note"]
            ok = table_checksum(src, "stock", columns, ["id"]) == table_checksum(tgt, "stock", columns, ["id"])
        return [] if ok else ["target != source"]

    try:
        with spare_server.connect(db) as conn:
            _seed_stock(conn)
        run("snapshot")
        outcomes: dict[str, int] = {}
        for trial in range(trials):
            with spare_server.connect(db) as conn:
                for _ in range(3):
                    mutate(conn)
            restart = _restart_in(spare_server, rng.uniform(0, 0.25))
            try:
                run(f"doomed-{trial}")
                outcome = "finished"
            except (SyncError, psycopg.OperationalError) as error:
                outcome = type(error).__name__
            restart.join(120)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            run(f"retry-{trial}")
            found = problems()
            record_fault_trial("CDC source restart", failed=bool(found), detail=outcome)
            assert not found, (trial, outcome, found)
        print(f"outcomes of the interrupted CDC runs: {outcomes}")
    finally:
        _drop_slots(spare_server, db)
        engine.dispose()
