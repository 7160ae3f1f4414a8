"""Registers the ``cluster`` marker for this folder (also listed in pyproject's markers)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: runs a real multi-process Airflow cluster (CeleryExecutor)")
