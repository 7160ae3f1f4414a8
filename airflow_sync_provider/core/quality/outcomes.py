"""What the gate found: one :class:`ExpectationOutcome` per expectation (chunk results combined), the
:class:`GateResult` of a batch, the :class:`QualityError` that stops a load, and the words for them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from airflow_sync_provider.core.errors import DataError
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.quality.engine import Check, Scope, Severity, mostly_success
from airflow_sync_provider.core.quality.store import QUARANTINE_TABLE
from airflow_sync_provider.core.quality.suite import COLUMN_KWARGS
from airflow_sync_provider.core.quality.values import KeyTuple, display, jsonable, key_of, percent, plain


class QualityError(DataError):
    """The staged batch failed the quality gate; nothing was loaded.

    ``outcomes`` holds the failed expectations (see :class:`ExpectationOutcome`), ``result`` the
    whole :class:`GateResult` (when the validation got that far).
    """

    outcomes: tuple[ExpectationOutcome, ...] = ()
    result: GateResult | None = None


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
                f"{subject}: {self.unexpected_count:,} of {rows:,} rows ({percent(self.unexpected_count, rows)}) "
                f"{problem(self.type, self.kwargs)}"
            )
            if self.unexpected_count and self.kwargs.get("mostly") is not None:
                text += f" (mostly={self.kwargs['mostly']})"
            if self.examples:
                text += "; examples: " + ", ".join(example_text(e) for e in self.examples)
            elif self.unexpected_count and self.rows_identified == 0 and self.row_level:
                text += "; GX named no rows for this expectation"
            return text
        return f"{subject}: observed {display(self.observed_value)}, expected {expected(self.kwargs)}"

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


def example_text(example: Mapping[str, Any]) -> str:
    """One failing row in a message: ``key=(id=17) value=-5``."""
    key = example.get("key") or {}
    shown = "key=(" + ", ".join(f"{k}={display(v)}" for k, v in key.items()) + ")"
    if "value" in example:
        value = example["value"]
        shown += f" value={display(value)}" if not isinstance(value, Mapping) else f" values={display(value)}"
    return shown


def _bounds(kwargs: Mapping[str, Any], low: str = "min_value", high: str = "max_value") -> str:
    lo, hi = kwargs.get(low), kwargs.get(high)
    if lo is not None and hi is not None:
        return f"[{display(lo)}, {display(hi)}]"
    if lo is not None:
        return f"[{display(lo)}, ...)"
    return f"(..., {display(hi)}]"


def problem(kind: str, kwargs: Mapping[str, Any]) -> str:
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
        shown = "{" + ", ".join(display(v) for v in values[:8]) + (", ..." if len(values) > 8 else "") + "}"
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


def expected(kwargs: Mapping[str, Any]) -> str:
    """What a table- or batch-level expectation wanted, in words (its bounds or arguments)."""
    if "min_value" in kwargs or "max_value" in kwargs:
        return _bounds(kwargs)
    shown = {k: v for k, v in kwargs.items() if k not in (*COLUMN_KWARGS, "column_list", "batch_id", "result_format")}
    return ", ".join(f"{k}={display(v)}" for k, v in shown.items()) or "the expectation to hold"


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


def _row_value(value: Any, column: str, key: Mapping[str, Any], data: pa.Table | pa.RecordBatch | None) -> Any:
    """A failing row's value for the examples: :func:`jsonable`, None for a NULL, float NaN for a real NaN.

    GX validates NumPy-backed pandas frames, where a NULL in a numeric column arrives as NaN; the
    Arrow data the frame came from (``data``) still tells the two apart.  Only the few examples a
    message shows are looked up.  (:meth:`ExpectationOutcome.details` makes a NaN JSON-safe.)
    """
    value = plain(value)
    if not (isinstance(value, float) and math.isnan(value)):
        return jsonable(value)
    if data is None or column not in data.schema.names or not pa.types.is_floating(data.schema.field(column).type):
        return None  # NaN in a non-float column is pandas' NULL
    try:
        mask: Any = None
        for name, wanted in key.items():
            field_type = data.schema.field(name).type
            equal = pc.equal(data.column(name), pa.scalar(plain(wanted), type=field_type))
            mask = equal if mask is None else pc.and_(mask, equal)
        found = data.filter(mask).column(column)
    except (KeyError, TypeError, ValueError, pa.ArrowException):
        return None
    return value if len(found) and found[0].is_valid else None


def absorb_result(
    outcome: ExpectationOutcome,
    check: Check,
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
                    keys[key_of(row, primary_key)] = None
    if error:
        outcome.success = False


def finish_outcome(outcome: ExpectationOutcome, check: Check) -> None:
    """After the last chunk: a row-level expectation succeeds by GX's ``mostly`` rule on the totals."""
    if outcome.error:
        outcome.success = False
    elif check.row_level and outcome.unexpected_count is not None:
        considered = outcome.element_count - outcome.missing_count
        outcome.success = mostly_success(considered, outcome.unexpected_count, check.mostly)


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
                f"({percent(self.quarantined_rows, self.rows)}) in {QUARANTINE_TABLE}"
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


__all__ = [
    "ExpectationOutcome",
    "GateResult",
    "QualityError",
    "absorb_result",
    "example_text",
    "expected",
    "finish_outcome",
    "problem",
]
