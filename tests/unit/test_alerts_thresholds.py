"""Alert thresholds against hand-made statuses (pure Python, no database): each rule fires past its
threshold and only then, off by default, with severity and a message that names the figures."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

import pytest

from airflow_sync_provider.core import ConfigurationError
from airflow_sync_provider.core.alerts import (
    RULES,
    AlertThresholds,
    evaluate,
    format_bytes,
    format_duration,
    parse_bytes,
    parse_duration,
    thresholds_for,
)
from airflow_sync_provider.core.status import HeldBack, ReconciliationStatus, SlotStatus, SyncStatus

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def _status(**changes: object) -> SyncStatus:
    base = SyncStatus(
        sync_id="orders",
        schema="sales",
        kind="table",
        mode="incremental",
        read_at=NOW,
        source_table="orders",
        target_table="orders_copy",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _recon(missing: int = 0, extra: int = 0, different: int = 0, repaired: bool = False) -> ReconciliationStatus:
    return ReconciliationStatus(
        "check1", NOW, "buckets", 100, 100 - missing + extra, missing, extra, different, 2, repaired
    )


SICK = _status(
    cursor_time=NOW - dt.timedelta(hours=3, minutes=2),
    freshness=dt.timedelta(hours=3, minutes=2),
    quarantine_open=7,
    reconciliation=_recon(missing=2, different=1),
    held_back=HeldBack(
        "upper bound lowered from 2026-03-01T11:59:00+00:00 to 2026-03-01T11:00:00+00:00: open transaction pid 42",
        NOW - dt.timedelta(hours=1),
        NOW - dt.timedelta(minutes=50),
        4,
    ),
)
CDC = _status(
    kind="cdc",
    mode="cdc-changes",
    slot_name="sync_orders",
    slot=SlotStatus("sync_orders", True, False, 1_500_000, 250_000_000, "reserved", "0/1000", "0/F000000"),
)


def test_defaults_are_off_and_nothing_alerts() -> None:
    assert AlertThresholds().enabled == ()
    assert evaluate(SICK, AlertThresholds(), target="t") == []
    assert evaluate(CDC, AlertThresholds(), target="t") == []


def test_each_rule_fires_past_its_threshold_only() -> None:
    every = AlertThresholds(
        freshness_older_than=dt.timedelta(hours=1),
        watermark_held_back_longer_than=dt.timedelta(minutes=30),
        quarantine_above=5,
        reconciliation_differences=0,
    )
    alerts = evaluate(SICK, every, target="warehouse")
    assert [a.rule for a in alerts] == ["freshness", "watermark_held_back", "quarantine", "reconciliation_differences"]
    fresh, held, quarantine, recon = alerts
    assert (fresh.observed, fresh.threshold, fresh.severity) == (
        dt.timedelta(hours=3, minutes=2),
        dt.timedelta(hours=1),
        "critical",
    )
    assert fresh.message.startswith("sync orders (target warehouse, table sales.orders_copy, source orders): ")
    assert "3 h 2 min old" in fresh.message and "threshold 1 h" in fresh.message
    assert fresh.subject == "[sync alert: critical] orders: freshness 3 h 2 min > 1 h"
    assert fresh.dedupe_key == "warehouse/sales/orders:freshness"
    assert (held.observed, held.severity, held.observed_text) == (dt.timedelta(minutes=50), "warning", "50 min")
    assert "open transaction pid 42" in held.message and "4 runs" in held.message
    assert (quarantine.observed, quarantine.threshold, quarantine.severity) == (7, 5, "warning")
    assert "7 rows wait in quarantine" in quarantine.message
    assert (recon.observed, recon.threshold, recon.severity) == (3, 0, "critical")
    assert "2 missing, 0 extra, 1 changed" in recon.message and "any difference alerts" in recon.message

    # Exactly at the threshold is healthy; one past it is not.
    at = AlertThresholds(
        freshness_older_than=dt.timedelta(hours=3, minutes=2),
        watermark_held_back_longer_than=dt.timedelta(minutes=50),
        quarantine_above=7,
        reconciliation_differences=3,
    )
    assert evaluate(SICK, at) == []
    assert [a.rule for a in evaluate(SICK, replace(at, quarantine_above=6))] == ["quarantine"]


def test_slot_rule_reads_retained_wal_and_skips_unread_slots() -> None:
    (alert,) = evaluate(CDC, AlertThresholds.of({"slot_retained_wal_over": "100MB"}), target="src")
    assert (alert.rule, alert.observed, alert.threshold, alert.severity) == (
        "slot_retained_wal",
        250_000_000,
        100_000_000,
        "critical",
    )
    assert "replication slot sync_orders retains 250 MB (250,000,000 bytes)" in alert.message
    assert "not active" in alert.message and "lag 1.5 MB" in alert.message
    assert evaluate(CDC, AlertThresholds(slot_retained_wal_over=250_000_000)) == []
    assert evaluate(replace(CDC, slot=None), AlertThresholds(slot_retained_wal_over=1)) == []


def test_missing_figures_and_repaired_reconciliations_raise_nothing() -> None:
    every = AlertThresholds.of(
        {
            "freshness_older_than": 0,
            "watermark_held_back_longer_than": 0,
            "quarantine_above": 0,
            "reconciliation_differences": 0,
        }
    )
    assert evaluate(_status(), every) == []  # never synced: no cursor time, no quarantine, no reconciliation
    assert evaluate(_status(reconciliation=_recon(missing=5, repaired=True)), every) == []
    assert evaluate(_status(reconciliation=_recon()), every) == []


def test_per_sync_overrides_and_parsing() -> None:
    default = {"freshness_older_than": "2h", "quarantine_above": 0}
    per_sync: dict[str, dict[str, Any]] = {
        "orders": {"freshness_older_than": "4h"},
        "audit": {"quarantine_above": None},
    }
    orders = thresholds_for("orders", default, per_sync)
    assert (orders.freshness_older_than, orders.quarantine_above) == (dt.timedelta(hours=4), 0)
    assert thresholds_for("audit", default, per_sync).quarantine_above is None
    assert thresholds_for("other", default, per_sync).freshness_older_than == dt.timedelta(hours=2)
    assert set(AlertThresholds.of(default).enabled) == {"freshness", "quarantine"} and set(RULES) >= {"freshness"}
    assert parse_duration("90s") == dt.timedelta(seconds=90) and parse_duration(60) == dt.timedelta(minutes=1)
    assert parse_duration("1.5 h") == dt.timedelta(minutes=90) and parse_duration("2d") == dt.timedelta(days=2)
    assert parse_bytes("512MB") == 512_000_000 and parse_bytes("1GiB") == 1024**3 and parse_bytes(10) == 10
    assert format_duration(dt.timedelta(days=2, hours=3, minutes=4)) == "2 d 3 h"
    assert format_duration(dt.timedelta(seconds=4)) == "4 s" and format_bytes(734) == "734 B"
    assert format_bytes(1_024_000) == "1.02 MB"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"freshness_older_than": "soon"}, "freshness_older_than: 'soon' is not a duration"),
        ({"slot_retained_wal_over": "lots"}, "slot_retained_wal_over: 'lots' is not a size"),
        ({"quarantine_above": -1}, "quarantine_above must not be negative"),
        ({"quarantine_above": 1.5}, "quarantine_above must be a whole number"),
        ({"freshnes_older_than": "1h"}, "unknown alert thresholds ['freshnes_older_than']"),
    ],
)
def test_bad_thresholds_name_the_threshold(value: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigurationError, match=words.replace("[", r"\[").replace("]", r"\]")):
        AlertThresholds.of(value)
