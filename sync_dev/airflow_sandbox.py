"""Run the reference DAGs for real (``dag.test()``) against a throw-away Airflow home.

The demo and the end-to-end tests use it: a SQLite metadata database in a temporary
``AIRFLOW_HOME``, the repository's ``dags/`` folder (on ``sys.path``, as Airflow puts it),
connections and variables as ``AIRFLOW_CONN_*`` / ``AIRFLOW_VAR_*`` environment variables.

Each run is its own process, so the DAG files are parsed the way the dag-processor parses them and
each run starts clean.  What made that slow was paid again and again: ``airflow db migrate`` (once
per sandbox: ~15 s) and, per run, importing Airflow, pandas, pyarrow and Great Expectations and
building the in-process Execution API that ``dag.test()`` runs tasks against (~20 s, over a minute
on a loaded 2-CPU machine).  So the metadata database is migrated once per process and copied into
each new home, and a runner process does the imports and that build once, then forks a child per
DAG run: the child starts from the same freshly imported, never-used state a new interpreter would
reach, takes exactly the sandbox's environment, parses the DAG folder, runs ``dag.test()`` and
exits.  A runner is leased to one sandbox at a time and handed to the next one that agrees on the
variables read at import time; its ``AIRFLOW_HOME`` is a symbolic link pointed at the lessee's home,
so each sandbox still has its own metadata database and logs.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import os
import selectors
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sync_dev import DAGS_FOLDER

#: Modules the runner imports before it forks: what a reference DAG run imports, the slow ones first.
#: Not the provider's own modules: they are quick to import and one reads ``SYNC_STAGING_DIR`` at
#: import, which is the sandbox's (see _RUNTIME_VARIABLES).
PRELOAD = (
    "airflow",
    "airflow.sdk",
    "airflow.dag_processing.dagbag",
    "airflow.dag_processing.bundles.manager",
    "airflow.models.dagrun",
    "airflow.serialization.serialized_objects",
    "airflow.sdk.execution_time.supervisor",
    "airflow.sdk.execution_time.task_runner",
    "airflow.sdk.definitions.decorators",
    "airflow.providers.standard.decorators.python",
    "airflow.providers.standard.operators.python",
    "airflow.providers.postgres.hooks.postgres",
    "pandas",
    "pyarrow.parquet",
    "sqlalchemy",
    "psycopg",
    "great_expectations",
)

# BundleDagBag, as the dag-processor and the task runner parse: it puts the DAG folder on sys.path,
# which is how the DAG files find their helper package, dags/case_studies.  ``run`` is what a child
# does; the loop around it imports PRELOAD once, then forks one child per request line on stdin and
# answers ``{"pid": ...}`` at the fork and ``{"status": ...}`` when the child is gone.  A child's
# stdout and stderr go to the run's log file, so the RESULT line is read from there.
_RUNNER_SCRIPT = """
import datetime as dt, importlib, json, os, pathlib, sys

def run(dags_folder, dag_id, logical_date, conf):
    from airflow.dag_processing.dagbag import BundleDagBag
    bag = BundleDagBag(dag_folder=dags_folder, bundle_path=pathlib.Path(dags_folder))
    if bag.import_errors:
        errors = {k: str(v) for k, v in bag.import_errors.items()}
        print("RESULT=" + json.dumps({"state": "import_error", "tasks": {}, "errors": errors}))
        return
    dag = bag.get_dag(dag_id)
    run = dag.test(logical_date=dt.datetime.fromisoformat(logical_date), run_conf=json.loads(conf) or None)
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    print("RESULT=" + json.dumps({"state": str(run.state), "tasks": states}))

def child(request):
    os.environ.clear()  # exactly the sandbox's environment, as a new process would get it
    os.environ.update(request["env"])
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 0
    try:
        run(request["dags_folder"], request["dag_id"], request["logical_date"], request["conf"])
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        import logging
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)

control = os.fdopen(os.dup(1), "w")  # replies; whatever an import prints goes to stderr
os.dup2(2, 1)
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
try:  # dag.test() runs each task against an in-process Execution API: build its app and have its
    # first request generate the versioned routes (cadwyn; tens of seconds on a loaded machine) once, here
    import asyncio, httpx
    from airflow.sdk.execution_time.supervisor import in_process_api_server
    app = in_process_api_server().app
    async def first_request():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://warm-up.invalid") as client:
            await client.get("/warm-up")
    asyncio.run(first_request())
except Exception:
    import traceback
    traceback.print_exc()
print(json.dumps({"ready": True}), file=control, flush=True)
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(request)
    print(json.dumps({"pid": pid}), file=control, flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), file=control, flush=True)
