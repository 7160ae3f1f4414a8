"""The wheel ships the provider and nothing else: built from a copy of this checkout (so the build
leaves no ``build/`` or ``*.egg-info`` behind), then read back.

Not in it: the case studies (``dags/case_studies``), the developer tools (``sync_dev``: demo, local
PostgreSQL, ``make ui``, the ``dag.test()`` runner), tests, DAGs, benchmarks.  In it: every module of
``airflow_sync_provider``, ``py.typed``, the ``apache_airflow_provider`` entry point, and metadata
that agrees with ``get_provider_info``.
"""

from __future__ import annotations

import email.parser
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_sync_provider import __version__
from airflow_sync_provider.get_provider_info import get_provider_info

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "airflow_sync_provider"
# What a developer's checkout holds besides the sources: never copied into the build.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".airflow", ".demo", ".staging"
)


def _build_command(out_dir: Path) -> list[str]:
    """``uv build --wheel`` (the Makefile installs uv into the venv), else ``pip wheel``."""
    if importlib.util.find_spec("uv") is not None:
        from uv import find_uv_bin

        return [find_uv_bin(), "build", "--wheel", "--out-dir", str(out_dir)]
    uv = shutil.which("uv")
    if uv:
        return [uv, "build", "--wheel", "--out-dir", str(out_dir)]
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out_dir), "."]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    out_dir = work / "dist"
    done = subprocess.run(_build_command(out_dir), cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = out_dir.glob("*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def _dist_info(wheel: zipfile.ZipFile) -> str:
    (dist_info,) = {name.split("/")[0] for name in wheel.namelist() if name.split("/")[0].endswith(".dist-info")}
    return dist_info


def test_the_wheel_holds_only_the_provider_package(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    dist_info = _dist_info(wheel)
    outside = [name for name in names if not name.startswith((f"{PACKAGE}/", f"{dist_info}/"))]
    assert outside == []  # no sync_dev, case_studies, dags, tests, benchmarks at the top
    assert wheel.read(f"{dist_info}/top_level.txt").decode().split() == [PACKAGE]
    shipped = {name for name in names if name.startswith(f"{PACKAGE}/")}
    for gone in ("casestudies/", "demo.py", "local_postgres.py"):
        assert not [name for name in shipped if name.startswith(f"{PACKAGE}/{gone}")], gone
    # every module of the provider, and besides the modules only py.typed
    sources = {path.relative_to(REPO).as_posix() for path in (REPO / PACKAGE).rglob("*.py")}
    assert {name for name in shipped if name.endswith(".py")} == sources
    templates = {f"{PACKAGE}/plugins/templates/{page}.html" for page in ("base", "overview", "detail")}
    assert shipped - sources == {f"{PACKAGE}/py.typed", *templates}


def test_the_wheel_registers_the_provider_with_matching_metadata(wheel: zipfile.ZipFile) -> None:
    dist_info = _dist_info(wheel)
    entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert "[apache_airflow_provider]\nprovider_info = airflow_sync_provider.get_provider_info:get_provider_info" in (
        entry_points
    )
    plugin = "sync_status = airflow_sync_provider.plugins.status_plugin:SyncStatusPlugin"
    assert f"[airflow.plugins]\n{plugin}" in entry_points  # the "Sync status" view in the UI
    metadata = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
    info = get_provider_info()
    assert metadata["Name"] == info["package-name"]  # Airflow matches the provider to its distribution by it
    assert metadata["Version"] == __version__ and __version__ in info["versions"]
    classifiers = metadata.get_all("Classifier") or []
    assert {"Framework :: Apache Airflow", "Framework :: Apache Airflow :: Provider", "Typing :: Typed"} <= set(
        classifiers
    )
    assert metadata["License-Expression"] == "Apache-2.0"
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL") or [])
    assert {"Homepage", "Source", "Changelog", "Issues"} <= set(urls)
