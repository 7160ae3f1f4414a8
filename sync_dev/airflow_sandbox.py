"""Run the reference DAGs for real (``dag.test()``) against a throw-away Airflow home.

The demo and the end-to-end tests use it: a SQLite metadata database in a temporary
``AIRFLOW_HOME``, the repository's ``dags/`` folder (on ``sys.path``, as Airflow puts it),
connections and variables as ``AIRFLOW_CONN_*`` / ``AIRFLOW_VAR_*`` environment variables.  Each
run is a subprocess, so the DAG files are parsed the way the dag-processor parses them and each
run starts clean.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sync_dev import DAGS_FOLDER

# BundleDagBag, as the dag-processor and the task runner parse: it puts the DAG folder on sys.path,
# which is how the DAG files find their helper package, dags/case_studies.
_RUN_SCRIPT = """
import datetime as dt, json, pathlib, sys
from airflow.dag_processing.dagbag import BundleDagBag
bag = BundleDagBag(dag_folder=sys.argv[1], bundle_path=pathlib.Path(sys.argv[1]))
if bag.import_errors:
    errors = {k: str(v) for k, v in bag.import_errors.items()}
    print("RESULT=" + json.dumps({"state": "import_error", "tasks": {}, "errors": errors}))
    sys.exit(0)
dag = bag.get_dag(sys.argv[2])
run = dag.test(logical_date=dt.datetime.fromisoformat(sys.argv[3]), run_conf=json.loads(sys.argv[4]) or None)
states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
print("RESULT=" + json.dumps({"state": str(run.state), "tasks": states}))
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


class AirflowSandbox:
    """A temporary Airflow home with a migrated SQLite metadata database."""

    def __init__(self, home: Path, environment: Mapping[str, str], dags_folder: Path = DAGS_FOLDER) -> None:
        self.home = home
        self.dags_folder = dags_folder
        home.mkdir(parents=True, exist_ok=True)
        self.environment = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            **environment,
        }
        self.runs = 0

    def migrate(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{done.stderr[-3000:]}")

    def run_dag(
        self, dag_id: str, logical_date: dt.datetime, conf: Mapping[str, Any] | None = None, timeout: float = 900
    ) -> DagRunOutcome:
        """``dag.test()`` one run; its whole log goes to a file in the Airflow home."""
        self.runs += 1
        log_file = self.home / f"{self.runs:02d}-{dag_id}.log"
        started = time.monotonic()
        with log_file.open("w") as log:
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _RUN_SCRIPT,
                    str(self.dags_folder),
                    dag_id,
                    logical_date.isoformat(),
                    json.dumps(dict(conf or {})),
                ],
                env=self.environment,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                timeout=timeout,
            )
            log.write(done.stdout)
        seconds = time.monotonic() - started
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT=")]
        if not lines:
            return DagRunOutcome(dag_id, f"crashed (exit {done.returncode})", seconds, {}, log_file)
        result = json.loads(lines[-1].removeprefix("RESULT="))
        state = str(result["state"]).removeprefix("DagRunState.").lower()
        tasks = {k: str(v).removeprefix("TaskInstanceState.").lower() for k, v in result["tasks"].items()}
        return DagRunOutcome(dag_id, state, seconds, tasks, log_file)


__all__ = ["DAGS_FOLDER", "AirflowSandbox", "DagRunOutcome"]
