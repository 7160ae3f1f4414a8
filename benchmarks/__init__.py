"""Benchmarks of the provider against its peers and under the real scheduler (see README.md here).

Importing :mod:`sync_dev` puts the repository's ``dags/`` folder on ``sys.path`` (as Airflow does), so
``python -m benchmarks.latency`` finds the case studies from a fresh clone without ``PYTHONPATH``.
"""

import sync_dev  # noqa: F401
