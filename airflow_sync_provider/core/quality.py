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
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import html
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc
import pyarrow.parquet as pq
from psycopg import sql
from psycopg.types.json import Jsonb

from airflow_sync_provider.core.audit import AUDIT_TABLE, QUALITY_TABLE, make_append_only
from airflow_sync_provider.core.catalog import column_types, ddl_lock, table_exists
from airflow_sync_provider.core.errors import (
    ConfigurationError,
    DataError,
    SourceUnavailableError,
    SyncError,
)
from airflow_sync_provider.core.load import apply_table_batch
from airflow_sync_provider.core.manifest import Manifest, ManifestColumn, StagedFile
from airflow_sync_provider.core.progress import LOG, Logger
from airflow_sync_provider.core.spec import SYNCED_AT_COLUMN
from airflow_sync_provider.core.sqltext import bindable, execute
from airflow_sync_provider.core.staging import StagingArea, filesystem_for, staged_schema
from airflow_sync_provider.core.state import hold_state_row

Severity = Literal["error", "warn"]
Scope = Literal["rows", "batch", "schema"]
#: What a suite can be given as: GX expectation objects, a GX suite, or a GX suite JSON file.
SuiteLike = Any
RowFix = Callable[[pd.DataFrame], pd.DataFrame]

QUARANTINE_TABLE = "_sync_quarantine"
REPORT_NAME = "quality_report.html"
DEFAULT_CHUNK_ROWS = 200_000
#: Examples of failing rows kept per expectation (in messages, XCom, audit and report).
DEFAULT_EXAMPLES = 5
_SCHEMA_META_KEY = b"airflow_sync_provider.batch"
_GATE_INDEX = "_sync_gate_index"

# Map expectations whose verdict on a row depends on other rows (or, for the type checks, on the
# dtype of the whole column): validated on the whole batch, not chunk by chunk.
_CROSS_ROW = frozenset(
    {
        "expect_column_values_to_be_unique",
        "expect_compound_columns_to_be_unique",
        "expect_multicolumn_values_to_be_unique",
        "expect_column_values_to_be_increasing",
        "expect_column_values_to_be_decreasing",
        "expect_column_value_z_scores_to_be_less_than",
        "expect_column_values_to_not_be_outliers",
        "expect_column_values_to_be_of_type",
        "expect_column_values_to_be_in_type_list",
    }
)
# Expectations about the columns only: validated on a zero-row frame with the staged schema.
_SCHEMA_ONLY = frozenset(
    {
        "expect_column_to_exist",
        "expect_table_columns_to_match_set",
        "expect_table_columns_to_match_ordered_list",
        "expect_table_column_count_to_equal",
        "expect_table_column_count_to_be_between",
    }
)
# Table-level expectations that only need the row count (the key columns suffice).
_ROW_COUNT = frozenset({"expect_table_row_count_to_be_between", "expect_table_row_count_to_equal"})
_COLUMN_KWARGS = ("column", "column_A", "column_B")


class QualityError(DataError):
    """The staged batch failed the quality gate; nothing was loaded.

    ``outcomes`` holds the failed expectations (see :class:`ExpectationOutcome`), ``result`` the
    whole :class:`GateResult` (when the validation got that far).
    """

    outcomes: tuple[ExpectationOutcome, ...] = ()
    result: GateResult | None = None


# --------------------------------------------------------------------------- GX access


def _gx() -> Any:
    """Great Expectations, imported on first use (it takes seconds; DAG parsing must not pay it)."""
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:  # its INFO chatter would drown the task log
        gx_logger.setLevel(logging.WARNING)
    import great_expectations

    return great_expectations


class _GxEngine:
    """One ephemeral GX context with a pandas dataframe asset; each chunk is one GX batch."""

    def __init__(self) -> None:
        gx = _gx()
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            progress_bars=ProgressBarsConfig(globally=False),
            analytics_enabled=False,
        )
        context = gx.get_context(mode="ephemeral", project_config=config)
        source = context.data_sources.add_pandas(name="sync_staged_batch")
        self.batch_definition = source.add_dataframe_asset(name="staged").add_batch_definition_whole_dataframe("chunk")
        self._suites = 0

    def suite(self, checks: Sequence[_Check]) -> Any:
        self._suites += 1
        expectations = []
        for check in checks:
            copy = check.expectation.copy(deep=True)
            copy.id = None  # a copy must not belong to the user's suite
            copy.meta = {**(copy.meta or {}), _GATE_INDEX: check.index}
            expectations.append(copy)
        return _gx().ExpectationSuite(name=f"sync_quality_gate_{self._suites}", expectations=expectations)

    def validate(self, suite: Any, frame: pd.DataFrame, result_format: dict[str, Any]) -> dict[int, Any]:
        batch = self.batch_definition.get_batch(batch_parameters={"dataframe": frame})
        try:
            results = batch.validate(suite, result_format=result_format)
        except Exception as error:  # GX refused the suite as a whole (not one expectation)
            raise ConfigurationError(
                f"Great Expectations could not run the suite on the staged batch: {type(error).__name__}: {error}",
                rule="quality gate",
            ) from error
        return {int(r.expectation_config.meta[_GATE_INDEX]): r for r in results.results}


def _mostly_success(rows_considered: int, unexpected: int, mostly: float) -> bool:
    """GX's own rule for map expectations (vacuously true without rows)."""
    if rows_considered <= 0:
        return True
    try:
        from great_expectations.expectations.expectation import _mostly_success as gx_mostly
    except ImportError:  # private helper moved: same formula
        return (rows_considered - unexpected) / rows_considered >= mostly
    return bool(gx_mostly(rows_considered, unexpected, mostly))


# --------------------------------------------------------------------------- the suite


@dataclass(frozen=True)
class _Check:
    """One expectation of the suite, with how the gate runs it."""

    index: int
    expectation: Any
    type: str
    columns: tuple[str, ...]
    severity: Severity
    scope: Scope
    #: A map expectation: GX names the failing rows, so they can be quarantined.
    row_level: bool
    mostly: float
    #: Needs every column (a ``row_condition`` may name any of them).
    all_columns: bool

    @property
    def label(self) -> str:
        return f"{self.type}({', '.join(self.columns)})" if self.columns else self.type


def load_suite(suite: SuiteLike) -> list[Any]:
    """GX expectation objects from a list of expectations, a ``gx.ExpectationSuite`` or a suite JSON file.

    The JSON file is GX's suite format (``{"name": ..., "expectations": [{"type": ..., "kwargs":
    {...}, "meta": {...}}]}``; the 0.x key ``expectation_type`` is accepted too).  Anything GX
    cannot build raises :class:`ConfigurationError` naming the file and the expectation.
    """
    gx = _gx()
    from great_expectations.expectations.expectation import Expectation

    if isinstance(suite, str | Path):
        return _load_suite_file(Path(suite))
    if isinstance(suite, gx.ExpectationSuite):
        items: list[Any] = list(suite.expectations)
    elif isinstance(suite, Expectation):
        items = [suite]
    elif isinstance(suite, Iterable) and not isinstance(suite, Mapping):
        items = list(suite)
    else:
        raise ConfigurationError(
            "expectations must be a list of GX expectation objects, a gx.ExpectationSuite or the path of a "
            f"suite JSON file, not {type(suite).__name__}",
            rule="quality suite",
        )
    expectations = []
    for position, item in enumerate(items, 1):
        if isinstance(item, Expectation):
            expectations.append(item)
        elif isinstance(item, Mapping):
            expectations.append(_expectation_from_dict(item, f"expectation #{position}"))
        else:
            raise ConfigurationError(
                f"expectation #{position} is a {type(item).__name__}, not a GX expectation "
                "(e.g. gx.expectations.ExpectColumnValuesToNotBeNull(column='id'))",
                rule="quality suite",
            )
    if not expectations:
        raise ConfigurationError("the expectation suite is empty: a gate without expectations checks nothing")
    return expectations


