"""Test harness: one real PostgreSQL server (wal_level=logical) for the whole session, started by
the suite itself, and a fresh pair of source/target databases for every test that asks for one.
"""

from __future__ import annotations

import itertools
import os
import tempfile

# Airflow reads its home at import time: give the session its own, away from ~/airflow.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="sync-tests-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from airflow_sync_provider.core import StagingArea, SyncSpec, run_sync
from airflow_sync_provider.core.cdc import CdcLoadResult, CdcManifest, CdcSpec, run_cdc_sync
from airflow_sync_provider.core.cdc import slot as cdc_slot
from airflow_sync_provider.core.cdc.extract import open_source
from airflow_sync_provider.core.load import LoadResult
from airflow_sync_provider.core.manifest import Manifest
from sync_dev.local_postgres import LocalPostgres, local_postgres

if TYPE_CHECKING:
    from sync_dev.airflow_sandbox import AirflowSandbox

_counter = itertools.count()


def pytest_sessionstart(session: pytest.Session) -> None:
    """When the run includes a test file that runs DAGs (one that uses ``AirflowSandbox``), migrate the
    Airflow template metadata database and start a DAG runner in the background now, so that both
    overlap with collection (see sync_dev.airflow_sandbox)."""
    from sync_dev.airflow_sandbox import prepare

    config = session.config
    if "not airflow" in (config.option.markexpr or ""):
        return
    for arg in config.args:
        path = (config.invocation_params.dir / arg.split("::")[0]).resolve()
        files = path.rglob("test_*.py") if path.is_dir() else [path]
        if any(file.is_file() and "AirflowSandbox" in file.read_text(errors="replace") for file in files):
            prepare()
            return


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """The suite's own PostgreSQL server, stopped and deleted at the end of the session."""
    with local_postgres(tmp_path_factory.mktemp("pg") / "data") as server:
        yield server


@dataclass
class SyncEnv:
    """A source and a target database on the test server, plus helpers to sync and compare."""

    server: LocalPostgres
    source_db: str
    target_db: str
    staging: StagingArea

    @property
    def source_engine(self) -> sa.Engine:
        return sa.create_engine(self.server.url(self.source_db), poolclass=sa.NullPool)

    @property
    def source_url(self) -> str:
        return self.server.url(self.source_db)

    @property
    def target_url(self) -> str:
        return self.server.url(self.target_db)

    def source(self, autocommit: bool = True) -> psycopg.Connection[Any]:
        return self.server.connect(self.source_db, autocommit=autocommit)

    def target(self, autocommit: bool = True) -> psycopg.Connection[Any]:
        return self.server.connect(self.target_db, autocommit=autocommit)

    def sync(self, spec: SyncSpec, **kwargs: Any) -> tuple[Manifest, LoadResult]:
        engine = self.source_engine
        try:
            with self.target() as target:
                return run_sync(engine, target, spec, staging=self.staging, **kwargs)
        finally:
            engine.dispose()

    def state(self, sync_id: str, schema: str = "public") -> tuple[Any, ...] | None:
        with self.target() as conn:
            exists = conn.execute("SELECT to_regclass(%s)", (f"{schema}._sync_state",)).fetchone()
            if not exists or exists[0] is None:
                return None
            return conn.execute(
                sql.SQL("SELECT version, watermark, last_manifest_id FROM {} WHERE sync_id = %s").format(
                    sql.Identifier(schema, "_sync_state")
                ),
                (sync_id,),
            ).fetchone()


def airflow_orders(env: SyncEnv, monkeypatch: pytest.MonkeyPatch, rows: int) -> SyncEnv:
    """``sync_source`` / ``sync_target`` Airflow connections pointing at the test databases (and the
    staging folder), and a source ``orders`` table of ``rows`` rows."""
    port = env.server.port
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_SOURCE", f"postgres://postgres@127.0.0.1:{port}/{env.source_db}")
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_TARGET", f"postgres://postgres@127.0.0.1:{port}/{env.target_db}")
    monkeypatch.setenv("SYNC_STAGING_DIR", str(Path(env.staging.base_uri.removeprefix("file://"))))
    make_orders(env, rows)
    return env


def make_orders(env: SyncEnv, rows: int = 1_000) -> None:
    """A source ``orders`` table of ``rows`` rows (ids 1..rows, quantity ``id % 7``, price 9.99)."""
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text, quantity int, unit_price numeric(10,2), "
            "updated_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO orders (id, customer, quantity, unit_price) "
            "SELECT g, 'customer ' || g, g %% 7, 9.99 FROM generate_series(1, %s) g",
            (rows,),
        )


def table_checksum(
    conn: psycopg.Connection[Any], table: str, columns: list[str], key: list[str], schema: str = "public"
) -> tuple[int, str]:
    """(row count, md5 of every row's text rendering in key order): equal iff the tables are equal."""
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), md5(coalesce(string_agg(({cols})::text, E'\\n' ORDER BY {key}), '')) FROM {t}"
        ).format(
            cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
            key=sql.SQL(", ").join(map(sql.Identifier, key)),
            t=sql.Identifier(schema, table),
        )
    ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def source_columns(conn: psycopg.Connection[Any], table: str, schema: str = "public") -> list[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
        "ORDER BY ordinal_position",
        (schema, table),
    ).fetchall()
    return [r[0] for r in rows]


