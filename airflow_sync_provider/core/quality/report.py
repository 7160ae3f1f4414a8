"""The HTML report of a gate run, written next to the staged batch (``quality_report.html``)."""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import replace

from airflow_sync_provider.core.audit import QUALITY_TABLE
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.progress import Logger
from airflow_sync_provider.core.quality.engine import import_gx
from airflow_sync_provider.core.quality.outcomes import GateResult, example_text, expected
from airflow_sync_provider.core.quality.store import QUARANTINE_TABLE
from airflow_sync_provider.core.quality.values import display, percent
from airflow_sync_provider.core.staging import filesystem_for

REPORT_NAME = "quality_report.html"


def with_report(result: GateResult, manifest: Manifest, enabled: bool, log: Logger) -> GateResult:
    """Write the report into the batch's staging folder (when ``enabled``); the result then names it."""
    if not enabled or not manifest.staging_dir:
        return result
    uri = f"{manifest.staging_dir}/{REPORT_NAME}"
    try:
        fs, path = filesystem_for(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(render_report(result, manifest).encode())
    except OSError as error:  # the report is a convenience; the results are recorded anyway
        log.warning("sync %s: could not write the quality report %s: %s", manifest.sync_id, uri, error)
        return result
    return replace(result, report_uri=uri)


def render_report(result: GateResult, manifest: Manifest) -> str:
    """A self-contained HTML page: the batch, the verdict, and one row per expectation."""
    esc = html.escape
    status = "EMPTY BATCH - PASSED" if result.empty else ("PASSED" if result.success else "FAILED - NOT LOADED")
    colour = "#1e7e34" if result.success else "#b00020"
    facts = [
        ("Sync", manifest.sync_id),
        ("Target table", result.target_table),
        ("Manifest", manifest.manifest_id),
        ("Run", result.run_id),
        ("Rows in batch", f"{result.rows:,}"),
        ("Staged files validated", str(result.files_validated)),
        ("Rows quarantined", f"{result.quarantined_rows:,} ({percent(result.quarantined_rows, result.rows)})"),
        ("Validated at", dt.datetime.now(dt.UTC).isoformat(timespec="seconds")),
        ("Validation time", f"{result.seconds:.2f} s"),
    ]
    if result.max_quarantine_fraction is not None:
        facts.append(("max_quarantine_fraction", f"{result.max_quarantine_fraction:.2%}"))
    rows_html = []
    for outcome in result.outcomes:
        state = outcome.status
        badge = {"passed": "#1e7e34", "quarantined": "#8a6d00", "warning": "#b36b00"}.get(state, "#b00020")
        unexpected = (
            f"{outcome.unexpected_count:,} ({percent(outcome.unexpected_count, outcome.element_count or result.rows)})"
            if outcome.unexpected_count is not None
            else ""
        )
        examples = "<br>".join(esc(example_text(e)) for e in outcome.examples) if not outcome.success else ""
        rows_html.append(
            "<tr>"
            f'<td style="color:{badge};font-weight:bold">{esc(state.upper())}</td>'
            f"<td>{esc(outcome.severity)}</td>"
            f"<td><code>{esc(outcome.type)}</code><br><small>{esc(expected(outcome.kwargs))}</small></td>"
            f"<td>{esc(', '.join(outcome.columns))}</td>"
            f"<td>{esc(outcome.scope)}</td>"
            f"<td>{esc(unexpected)}</td>"
            f"<td>{esc(display(outcome.observed_value)) if outcome.observed_value is not None else ''}</td>"
            f"<td>{examples}{esc(outcome.error or '')}</td>"
            "</tr>"
        )
    body = (
        "<table><tr><th>Status</th><th>Severity</th><th>Expectation</th><th>Column(s)</th><th>Scope</th>"
        "<th>Unexpected rows</th><th>Observed</th><th>Examples / error</th></tr>" + "".join(rows_html) + "</table>"
        if result.outcomes
        else "<p>The batch has no rows: nothing to validate. It passes and is recorded as empty.</p>"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Quality report {esc(manifest.sync_id)} {esc(manifest.manifest_id)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
        "th{background:#f3f3f3}</style></head><body>"
        f"<h1>Quality gate: <span style='color:{colour}'>{esc(status)}</span></h1>"
        "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts) + "</table>"
        "<h2>Expectations</h2>" + body + "<p><small>Validated with Great Expectations "
        f"{esc(str(getattr(import_gx(), '__version__', '?')))}; full results in the target table "
        f"{esc(manifest.target_schema)}.{QUALITY_TABLE}, quarantined rows in {QUARANTINE_TABLE}.</small></p>"
        "</body></html>"
    )


__all__ = ["REPORT_NAME", "render_report", "with_report"]
