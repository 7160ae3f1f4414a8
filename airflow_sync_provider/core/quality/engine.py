"""GX access: Great Expectations imported on first use, one ephemeral context, and the checks it runs.

A :class:`Check` is one expectation of the suite with what the gate decided about it (severity,
and scope: chunk by chunk, on the whole batch, or on the schema alone); :class:`GxEngine` validates
checks on pandas frames with GX's own engine, so expectations are never re-implemented here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd

from airflow_sync_provider.core.errors import ConfigurationError

Severity = Literal["error", "warn"]
Scope = Literal["rows", "batch", "schema"]

_GATE_INDEX = "_sync_gate_index"


@dataclass(frozen=True)
class Check:
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


def import_gx() -> Any:
    """Great Expectations, imported on first use (it takes seconds; DAG parsing must not pay it)."""
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:  # its INFO chatter would drown the task log
        gx_logger.setLevel(logging.WARNING)
    import great_expectations

    return great_expectations


class GxEngine:
    """One ephemeral GX context with a pandas dataframe asset; each chunk is one GX batch."""

    def __init__(self) -> None:
        gx = import_gx()
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

    def suite(self, checks: Sequence[Check]) -> Any:
        self._suites += 1
        expectations = []
        for check in checks:
            copy = check.expectation.copy(deep=True)
            copy.id = None  # a copy must not belong to the user's suite
            copy.meta = {**(copy.meta or {}), _GATE_INDEX: check.index}
            expectations.append(copy)
        return import_gx().ExpectationSuite(name=f"sync_quality_gate_{self._suites}", expectations=expectations)

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


def mostly_success(rows_considered: int, unexpected: int, mostly: float) -> bool:
    """GX's own rule for map expectations (vacuously true without rows)."""
    if rows_considered <= 0:
        return True
    try:
        from great_expectations.expectations.expectation import _mostly_success as gx_mostly
    except ImportError:  # private helper moved: same formula
        return (rows_considered - unexpected) / rows_considered >= mostly
    return bool(gx_mostly(rows_considered, unexpected, mostly))


__all__ = ["Check", "GxEngine", "Scope", "Severity", "import_gx", "mostly_success"]
