"""A real Airflow cluster on this machine: CeleryExecutor, several workers, staging on S3 (moto).

What the cluster test (``tests/cluster``) and anyone reproducing it by hand start, as separate
processes, each in its own process group so it can be stopped (or SIGKILLed, like a lost machine)
alone:

* :class:`MotoS3` - ``moto_server`` on a free localhost port: an S3-compatible store over HTTP, and
  the Airflow ``aws`` connection that points at it (:meth:`MotoS3.airflow_connection`);
* :class:`CeleryCluster` - ``airflow db migrate`` on a PostgreSQL metadata database, then the
  api-server (the Task SDK's execution API: Airflow 3 workers talk to it, not to the database),
  scheduler, dag-processor, triggerer and N ``airflow celery worker`` processes.  Each worker has
  its own ``AIRFLOW_HOME``, ``HOME``, working directory and staging folder (no shared local disk)
  and its own host name (:func:`worker_hostname`, ``[core] hostname_callable``), which Airflow
  records as ``TaskInstance.hostname``.  Each worker imports what the reference DAGs' tasks import
  once, before its pool forks (:data:`WORKER_PRELOAD`, through its ``airflow_local_settings.py``);
  ``retry_delay`` sets every task's delay between tries by a cluster policy.

The broker is Redis (``redis://127.0.0.1:6379/<db>``): a dedicated database number and a key
prefix (``[celery_broker_transport_options] global_keyprefix``) keep one cluster's queues apart
from anything else on the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg

from sync_dev import DAGS_FOLDER, REPO_ROOT
from sync_dev.airflow_sandbox import PRELOAD
from sync_dev.local_postgres import LocalPostgres, free_port

BIN = Path(sys.executable).parent
#: Environment variable a worker's host name comes from (see :func:`worker_hostname`).
HOSTNAME_VARIABLE = "SYNC_WORKER_HOSTNAME"
#: What the reference DAGs' tasks import (the dag.test() runner's list, plus S3 staging): a worker
#: imports it once, before its pool forks, so each task process inherits it instead of importing it
#: again (on a loaded 2-CPU machine the bank DAG's first tasks took 15-22 s each, later ones 4-8 s;
#: with the preload 1-5 s).  Airflow's own worker does the same for a few modules
#: (``on_celery_import_modules``); this goes through Celery's signal too.
WORKER_PRELOAD = (*PRELOAD, "pyarrow.fs", "boto3", "airflow.providers.amazon.aws.hooks.base_aws")
#: ``airflow_local_settings.py`` (Airflow imports it in every process of the home it is in): the
#: preload of a worker, connected to its Celery ``import_modules`` signal...
PRELOAD_SETTINGS = """
import importlib

from celery.signals import import_modules

PRELOAD = {modules!r}


def _preload(**_: object) -> None:
    for name in PRELOAD:
        importlib.import_module(name)  # a failure is logged by Celery's signal and costs only speed


import_modules.connect(_preload, weak=False)
"""
#: ...and the cluster policy that sets every task's ``retry_delay`` (see ``CeleryCluster.retry_delay``).
RETRY_DELAY_POLICY = """
import datetime


def task_policy(task: object) -> None:
    task.retry_delay = datetime.timedelta(seconds={seconds!r})  # type: ignore[attr-defined]
"""


def _write_local_settings(home: Path, *, preload: bool, retry_delay: float | None) -> None:
    """``home/config/airflow_local_settings.py`` with what this process home needs (nothing: no file)."""
    parts = [PRELOAD_SETTINGS.format(modules=list(WORKER_PRELOAD))] if preload else []
    if retry_delay is not None:
        parts.append(RETRY_DELAY_POLICY.format(seconds=retry_delay))
    if parts:
        (home / "config").mkdir(parents=True, exist_ok=True)
        policies = '["task_policy"]' if retry_delay is not None else "[]"
        header = f"# Written by sync_dev.cluster.\n__all__ = {policies}  # the cluster policies defined here\n"
        (home / "config" / "airflow_local_settings.py").write_text(header + "".join(parts))


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the cluster's processes: ``$SYNC_WORKER_HOSTNAME``, else the FQDN.

    Workers on one machine would all record the same host name; each gets its own here.
    """
    return os.environ.get(HOSTNAME_VARIABLE) or socket.getfqdn()


