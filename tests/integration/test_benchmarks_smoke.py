"""Smoke tests of the benchmark harness (benchmarks/): tiny runs end to end.

The benchmark itself is never part of the suite (``make bench``); these only prove the harness
starts its server, runs workers, counts rows, checks every target against its source by a full-row
fingerprint (and fails the run when one differs) and writes its JSON and markdown.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _harness(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A tiny run (~20-40 s idle; the generous timeout is for a machine shared with other suites)."""
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--rows", "2000", "--rounds", "1", "--out", str(out)]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=230, check=False)


@pytest.mark.timeout(240)
def test_quick_harness_runs_and_writes_results(tmp_path: Path) -> None:
    done = _harness(tmp_path, "--only", "abe", "--contenders", "raw_limit,raw_merge,provider_incremental")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("quick-*.json")).read_text())
    summary = result["summary"]
    assert summary["a"]["raw_limit"]["rows"] == 2000  # psql's COPY tag, not the job's number
    assert summary["a"]["provider_incremental"]["rows"] == 2000
    assert summary["b"]["raw_merge"]["rows"] == 400  # 10% updated + 10% new
    assert summary["b"]["provider_incremental"]["rows"] == 400
    assert summary["e"]["provider_incremental"]["rows"] == 0
    assert "raw_limit" not in summary["b"]  # COPY straight in is (a)'s limit only
    assert result["checks"] == {
        "a/raw_limit": [True],
        "a/raw_merge": [True],
        "a/provider_incremental": [True],
        "b/raw_merge": [True],
        "b/provider_incremental": [True],
        "e/provider_incremental": [True],
    }
    assert (tmp_path / "latest-quick.json").exists()
    markdown = next(tmp_path.glob("quick-*.md")).read_text()
    assert "(a) provider incremental / stricter raw limit" in markdown
    assert "(b) changed rows: provider incremental / raw COPY + MERGE" in markdown


@pytest.mark.timeout(240)
def test_a_damaged_target_fails_the_run(tmp_path: Path) -> None:
    """One changed value in one row of one contender's target (the count and the sums the old check
    compared stay the same) is caught by the fingerprint; the run exits non-zero and is not the latest."""
    done = _harness(tmp_path, "--only", "a", "--contenders", "raw_limit,raw_merge", "--damage", "raw_merge")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "MISMATCH a/raw_merge" in done.stdout and "FAILED" in done.stdout
    result = json.loads(next(tmp_path.glob("quick-*.json")).read_text())
    assert result["checks"] == {"a/raw_limit": [True], "a/raw_merge": [False]}
    assert result["samples"]["a"]["raw_merge"][0]["target_rows"] == 2000  # same count: only the row differs
    assert not (tmp_path / "latest-quick.json").exists()
    assert "**FAILED" in next(tmp_path.glob("quick-*.md")).read_text()
