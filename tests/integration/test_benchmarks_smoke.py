"""Smoke test of the benchmark harness (benchmarks/): a tiny run of two contenders end to end.

The benchmark itself is never part of the suite (``make bench``); this only proves the harness
starts its server, runs workers, checks target == source and writes its JSON and markdown.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_quick_harness_runs_and_writes_results(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--quick",
            "--rows",
            "2000",
            "--rounds",
            "1",
            "--only",
            "abe",
            "--contenders",
            "raw_limit,provider_incremental",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("quick-*.json")).read_text())
    summary = result["summary"]
    assert summary["a"]["provider_incremental"]["rows"] == 2000
    assert summary["b"]["provider_incremental"]["rows"] == 400  # 10% updated + 10% new
    assert summary["e"]["provider_incremental"]["rows"] == 0
    assert all(all(v) for v in result["checks"].values()) and set(result["checks"]) == {
        "raw_limit",
        "provider_incremental",
    }
    assert "(a) provider incremental / raw limit" in next(tmp_path.glob("quick-*.md")).read_text()