"""


@dataclass
class DagRunOutcome:
    dag_id: str
    state: str
    seconds: float
    tasks: dict[str, str] = field(default_factory=dict)
    log_file: Path | None = None

    @property
    def ok(self) -> bool:
        return self.state == "success"

    def failed_tasks(self) -> list[str]:
        return [task for task, state in self.tasks.items() if state != "success"]


# --------------------------------------------------------------------------- migrated metadata template


@dataclass
class _Template:
    home: Path
    migrate: subprocess.Popen[str]
    error: str | None = None

    @property
    def database(self) -> Path:
        return self.home / "airflow.db"


_template_lock = threading.Lock()
_template: _Template | None = None


def prepare_template() -> None:
    """Start ``airflow db migrate`` of the process's template metadata database in the background (a
    test session calls it at its start, so the migration overlaps with collection); returns at once."""
    global _template
    with _template_lock:
        if _template is not None:
            return
        home = Path(tempfile.mkdtemp(prefix="sync-airflow-template-"))
        environment = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        }
        migrate = subprocess.Popen(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _template = _Template(home, migrate)
        atexit.register(_discard_template, _template)


def _discard_template(template: _Template) -> None:
    if template.migrate.poll() is None:
        template.migrate.kill()
        template.migrate.communicate()
    shutil.rmtree(template.home, ignore_errors=True)


def _migrated_template() -> Path:
    """The template metadata database, migrated once per process: the schema does not depend on
    the home (connections and variables come from the environment)."""
    prepare_template()
    assert _template is not None
    with _template_lock:
        if _template.migrate.returncode is None:
            try:
                _, stderr = _template.migrate.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                _template.migrate.kill()
                _, stderr = _template.migrate.communicate()
            if _template.migrate.returncode != 0:
                _template.error = f"airflow db migrate failed:\n{stderr[-3000:]}"
    if _template.error:
        raise RuntimeError(_template.error)
    return _template.database


def _copy_database(source: Path, target: Path) -> None:
    """SQLite's online backup: a consistent copy even when the source still has a write-ahead log."""
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def copy_migrated_database(target: Path) -> None:
    """A migrated Airflow metadata database (SQLite) at ``target``, copied from this process's
    template: a new Airflow home without its own ``airflow db migrate`` (seconds saved per home)."""
    _copy_database(_migrated_template(), target)


# --------------------------------------------------------------------------- the forking runner


#: Variables read only while a DAG runs (connections, variables, the staging folder) or by no one
#: (pytest's): a runner is shared by sandboxes whose environments differ in these only.
_RUNTIME_VARIABLES = ("AIRFLOW_CONN_", "AIRFLOW_VAR_", "SYNC_STAGING_DIR", "PYTEST_CURRENT_TEST")
#: What the runner pins, pointing through its home link at the current sandbox's home.
_PINNED = ("AIRFLOW_HOME", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")


def _runner_key(environment: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted((k, v) for k, v in environment.items() if not k.startswith(_RUNTIME_VARIABLES) and k not in _PINNED)
    )


class _Runner:
    """A process that imports Airflow and the DAGs' libraries once, then forks a child per DAG run
    (see the module docstring).  It is leased to one sandbox at a time: its ``AIRFLOW_HOME`` is a
    symbolic link re-pointed at the lessee's home, so every run reads and writes that sandbox's own
    metadata database and logs, and each child gets exactly the sandbox's environment."""

    def __init__(self, environment: Mapping[str, str], home: Path) -> None:
        self.key = _runner_key(environment)
        self.root = Path(tempfile.mkdtemp(prefix="sync-airflow-runner-"))
        self.home_link = self.root / "home"
        self.lease(home)
        self.pinned = {
            "AIRFLOW_HOME": str(self.home_link),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home_link / 'airflow.db'}",
        }
        self.log_file = self.root / "runner.log"
        with self.log_file.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _RUNNER_SCRIPT, json.dumps(PRELOAD)],
                env={**environment, **self.pinned},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,  # a Ctrl-C of the caller does not reach it half-way
            )
        self._ready = False
        self.busy = False
        self._finalizer = weakref.finalize(self, _stop_runner, self.process, self.root)

    def lease(self, home: Path) -> None:
        """Point the runner's home at ``home`` (atomically: no run sees a missing home)."""
        fresh = self.root / "home.new"
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(home.resolve(), target_is_directory=True)
        os.replace(fresh, self.home_link)

    def alive(self) -> bool:
        return self.process.poll() is None

    def _reply(self, deadline: float) -> dict[str, Any]:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError
        line = stdout.readline()
        if not line:
            log = self.log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the Airflow runner process ended (exit {self.process.wait()}):\n{log}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def run(self, request: Mapping[str, Any], environment: Mapping[str, str], timeout: float) -> int:
        """Fork a child for ``request`` with ``environment``; its exit code (negative: killed by that signal)."""
        deadline = time.monotonic() + timeout
        if not self._ready:
            self._reply(time.monotonic() + 600)  # imports: minutes at worst on a loaded machine
            self._ready = True
        stdin = self.process.stdin
        assert stdin is not None
        self.busy = True  # until the child's status is read: an interrupted run leaves it set
        stdin.write(json.dumps({**request, "env": {**environment, **self.pinned}}) + "\n")
        stdin.flush()
        pid = int(self._reply(deadline)["pid"])
        try:
            status = int(self._reply(deadline)["status"])
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._reply(time.monotonic() + 60)
            raise subprocess.TimeoutExpired(f"dag.test() in child {pid}", timeout) from None
        self.busy = False
        return status

    def close(self) -> None:
        self._finalizer()


