"""Reading a batch for the checks: staged Parquet files or an in-memory table, chunk by chunk (row-level
checks), whole (batch-level checks, only the columns they name) or as an empty frame (schema checks).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from airflow_sync_provider.core.errors import SyncError
from airflow_sync_provider.core.manifest import StagedFile
from airflow_sync_provider.core.progress import Logger
from airflow_sync_provider.core.quality.engine import Check, GxEngine
from airflow_sync_provider.core.quality.outcomes import ExpectationOutcome, absorb_result, finish_outcome
from airflow_sync_provider.core.quality.values import KeyTuple
from airflow_sync_provider.core.staging import filesystem_for

#: Rows per chunk for row-level expectations.
DEFAULT_CHUNK_ROWS = 200_000
#: Examples of failing rows kept per expectation (in messages, XCom, audit and report).
DEFAULT_EXAMPLES = 5


def check_files(files: Sequence[StagedFile]) -> None:
    """Every staged file of the batch must still be there (a load removes them)."""
    import pyarrow.fs as pafs

    for staged in files:
        fs, path = filesystem_for(staged.uri)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise SyncError(
                f"staged file {staged.uri} does not exist: the batch was loaded already (a load removes its staged "
                "files) or removed; validate the manifest before loading it, or extract again",
                rule="staged batch",
            )


class BatchSource:
    """Where the rows come from: staged files (a manifest) or an in-memory table (replay)."""

    schema: pa.Schema

    def chunks(self, columns: list[str], chunk_rows: int) -> Iterator[tuple[str, pa.RecordBatch]]:
        raise NotImplementedError

    def whole(self, columns: list[str]) -> pa.Table:
        raise NotImplementedError


class StagedSource(BatchSource):
    """The staged Parquet files of a manifest, read file by file."""

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


class MemorySource(BatchSource):
    """An in-memory table (the rows a replay re-validates)."""

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


def _projection(checks: Sequence[Check], schema: pa.Schema, primary_key: Sequence[str]) -> list[str]:
    if any(c.all_columns for c in checks):
        return list(schema.names)
    wanted = set(primary_key)
    for check in checks:
        wanted.update(check.columns)
    return [name for name in schema.names if name in wanted]


def evaluate(
    engine: GxEngine,
    checks: Sequence[Check],
    source: BatchSource,
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
        group: Sequence[Check], results: Mapping[int, Any], label: str, data: pa.Table | pa.RecordBatch | None
    ) -> None:
        for check in group:
            result = results.get(check.index)
            if result is not None:
                absorb_result(
                    outcomes[check.index], check, result, label, primary_key, examples, keys.get(check.index), data
                )

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
        finish_outcome(outcomes[check.index], check)
    return [outcomes[c.index] for c in checks], keys


__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_EXAMPLES",
    "BatchSource",
    "MemorySource",
    "StagedSource",
    "check_files",
    "evaluate",
]
