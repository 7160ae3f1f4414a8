"""The suite: GX expectations from objects, a ``gx.ExpectationSuite`` or a suite JSON file, planned as checks."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.quality.engine import Check, Scope, Severity, import_gx

#: What a suite can be given as: GX expectation objects, a GX suite, or a GX suite JSON file.
SuiteLike = Any


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
#: The expectation arguments that name a column.
COLUMN_KWARGS = ("column", "column_A", "column_B")


def load_suite(suite: SuiteLike) -> list[Any]:
    """GX expectation objects from a list of expectations, a ``gx.ExpectationSuite`` or a suite JSON file.

    The JSON file is GX's suite format (``{"name": ..., "expectations": [{"type": ..., "kwargs":
    {...}, "meta": {...}}]}``; the 0.x key ``expectation_type`` is accepted too).  Anything GX
    cannot build raises :class:`ConfigurationError` naming the file and the expectation.
    """
    gx = import_gx()
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
    columns = [kwargs[k] for k in COLUMN_KWARGS if isinstance(kwargs.get(k), str)]
    column_list = kwargs.get("column_list")
    if isinstance(column_list, list | tuple):
        columns.extend(str(c) for c in column_list)
    return tuple(dict.fromkeys(columns))


def plan_checks(expectations: Sequence[Any], severities: Mapping[str, str] | None = None) -> list[Check]:
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
            Check(
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


def check_columns(checks: Sequence[Check], available: Sequence[str], primary_key: Sequence[str]) -> None:
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


__all__ = ["COLUMN_KWARGS", "SuiteLike", "check_columns", "load_suite", "plan_checks"]