def _stop_runner(process: subprocess.Popen[str], root: Path) -> None:
    """Its children are gone (each run waits for its child), so nothing is lost: no slow interpreter exit."""
    process.kill()
    process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()
    shutil.rmtree(root, ignore_errors=True)


_idle_lock = threading.Lock()
_idle_runners: list[_Runner] = []


def _lease_runner(environment: Mapping[str, str], home: Path) -> _Runner:
    """An idle runner started for the same import-time environment, else a new one."""
    key = _runner_key(environment)
    with _idle_lock:
        for runner in [r for r in _idle_runners if not r.alive()]:
            _idle_runners.remove(runner)
            runner.close()
        for runner in _idle_runners:
            if runner.key == key:
                _idle_runners.remove(runner)
                runner.lease(home)
                return runner
    return _Runner(environment, home)


def _return_runner(runner: _Runner) -> None:
    with _idle_lock:
        if runner.alive() and not runner.busy:
            _idle_runners.append(runner)
        else:
            runner.close()


def _sandbox_environment(home: Path, environment: Mapping[str, str], dags_folder: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        **environment,
    }


def prepare(dags_folder: Path = DAGS_FOLDER) -> None:
    """Start, in the background, the template migration and an idle runner for sandboxes on
    ``dags_folder`` whose environment adds run-time variables only (a test session calls it at its
    start: both then overlap with collection); returns at once."""
    prepare_template()
    placeholder = Path(tempfile.mkdtemp(prefix="sync-airflow-idle-"))
    atexit.register(shutil.rmtree, placeholder, ignore_errors=True)
    runner = _Runner(_sandbox_environment(placeholder, {}, dags_folder), placeholder)
    with _idle_lock:
        _idle_runners.append(runner)


class AirflowSandbox:
    """A temporary Airflow home with a migrated SQLite metadata database."""

    def __init__(self, home: Path, environment: Mapping[str, str], dags_folder: Path = DAGS_FOLDER) -> None:
        self.home = home
        self.dags_folder = dags_folder
        home.mkdir(parents=True, exist_ok=True)
        self.environment = _sandbox_environment(home, environment, dags_folder)
        self.runs = 0
        self._runner: _Runner | None = None

    def migrate(self) -> None:
        """Give the home a migrated metadata database (a copy of the process's template) and lease a
        runner: a new one's imports then overlap with whatever the caller does before the first run."""
        copy_migrated_database(self.home / "airflow.db")
        self._lease()

    def _lease(self) -> _Runner:
        if self._runner is not None and not self._runner.alive():
            self._runner.close()
            self._runner = None
        if self._runner is None:
            self._runner = _lease_runner(self.environment, self.home)
        return self._runner

    def close(self) -> None:
        """Give the runner back for the next sandbox (a runner left leased is stopped at exit)."""
        if self._runner is not None:
            _return_runner(self._runner)
            self._runner = None

    def __enter__(self) -> AirflowSandbox:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def run_dag(
        self, dag_id: str, logical_date: dt.datetime, conf: Mapping[str, Any] | None = None, timeout: float = 900
    ) -> DagRunOutcome:
        """``dag.test()`` one run in a fresh child process; its whole log goes to a file in the home."""
        self.runs += 1
        log_file = self.home / f"{self.runs:02d}-{dag_id}.log"
        started = time.monotonic()
        request = {
            "log": str(log_file),
            "dags_folder": str(self.dags_folder),
            "dag_id": dag_id,
            "logical_date": logical_date.isoformat(),
            "conf": json.dumps(dict(conf or {})),
        }
        exit_code = self._lease().run(request, self.environment, timeout)
        seconds = time.monotonic() - started
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.startswith("RESULT=")]
        if not lines:
            return DagRunOutcome(dag_id, f"crashed (exit {exit_code})", seconds, {}, log_file)
        result = json.loads(lines[-1].removeprefix("RESULT="))
        state = str(result["state"]).removeprefix("DagRunState.").lower()
        tasks = {k: str(v).removeprefix("TaskInstanceState.").lower() for k, v in result["tasks"].items()}
        return DagRunOutcome(dag_id, state, seconds, tasks, log_file)


__all__ = ["DAGS_FOLDER", "AirflowSandbox", "DagRunOutcome", "copy_migrated_database"]
