"""Quality gate: validate a staged batch with a Great Expectations 1.x suite before it is loaded.

The gate sits between extraction and load.  It reads the manifest's staged Parquet files and runs
the suite with GX's own validation engine (an ephemeral context, a pandas dataframe asset, one GX
batch per chunk), so expectations are never re-implemented here.  Memory stays bounded:

* **row-level** expectations (column map, column-pair map and multicolumn map expectations whose
  verdict on a row depends on that row only: between, not null, in set, regex, lengths, ...) run
  file by file and chunk by chunk (``chunk_rows``, reading only the columns they name plus the
  primary key); their counts are added up and their success is decided with GX's own ``mostly``
  rule on the totals;
* **batch-level** expectations (mean, sum, row count, uniqueness, increasing, z-scores, column
  types...) need every row at once: they run once on the whole batch, reading only the columns they
  name (plus the key), so their memory is rows x those columns;
* **schema** expectations (column set, column count, column exists) run on a zero-row frame with
  the staged schema.

Severity: each expectation is ``error`` (blocks the load; the default) or ``warn`` (logged and
recorded).  It comes from the ``severities`` argument (keys ``"<expectation type>:<column>"`` or
``"<expectation type>"``), else ``expectation.meta["severity"]``, else GX's own ``severity`` field
(``critical`` = error, ``warning``/``info`` = warn).

Quarantine (``quarantine=True``): rows failing row-level expectations of severity error are split
off.  The remaining rows are written to new Parquet files next to the batch and a *new* manifest
(same manifest id, base version and watermarks) is returned, so the load merges the clean rows and
still moves the watermark; the failing rows go to ``_sync_quarantine`` in the target with the rule,
the run id and the original row, committed before the load.  Above ``max_quarantine_fraction`` the
gate fails and nothing is quarantined.  :func:`replay_quarantined` merges fixed rows later, but only
rows whose batch committed (the load's ``_sync_audit`` row, written with the data, says so): a
quarantined row records its manifest and the state version its batch loads at, and once the sync
commits past that version without the batch (a failed or stale load), the next gate run or replay
marks the row ``abandoned`` - its watermark never moved, so later runs read the row again.

Every run appends its results to ``_sync_quality_results`` (append-only) and writes
``quality_report.html`` into the batch's staging folder.  An empty batch passes and is recorded
as empty.

Modules: :mod:`.engine` (GX access and checks), :mod:`.suite` (loading and planning a suite),
:mod:`.evaluate` (reading the batch for the checks), :mod:`.outcomes` (results and their words),
:mod:`.values` (values in messages and JSON), :mod:`.gate` (:func:`validate_manifest`), :mod:`.store`
(the results and quarantine tables), :mod:`.report` (the HTML report), :mod:`.replay`
(:func:`replay_quarantined`).
"""

from __future__ import annotations

from airflow_sync_provider.core.quality.gate import validate_manifest
from airflow_sync_provider.core.quality.outcomes import ExpectationOutcome, GateResult, QualityError
from airflow_sync_provider.core.quality.replay import ReplayResult, replay_quarantined
from airflow_sync_provider.core.quality.report import render_report
from airflow_sync_provider.core.quality.store import QUARANTINE_TABLE, ensure_quality_tables
from airflow_sync_provider.core.quality.suite import load_suite, plan_checks
from airflow_sync_provider.core.quality.values import jsonable

__all__ = [
    "QUARANTINE_TABLE",
    "ExpectationOutcome",
    "GateResult",
    "QualityError",
    "ReplayResult",
    "ensure_quality_tables",
    "jsonable",
    "load_suite",
    "plan_checks",
    "render_report",
    "replay_quarantined",
    "validate_manifest",
]
