"""Phase 2: classify the keys of the differing buckets, keep examples, stage every differing key."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from airflow_sync_provider.core.extract import new_manifest_id
from airflow_sync_provider.core.progress import LOG
from airflow_sync_provider.core.reconcile import limits
from airflow_sync_provider.core.reconcile.fingerprint import canonical_column, canonical_keys, plan_of
from airflow_sync_provider.core.reconcile.results import KIND_COLUMN, KINDS, DifferenceKind, ReconcileResult
from airflow_sync_provider.core.reconcile.sides import SourceSide, TargetSide
from airflow_sync_provider.core.source import SourceTable
from airflow_sync_provider.core.spec import SyncSpec
from airflow_sync_provider.core.staging import StagingArea, iter_staged_batches


class DifferenceSink:
    """Counts differing keys, keeps a few examples, and stages all of them to Parquet for the repair."""

    def __init__(self, staging: StagingArea, spec: SyncSpec, source: SourceTable, limit: int) -> None:
        self.staging = staging
        self.limit = max(limit, 0)
        self.key_plans = [plan_of(source, k) for k in source.primary_key]
        self.schema = pa.schema(
            [*(pa.field(p.name, p.arrow_type) for p in self.key_plans), pa.field(KIND_COLUMN, pa.string())]
        )
        self.dir = staging.batch_uri(spec.sync_id, f"reconcile-{stamp()}")
        self.uri = f"{self.dir}/differing-keys.parquet"
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.examples: dict[str, list[tuple[Any, ...]]] = {kind: [] for kind in KINDS}
        self._buffer: list[tuple[tuple[Any, ...], str]] = []
        self._writer: Any = None

    def add(self, kind: DifferenceKind, key: tuple[Any, ...]) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < self.limit:
            self.examples[kind].append(key)
        self._buffer.append((key, kind))
        if len(self._buffer) >= limits.FETCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        arrays = [
            pa.array([key[i] for key, _ in self._buffer], type=plan.arrow_type) for i, plan in enumerate(self.key_plans)
        ]
        arrays.append(pa.array([kind for _, kind in self._buffer], pa.string()))
        if self._writer is None:
            self._writer = self.staging.open_writer(self.uri, self.schema)
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self._buffer = []

    def close(self) -> str | None:
        self._flush()
        if self._writer is None:
            return None
        self._writer.close()
        self._writer = None
        return self.uri

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.staging.discard(self.dir)


def compare_buckets(
    differing: Sequence[int],
    source_counts: Sequence[int],
    target_counts: Sequence[int],
    sides: tuple[SourceSide, TargetSide],
    sink: DifferenceSink,
) -> int:
    """Phase 2: classify the keys of the differing buckets; returns how many buckets really differ."""
    source_side, target_side = sides
    confirmed: set[int] = set()
    for group in _groups(differing, source_counts, target_counts):
        wanted = set(group)
        source_rows: dict[tuple[Any, ...], tuple[tuple[Any, ...], int, int]] = {}
        for canon, key, h, b in source_side.rows_in(wanted):
            source_rows[canon] = (key, h, b)
        for canon, key, h, b in target_side.rows_in(wanted):
            match = source_rows.pop(canon, None)
            if match is None:
                sink.add("extra_in_target", key)
                confirmed.add(b)
            elif match[1] != h:
                sink.add("different", match[0])
                confirmed.add(b)
        for key, _, b in source_rows.values():
            sink.add("missing_in_target", key)
            confirmed.add(b)
    return len(confirmed)


def _groups(
    differing: Sequence[int], source_counts: Sequence[int], target_counts: Sequence[int]
) -> Iterator[list[int]]:
    group: list[int] = []
    rows = 0
    for b in differing:
        size = max(source_counts[b], target_counts[b])
        if group and rows + size > limits.GROUP_ROWS:
            yield group
            group, rows = [], 0
        group.append(b)
        rows += size
    if group:
        yield group


def differing_columns(keys: Sequence[tuple[Any, ...]], sides: tuple[SourceSide, TargetSide]) -> list[tuple[str, ...]]:
    """For the reported "different" examples: which columns differ (one small lookup per side)."""
    if not keys:
        return []
    source_side, target_side = sides
    plans = source_side.source.plans
    key_index = source_side.key_index

    def by_key(table: pa.Table) -> dict[tuple[Any, ...], tuple[Any, ...]]:
        canonical = [canonical_column(table.column(i), kind) for i, kind in enumerate(source_side.kinds)]
        rows = list(zip(*canonical, strict=True))
        return {tuple(row[i] for i in key_index): row for row in rows}

    source_rows = by_key(source_side.rows_by_key(keys))
    target_rows = by_key(target_side.rows_by_key(keys))
    key_table = pa.Table.from_arrays(
        [pa.array([k[i] for k in keys], type=p.arrow_type) for i, p in enumerate(source_side.key_plans)],
        names=[p.name for p in source_side.key_plans],
    )
    columns: list[tuple[str, ...]] = []
    for canon in canonical_keys(key_table, source_side.key_kinds, list(range(len(key_index)))):
        source_row, target_row = source_rows.get(canon), target_rows.get(canon)
        if source_row is None or target_row is None:  # changed between the scans (no snapshot, e.g. SQLite)
            columns.append(())
            continue
        columns.append(tuple(p.name for p, s, t in zip(plans, source_row, target_row, strict=True) if s != t))
    return columns


#: A unique, time-ordered name for a staging folder of this module (differing keys, repair rows).
stamp = new_manifest_id


def iter_differing_keys(result: ReconcileResult, batch_rows: int = 65_536) -> Iterable[dict[str, Any]]:
    """Every differing key of ``result`` (read back from the staged file): ``{column: value, kind}``."""
    if not result.keys_uri:
        return
    for batch in iter_staged_batches(result.keys_uri, batch_rows):
        yield from batch.to_pylist()


def discard_keys(result: ReconcileResult) -> None:
    """Remove the staged differing-keys file of a result that will not be repaired."""
    if result.keys_uri:
        StagingArea().discard(result.keys_uri.rsplit("/", 1)[0], LOG)


__all__ = [
    "DifferenceSink",
    "compare_buckets",
    "differing_columns",
    "discard_keys",
    "iter_differing_keys",
    "stamp",
]