def redis_available(host: str = "127.0.0.1", port: int = 6379, timeout: float = 2.0) -> bool:
    """Whether a Redis server answers PING at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait(condition: Any, what: str, timeout: float, every: float = 0.5, process: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status < 500)
    except OSError:
        return False


def _stop_groups(processes: list[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    """SIGTERM to each process group at once, SIGKILL to what is left of them after ``timeout``."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.1, deadline - time.monotonic()))
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)


class MotoS3:
    """``moto_server`` on a free port of 127.0.0.1 (in memory: stopping it loses every object)."""

    ACCESS_KEY = "cluster-test-key"
    SECRET_KEY = "cluster-test-secret"  # moto accepts any credentials
    REGION = "us-east-1"

    def __init__(self, log_dir: Path, *, wait: bool = True) -> None:
        """Start the server; ``wait``: until it answers (else call :meth:`wait_ready` before using it)."""
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = (log_dir / "moto.log").open("wb")
        self.process = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        try:
            _wait(lambda: _http_ok(f"{self.endpoint}/moto-api/"), "moto_server", 60, process=self.process)
        except BaseException:
            self.stop()
            raise

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            region_name=self.REGION,
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (directory markers included)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def airflow_connection(self) -> str:
        """An ``aws`` connection (``AIRFLOW_CONN_<ID>`` JSON) with this server as ``endpoint_url``."""
        return json.dumps(
            {
                "conn_type": "aws",
                "login": self.ACCESS_KEY,
                "password": self.SECRET_KEY,
                "extra": {"endpoint_url": self.endpoint, "region_name": self.REGION},
            }
        )

    def stop(self) -> None:
        _stop_groups([self.process], timeout=5)
        self.log.close()


@contextlib.contextmanager
def moto_s3(log_dir: Path, *, wait: bool = True) -> Iterator[MotoS3]:
    server = MotoS3(log_dir, wait=wait)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Worker:
    """One ``airflow celery worker`` with its own home, working directory and host name."""

    name: str
    home: Path
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def ready(self) -> bool:
        """Whether Celery has logged the worker ready (consuming from the broker)."""
        text = Path(self.log.name).read_text(errors="replace")
        return re.search(rf"{re.escape(self.name)}@\S+ ready\.", text) is not None


