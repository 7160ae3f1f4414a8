"""Developer tools of this repository, not part of the provider (the wheel does not ship them).

* :mod:`sync_dev.local_postgres` - a throw-away PostgreSQL (``wal_level=logical``) for the tests,
  the demo and the benchmarks;
* :mod:`sync_dev.demo` - ``make demo``; :mod:`sync_dev.case_study_demo` - its case-study part;
* :mod:`sync_dev.standalone` - ``make ui`` (``airflow standalone`` with the reference DAGs);
* :mod:`sync_dev.airflow_sandbox` - runs the reference DAGs with ``dag.test()`` in a throw-away
  Airflow home (the demo and the end-to-end tests).

The case studies' own code (schemas, generators, simulators, checks) lives beside the DAGs that
import it, in ``dags/case_studies/``: Airflow puts the DAG folder on ``sys.path`` when it parses a
DAG file or runs a task, so that package travels with the DAGs (e.g. the ``dags/`` mount of
docker-compose).  Importing this package puts ``dags/`` on ``sys.path`` the same way, so the
tools here can import ``case_studies`` too.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGS_FOLDER = REPO_ROOT / "dags"

if str(DAGS_FOLDER) not in sys.path:
    sys.path.append(str(DAGS_FOLDER))  # appended, as Airflow's BundleDagBag does

__all__ = ["DAGS_FOLDER", "REPO_ROOT"]
