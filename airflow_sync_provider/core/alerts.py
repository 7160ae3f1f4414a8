"""Per-sync alert thresholds and their evaluation against the status read model.

A :class:`AlertThresholds` says when a sync needs a person: its data older than X, its CDC slot
keeping more than Y bytes of WAL, its watermark held back by an open source transaction for longer
than Z, more than N rows waiting in quarantine, or a reconciliation that found differences it did not
repair.  Every threshold is off (None) by default.  :func:`evaluate` checks one
:class:`~.status.SyncStatus` and returns an :class:`Alert` per breach, with a message that names the
sync, the target, the table and the figures.  Pure Python: the Airflow notifiers and the health-check
operator deliver what it returns.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from airflow_sync_provider.core.errors import ConfigurationError
from airflow_sync_provider.core.status import SyncStatus

#: The rules, in the order alerts are reported.
AlertRule = Literal[
    "freshness",
    "slot_retained_wal",
    "watermark_held_back",
    "quarantine",
    "reconciliation_differences",
]
RULES: tuple[AlertRule, ...] = (
    "freshness",
    "slot_retained_wal",
    "watermark_held_back",
    "quarantine",
    "reconciliation_differences",
)
#: ``warning`` past the threshold, ``critical`` past twice the threshold.
Severity = Literal["warning", "critical"]


@dataclass(frozen=True)
class _Scale:
    """A kind of threshold quantity: a number, or text of a number and an optional unit."""

    what: str
    pattern: re.Pattern[str]
    units: Mapping[str, int]
    default_unit: str
    examples: str

    def parse(self, value: float | str, name: str) -> float:
        """``value`` in the smallest unit; a bool, text that does not match or a negative amount is refused."""
        if isinstance(value, bool):
            raise ConfigurationError(f"threshold {name} must be {self.what}, got {value!r}")
        if isinstance(value, (int, float)):
            amount = float(value)
        else:
            match = self.pattern.match(str(value))
            if not match:
                raise ConfigurationError(f"threshold {name}: {value!r} is not {self.examples}")
            amount = float(match.group(1)) * self.units[(match.group(2) or self.default_unit).lower()]
        if amount < 0:
            raise ConfigurationError(f"threshold {name} must not be negative, got {value!r}")
        return amount


_DURATION = _Scale(
    "a duration",
    re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$", re.IGNORECASE),
    {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800},
    "s",
    "a duration like '90s', '15m', '2h' or '1d'",
)
_BYTES = _Scale(
    "a size in bytes",
    re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.IGNORECASE),
    {
        "b": 1,
        "kb": 1000,
        "mb": 1000**2,
        "gb": 1000**3,
        "tb": 1000**4,
        "kib": 1024,
        "mib": 1024**2,
        "gib": 1024**3,
        "tib": 1024**4,
    },
    "b",
    "a size like 1048576, '512MB' or '2GiB'",
)


def parse_duration(value: dt.timedelta | float | str | None, *, name: str = "duration") -> dt.timedelta | None:
    """A threshold duration from a timedelta, seconds, or text such as ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"``."""
    if value is None or isinstance(value, dt.timedelta):
        return value
    return dt.timedelta(seconds=_DURATION.parse(value, name))


def parse_bytes(value: float | str | None, *, name: str = "bytes") -> int | None:
    """A threshold size from a number of bytes or text such as ``"512MB"``, ``"2GiB"``."""
    if value is None:
        return None
    return int(_BYTES.parse(value, name))