@dataclass
class CeleryCluster:
    """Airflow on CeleryExecutor: one metadata database, the control processes and ``workers`` workers.

    ``environment``: what every process gets on top of the cluster's own settings (connections,
    variables, ``AIRFLOW__SYNC__STAGING_URI``...).  ``retry_delay``: seconds between a task's tries,
    for every task (a cluster policy, ``task_policy`` in ``airflow_local_settings``); ``None`` keeps
    the DAGs' own.  Call :meth:`start`, then :meth:`stop` (or use :func:`celery_cluster`).
    """

    server: LocalPostgres
    root: Path
    environment: Mapping[str, str] = field(default_factory=dict)
    workers: int = 2
    concurrency: int = 2
    redis_url: str = "redis://127.0.0.1:6379/13"
    retry_delay: float | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    worker_processes: dict[str, Worker] = field(default_factory=dict, init=False)
    _logs: list[IO[bytes]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.api_port = free_port()
        self.meta_db = "airflow_meta"
        self.key_prefix = f"sync-cluster-{uuid.uuid4().hex[:8]}-"
        self.control_home = self.root / "control"
        self.control_home.mkdir(parents=True, exist_ok=True)
        _write_local_settings(self.control_home, preload=False, retry_delay=self.retry_delay)
        self.base_environment = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
            **self.environment,
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "sync_dev.cluster.worker_hostname",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.api_port}/execution/",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": f"cluster-test-{uuid.uuid4().hex}",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.server.url(self.meta_db),
            "AIRFLOW__CELERY__BROKER_URL": self.redis_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.server.url(self.meta_db, driver="postgresql"),
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": self.key_prefix,
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "3600",
            # a lost worker's running tasks fail (and retry) after this many seconds without a heartbeat
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",  # a busy 2-CPU machine answers slowly
            # ...and parses slowly: a task that cannot parse its DAG file in time is rescheduled (a minute lost)
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "300",
            "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "300",
            # parse the DAG files once (they do not change during a test), not every 30 s
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    # -- processes -------------------------------------------------------------------------------

    def _env(self, home: Path, **extra: str) -> dict[str, str]:
        return {**self.base_environment, "AIRFLOW_HOME": str(home), **extra}

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("wb")
        self._logs.append(log)
        return subprocess.Popen(
            [str(BIN / "airflow"), *args],
            env=dict(env),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stopping (or killing) it takes its children too
        )

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """An ``airflow`` CLI command with the control processes' settings."""
        return subprocess.run(
            [str(BIN / "airflow"), *args],
            env=self._env(self.control_home),
            cwd=self.control_home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> None:
        """Migrate the metadata database, start every process, return once the api-server answers and
        every worker is ready.  The workers start first: they do not use the metadata database until
        a task arrives, so their start (imports, preload) overlaps with the migration."""
        with self.server.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.meta_db}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{self.meta_db}"')
        for number in range(1, self.workers + 1):
            self.start_worker(f"worker-{number}")
        migrated = self.cli("db", "migrate", timeout=600)
        if migrated.returncode:
            raise RuntimeError(f"airflow db migrate failed:\n{migrated.stdout[-3000:]}\n{migrated.stderr[-3000:]}")
        env = self._env(self.control_home)
        for name, args in {
            "api-server": ["api-server"],
            "scheduler": ["scheduler"],
            "dag-processor": ["dag-processor"],
            "triggerer": ["triggerer"],
        }.items():
            self.processes[name] = self._spawn(name, args, env, self.control_home)
        _wait(
            lambda: _http_ok(f"http://127.0.0.1:{self.api_port}/api/v2/version"),
            "api-server",
            180,
            process=self.processes["api-server"],
        )
        _wait(self._workers_ready, "workers ready", 180)

    def _workers_ready(self) -> bool:
        dead = [worker.name for worker in self.worker_processes.values() if not worker.alive]
        if dead:
            raise RuntimeError(f"worker(s) exited: {', '.join(dead)} (logs in {self.root})")
        return all(worker.ready for worker in self.worker_processes.values())

    def start_worker(self, name: str) -> Worker:
        """A worker in its own folder: ``AIRFLOW_HOME``, ``HOME``, working directory, staging folder."""
        home = self.root / name
        (home / "home").mkdir(parents=True, exist_ok=True)
        _write_local_settings(home, preload=True, retry_delay=self.retry_delay)
        env = self._env(
            home,
            HOME=str(home / "home"),
            SYNC_STAGING_DIR=str(home / "staging"),
            **{HOSTNAME_VARIABLE: name},
        )
        process = self._spawn(
            name,
            [
                "celery",
                "worker",
                "--concurrency",
                str(self.concurrency),
                "--celery-hostname",
                f"{name}@%h",
                "--skip-serve-logs",  # the log server's fixed port would clash between workers
                "--without-mingle",
                "--without-gossip",
            ],
            env,
            home,
        )
        worker = Worker(name, home, process, self._logs[-1])
        self.worker_processes[name] = worker
        return worker

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL a worker and every process it forked, like a lost machine; returns their pids.

        Its whole tree, not only its group: the Task SDK puts each task process in a group of its own.
        """
        import psutil

        worker = self.worker_processes[name]
        try:
            root = psutil.Process(worker.process.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        worker.process.wait(30)
        psutil.wait_procs(tree, timeout=30)
        return [process.pid for process in tree]

    def stop(self) -> None:
        """Every process at once: the cluster is thrown away, so no worker needs the control processes to finish."""
        processes = [*(worker.process for worker in self.worker_processes.values()), *self.processes.values()]
        _stop_groups(processes, timeout=5)
        for log in self._logs:
            log.close()
        self._purge_broker()
        with self.server.connect() as admin:  # the server may outlive the cluster (a test suite's)
            admin.execute(f'DROP DATABASE IF EXISTS "{self.meta_db}" WITH (FORCE)')

    def _purge_broker(self) -> None:
        """Remove this cluster's keys from Redis (best effort: its database may be shared)."""
        with contextlib.suppress(Exception):
            import redis

            client = redis.Redis.from_url(self.redis_url)
            keys = list(client.scan_iter(match=f"{self.key_prefix}*"))
            if keys:
                client.delete(*keys)

    # -- metadata ----------------------------------------------------------------------------------

    def meta(self) -> psycopg.Connection[Any]:
        return self.server.connect(self.meta_db)

    def wait_dag(self, dag_id: str, timeout: float = 180) -> None:
        """Until the dag-processor has stored ``dag_id``."""

        def stored() -> bool:
            with self.meta() as conn:
                return conn.execute("SELECT 1 FROM dag WHERE dag_id = %s", (dag_id,)).fetchone() is not None

        _wait(stored, f"DAG {dag_id} parsed", timeout, process=self.processes["dag-processor"])

    def trigger(self, dag_id: str, run_id: str, conf: Mapping[str, Any] | None = None) -> None:
        args = ["dags", "trigger", dag_id, "--run-id", run_id]
        if conf:
            args += ["--conf", json.dumps(dict(conf))]
        done = self.cli(*args)
        if done.returncode:
            raise RuntimeError(f"airflow dags trigger {dag_id} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def unpause(self, dag_id: str) -> None:
        with self.meta() as conn:
            conn.execute("UPDATE dag SET is_paused = false WHERE dag_id = %s", (dag_id,))

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        with self.meta() as conn:
            row = conn.execute(
                "SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id)
            ).fetchone()
        return None if row is None else str(row[0])

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        """Until the run is finished; returns its state (``success`` or ``failed``)."""

        def finished() -> bool:
            self.check_alive()
            return self.run_state(dag_id, run_id) in ("success", "failed")

        _wait(finished, f"run {dag_id}/{run_id}", timeout)
        return str(self.run_state(dag_id, run_id))

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        """``{task_id: {state, hostname, try_number}}`` of one run."""
        with self.meta() as conn:
            rows = conn.execute(
                "SELECT task_id, state, hostname, try_number FROM task_instance "
                "WHERE dag_id = %s AND run_id = %s AND map_index = -1",
                (dag_id, run_id),
            ).fetchall()
        return {task: {"state": state, "hostname": host, "try_number": tries} for task, state, host, tries in rows}

    def tries(self, dag_id: str, run_id: str, task_id: str) -> list[tuple[int, str | None, str | None]]:
        """Every try of one task: ``(try_number, state, hostname)``, the history and the current one."""
        query = (
            "SELECT try_number, state, hostname FROM task_instance_history "
            "WHERE dag_id = %(d)s AND run_id = %(r)s AND task_id = %(t)s "
            "UNION ALL SELECT try_number, state, hostname FROM task_instance "
            "WHERE dag_id = %(d)s AND run_id = %(r)s AND task_id = %(t)s ORDER BY 1"
        )
        with self.meta() as conn:
            rows = conn.execute(query, {"d": dag_id, "r": run_id, "t": task_id}).fetchall()
        return [(int(tries), state, host) for tries, state, host in rows]

    def check_alive(self) -> None:
        dead = [name for name, process in self.processes.items() if process.poll() is not None]
        if dead:
            raise RuntimeError(f"cluster process(es) exited: {', '.join(dead)} (logs in {self.root})")

    def log_tail(self, name: str, lines: int = 60) -> str:
        path = self.root / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@contextlib.contextmanager
def celery_cluster(server: LocalPostgres, root: Path, **options: Any) -> Iterator[CeleryCluster]:
    cluster = CeleryCluster(server, root, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def celery_provider_installed() -> bool:
    """Whether ``airflow celery worker`` exists here (the celery provider and its ``celery`` package)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("celery", "airflow.providers.celery"))


__all__ = [
    "CeleryCluster",
    "MotoS3",
    "Worker",
    "celery_cluster",
    "celery_provider_installed",
    "moto_s3",
    "redis_available",
    "worker_hostname",
]