@pytest.fixture
def env(pg_server: LocalPostgres, tmp_path: Path) -> Iterator[SyncEnv]:
    """Two new, empty databases (names unique in the session), dropped afterwards.  FILE_COPY copies
    the small template's files instead of WAL-logging every page: ~2x faster with fsync off."""
    n = next(_counter)
    source_db, target_db = f"src_{os.getpid()}_{n}", f"tgt_{os.getpid()}_{n}"
    with pg_server.connect() as conn:
        for db in (source_db, target_db):
            conn.execute(sql.SQL("CREATE DATABASE {} STRATEGY FILE_COPY").format(sql.Identifier(db)))
    yield SyncEnv(pg_server, source_db, target_db, StagingArea(tmp_path / "staging"))
    with pg_server.connect() as conn:
        for db in (source_db, target_db):
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))


def mariadb_url() -> str | None:
    """SQLAlchemy URL of the local MariaDB test database, or None when it is not reachable."""
    try:
        import pymysql
    except ImportError:
        return None
    host = os.environ.get("SYNC_TEST_MYSQL_HOST", "127.0.0.1")
    port = int(os.environ.get("SYNC_TEST_MYSQL_PORT", "3306"))
    try:
        pymysql.connect(host=host, port=port, user="root", password="", connect_timeout=2).close()
    except pymysql.Error:
        return None
    return f"mysql+pymysql://root@{host}:{port}"


@dataclass
class CdcEnv:
    env: SyncEnv

    def run(self, spec: CdcSpec, **kwargs: Any) -> tuple[CdcManifest, CdcLoadResult]:
        engine = self.env.source_engine
        try:
            with self.env.target() as target:
                return run_cdc_sync(engine, target, spec, staging=self.env.staging, **kwargs)
        finally:
            engine.dispose()

    def checksums(self, table: str, key: list[str]) -> tuple[tuple[int, str], tuple[int, str]]:
        with self.env.source() as src, self.env.target() as tgt:
            columns = source_columns(src, table)
            return table_checksum(src, table, columns, key), table_checksum(tgt, table, columns, key)

    def assert_converged(self, table: str, key: list[str]) -> int:
        source, target = self.checksums(table, key)
        assert target == source, f"{table}: target {target} != source {source}"
        return source[0]

    def slot(self, spec: CdcSpec) -> cdc_slot.SlotInfo:
        engine = self.env.source_engine
        try:
            with closing(open_source(engine, spec.sync_id)) as conn:
                return cdc_slot.slot_info(conn, spec.slot_name)
        finally:
            engine.dispose()


@pytest.fixture
def cdc(env: SyncEnv) -> Iterator[CdcEnv]:
    yield CdcEnv(env)
    with env.source() as conn:  # a database with a replication slot cannot be dropped
        for (name,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
        ).fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))


# --------------------------------------------------------------------------- fault-injection tally

#: Per fault class: trials run and trials that ended with a lost or duplicated row (or an
#: inconsistent state), filled by ``tests/faults/test_faults.py`` and written to ``tests/.fault_summary.json``.
FAULT_TALLY: dict[str, dict[str, Any]] = {}
FAULT_SUMMARY_PATH = Path(__file__).parent / ".fault_summary.json"


def record_fault_trial(fault: str, *, failed: bool, detail: str | None = None) -> None:
    """Count one trial of a fault class (``failed``: a row was lost or duplicated, or state is wrong)."""
    tally = FAULT_TALLY.setdefault(fault, {"trials": 0, "failures": 0, "details": {}})
    tally["trials"] += 1
    tally["failures"] += int(failed)
    if detail:
        tally["details"][detail] = tally["details"].get(detail, 0) + 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FAULT_TALLY:
        return
    import json

    FAULT_SUMMARY_PATH.write_text(json.dumps(FAULT_TALLY, indent=2, sort_keys=True) + "\n")
    terminalreporter.write_sep("-", "fault injection: trials / trials with lost or duplicated rows")
    for fault, tally in sorted(FAULT_TALLY.items()):
        details = ", ".join(f"{k}: {v}" for k, v in sorted(tally["details"].items()))
        terminalreporter.write_line(
            f"{fault:<28} {tally['trials']:>4} trials {tally['failures']:>3} failed"
            + (f"  ({details})" if details else "")
        )
    terminalreporter.write_line(f"(written to {FAULT_SUMMARY_PATH})")


@contextmanager
def case_study_systems(
    server: LocalPostgres,
    home: Path,
    *,
    prefix: str,
    token_key: str,
    extra_databases: Sequence[str] = (),
    environment: Mapping[str, str] | None = None,
) -> Iterator[tuple[AirflowSandbox, dict[str, str]]]:
    """The case studies' databases (plus ``extra_databases``) on the test server and a migrated Airflow
    sandbox whose connections point at them; drops the databases and their CDC slots afterwards."""
    from case_studies import databases
    from sync_dev.airflow_sandbox import AirflowSandbox

    with server.connect() as admin:
        databases.create_databases(admin, prefix)
        for name in extra_databases:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(prefix + name)))
    uris = databases.connection_uris("127.0.0.1", server.port, prefix=prefix)
    extra = {name: f"postgresql://postgres@127.0.0.1:{server.port}/{prefix + name}" for name in extra_databases}
    box = AirflowSandbox(
        home / "airflow",
        {
            **databases.airflow_environment(uris),
            "AIRFLOW_VAR_SYNC_TOKEN_KEY": token_key,
            "SYNC_STAGING_DIR": str(home / "staging"),
            **(environment or {}),
        },
    )
    try:
        box.migrate()
        yield box, {**uris, **extra}
    finally:
        box.close()
        for system in databases.ALL_SYSTEMS:  # CDC slots are server-wide: never leave one behind
            with databases.connect(uris[system]) as conn:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE database = current_database()"
                )
        with server.connect() as admin:
            for system in (*databases.ALL_SYSTEMS, *extra_databases):
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(prefix + system))
                )
