"""What a reconciliation and a repair report: the window compared, the counts, bounded examples."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.manifest import Manifest
from airflow_sync_provider.core.source import SourceTable
from airflow_sync_provider.core.spec import SyncSpec
from airflow_sync_provider.core.values import decode_value, encode_value

Method = Literal["auto", "sql", "python"]
DifferenceKind = Literal["missing_in_target", "extra_in_target", "different"]
KINDS: tuple[DifferenceKind, ...] = ("missing_in_target", "extra_in_target", "different")

#: Column of the differing-keys Parquet file that says which kind of difference a key is.
KIND_COLUMN = "_sync_reconcile_kind"


@dataclass(frozen=True)
class ReconcileWindow:
    """Rows with ``low <= cursor < high`` (``<= high`` with ``include_high``); None = unbounded."""

    low: Any = None
    high: Any = None
    include_high: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"low": encode_value(self.low), "high": encode_value(self.high), "include_high": self.include_high}

    def describe(self) -> str:
        def show(value: Any, unbounded: str) -> str:
            if value is None:
                return unbounded
            return value.isoformat() if isinstance(value, (dt.date, dt.time)) else repr(value)

        return f"[{show(self.low, '-inf')}, {show(self.high, '+inf')}{']' if self.include_high else ')'}"


WindowLike = ReconcileWindow | tuple[Any, Any] | None


def window_from_manifest(manifest: Manifest | Mapping[str, Any]) -> ReconcileWindow | None:
    """The cursor window an incremental manifest synced; None (the whole table) for a full sync.

    From the committed watermark's cursor up to the extraction's exclusive upper bound (every row
    below it was extracted); without an upper bound (numeric cursors), up to and including the last
    extracted cursor value.  Accepts a :class:`Manifest`, its dict (XCom), or the
    ``SyncTableOperator`` XCom (``{"manifest": ..., "load": ...}``).
    """
    data = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
    if isinstance(data.get("manifest"), Mapping):
        data = dict(data["manifest"])
    if data.get("mode") != "incremental" or not data.get("cursor_column"):
        return None
    low_row, high_row, upper = data.get("watermark_low"), data.get("watermark_high"), data.get("upper_bound")
    low = decode_value(low_row[0]) if low_row else None
    if upper is not None:
        return ReconcileWindow(low, decode_value(upper))
    if high_row:
        return ReconcileWindow(low, decode_value(high_row[0]), include_high=True)
    return ReconcileWindow(low, None)


@dataclass(frozen=True)
class ReconcileResult:
    """Source vs target: counts, differing buckets, and (bounded) examples of differing keys."""

    sync_id: str
    source_table: str
    target_table: str
    primary_key: tuple[str, ...]
    method: str
    buckets: int
    window: dict[str, Any] | None
    source_count: int
    target_count: int
    differing_buckets: int
    missing_count: int
    extra_count: int
    different_count: int
    #: Up to ``max_keys_reported`` keys per kind, as ``{column: value}`` (JSON-safe values).
    missing_in_target: tuple[dict[str, Any], ...] = ()
    extra_in_target: tuple[dict[str, Any], ...] = ()
    different: tuple[dict[str, Any], ...] = ()
    #: For each ``different`` example: the columns whose values differ.
    different_columns: tuple[tuple[str, ...], ...] = ()
    seconds: float = 0.0
    #: Parquet file with every differing key (key columns + ``_sync_reconcile_kind``), for the repair.
    keys_uri: str | None = None

    @property
    def differing_keys(self) -> int:
        return self.missing_count + self.extra_count + self.different_count

    @property
    def equal(self) -> bool:
        return self.differing_keys == 0 and self.source_count == self.target_count

    def examples(self) -> dict[str, list[Any]]:
        different = [
            {"key": key, "columns": list(columns)}
            for key, columns in zip(self.different, self.different_columns, strict=False)
        ]
        return {
            "missing_in_target": list(self.missing_in_target),
            "extra_in_target": list(self.extra_in_target),
            "different": different,
        }

    def to_dict(self) -> dict[str, Any]:
        """Small and JSON-safe (for XCom): counts and the bounded examples, never all keys."""
        data = asdict(self)
        data.update(self.examples())
        data.pop("different_columns")
        data["primary_key"] = list(self.primary_key)
        data["differing_keys"] = self.differing_keys
        data["equal"] = self.equal
        return data

    def describe(self) -> str:
        scope = "" if self.window is None else f" in window {_describe_window(self.window)}"
        text = (
            f"source {self.source_table} has {self.source_count:,} rows, target {self.target_table} has "
            f"{self.target_count:,}{scope}"
        )
        if self.equal:
            return text + "; they are equal"
        parts = []
        for kind, count, examples in (
            ("missing in target", self.missing_count, self.missing_in_target),
            ("extra in target", self.extra_count, self.extra_in_target),
        ):
            if count:
                parts.append(f"{kind}: {count:,} (e.g. {', '.join(_key_text(k) for k in examples)})")
        if self.different_count:
            shown = [
                f"{_key_text(k)} [{', '.join(c)}]" if c else _key_text(k)
                for k, c in zip(self.different, self.different_columns, strict=False)
            ]
            parts.append(f"different values: {self.different_count:,} (e.g. {', '.join(shown)})")
        return (
            f"{text}; {self.differing_keys:,} differing key(s) in {self.differing_buckets} of {self.buckets} "
            f"buckets: " + "; ".join(parts)
        )


@dataclass(frozen=True)
class RepairResult:
    """What a repair changed in the target (the sync state is never touched)."""

    sync_id: str
    run_id: str
    keys: int
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    #: Keys the source does not have but ``delete_mode="none"`` forbids removing from the target.
    not_deleted: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_window(window: WindowLike, spec: SyncSpec) -> ReconcileWindow | None:
    """The window to compare (None: the whole table); a window needs the sync's cursor column."""
    if window is None:
        return None
    if not isinstance(window, ReconcileWindow):
        try:
            low, high = window
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"window must be a (low, high) pair on the cursor column, got {window!r}", sync_id=spec.sync_id
            ) from None
        window = ReconcileWindow(low, high)
    if not spec.cursor_column:
        raise ConfigurationError("a reconciliation window needs the sync's cursor_column", sync_id=spec.sync_id)
    if window.low is None and window.high is None:
        return None
    return window


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)


def key_dict(source: SourceTable, key: tuple[Any, ...]) -> dict[str, Any]:
    """A key as ``{column: value}`` with JSON-safe values (for results and the log)."""
    return {name: _json_safe(v) for name, v in zip(source.primary_key, key, strict=True)}


def _key_text(key: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in key.items()) + ")"


def _describe_window(window: Mapping[str, Any]) -> str:
    return ReconcileWindow(
        decode_value(window.get("low")), decode_value(window.get("high")), bool(window.get("include_high"))
    ).describe()


__all__ = [
    "KINDS",
    "KIND_COLUMN",
    "DifferenceKind",
    "Method",
    "ReconcileResult",
    "ReconcileWindow",
    "RepairResult",
    "WindowLike",
    "key_dict",
    "resolve_window",
    "window_from_manifest",
]
