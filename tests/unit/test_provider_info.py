"""The provider metadata Airflow reads: valid against Airflow's own schema, and every class and
module it names imports (a typo there only shows when Airflow discovers providers at run time)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import airflow
import jsonschema
import pytest

from airflow_sync_provider.get_provider_info import get_provider_info

INFO = get_provider_info()


def test_provider_info_is_valid_against_airflows_schema() -> None:
    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(INFO, schema)


@pytest.mark.parametrize(
    "module",
    sorted(
        {
            module
            for kind in ("hooks", "operators", "sensors", "triggers")
            for e in INFO[kind]
            for module in e["python-modules"]
        }
    ),
)
def test_every_listed_module_imports(module: str) -> None:
    importlib.import_module(module)


@pytest.mark.parametrize(
    "dotted",
    sorted([*INFO["notifications"], *INFO["extra-links"], *(c["hook-class-name"] for c in INFO["connection-types"])]),
)
def test_every_listed_class_exists(dotted: str) -> None:
    module, _, name = dotted.rpartition(".")
    assert isinstance(getattr(importlib.import_module(module), name), type)
