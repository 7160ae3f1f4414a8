"""The gate: validate a staged batch, quarantine failing rows if asked, record the results, say what failed."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.types.json import Jsonb

from airflow_sync_provider.core.audit import QUALITY_TABLE
from airflow_sync_provider.core.errors import ConfigurationError, DataError, SyncError, TargetUnavailableError
from airflow_sync_provider.core.manifest import Manifest, StagedFile
from airflow_sync_provider.core.progress import LOG, Logger
from airflow_sync_provider.core.quality.engine import GxEngine
from airflow_sync_provider.core.quality.evaluate import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_EXAMPLES,
    StagedSource,
    check_files,
    evaluate,
)
from airflow_sync_provider.core.quality.outcomes import GateResult, QualityError, problem
from airflow_sync_provider.core.quality.report import with_report
from airflow_sync_provider.core.quality.store import (
    QUARANTINE_TABLE,
    abandon_unloaded,
    batch_schema,
    ensure_quality_tables,
)
from airflow_sync_provider.core.quality.suite import SuiteLike, check_columns, load_suite, plan_checks
from airflow_sync_provider.core.quality.values import KeyTuple, jsonable, key_of, percent, plain
from airflow_sync_provider.core.sqltext import bindable, execute
from airflow_sync_provider.core.staging import StagingArea, staged_schema
from airflow_sync_provider.core.target import idle_autocommit


def validate_manifest(
    manifest: Manifest,
    suite: SuiteLike,
    *,
    severities: Mapping[str, str] | None = None,
    quarantine: bool = False,
    max_quarantine_fraction: float = 0.0,
    staging: StagingArea | None = None,
    target_conn: psycopg.Connection[Any] | None = None,
    run_id: str | None = None,
    logger: Logger | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    examples: int = DEFAULT_EXAMPLES,
    write_report: bool = True,
) -> GateResult:
    """Validate a staged batch; return the gate's result (and the manifest to load) or raise.

    Raises :class:`QualityError` when an ``error`` expectation fails (or the quarantined share is
    above ``max_quarantine_fraction``) and :class:`ConfigurationError` for a bad suite (invalid
    file, unknown expectation, a column the batch lacks).  With ``target_conn`` the results are
    appended to ``_sync_quality_results`` (also when the gate fails); quarantine needs it.
    """
    log = logger or LOG
    started = time.monotonic()
    run_id = run_id or manifest.run_id
    table = f"{manifest.target_schema}.{manifest.target_table}"
    context = {"sync_id": manifest.sync_id, "table": table}
    try:
        if chunk_rows < 1:
            raise ConfigurationError("chunk_rows must be positive")
        if not 0.0 <= max_quarantine_fraction <= 1.0:
            raise ConfigurationError(
                f"max_quarantine_fraction must be between 0 and 1, not {max_quarantine_fraction!r}",
                rule="max_quarantine_fraction",
            )
        if quarantine and target_conn is None:
            raise ConfigurationError("quarantine needs the target connection (the rows go to _sync_quarantine)")
        checks = plan_checks(load_suite(suite), severities)
        files = [f for f in manifest.files if f.rows]
        check_files(files)
        schema = (
            staged_schema(files[0].uri) if files else pa.schema([pa.field(c.name, pa.null()) for c in manifest.columns])
        )
        check_columns(checks, schema.names, manifest.primary_key)
    except SyncError as error:
        raise error.with_context(**context) from error.__cause__

    def finish(**values: Any) -> GateResult:
        return GateResult(
            sync_id=manifest.sync_id,
            manifest_id=manifest.manifest_id,
            run_id=run_id,
            target_table=table,
            rows=manifest.rows,
            max_quarantine_fraction=max_quarantine_fraction if quarantine else None,
            seconds=round(time.monotonic() - started, 3),
            files_validated=len(files),
            **values,
        )

    if not files or manifest.rows == 0:
        result = finish(success=True, empty=True, manifest=manifest)
        result = with_report(result, manifest, write_report, log)
        result = replace(result, manifest=replace(manifest, notes=(*manifest.notes, result.note())))
        if target_conn is not None:
            _record(target_conn, manifest, result, quarantined=None)
        log.info("sync %s: quality gate: empty batch, nothing to validate; passed", manifest.sync_id)
        return result

    collect = {c.index for c in checks if quarantine and c.row_level and c.severity == "error"}
    try:
        outcomes, failing_keys = evaluate(
            GxEngine(),
            checks,
            StagedSource(files, schema),
            manifest.primary_key,
            collect=collect,
            chunk_rows=chunk_rows,
            examples=examples,
            log=log,
        )
    except SyncError as error:
        raise error.with_context(**context) from error.__cause__
    by_index = {o.index: o for o in outcomes}

    # Rows to quarantine: every row an error-severity row-level expectation rejected, when GX
    # named all of them (a failed expectation whose rows are not all known stays blocking).
    quarantine_rules: dict[KeyTuple, list[str]] = {}
    if quarantine:
        for check in checks:
            outcome = by_index[check.index]
            keys = failing_keys.get(check.index, {})
            if outcome.success or check.index not in collect or outcome.error:
                continue
            if not keys or outcome.rows_identified < (outcome.unexpected_count or 0):
                continue
            rule = f"{check.label}: {problem(check.type, outcome.kwargs)}"
            for key in keys:
                quarantine_rules.setdefault(key, []).append(rule)
            outcome.quarantined = len(keys)
    blocking = [o for o in outcomes if not o.success and o.severity == "error" and o.status != "quarantined"]
    for outcome in outcomes:
        if not outcome.success and outcome.severity == "warn":
            log.warning(
                "sync %s: quality warning [rule=%s] %s",
                manifest.sync_id,
                outcome.type,
                outcome.describe(manifest.rows),
            )

    over_threshold = bool(quarantine_rules) and len(quarantine_rules) / manifest.rows > max_quarantine_fraction
    if blocking or over_threshold:
        for outcome in outcomes:  # nothing is quarantined after all
            outcome.quarantined = 0
        result = finish(success=False, empty=False, manifest=manifest, outcomes=tuple(outcomes))
        result = with_report(result, manifest, write_report, log)
        if target_conn is not None:
            _record(target_conn, manifest, result, quarantined=None)
        raise _gate_error(result, len(quarantine_rules) if over_threshold else 0, max_quarantine_fraction)

    new_manifest = manifest
    quarantined_rows: list[tuple[KeyTuple, dict[str, Any]]] = []
    if quarantine_rules:
        assert target_conn is not None
        new_manifest, quarantined_rows = _split(manifest, files, schema, quarantine_rules, staging, chunk_rows, log)
    result = finish(
        success=True,
        empty=False,
        manifest=new_manifest,
        outcomes=tuple(outcomes),
        quarantined_rows=len(quarantine_rules),
    )
    result = with_report(result, manifest, write_report, log)
    result = replace(result, manifest=replace(new_manifest, notes=(*new_manifest.notes, result.note())))
    if quarantine_rules:
        (staging or StagingArea()).write_manifest(result.manifest)
    if target_conn is not None:
        _record(
            target_conn,
            manifest,
            result,
            quarantined=(schema, quarantine_rules, quarantined_rows) if quarantine_rules else None,
        )
    log.info("sync %s: %s (%.2f s)", manifest.sync_id, result.note(), result.seconds)
    return result


def _gate_error(result: GateResult, quarantine_count: int, max_fraction: float) -> QualityError:
    rows = result.rows
    lines = [o for o in result.outcomes if not o.success and o.severity == "error"]
    report = f"\nreport: {result.report_uri}" if result.report_uri else ""
    if quarantine_count:
        message = (
            f"{quarantine_count:,} of {rows:,} rows ({percent(quarantine_count, rows)}) fail row-level expectations, "
            f"more than max_quarantine_fraction {max_fraction:.2%} allows; nothing was quarantined or loaded:\n"
            + "\n".join(f"  - {o.type}: {o.describe(rows)}" for o in lines)
            + report
        )
        rule = "max_quarantine_fraction"
    elif len(lines) == 1:
        message = lines[0].describe(rows) + report
        rule = lines[0].type
    else:
        message = (
            f"{len(lines)} expectations failed; nothing was loaded:\n"
            + "\n".join(f"  - {o.type}: {o.describe(rows)}" for o in lines)
            + report
        )
        rule = "quality gate"
    error = QualityError(message, sync_id=result.sync_id, table=result.target_table, rule=rule)
    error.outcomes = tuple(lines)
    error.result = result
    return error


def _split(
    manifest: Manifest,
    files: Sequence[StagedFile],
    schema: pa.Schema,
    rules: Mapping[KeyTuple, list[str]],
    staging: StagingArea | None,
    chunk_rows: int,
    log: Logger,
) -> tuple[Manifest, list[tuple[KeyTuple, dict[str, Any]]]]:
    """Write the rows that stay to new files next to the batch; return the new manifest and the others."""
    staging = staging or StagingArea()
    tag = hashlib.sha1("|".join(f.uri for f in files).encode()).hexdigest()[:8]
    primary_key = list(manifest.primary_key)
    new_files: list[StagedFile] = []
    quarantined: list[tuple[KeyTuple, dict[str, Any]]] = []
    for staged in files:
        uri = f"{manifest.staging_dir}/quality-{tag}-part-{len(new_files):05d}.parquet"
        writer = None
        kept = 0
        try:
            for _, chunk in StagedSource([staged], schema).chunks(list(schema.names), chunk_rows):
                key_columns = [chunk.column(chunk.schema.get_field_index(k)).to_pylist() for k in primary_key]
                keys = [tuple(plain(v) for v in key) for key in zip(*key_columns, strict=True)]
                bad = [key in rules for key in keys]
                if any(bad):
                    rows = chunk.filter(pa.array(bad)).to_pylist()
                    quarantined.extend((key_of(row, primary_key), row) for row in rows)
                    chunk = chunk.filter(pa.array([not b for b in bad]))
                if chunk.num_rows:
                    if writer is None:
                        writer = staging.open_writer(uri, schema)
                    writer.write_batch(chunk)
                    kept += chunk.num_rows
        finally:
            if writer is not None:
                writer.close()
        if kept:
            new_files.append(StagedFile(uri=uri, rows=kept))
    if len(quarantined) != len(rules):
        raise DataError(
            f"the quarantine split found {len(quarantined)} of the {len(rules)} failing rows GX named; "
            "is the primary key unique in the batch?",
            sync_id=manifest.sync_id,
            table=f"{manifest.target_schema}.{manifest.target_table}",
            rule="quarantine",
        )
    notes = list(manifest.notes)
    detect_deletes = manifest.detect_deletes
    if manifest.mode == "full" and manifest.detect_deletes:
        # In full mode the staged rows are the source's key set: without the quarantined rows the
        # load would delete their (older) target rows.  Skip delete detection for this run; the
        # next full run detects deletes again.
        detect_deletes = False
        notes.append(
            f"quality: delete detection skipped for this batch because {len(quarantined)} row(s) were quarantined "
            "(their keys are missing from the batch); the next full run detects deletes"
        )
        log.warning("sync %s: %s", manifest.sync_id, notes[-1])
    new_manifest = replace(
        manifest,
        files=tuple(new_files),
        rows=sum(f.rows for f in new_files),
        detect_deletes=detect_deletes,
        notes=tuple(notes),
    )
    return new_manifest, quarantined


def _record(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    result: GateResult,
    quarantined: tuple[pa.Schema, Mapping[KeyTuple, list[str]], list[tuple[KeyTuple, dict[str, Any]]]] | None,
) -> None:
    """Append the results (and the quarantined rows) in one transaction, before the load."""
    schema = manifest.target_schema
    try:
        idle_autocommit(conn, step="the quality gate", sync_id=manifest.sync_id)
        ensure_quality_tables(conn, schema)
        with conn.transaction():
            if quarantined is not None:
                staged, rules, rows = quarantined
                blob = batch_schema(staged, manifest)
                key_names = list(manifest.primary_key)
                # The state version the batch loads at (a backfill window loads at any version).
                base_version = manifest.base_version if manifest.window is None else None
                with conn.cursor() as cursor:
                    cursor.executemany(
                        bindable(
                            sql.SQL(
                                "INSERT INTO {} (sync_id, run_id, manifest_id, target_table, row_key, failed_rules, "
                                "row, batch_schema, base_version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                                "ON CONFLICT (sync_id, manifest_id, row_key) DO NOTHING"
                            ).format(sql.Identifier(schema, QUARANTINE_TABLE)),
                            cursor,
                        ),
                        [
                            (
                                manifest.sync_id,
                                result.run_id,
                                manifest.manifest_id,
                                result.target_table,
                                Jsonb({k: jsonable(v) for k, v in zip(key_names, key, strict=True)}),
                                rules[key],
                                Jsonb({k: jsonable(v) for k, v in row.items()}),
                                blob,
                                base_version,
                            )
                            for key, row in rows
                        ],
                    )
            execute(
                conn,
                sql.SQL(
                    "INSERT INTO {} (sync_id, run_id, manifest_id, target_table, success, rows, quarantined_rows, "
                    "summary, details) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                ).format(sql.Identifier(schema, QUALITY_TABLE)),
                (
                    result.sync_id,
                    result.run_id,
                    result.manifest_id,
                    result.target_table,
                    result.success,
                    result.rows,
                    result.quarantined_rows,
                    Jsonb(result.summary()),
                    Jsonb(result.details()),
                ),
            )
            # Rows earlier gates quarantined from batches that never loaded are no longer pending.
            abandoned = abandon_unloaded(conn, schema, manifest.sync_id, manifest.state_table, result.run_id)
    except psycopg.OperationalError as error:
        raise TargetUnavailableError(
            f"could not record the quality results in the target: {error}", sync_id=manifest.sync_id
        ) from error
    if abandoned:
        LOG.warning(
            "sync %s: %d quarantined row(s) of earlier batches that never loaded marked abandoned in %s "
            "(later runs read those rows again from the source)",
            manifest.sync_id,
            abandoned,
            QUARANTINE_TABLE,
        )


__all__ = ["validate_manifest"]