def _parse_count(value: Any, *, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigurationError(f"threshold {name} must be a whole number of rows, got {value!r}")
    try:
        count = int(value)
    except ValueError:
        raise ConfigurationError(f"threshold {name} must be a whole number of rows, got {value!r}") from None
    if count < 0:
        raise ConfigurationError(f"threshold {name} must not be negative, got {value!r}")
    return count


@dataclass(frozen=True)
class AlertThresholds:
    """When one sync needs attention; every threshold is off (None) unless set.

    :param freshness_older_than: alert when now minus the newest synced cursor time is longer
        (table syncs with a date/time cursor; CDC freshness is the slot rule's job).
    :param slot_retained_wal_over: alert when the CDC slot keeps more bytes of WAL on the source.
    :param watermark_held_back_longer_than: alert when an open source transaction has held the
        watermark back for longer (since the first of the consecutive held-back runs).
    :param quarantine_above: alert when more rows than this wait in quarantine.
    :param reconciliation_differences: alert when the newest reconciliation left more differing
        rows than this unrepaired (0: any difference).
    """

    freshness_older_than: dt.timedelta | None = None
    slot_retained_wal_over: int | None = None
    watermark_held_back_longer_than: dt.timedelta | None = None
    quarantine_above: int | None = None
    reconciliation_differences: int | None = None

    def __post_init__(self) -> None:
        # Accept the spellings a YAML file or an Airflow Variable gives ("2h", "1GB", "5"), checked once here.
        set_ = object.__setattr__
        set_(self, "freshness_older_than", parse_duration(self.freshness_older_than, name="freshness_older_than"))
        set_(self, "slot_retained_wal_over", parse_bytes(self.slot_retained_wal_over, name="slot_retained_wal_over"))
        set_(
            self,
            "watermark_held_back_longer_than",
            parse_duration(self.watermark_held_back_longer_than, name="watermark_held_back_longer_than"),
        )
        set_(self, "quarantine_above", _parse_count(self.quarantine_above, name="quarantine_above"))
        set_(
            self,
            "reconciliation_differences",
            _parse_count(self.reconciliation_differences, name="reconciliation_differences"),
        )

    @classmethod
    def of(cls, value: AlertThresholds | Mapping[str, Any] | None) -> AlertThresholds:
        """Thresholds from an instance or a mapping of its field names (unknown names are an error)."""
        if value is None:
            return cls()
        if isinstance(value, AlertThresholds):
            return value
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"thresholds must be AlertThresholds or a mapping, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigurationError(f"unknown alert thresholds {unknown}; known: {sorted(known)}")
        return cls(**value)

    def merged(self, override: AlertThresholds | Mapping[str, Any] | None) -> AlertThresholds:
        """These thresholds with the ones ``override`` sets (a mapping may set one to None to turn it off)."""
        if override is None:
            return self
        if isinstance(override, AlertThresholds):
            changes = {f.name: getattr(override, f.name) for f in fields(self) if getattr(override, f.name) is not None}
        else:
            AlertThresholds.of(override)  # validate names and values
            changes = dict(override)
        return AlertThresholds(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    @property
    def enabled(self) -> tuple[AlertRule, ...]:
        """The rules with a threshold set."""
        by_rule = {
            "freshness": self.freshness_older_than,
            "slot_retained_wal": self.slot_retained_wal_over,
            "watermark_held_back": self.watermark_held_back_longer_than,
            "quarantine": self.quarantine_above,
            "reconciliation_differences": self.reconciliation_differences,
        }
        return tuple(rule for rule in RULES if by_rule[rule] is not None)


@dataclass(frozen=True)
class Alert:
    """One threshold a sync breached, as a notifier delivers it.

    ``observed`` and ``threshold`` are the raw figures (a timedelta, bytes or rows);
    ``observed_text`` and ``threshold_text`` how people read them.  ``dedupe_key`` identifies the
    open alert (target, schema, sync and rule): a health check sends it once per run.
    """

    sync_id: str
    rule: AlertRule
    observed: dt.timedelta | int
    threshold: dt.timedelta | int
    severity: Severity
    message: str
    target: str
    schema: str
    target_table: str | None = None
    source_table: str | None = None
    kind: str = "table"
    observed_text: str = ""
    threshold_text: str = ""
    detail: str = ""

    @property
    def dedupe_key(self) -> str:
        """``target/schema/sync_id:rule``: the same open alert has the same key in every run."""
        return f"{self.target}/{self.schema}/{self.sync_id}:{self.rule}"

    @property
    def subject(self) -> str:
        """A one-line title, e.g. ``[sync alert: warning] orders: freshness 3 h 2 min > 1 h``."""
        return (
            f"[sync alert: {self.severity}] {self.sync_id}: {self.rule.replace('_', ' ')} "
            f"{self.observed_text} > {self.threshold_text}"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly (XCom, a webhook's payload): durations in seconds."""

        def plain(value: dt.timedelta | int) -> float | int:
            return value.total_seconds() if isinstance(value, dt.timedelta) else value

        return {
            "sync_id": self.sync_id,
            "rule": self.rule,
            "severity": self.severity,
            "observed": plain(self.observed),
            "threshold": plain(self.threshold),
            "observed_text": self.observed_text,
            "threshold_text": self.threshold_text,
            "target": self.target,
            "schema": self.schema,
            "target_table": self.target_table,
            "source_table": self.source_table,
            "kind": self.kind,
            "message": self.message,
            "dedupe_key": self.dedupe_key,
        }


def format_duration(value: dt.timedelta) -> str:
    """``2 d 3 h``, ``3 h 2 min``, ``4 min 10 s``, ``12 s``: two units at most, for messages."""
    seconds = int(value.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size} {unit}")
            seconds %= size
    return sign + " ".join(parts[:2])


def format_bytes(value: int) -> str:
    """``734 B``, ``12.4 MB``, ``1.02 GB`` (powers of 1000, like the thresholds' ``MB``)."""
    size = float(value)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _rows(count: int) -> str:
    return f"{count:,} row" + ("" if count == 1 else "s")


def _severity(observed: float, threshold: float) -> Severity:
    return "critical" if observed > 2 * threshold else "warning"


def evaluate(status: SyncStatus, thresholds: AlertThresholds, *, target: str = "") -> list[Alert]:
    """The alerts ``status`` raises under ``thresholds`` (empty when healthy), in :data:`RULES` order.

    ``target`` names the target database in messages and dedupe keys (the Airflow connection id).
    A rule whose figure the status does not have (no date/time cursor, no slot read, never
    reconciled) raises nothing.  Reconciliations whose differences were repaired do not alert.
    """
    table = status.target_table
    where = (table if "." in table else f"{status.schema}.{table}") if table else f"schema {status.schema}"
    on = f"sync {status.sync_id} (target {target or '?'}, table {where}"
    on += f", source {status.source_table})" if status.source_table else ")"
    alerts: list[Alert] = []

    def add(
        rule: AlertRule, observed: dt.timedelta | int, threshold: dt.timedelta | int, text: tuple[str, str], what: str
    ) -> None:
        ratio = (
            (observed.total_seconds(), threshold.total_seconds())
            if isinstance(observed, dt.timedelta) and isinstance(threshold, dt.timedelta)
            else (float(observed), float(threshold))  # type: ignore[arg-type]
        )
        severity = _severity(*ratio)
        alerts.append(
            Alert(
                sync_id=status.sync_id,
                rule=rule,
                observed=observed,
                threshold=threshold,
                severity=severity,
                message=f"{on}: {what}",
                target=target,
                schema=status.schema,
                target_table=status.target_table,
                source_table=status.source_table,
                kind=status.kind,
                observed_text=text[0],
                threshold_text=text[1],
                detail=what,
            )
        )

    limit = thresholds.freshness_older_than
    if limit is not None and status.freshness is not None and status.freshness > limit:
        add(
            "freshness",
            status.freshness,
            limit,
            (format_duration(status.freshness), format_duration(limit)),
            f"the newest synced row is {format_duration(status.freshness)} old (cursor "
            f"{status.cursor_time.isoformat() if status.cursor_time else '?'}, read at {status.read_at.isoformat()}), "
            f"older than the threshold {format_duration(limit)}",
        )
    wal = thresholds.slot_retained_wal_over
    slot = status.slot
    if wal is not None and slot is not None and slot.retained_bytes is not None and slot.retained_bytes > wal:
        add(
            "slot_retained_wal",
            slot.retained_bytes,
            wal,
            (format_bytes(slot.retained_bytes), format_bytes(wal)),
            f"replication slot {slot.slot_name} retains {format_bytes(slot.retained_bytes)} "
            f"({slot.retained_bytes:,} bytes) of WAL on the source, over the threshold {format_bytes(wal)}; "
            f"{'active' if slot.active else 'not active'}, confirmed up to {slot.confirmed_lsn or '?'}, "
            f"source at {slot.current_lsn or '?'}, lag {format_bytes(slot.lag_bytes or 0)}",
        )
    held_limit = thresholds.watermark_held_back_longer_than
    held = status.held_back
    if held_limit is not None and held is not None:
        held_for = status.read_at - held.since
        if held_for > held_limit:
            add(
                "watermark_held_back",
                held_for,
                held_limit,
                (format_duration(held_for), format_duration(held_limit)),
                f"the watermark has been held back for {format_duration(held_for)} ({held.runs} run"
                f"{'' if held.runs == 1 else 's'} since {held.since.isoformat()}), longer than the threshold "
                f"{format_duration(held_limit)}: {held.reason}",
            )
    rows = thresholds.quarantine_above
    if rows is not None and status.quarantine_open > rows:
        rules = ", ".join(r.label for r in status.gate.failing_rules) if status.gate else ""
        add(
            "quarantine",
            status.quarantine_open,
            rows,
            (_rows(status.quarantine_open), _rows(rows)),
            f"{_rows(status.quarantine_open)} wait in quarantine, above the threshold of {_rows(rows)}"
            + (f" (newest gate's failing rules: {rules})" if rules else ""),
        )
    allowed = thresholds.reconciliation_differences
    recon = status.reconciliation
    if allowed is not None and recon is not None and recon.result == "differences" and recon.differences > allowed:
        add(
            "reconciliation_differences",
            recon.differences,
            allowed,
            (_rows(recon.differences), _rows(allowed)),
            f"reconciliation {recon.run_id} at {recon.reconciled_at.isoformat()} found {_rows(recon.differences)} "
            f"different (source {recon.source_count:,}, target {recon.target_count:,}: {recon.missing_in_target} "
            f"missing, {recon.extra_in_target} extra, {recon.different} changed; {recon.differing_buckets} "
            f"bucket{'' if recon.differing_buckets == 1 else 's'}), not repaired; "
            + ("any difference alerts" if allowed == 0 else f"threshold {_rows(allowed)}"),
        )
    return alerts


def thresholds_for(
    sync_id: str,
    default: AlertThresholds | Mapping[str, Any] | None,
    per_sync: Mapping[str, AlertThresholds | Mapping[str, Any] | None] | None = None,
) -> AlertThresholds:
    """The thresholds of ``sync_id``: ``default`` with its entry in ``per_sync`` applied over it."""
    base = AlertThresholds.of(default)
    return base.merged((per_sync or {}).get(sync_id))


__all__ = [
    "RULES",
    "Alert",
    "AlertRule",
    "AlertThresholds",
    "Severity",
    "evaluate",
    "format_bytes",
    "format_duration",
    "parse_bytes",
    "parse_duration",
    "thresholds_for",
]