def _load_suite_file(path: Path) -> list[Any]:
    where = f"suite file {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"{where} does not exist", rule="quality suite") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"{where} cannot be read: {error}", rule="quality suite") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigurationError(
            f"{where} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}",
            rule="quality suite",
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise ConfigurationError(
            f'{where} is not a GX expectation suite: expected an object with an "expectations" list',
            rule="quality suite",
        )
    expectations = [
        _expectation_from_dict(item, f"{where}, expectation #{position}")
        for position, item in enumerate(data["expectations"], 1)
    ]
    if not expectations:
        raise ConfigurationError(f"{where} has no expectations: a gate without expectations checks nothing")
    return expectations


def _expectation_from_dict(item: Any, where: str) -> Any:
    """Build one expectation like GX does, but fail loudly (a GX suite logs and drops bad ones)."""
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    if not isinstance(item, Mapping):
        raise ConfigurationError(f"{where} is not a JSON object", rule="quality suite")
    data = dict(item)
    if "type" not in data and "expectation_type" in data:
        data["type"] = data.pop("expectation_type")
    kind = data.get("type")
    if not isinstance(kind, str) or not kind:
        raise ConfigurationError(f'{where} has no "type" (e.g. "expect_column_values_to_not_be_null")')
    if not isinstance(data.get("kwargs", {}), dict):
        raise ConfigurationError(f'{where} ({kind}): "kwargs" must be an object', rule=kind)
    allowed = {"type", "kwargs", "meta", "notes", "description", "severity", "id", "rendered_content"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigurationError(f"{where} ({kind}) has unknown keys {unknown}", rule=kind)
    data.setdefault("kwargs", {})
    data.pop("rendered_content", None)
    try:
        return ExpectationConfiguration(**data).to_domain_obj()
    except Exception as error:
        reason = " ".join(str(error).split())
        if len(reason) > 400:
            reason = reason[:400] + "..."
        raise ConfigurationError(f"{where} ({kind}) is not a valid expectation: {reason}", rule=kind) from None


def _parse_severity(value: Any, where: str) -> Severity:
    text = str(getattr(value, "value", value)).strip().lower()
    if text in ("error", "critical", "fail", "block"):
        return "error"
    if text in ("warn", "warning", "info"):
        return "warn"
    raise ConfigurationError(f"{where}: severity must be 'error' or 'warn', not {value!r}", rule="quality suite")


def _columns_of(kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    columns = [kwargs[k] for k in _COLUMN_KWARGS if isinstance(kwargs.get(k), str)]
    column_list = kwargs.get("column_list")
    if isinstance(column_list, list | tuple):
        columns.extend(str(c) for c in column_list)
    return tuple(dict.fromkeys(columns))


def plan_checks(expectations: Sequence[Any], severities: Mapping[str, str] | None = None) -> list[_Check]:
    """Decide severity and scope (rows / batch / schema) of each expectation."""
    from great_expectations.expectations.expectation import (
        ColumnMapExpectation,
        ColumnPairMapExpectation,
        MulticolumnMapExpectation,
        QueryExpectation,
        UnexpectedRowsExpectation,
    )

    severities = dict(severities or {})
    checks = []
    for index, expectation in enumerate(expectations):
        kind = str(expectation.expectation_type)
        if isinstance(expectation, QueryExpectation | UnexpectedRowsExpectation):
            raise ConfigurationError(
                f"{kind} runs SQL against a database table; the gate validates the staged Parquet batch with "
                "pandas. Use column/table expectations instead",
                rule=kind,
            )
        kwargs = expectation.configuration.kwargs
        columns = _columns_of(kwargs)
        where = f"expectation #{index + 1} ({kind})"
        if (key := f"{kind}:{columns[0]}" if len(columns) == 1 else None) and key in severities:
            severity = _parse_severity(severities[key], f"severities[{key!r}]")
        elif kind in severities:
            severity = _parse_severity(severities[kind], f"severities[{kind!r}]")
        elif expectation.meta and "severity" in expectation.meta:
            severity = _parse_severity(expectation.meta["severity"], where)
        else:
            severity = _parse_severity(getattr(expectation, "severity", "critical"), where)
        row_level = isinstance(expectation, ColumnMapExpectation | ColumnPairMapExpectation | MulticolumnMapExpectation)
        scope: Scope
        if kind in _SCHEMA_ONLY:
            scope = "schema"
        elif row_level and kind not in _CROSS_ROW:
            scope = "rows"
        else:
            scope = "batch"
        mostly = getattr(expectation, "mostly", None)
        checks.append(
            _Check(
                index=index,
                expectation=expectation,
                type=kind,
                columns=columns,
                severity=severity,
                scope=scope,
                row_level=row_level,
                mostly=float(mostly) if isinstance(mostly, int | float) else 1.0,
                all_columns=bool(kwargs.get("row_condition"))
                or (scope == "batch" and not columns and kind not in _ROW_COUNT),
            )
        )
    return checks


def _check_files(files: Sequence[StagedFile]) -> None:
    import pyarrow.fs as pafs

    for staged in files:
        fs, path = filesystem_for(staged.uri)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise SyncError(
                f"staged file {staged.uri} does not exist: the batch was loaded already (a load removes its staged "
                "files) or removed; validate the manifest before loading it, or extract again",
                rule="staged batch",
            )


def _check_columns(checks: Sequence[_Check], available: Sequence[str], primary_key: Sequence[str]) -> None:
    """Every column the suite names (and the key) must exist in the batch: say which do not."""
    names = set(available)
    problems = []
    for check in checks:
        if check.scope == "schema":  # expect_column_to_exist & co. are about this very question
            continue
        for column in check.columns:
            if column not in names:
                problems.append((check, column))
    if problems:
        check, column = problems[0]
        listed = "; ".join(f"{c.type} (expectation #{c.index + 1}) names column {col!r}" for c, col in problems)
        raise ConfigurationError(
            f"the staged batch has no such column: {listed}. Batch columns: {', '.join(available)}",
            column=sorted({col for _, col in problems}),
            rule=check.type,
        )
    missing_key = [k for k in primary_key if k not in names]
    if missing_key:
        raise ConfigurationError(f"the staged batch lacks primary-key column(s) {missing_key}")


# --------------------------------------------------------------------------- values


def _plain(value: Any) -> Any:
    """A Python value from what pandas/numpy/GX hand back (np.int64, Timestamp, NaN...)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, pd.Timestamp):
        return None if pd.isna(value) else value.to_pydatetime()
    if value is pd.NaT or value is pd.NA:
        return None
    return value


def jsonable(value: Any) -> Any:
    """A JSON-safe rendering that :func:`_decode` can turn back into the staged Arrow type."""
    value = _plain(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset | np.ndarray):
        return [jsonable(v) for v in value]
    return str(value)


def _display(value: Any) -> str:
    """A value in a message.  NULL is ``NULL``; a float NaN (a value, not a NULL) is ``NaN``.

    Row values from GX come through NumPy-backed pandas, where a NULL in a numeric column is NaN:
    :func:`_row_value` turns those back into None before they get here.
    """
    value = _plain(value)
    if value is None:
        return "NULL"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # an integer column with NULLs reaches pandas as float
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        return "(" + ", ".join(f"{k}={_display(v)}" for k, v in value.items()) + ")"
    if isinstance(value, list | tuple):
        shown = ", ".join(_display(v) for v in list(value)[:6])
        return "[" + shown + (", ..." if len(value) > 6 else "") + "]"
    return str(value)


def _percent(part: int, whole: int) -> str:
    if not whole:
        return "0%"
    share = 100.0 * part / whole
    if share == 0:
        return "0%"
    return f"{share:.1f}%" if share >= 0.1 else f"{share:.2g}%"


# --------------------------------------------------------------------------- outcomes


@dataclass
class ExpectationOutcome:
    """One expectation's result over the whole batch (chunk results combined)."""

    index: int
    type: str
    columns: tuple[str, ...]
    severity: Severity
    scope: Scope
    row_level: bool
    kwargs: dict[str, Any]
    success: bool = True
    element_count: int = 0
    unexpected_count: int | None = None
    missing_count: int = 0
    observed_value: Any = None
    examples: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Failing rows GX named (``unexpected_index_list``), counted over all chunks.
    rows_identified: int = 0
    #: Rows split off into quarantine because of this expectation.
    quarantined: int = 0

    @property
    def label(self) -> str:
        return f"{self.type}({', '.join(self.columns)})" if self.columns else self.type

    @property
    def status(self) -> str:
        if self.success:
            return "passed"
        if self.quarantined and self.quarantined >= (self.unexpected_count or 0):
            return "quarantined"
        return "failed" if self.severity == "error" else "warning"

    def describe(self, total_rows: int) -> str:
        """``column 'qty': 3 of 1,000 rows (0.3%) outside [0, 10000]; examples: key=(id=17) value=-5``"""
        subject = (
            f"column {self.columns[0]!r}"
            if len(self.columns) == 1
            else f"columns {', '.join(map(repr, self.columns))}"
            if self.columns
            else "table"
        )
        if self.error:
            return (
                f"{subject}: could not be evaluated: {self.error} (check the expectation's arguments against the "
                "column's type)"
            )
        if self.unexpected_count is not None:
            rows = self.element_count or total_rows
            text = (
                f"{subject}: {self.unexpected_count:,} of {rows:,} rows ({_percent(self.unexpected_count, rows)}) "
                f"{_problem(self.type, self.kwargs)}"
            )
            if self.unexpected_count and self.kwargs.get("mostly") is not None:
                text += f" (mostly={self.kwargs['mostly']})"
            if self.examples:
                text += "; examples: " + ", ".join(_example_text(e) for e in self.examples)
            elif self.unexpected_count and self.rows_identified == 0 and self.row_level:
                text += "; GX named no rows for this expectation"
            return text
        return f"{subject}: observed {_display(self.observed_value)}, expected {_expected(self.kwargs)}"

    def summary(self, examples: int = 3) -> dict[str, Any]:
        """Small enough for XCom."""
        data: dict[str, Any] = {
            "expectation": self.type,
            "column": self.columns[0] if len(self.columns) == 1 else list(self.columns) or None,
            "severity": self.severity,
            "success": self.success,
            "status": self.status,
        }
        if self.unexpected_count is not None:
            data["unexpected_count"] = self.unexpected_count
        elif self.observed_value is not None:
            data["observed_value"] = jsonable(self.observed_value)
        if not self.success and self.examples:
            data["example_keys"] = [e["key"] for e in self.examples[:examples]]
        if self.quarantined:
            data["quarantined"] = self.quarantined
        if self.error:
            data["error"] = self.error[:200]
        return data

    def details(self) -> dict[str, Any]:
        """The combined result in GX's shape (lists cut to the examples), for the audit table (JSON-safe)."""
        result: dict[str, Any] = {"element_count": self.element_count}
        if self.unexpected_count is not None:
            considered = self.element_count - self.missing_count
            result.update(
                unexpected_count=self.unexpected_count,
                unexpected_percent=100.0 * self.unexpected_count / considered if considered else 0.0,
                missing_count=self.missing_count,
                partial_unexpected_index_list=jsonable(self.examples),
            )
        if self.observed_value is not None:
            result["observed_value"] = jsonable(self.observed_value)
        return {
            "expectation_config": {"type": self.type, "kwargs": jsonable(self.kwargs)},
            "severity": self.severity,
            "scope": self.scope,
            "success": self.success,
            "status": self.status,
            "result": result,
            "per_file": self.per_file,
            "quarantined": self.quarantined,
            "exception_message": self.error,
        }


def _example_text(example: Mapping[str, Any]) -> str:
    key = example.get("key") or {}
    shown = "key=(" + ", ".join(f"{k}={_display(v)}" for k, v in key.items()) + ")"
    if "value" in example:
        value = example["value"]
        shown += f" value={_display(value)}" if not isinstance(value, Mapping) else f" values={_display(value)}"
    return shown


def _bounds(kwargs: Mapping[str, Any], low: str = "min_value", high: str = "max_value") -> str:
    lo, hi = kwargs.get(low), kwargs.get(high)
    if lo is not None and hi is not None:
        return f"[{_display(lo)}, {_display(hi)}]"
    if lo is not None:
        return f"[{_display(lo)}, ...)"
    return f"(..., {_display(hi)}]"


def _problem(kind: str, kwargs: Mapping[str, Any]) -> str:
    """What the failing rows do wrong, in words (a fallback names the expectation)."""
    simple = {
        "expect_column_values_to_not_be_null": "are NULL",
        "expect_column_values_to_be_null": "are not NULL",
        "expect_column_values_to_be_unique": "are duplicates",
        "expect_compound_columns_to_be_unique": "are duplicates of the column combination",
        "expect_multicolumn_values_to_be_unique": "repeat a value within the row",
        "expect_select_column_values_to_be_unique_within_record": "repeat a value within the row",
        "expect_column_values_to_be_increasing": "are not increasing",
        "expect_column_values_to_be_decreasing": "are not decreasing",
        "expect_column_values_to_be_json_parseable": "are not valid JSON",
        "expect_column_values_to_be_dateutil_parseable": "are not parseable dates",
        "expect_column_values_to_match_json_schema": "do not match the JSON schema",
        "expect_column_value_z_scores_to_be_less_than": f"have a z-score of {kwargs.get('threshold')} or more",
    }
    if kind in simple:
        return simple[kind]
    if kind == "expect_column_values_to_be_between":
        return f"outside {_bounds(kwargs)}"
    if kind in ("expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set"):
        values = list(kwargs.get("value_set") or [])
        shown = "{" + ", ".join(_display(v) for v in values[:8]) + (", ..." if len(values) > 8 else "") + "}"
        return f"not in {shown}" if kind.endswith("_be_in_set") else f"in the forbidden set {shown}"
    if kind == "expect_column_values_to_match_regex":
        return f"do not match regex {kwargs.get('regex')!r}"
    if kind == "expect_column_values_to_not_match_regex":
        return f"match the forbidden regex {kwargs.get('regex')!r}"
    if kind == "expect_column_values_to_match_like_pattern":
        return f"do not match LIKE {kwargs.get('like_pattern')!r}"
    if kind == "expect_column_values_to_match_strftime_format":
        return f"do not match format {kwargs.get('strftime_format')!r}"
    if kind == "expect_column_value_lengths_to_be_between":
        return f"have a length outside {_bounds(kwargs)}"
    if kind == "expect_column_value_lengths_to_equal":
        return f"have a length other than {kwargs.get('value')}"
    if kind == "expect_column_pair_values_a_to_be_greater_than_b":
        operator = ">=" if kwargs.get("or_equal") else ">"
        return f"fail {kwargs.get('column_A')} {operator} {kwargs.get('column_B')}"
    if kind == "expect_column_pair_values_to_be_equal":
        return f"have {kwargs.get('column_A')} != {kwargs.get('column_B')}"
    if kind == "expect_multicolumn_sum_to_equal":
        return f"do not sum to {kwargs.get('sum_total')}"
    return f"fail {kind}"


def _expected(kwargs: Mapping[str, Any]) -> str:
    if "min_value" in kwargs or "max_value" in kwargs:
        return _bounds(kwargs)
    shown = {k: v for k, v in kwargs.items() if k not in (*_COLUMN_KWARGS, "column_list", "batch_id", "result_format")}
    return ", ".join(f"{k}={_display(v)}" for k, v in shown.items()) or "the expectation to hold"


def _exception_message(info: Any) -> str | None:
    """GX reports an expectation that raised in ``exception_info`` (flat, or per metric)."""
    if not isinstance(info, Mapping):
        return None
    if info.get("raised_exception") or info.get("exception_message"):
        message = info.get("exception_message")
        return " ".join(str(message).split())[:300] if message else "raised an exception"
    for value in info.values():
        found = _exception_message(value)
        if found:
            return found
    return None


KeyTuple = tuple[Any, ...]


def _key_of(row: Mapping[str, Any], primary_key: Sequence[str]) -> KeyTuple:
    return tuple(_plain(row.get(k)) for k in primary_key)


def _row_value(value: Any, column: str, key: Mapping[str, Any], data: pa.Table | pa.RecordBatch | None) -> Any:
    """A failing row's value for the examples: :func:`jsonable`, None for a NULL, float NaN for a real NaN.

    GX validates NumPy-backed pandas frames, where a NULL in a numeric column arrives as NaN; the
    Arrow data the frame came from (``data``) still tells the two apart.  Only the few examples a
    message shows are looked up.  (:meth:`ExpectationOutcome.details` makes a NaN JSON-safe.)
    """
    value = _plain(value)
    if not (isinstance(value, float) and math.isnan(value)):
        return jsonable(value)
    if data is None or column not in data.schema.names or not pa.types.is_floating(data.schema.field(column).type):
        return None  # NaN in a non-float column is pandas' NULL
    try:
        mask: Any = None
        for name, wanted in key.items():
            field_type = data.schema.field(name).type
            equal = pc.equal(data.column(name), pa.scalar(_plain(wanted), type=field_type))
            mask = equal if mask is None else pc.and_(mask, equal)
        found = data.filter(mask).column(column)
    except (KeyError, TypeError, ValueError, pa.ArrowException):
        return None
    return value if len(found) and found[0].is_valid else None


def _absorb(
    outcome: ExpectationOutcome,
    check: _Check,
    result: Any,
    label: str,
    primary_key: Sequence[str],
    examples: int,
    keys: dict[KeyTuple, None] | None,
    rows: pa.Table | pa.RecordBatch | None = None,
) -> None:
    """Add one chunk's GX result to the expectation's running outcome (``rows``: the chunk's Arrow data)."""
    data = result.result or {}
    error = _exception_message(result.exception_info)
    if error and not outcome.error:
        outcome.error = error
    element_count = int(data.get("element_count") or 0)
    outcome.element_count += element_count
    if "observed_value" in data:
        outcome.observed_value = data["observed_value"]
    if not check.row_level or "unexpected_count" not in data:
        outcome.success = outcome.success and bool(result.success) and not error
        return
    unexpected = int(data.get("unexpected_count") or 0)
    outcome.unexpected_count = (outcome.unexpected_count or 0) + unexpected
    outcome.missing_count += int(data.get("missing_count") or 0)
    stats = outcome.per_file.setdefault(label, {"element_count": 0, "unexpected_count": 0})
    stats["element_count"] += element_count
    stats["unexpected_count"] += unexpected
    for row in data.get("partial_unexpected_index_list") or []:
        if len(outcome.examples) >= examples or not isinstance(row, Mapping):
            break
        key = {k: jsonable(row.get(k)) for k in primary_key}
        raw_key = {k: row.get(k) for k in primary_key}
        values = {c: _row_value(row.get(c), c, raw_key, rows) for c in check.columns if c in row}
        example: dict[str, Any] = {"key": key}
        if len(check.columns) == 1 and check.columns[0] in row:
            example["value"] = values[check.columns[0]]
        elif values:
            example["value"] = values
        outcome.examples.append(example)
    index_list = data.get("unexpected_index_list")
    if isinstance(index_list, list):
        outcome.rows_identified += len(index_list)
        if keys is not None:
            for row in index_list:
                if isinstance(row, Mapping):
                    keys[_key_of(row, primary_key)] = None
    if error:
        outcome.success = False


def _finish(outcome: ExpectationOutcome, check: _Check) -> None:
    if outcome.error:
        outcome.success = False
    elif check.row_level and outcome.unexpected_count is not None:
        considered = outcome.element_count - outcome.missing_count
        outcome.success = _mostly_success(considered, outcome.unexpected_count, check.mostly)


# --------------------------------------------------------------------------- reading batches


class _Source:
    """Where the rows come from: staged files (a manifest) or an in-memory table (replay)."""

    schema: pa.Schema

    def chunks(self, columns: list[str], chunk_rows: int) -> Iterator[tuple[str, pa.RecordBatch]]:
        raise NotImplementedError

    def whole(self, columns: list[str]) -> pa.Table:
        raise NotImplementedError


class _StagedSource(_Source):
    def __init__(self, files: Sequence[StagedFile], schema: pa.Schema) -> None:
        self.files = files
        self.schema = schema

    def chunks(self, columns: list[str], chunk_rows: int) -> Iterator[tuple[str, pa.RecordBatch]]:
        for staged in self.files:
            fs, path = filesystem_for(staged.uri)
            with fs.open_input_file(path) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=chunk_rows, columns=columns):
                    yield staged.uri.rsplit("/", 1)[-1], batch

    def whole(self, columns: list[str]) -> pa.Table:
        tables = []
        for staged in self.files:
            fs, path = filesystem_for(staged.uri)
            tables.append(pq.read_table(path, columns=columns, filesystem=fs))
        return pa.concat_tables(tables) if tables else self.schema.empty_table().select(columns)


class _MemorySource(_Source):
    def __init__(self, table: pa.Table, label: str = "replay") -> None:
        self.table = table
        self.schema = table.schema
        self.label = label

    def chunks(self, columns: list[str], chunk_rows: int) -> Iterator[tuple[str, pa.RecordBatch]]:
        for batch in self.table.select(columns).to_batches(max_chunksize=chunk_rows):
            yield self.label, batch

    def whole(self, columns: list[str]) -> pa.Table:
        return self.table.select(columns)


def _to_frame(data: pa.Table | pa.RecordBatch) -> pd.DataFrame:
    """NumPy-backed pandas, the representation GX's pandas engine is built and tested for."""
    return data.to_pandas()


def _projection(checks: Sequence[_Check], schema: pa.Schema, primary_key: Sequence[str]) -> list[str]:
    if any(c.all_columns for c in checks):
        return list(schema.names)
    wanted = set(primary_key)
    for check in checks:
        wanted.update(check.columns)
    return [name for name in schema.names if name in wanted]


def _evaluate(
    engine: _GxEngine,
    checks: Sequence[_Check],
    source: _Source,
    primary_key: Sequence[str],
    *,
    collect: set[int],
    chunk_rows: int,
    examples: int,
    log: Logger,
) -> tuple[list[ExpectationOutcome], dict[int, dict[KeyTuple, None]]]:
    """Run the checks with GX; return the outcomes and, for ``collect``ed checks, the failing keys."""
    outcomes = {
        c.index: ExpectationOutcome(
            index=c.index,
            type=c.type,
            columns=c.columns,
            severity=c.severity,
            scope=c.scope,
            row_level=c.row_level,
            kwargs={k: v for k, v in c.expectation.configuration.kwargs.items() if k != "batch_id"},
        )
        for c in checks
    }
    keys: dict[int, dict[KeyTuple, None]] = {i: {} for i in collect}
    result_format = {
        "result_format": "COMPLETE" if collect else "SUMMARY",
        "unexpected_index_column_names": list(primary_key),
        "partial_unexpected_count": examples,
        "return_unexpected_index_query": False,
    }
    by_scope = {scope: [c for c in checks if c.scope == scope] for scope in ("rows", "batch", "schema")}

    def absorb(
        group: Sequence[_Check], results: Mapping[int, Any], label: str, data: pa.Table | pa.RecordBatch | None
    ) -> None:
        for check in group:
            result = results.get(check.index)
            if result is not None:
                _absorb(outcomes[check.index], check, result, label, primary_key, examples, keys.get(check.index), data)

    if group := by_scope["rows"]:
        suite = engine.suite(group)
        columns = _projection(group, source.schema, primary_key)
        for label, batch in source.chunks(columns, chunk_rows):
            absorb(group, engine.validate(suite, _to_frame(batch), result_format), label, batch)
    if group := by_scope["batch"]:
        columns = _projection(group, source.schema, primary_key)
        whole = source.whole(columns)
        log.info(
            "quality gate: batch-level expectation(s) %s read %d column(s) of all %s rows at once",
            ", ".join(c.label for c in group),
            len(columns),
            f"{whole.num_rows:,}",
        )
        absorb(group, engine.validate(engine.suite(group), _to_frame(whole), result_format), "batch", whole)
        del whole
    if group := by_scope["schema"]:
        empty = source.schema.empty_table()
        absorb(group, engine.validate(engine.suite(group), _to_frame(empty), result_format), "schema", empty)
    for check in checks:
        _finish(outcomes[check.index], check)
    return [outcomes[c.index] for c in checks], keys


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class GateResult:
    """What the gate decided; ``manifest`` is the one to load (new files if rows were quarantined)."""

    sync_id: str
    manifest_id: str
    run_id: str
    target_table: str
    success: bool
    empty: bool
    rows: int
    manifest: Manifest
    outcomes: tuple[ExpectationOutcome, ...] = ()
    quarantined_rows: int = 0
    max_quarantine_fraction: float | None = None
    report_uri: str | None = None
    seconds: float = 0.0
    files_validated: int = 0

    @property
    def quarantine_fraction(self) -> float:
        return self.quarantined_rows / self.rows if self.rows else 0.0

    @property
    def warnings(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and o.severity == "warn"]

    def note(self) -> str:
        """One line for the manifest's notes (the load records them in its audit entry)."""
        if self.empty:
            return "quality: empty batch, nothing to validate (passed)"
        passed = sum(o.success for o in self.outcomes)
        text = (
            f"quality: {'passed' if self.success else 'FAILED'} - {passed}/{len(self.outcomes)} expectations met "
            f"on {self.rows:,} rows"
        )
        if self.warnings:
            text += f", {len(self.warnings)} warning(s): " + ", ".join(o.label for o in self.warnings)
        if self.quarantined_rows:
            text += (
                f", {self.quarantined_rows:,} row(s) quarantined "
                f"({_percent(self.quarantined_rows, self.rows)}) in {QUARANTINE_TABLE}"
            )
        if self.report_uri:
            text += f"; report {self.report_uri}"
        return text

    def summary(self) -> dict[str, Any]:
        """Small enough for XCom: counts and one compact line per expectation."""
        many = len(self.outcomes) > 50
        shown = [o for o in self.outcomes if not (many and o.success)]
        data: dict[str, Any] = {
            "sync_id": self.sync_id,
            "manifest_id": self.manifest_id,
            "run_id": self.run_id,
            "success": self.success,
            "empty": self.empty,
            "rows": self.rows,
            "expectations": len(self.outcomes),
            "failed": sum(o.status == "failed" for o in self.outcomes),
            "warnings": len(self.warnings),
            "quarantined_rows": self.quarantined_rows,
            "results": [o.summary() for o in shown],
            "report": self.report_uri,
            "seconds": self.seconds,
        }
        if many:
            data["results_omitted_passed"] = len(self.outcomes) - len(shown)
        return data

    def details(self) -> dict[str, Any]:
        return {
            "target_table": self.target_table,
            "rows": self.rows,
            "files_validated": self.files_validated,
            "quarantined_rows": self.quarantined_rows,
            "max_quarantine_fraction": self.max_quarantine_fraction,
            "results": [o.details() for o in self.outcomes],
        }


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
        _check_files(files)
        schema = (
            staged_schema(files[0].uri) if files else pa.schema([pa.field(c.name, pa.null()) for c in manifest.columns])
        )
        _check_columns(checks, schema.names, manifest.primary_key)
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
        result = _with_report(result, manifest, write_report, log)
        result = replace(result, manifest=replace(manifest, notes=(*manifest.notes, result.note())))
        if target_conn is not None:
            _record(target_conn, manifest, result, quarantined=None)
        log.info("sync %s: quality gate: empty batch, nothing to validate; passed", manifest.sync_id)
        return result

    collect = {c.index for c in checks if quarantine and c.row_level and c.severity == "error"}
    try:
        outcomes, failing_keys = _evaluate(
            _GxEngine(),
            checks,
            _StagedSource(files, schema),
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
            rule = f"{check.label}: {_problem(check.type, outcome.kwargs)}"
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
        result = _with_report(result, manifest, write_report, log)
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
    result = _with_report(result, manifest, write_report, log)
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
            f"{quarantine_count:,} of {rows:,} rows ({_percent(quarantine_count, rows)}) fail row-level expectations, "
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
            for _, chunk in _StagedSource([staged], schema).chunks(list(schema.names), chunk_rows):
                key_columns = [chunk.column(chunk.schema.get_field_index(k)).to_pylist() for k in primary_key]
                keys = [tuple(_plain(v) for v in key) for key in zip(*key_columns, strict=True)]
                bad = [key in rules for key in keys]
                if any(bad):
                    rows = chunk.filter(pa.array(bad)).to_pylist()
                    quarantined.extend((_key_of(row, primary_key), row) for row in rows)
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


# --------------------------------------------------------------------------- target tables


def ensure_quality_tables(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create ``_sync_quality_results`` (append-only) and ``_sync_quarantine`` if missing."""
    with conn.transaction():
        ddl_lock(conn)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        if not table_exists(conn, schema, QUALITY_TABLE):
            results = sql.Identifier(schema, QUALITY_TABLE)
            conn.execute(
                sql.SQL(
                    """CREATE TABLE {} (
                        result_id bigserial PRIMARY KEY,
                        sync_id text NOT NULL,
                        run_id text NOT NULL,
                        manifest_id text NOT NULL,
                        target_table text,
                        validated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                        success boolean NOT NULL,
                        rows bigint NOT NULL DEFAULT 0,
                        quarantined_rows bigint NOT NULL DEFAULT 0,
                        summary jsonb NOT NULL,
                        details jsonb NOT NULL
                    )"""
                ).format(results)
            )
            conn.execute(sql.SQL("CREATE INDEX ON {} (sync_id, run_id)").format(results))
            make_append_only(conn, schema, "_sync_quality_results", "the sync quality results are")
        if not table_exists(conn, schema, QUARANTINE_TABLE):
            quarantine = sql.Identifier(schema, QUARANTINE_TABLE)
            conn.execute(
                sql.SQL(
                    """CREATE TABLE {} (
                        quarantine_id bigserial PRIMARY KEY,
                        sync_id text NOT NULL,
                        run_id text NOT NULL,
                        manifest_id text NOT NULL,
                        target_table text NOT NULL,
                        row_key jsonb NOT NULL,
                        failed_rules text[] NOT NULL,
                        row jsonb NOT NULL,
                        batch_schema bytea NOT NULL,
                        quarantined_at timestamptz NOT NULL DEFAULT now(),
                        replayed_at timestamptz,
                        replay_status text,
                        replay_run_id text,
                        replay_note text,
                        replayed_row jsonb,
                        base_version bigint,
                        UNIQUE (sync_id, manifest_id, row_key)
                    )"""
                ).format(quarantine)
            )
            conn.execute(
                sql.SQL("CREATE INDEX ON {} (sync_id, target_table, row_key)").format(quarantine),
            )
            _comment_replay_status(conn, schema)
        elif "base_version" not in (column_types(conn, schema, QUARANTINE_TABLE) or {}):
            # A table from before quarantined rows were tied to their batch's state version.
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN base_version bigint").format(
                    sql.Identifier(schema, QUARANTINE_TABLE)
                )
            )
            _comment_replay_status(conn, schema)


def _comment_replay_status(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(
        sql.SQL("COMMENT ON COLUMN {} IS {}").format(
            sql.Identifier(schema, QUARANTINE_TABLE, "replay_status"),
            sql.Literal(
                "NULL = pending: replayable once its batch (manifest_id) committed, per _sync_audit, else waiting "
                "for that load; replayed; skipped_newer (a later sync merged a newer version); superseded (a later "
                "committed batch quarantined the key again); abandoned (its batch can no longer load: the sync "
                "committed past base_version without it, and later runs read the rows again)"
            ),
        )
    )


def _committed(conn: psycopg.Connection[Any], schema: str, alias: str) -> sql.Composable:
    """SQL: the batch of quarantined row ``alias`` committed.

    The load appends its ledger row (``_sync_audit``, status ``applied`` or ``backfilled``) in the
    transaction that merges the batch, so the ledger says exactly which batches are in the target.
    """
    if not table_exists(conn, schema, AUDIT_TABLE):
        return sql.SQL("false")
    return sql.SQL(
        "EXISTS (SELECT 1 FROM {audit} a WHERE a.sync_id = {q}.sync_id AND a.manifest_id = {q}.manifest_id "
        "AND a.status IN ('applied', 'backfilled'))"
    ).format(audit=sql.Identifier(schema, AUDIT_TABLE), q=sql.Identifier(alias))


def _abandon_unloaded(conn: psycopg.Connection[Any], schema: str, sync_id: str, state_table: str, run_id: str) -> int:
    """Mark pending rows of batches that can no longer load ``abandoned``; return how many.

    A batch loads only while the sync's state is at the version it was extracted against (its
    ``base_version``; a backfill window has none and may load any time).  Once the state moved past
    that version without the batch's ledger row, the batch never will: it failed, was dropped, or
    was refused as stale.  Its watermark never committed, so the rows it quarantined are read
    again by later runs (and gated again); replaying the old versions could resurrect a row
    deleted at the source since.  The test is monotonic (versions only grow), so no lock is needed.
    """
    if not table_exists(conn, schema, state_table):
        return 0
    row = execute(
        conn,
        sql.SQL("SELECT version FROM {} WHERE sync_id = %s").format(sql.Identifier(schema, state_table)),
        (sync_id,),
    ).fetchone()
    if row is None:
        return 0
    return execute(
        conn,
        sql.SQL(
            "UPDATE {q} q SET replay_status = 'abandoned', replay_run_id = %(run)s, replay_note = "
            "'its batch never loaded: the sync committed state version ' || %(version)s::text || ' without it; "
            "later runs read these rows again from the source' "
            "WHERE q.sync_id = %(sync)s AND q.replay_status IS NULL AND q.base_version < %(version)s "
            "AND NOT {committed}"
        ).format(q=sql.Identifier(schema, QUARANTINE_TABLE), committed=_committed(conn, schema, "q")),
        {"run": run_id, "version": int(row[0]), "sync": sync_id},
    ).rowcount


def _connection_ready(conn: psycopg.Connection[Any], sync_id: str) -> None:
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise SyncError("the quality gate needs a target connection outside any transaction", sync_id=sync_id)
    conn.autocommit = True


def _batch_schema(schema: pa.Schema, manifest: Manifest) -> bytes:
    """The staged Arrow schema plus what a replay needs to rebuild a manifest (one blob per row)."""
    batch = {
        "columns": [{"name": c.name, "pg_type": c.pg_type, "nullable": c.nullable} for c in manifest.columns],
        "primary_key": list(manifest.primary_key),
        "target_schema": manifest.target_schema,
        "target_table": manifest.target_table,
        "source_table": manifest.source_table,
        "delete_mode": manifest.delete_mode,
    }
    return bytes(schema.with_metadata({_SCHEMA_META_KEY: json.dumps(batch).encode()}).serialize().to_pybytes())


def _record(
    conn: psycopg.Connection[Any],
    manifest: Manifest,
    result: GateResult,
    quarantined: tuple[pa.Schema, Mapping[KeyTuple, list[str]], list[tuple[KeyTuple, dict[str, Any]]]] | None,
) -> None:
    """Append the results (and the quarantined rows) in one transaction, before the load."""
    schema = manifest.target_schema
    try:
        _connection_ready(conn, manifest.sync_id)
        ensure_quality_tables(conn, schema)
        with conn.transaction():
            if quarantined is not None:
                staged, rules, rows = quarantined
                blob = _batch_schema(staged, manifest)
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
            abandoned = _abandon_unloaded(conn, schema, manifest.sync_id, manifest.state_table, result.run_id)
    except psycopg.OperationalError as error:
        raise SourceUnavailableError(
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


# --------------------------------------------------------------------------- the report


def _with_report(result: GateResult, manifest: Manifest, enabled: bool, log: Logger) -> GateResult:
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
        ("Rows quarantined", f"{result.quarantined_rows:,} ({_percent(result.quarantined_rows, result.rows)})"),
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
            f"{outcome.unexpected_count:,} ({_percent(outcome.unexpected_count, outcome.element_count or result.rows)})"
            if outcome.unexpected_count is not None
            else ""
        )
        examples = "<br>".join(esc(_example_text(e)) for e in outcome.examples) if not outcome.success else ""
        rows_html.append(
            "<tr>"
            f'<td style="color:{badge};font-weight:bold">{esc(state.upper())}</td>'
            f"<td>{esc(outcome.severity)}</td>"
            f"<td><code>{esc(outcome.type)}</code><br><small>{esc(_expected(outcome.kwargs))}</small></td>"
            f"<td>{esc(', '.join(outcome.columns))}</td>"
            f"<td>{esc(outcome.scope)}</td>"
            f"<td>{esc(unexpected)}</td>"
            f"<td>{esc(_display(outcome.observed_value)) if outcome.observed_value is not None else ''}</td>"
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
        f"{esc(str(getattr(_gx(), '__version__', '?')))}; full results in the target table "
        f"{esc(manifest.target_schema)}.{QUALITY_TABLE}, quarantined rows in {QUARANTINE_TABLE}.</small></p>"
        "</body></html>"
    )


# --------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class ReplayResult:
    sync_id: str
    run_id: str
    manifest_id: str
    pending: int = 0
    replayed: int = 0
    inserted: int = 0
    updated: int = 0
    #: Keys a later sync already updated in the target (their quarantined version is older): not replayed.
    skipped_newer: tuple[dict[str, Any], ...] = ()
    superseded: int = 0
    #: Rows the fix dropped or that still fail the suite: left pending in quarantine.
    still_pending: tuple[dict[str, Any], ...] = ()
    #: Rows whose batch has not committed (yet): not replayable, left as they are.
    awaiting_load: int = 0
    #: Rows whose batch can no longer load, marked ``abandoned`` by this replay.
    abandoned: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sync_id": self.sync_id,
            "run_id": self.run_id,
            "manifest_id": self.manifest_id,
            "pending": self.pending,
            "replayed": self.replayed,
            "inserted": self.inserted,
            "updated": self.updated,
            "skipped_newer": list(self.skipped_newer[:20]),
            "skipped_newer_count": len(self.skipped_newer),
            "superseded": self.superseded,
            "still_pending": list(self.still_pending[:20]),
            "still_pending_count": len(self.still_pending),
            "awaiting_load": self.awaiting_load,
            "abandoned": self.abandoned,
            "seconds": self.seconds,
        }


def _decode(value: Any, kind: pa.DataType) -> Any:
    """Turn a :func:`jsonable` value (or a hand-edited one) back into a value of the staged type."""
    if value is None:
        return None
    if isinstance(value, str):
        if pa.types.is_decimal(kind):
            return decimal.Decimal(value)
        if pa.types.is_timestamp(kind):
            return dt.datetime.fromisoformat(value)
        if pa.types.is_date(kind):
            return dt.date.fromisoformat(value)
        if pa.types.is_time(kind):
            return dt.time.fromisoformat(value)
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return bytes.fromhex(value[2:]) if value.startswith("\\x") else value.encode()
        if pa.types.is_floating(kind):
            return float(value)
        if pa.types.is_integer(kind):
            return int(value)
        if pa.types.is_boolean(kind):
            return value.strip().lower() in ("t", "true", "1", "yes", "y", "on")
    if pa.types.is_decimal(kind) and isinstance(value, int | float):
        return decimal.Decimal(str(value))
    if pa.types.is_floating(kind) and isinstance(value, int):
        return float(value)
    return value


def _rows_to_table(rows: Sequence[tuple[int, dict[str, Any]]], schema: pa.Schema, sync_id: str) -> pa.Table:
    arrays = []
    for column in schema:
        values = []
        for quarantine_id, row in rows:
            try:
                values.append(_decode(row.get(column.name), column.type))
            except (ValueError, TypeError, decimal.InvalidOperation) as error:
                raise DataError(
                    f"quarantined row {quarantine_id}: value {row.get(column.name)!r} cannot be read back as "
                    f"{column.type}: {error}; fix it in the row column of {QUARANTINE_TABLE}",
                    sync_id=sync_id,
                    column=column.name,
                    rule="replay",
                ) from error
        try:
            arrays.append(pa.array(values, type=column.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as error:
            raise DataError(
                f"quarantined rows cannot be read back as {column.type}: {error}",
                sync_id=sync_id,
                column=column.name,
                rule="replay",
            ) from error
    return pa.Table.from_arrays(arrays, schema=schema.remove_metadata())


def _apply_fix(fix: RowFix, table: pa.Table, schema: pa.Schema, sync_id: str) -> pa.Table:
    """Run the user's fix like a transform (ArrowDtype in, any frame out) and conform the result."""
    frame = table.to_pandas(types_mapper=pd.ArrowDtype)
    try:
        fixed = fix(frame)
    except Exception as error:
        raise SyncError(
            f"fix {getattr(fix, '__name__', fix)!r} failed: {type(error).__name__}: {error}", sync_id=sync_id
        ) from error
    if not isinstance(fixed, pd.DataFrame):
        raise ConfigurationError(f"fix must return a pandas DataFrame, got {type(fixed).__name__}", sync_id=sync_id)
    missing = [n for n in schema.names if n not in fixed.columns]
    if missing:
        raise ConfigurationError(f"fix dropped column(s) {missing}; it must keep every column", sync_id=sync_id)
    try:
        out = pa.Table.from_pandas(fixed[schema.names], preserve_index=False)
        return pa.Table.from_arrays(
            [out.column(n).cast(schema.field(n).type) for n in schema.names], schema=schema.remove_metadata()
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
        raise ConfigurationError(
            f"the fixed rows do not fit the staged column types: {error}", sync_id=sync_id, rule="replay"
        ) from error


def replay_quarantined(
    target_conn: psycopg.Connection[Any],
    sync_id: str,
    *,
    run_id: str,
    fix: RowFix | None = None,
    suite: SuiteLike | None = None,
    severities: Mapping[str, str] | None = None,
    quarantined_in_run: str | None = None,
    target_schema: str = "public",
    state_table: str = "_sync_state",
    staging: StagingArea | None = None,
    logger: Logger | None = None,
) -> ReplayResult:
    """Merge a sync's pending quarantined rows into the target (after fixing them), in one transaction.

    ``run_id`` is the replaying run (written to ``_sync_run_id`` of merged rows and to
    ``replay_run_id``); ``quarantined_in_run`` limits the replay to rows one run quarantined.
    ``fix`` gets the rows as a pandas DataFrame (ArrowDtype columns, like a transform) and returns
    them fixed; rows it drops stay pending.  With ``suite``, rows that still fail a row-level
    ``error`` expectation stay pending too.  Rows can also be fixed in SQL (``UPDATE
    _sync_quarantine SET row = jsonb_set(row, ...)``) before replaying.

    Only rows of batches that committed are replayed: the gate quarantines before the load, and
    a load that fails (or is refused as stale) leaves its batch out of the target.  Rows whose
    batch has not committed yet are left alone (``awaiting_load``); rows whose batch can no longer
    load (the sync committed past the version it was extracted at) are marked ``abandoned``,
    since later runs read those rows again from the source.  The load's ledger row in
    ``_sync_audit`` (written in the merge's transaction) says which batches committed.

    A row is not replayed when the target already holds a version merged after it was quarantined
    (``_sync_synced_at`` newer: a later sync brought the row again) - it is marked
    ``skipped_newer`` and reported - or when a later committed batch quarantined the same key
    again (``superseded``).  The merge is the load's own (:func:`apply_table_batch`) without
    deletes and without touching the sync state: the watermark does not move.
    """
    log = logger or LOG
    started = time.monotonic()
    staging = staging or StagingArea()
    manifest_id = f"replay-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    checks = plan_checks(load_suite(suite), severities) if suite is not None else []
    _connection_ready(target_conn, sync_id)
    quarantine = sql.Identifier(target_schema, QUARANTINE_TABLE)
    if not table_exists(target_conn, target_schema, QUARANTINE_TABLE):
        return ReplayResult(sync_id=sync_id, run_id=run_id, manifest_id=manifest_id)
    ensure_quality_tables(target_conn, target_schema)
    staged_dirs: list[str] = []
    pending = replayed = inserted = updated = superseded = awaiting = abandoned = 0
    skipped: list[dict[str, Any]] = []
    still: list[dict[str, Any]] = []
    try:
        with target_conn.transaction():
            hold_state_row(target_conn, target_schema, state_table, sync_id)  # serialize with loads of this sync
            abandoned = _abandon_unloaded(target_conn, target_schema, sync_id, state_table, run_id)
            run_filter = sql.SQL(" AND q.run_id = %(run)s") if quarantined_in_run else sql.SQL("")
            params = {"sync": sync_id, "run": quarantined_in_run, "replay": run_id}
            superseded = execute(
                target_conn,
                sql.SQL(
                    "UPDATE {q} q SET replay_status = 'superseded', replay_run_id = %(replay)s, "
                    "replay_note = 'a later run quarantined this key again' "
                    "WHERE q.sync_id = %(sync)s AND q.replay_status IS NULL{run_filter} AND EXISTS ("
                    " SELECT 1 FROM {q} n WHERE n.sync_id = q.sync_id AND n.target_table = q.target_table"
                    " AND n.row_key = q.row_key AND (n.quarantined_at, n.quarantine_id) > "
                    "(q.quarantined_at, q.quarantine_id) AND {n_committed})"
                ).format(q=quarantine, run_filter=run_filter, n_committed=_committed(target_conn, target_schema, "n")),
                params,
            ).rowcount
            rows = execute(
                target_conn,
                sql.SQL(
                    "SELECT q.quarantine_id, q.target_table, q.row_key, q.row, q.batch_schema, {committed} "
                    "FROM {q} q WHERE q.sync_id = %(sync)s AND q.replay_status IS NULL{run_filter} "
                    "ORDER BY q.quarantine_id FOR UPDATE"
                ).format(q=quarantine, run_filter=run_filter, committed=_committed(target_conn, target_schema, "q")),
                params,
            ).fetchall()
            selected = [r[:5] for r in rows if r[5]]
            awaiting = len(rows) - len(selected)
            if awaiting:
                log.info("sync %s: %d quarantined row(s) wait for their batch to load; not replayed", sync_id, awaiting)
            pending = len(selected)
            groups: dict[tuple[str, bytes], list[tuple[int, dict[str, Any], dict[str, Any]]]] = {}
            for quarantine_id, target_table, row_key, row, blob in selected:
                groups.setdefault((target_table, bytes(blob)), []).append((quarantine_id, row_key, row))
            for (target_table, blob), members in groups.items():
                outcome = _replay_group(
                    target_conn,
                    sync_id,
                    run_id,
                    manifest_id,
                    target_table,
                    blob,
                    members,
                    fix=fix,
                    checks=checks,
                    staging=staging,
                    log=log,
                    target_schema=target_schema,
                )
                staged_dirs.extend(outcome["staged_dirs"])
                replayed += outcome["replayed"]
                inserted += outcome["inserted"]
                updated += outcome["updated"]
                skipped.extend(outcome["skipped"])
                still.extend(outcome["still"])
            result = ReplayResult(
                sync_id=sync_id,
                run_id=run_id,
                manifest_id=manifest_id,
                pending=pending,
                replayed=replayed,
                inserted=inserted,
                updated=updated,
                skipped_newer=tuple(skipped),
                superseded=superseded,
                still_pending=tuple(still),
                awaiting_load=awaiting,
                abandoned=abandoned,
                seconds=round(time.monotonic() - started, 3),
            )
            execute(
                target_conn,
                sql.SQL(
                    "INSERT INTO {} (sync_id, run_id, manifest_id, target_table, success, rows, quarantined_rows, "
                    "summary, details) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                ).format(sql.Identifier(target_schema, QUALITY_TABLE)),
                (
                    sync_id,
                    run_id,
                    manifest_id,
                    ", ".join(sorted({g[0] for g in groups})) or None,
                    True,
                    replayed,
                    len(still),
                    Jsonb(
                        {
                            "kind": "replay",
                            "pending": pending,
                            "replayed": replayed,
                            "inserted": inserted,
                            "updated": updated,
                            "skipped_newer": len(skipped),
                            "superseded": superseded,
                            "still_pending": len(still),
                            "awaiting_load": awaiting,
                            "abandoned": abandoned,
                        }
                    ),
                    Jsonb({"kind": "replay", **result.to_dict()}),
                ),
            )
    except psycopg.OperationalError as error:
        raise SourceUnavailableError(f"replay failed, nothing changed: {error}", sync_id=sync_id) from error
    finally:
        for uri in staged_dirs:
            staging.discard(uri, log)
    log.info(
        "sync %s: replayed %d of %d quarantined row(s) (%d inserted, %d updated); %d skipped (newer version in "
        "the target), %d superseded, %d left pending, %d waiting for their batch to load, %d abandoned (their "
        "batch never loaded)",
        sync_id,
        replayed,
        pending + superseded,
        inserted,
        updated,
        len(skipped),
        superseded,
        len(still),
        awaiting,
        abandoned,
    )
    return result


def _replay_group(
    conn: psycopg.Connection[Any],
    sync_id: str,
    run_id: str,
    manifest_id: str,
    target_table: str,
    blob: bytes,
    members: Sequence[tuple[int, dict[str, Any], dict[str, Any]]],
    *,
    fix: RowFix | None,
    checks: Sequence[_Check],
    staging: StagingArea,
    log: Logger,
    target_schema: str,
) -> dict[str, Any]:
    schema = pyarrow.ipc.read_schema(pa.py_buffer(blob))
    batch = json.loads((schema.metadata or {})[_SCHEMA_META_KEY])
    primary_key = list(batch["primary_key"])
    quarantine = sql.Identifier(target_schema, QUARANTINE_TABLE)
    target = sql.Identifier(batch["target_schema"], batch["target_table"])
    ids = [m[0] for m in members]
    done: dict[str, Any] = {"staged_dirs": [], "replayed": 0, "inserted": 0, "updated": 0, "skipped": [], "still": []}

    # 1. Rows a later sync already brought again: the target's version is newer, keep it.
    newer: dict[int, Any] = {}
    if table_exists(conn, batch["target_schema"], batch["target_table"]):
        match = sql.SQL(" AND ").join(sql.SQL("t.{0} = r.{0}").format(sql.Identifier(k)) for k in primary_key)
        newer = dict(
            execute(
                conn,
                sql.SQL(
                    "SELECT q.quarantine_id, t.{synced} FROM {q} q "
                    "CROSS JOIN LATERAL jsonb_populate_record(NULL::{t}, q.row_key) r "
                    "JOIN {t} t ON {match} WHERE q.quarantine_id = ANY(%s) AND t.{synced} > q.quarantined_at "
                    "FOR UPDATE OF t"
                ).format(q=quarantine, t=target, match=match, synced=sql.Identifier(SYNCED_AT_COLUMN)),
                (ids,),
            ).fetchall()
        )
    if newer:
        execute(
            conn,
            sql.SQL(
                "UPDATE {} SET replay_status = 'skipped_newer', replay_run_id = %s, "
                "replay_note = 'the target holds a version synced after the quarantine' WHERE quarantine_id = ANY(%s)"
            ).format(quarantine),
            (run_id, list(newer)),
        )
        done["skipped"] = [
            {"quarantine_id": qid, "key": key, "target_synced_at": newer[qid].isoformat()}
            for qid, key, _ in members
            if qid in newer
        ]
        log.warning(
            "sync %s: %d quarantined row(s) not replayed: a later sync already merged a newer version: %s",
            sync_id,
            len(newer),
            ", ".join(_display(s["key"]) for s in done["skipped"][:5]),
        )
    candidates = [(qid, row) for qid, _, row in members if qid not in newer]
    if not candidates:
        return done

    # 2. Rebuild the staged rows, fix them, re-validate them.
    table = _rows_to_table(candidates, schema, sync_id)
    by_key = {_key_of(row, primary_key): qid for qid, row in candidates}
    if fix is not None:
        table = _apply_fix(fix, table, schema, sync_id)
    fixed_keys = [
        tuple(_plain(v) for v in key) for key in zip(*(table.column(k).to_pylist() for k in primary_key), strict=True)
    ]
    foreign = [k for k in fixed_keys if k not in by_key]
    if foreign:
        raise ConfigurationError(
            f"fix changed or added primary keys (e.g. {foreign[0]!r}); it may fix values, not keys", sync_id=sync_id
        )
    failing: dict[KeyTuple, list[str]] = {}
    row_checks = [c for c in checks if c.row_level]
    if checks and len(row_checks) < len(checks):
        log.info("sync %s: replay re-validates row-level expectations only", sync_id)
    if row_checks and table.num_rows:
        _check_columns(row_checks, table.schema.names, primary_key)
        collect = {c.index for c in row_checks if c.severity == "error"}
        outcomes, keys = _evaluate(
            _GxEngine(),
            row_checks,
            _MemorySource(table),
            primary_key,
            collect=collect,
            chunk_rows=DEFAULT_CHUNK_ROWS,
            examples=DEFAULT_EXAMPLES,
            log=log,
        )
        for outcome in outcomes:
            if outcome.error and outcome.severity == "error":
                raise QualityError(
                    f"replay: {outcome.describe(table.num_rows)}",
                    sync_id=sync_id,
                    table=target_table,
                    rule=outcome.type,
                )
            if outcome.unexpected_count and outcome.severity == "warn":
                log.warning("sync %s: replay warning [rule=%s] %s", sync_id, outcome.type, outcome.describe(0))
            for key in keys.get(outcome.index, {}):
                failing.setdefault(key, []).append(outcome.label)
    keep = [k not in failing for k in fixed_keys]
    dropped = set(by_key) - set(fixed_keys)
    done["still"] = [
        {"quarantine_id": by_key[k], "key": dict(zip(primary_key, map(jsonable, k), strict=True)), "reason": reason}
        for k, reason in [
            *((k, "dropped by the fix") for k in dropped),
            *((k, "; ".join(r)) for k, r in failing.items()),
        ]
    ]
    table = table.filter(pa.array(keep, type=pa.bool_()))
    if not table.num_rows:
        return done

    # 3. Merge with the load's own machinery (no deletes, no state change), mark the rows replayed.
    staging_dir = staging.batch_uri(sync_id, f"{manifest_id}-{uuid.uuid4().hex[:6]}")
    uri = f"{staging_dir}/part-00000.parquet"
    writer = staging.open_writer(uri, table.schema)
    try:
        writer.write_table(table)
    finally:
        writer.close()
    done["staged_dirs"].append(staging_dir)
    manifest = Manifest(
        sync_id=sync_id,
        run_id=run_id,
        manifest_id=manifest_id,
        mode="incremental",
        source_table=batch.get("source_table") or batch["target_table"],
        target_schema=batch["target_schema"],
        target_table=batch["target_table"],
        primary_key=tuple(primary_key),
        cursor_column=None,
        columns=tuple(ManifestColumn(**c) for c in batch["columns"]),
        files=(StagedFile(uri=uri, rows=table.num_rows),),
        rows=table.num_rows,
        base_version=0,
        watermark_low=None,
        watermark_high=None,
        staging_dir=staging_dir,
        delete_mode=batch.get("delete_mode", "hard"),
        detect_deletes=False,
    )
    applied = apply_table_batch(conn, manifest, run_id, log)
    replayed_rows = table.to_pylist()
    with conn.cursor() as cursor:
        cursor.executemany(
            bindable(
                sql.SQL(
                    "UPDATE {} SET replay_status = 'replayed', replayed_at = now(), replay_run_id = %s, "
                    "replayed_row = %s WHERE quarantine_id = %s"
                ).format(quarantine),
                cursor,
            ),
            [
                (run_id, Jsonb({k: jsonable(v) for k, v in row.items()}), by_key[_key_of(row, primary_key)])
                for row in replayed_rows
            ],
        )
    done.update(replayed=len(replayed_rows), inserted=applied.inserted, updated=applied.updated)
    return done


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
