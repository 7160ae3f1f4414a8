"""Late commits: a source transaction that commits *after* an extraction, with a cursor value older
than what that extraction saw, must still be synced by the next run.

The negative control shows the classic bug (no guard, no lookback: the row is lost forever), so the
tests of the defences prove something.
"""

from __future__ import annotations

import datetime as dt

from airflow_sync_provider.core import SyncSpec

from ..conftest import SyncEnv


def _setup(env: SyncEnv) -> None:
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE events (id bigint PRIMARY KEY, payload text, updated_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("INSERT INTO events (id, payload) SELECT g, 'seed' FROM generate_series(1, 100) g")


def _synced_ids(env: SyncEnv) -> set[int]:
    with env.target() as conn:
        return {r[0] for r in conn.execute("SELECT id FROM events").fetchall()}


def _late_commit_scenario(env: SyncEnv, spec: SyncSpec) -> set[int]:
    """Row 1000 is written by a transaction that starts first and commits last; row 2000 by a
    transaction that starts and commits in between, during which a sync runs."""
    _setup(env)
    env.sync(spec, run_id="initial")
    late = env.source(autocommit=False)
    try:
        # updated_at = now() = the late transaction's start time, the oldest of all.
        late.execute("INSERT INTO events (id, payload) VALUES (1000, 'late')")
        with env.source() as other:
            other.execute("INSERT INTO events (id, payload) VALUES (2000, 'on time')")
        env.sync(spec, run_id="while-open")
        late.commit()
    finally:
        late.close()
    env.sync(spec, run_id="after-commit")
    return _synced_ids(env)


def test_without_defence_a_late_commit_is_lost(env: SyncEnv) -> None:
    """Negative control: the bug this module guards against is real."""
    spec = SyncSpec(sync_id="events", source_table="events", cursor_column="updated_at", guard_open_transactions=False)
    ids = _late_commit_scenario(env, spec)
    assert 2000 in ids
    assert 1000 not in ids  # lost: its cursor is below the watermark that row 2000 moved forward


def test_open_transaction_guard_holds_the_watermark_back(env: SyncEnv) -> None:
    spec = SyncSpec(sync_id="events", source_table="events", cursor_column="updated_at")
    ids = _late_commit_scenario(env, spec)
    assert {1000, 2000} <= ids
    assert len(ids) == 102


def test_guard_explains_why_the_bound_was_lowered(env: SyncEnv) -> None:
    spec = SyncSpec(sync_id="events", source_table="events", cursor_column="updated_at")
    _setup(env)
    env.sync(spec, run_id="initial")
    late = env.source(autocommit=False)
    try:
        late.execute("INSERT INTO events (id, payload) VALUES (1000, 'late')")
        with env.source() as other:
            other.execute("INSERT INTO events (id, payload) VALUES (2000, 'on time')")
        manifest, result = env.sync(spec, run_id="while-open")
    finally:
        late.rollback()
        late.close()
    assert manifest.rows == 0 and result.inserted == 0  # row 2000 waits behind the open transaction
    (note,) = [note for note in manifest.notes if "open transaction" in note]
    # names the holder a DBA can look up, without empty parts (issue 12: "open transaction 16956 ()")
    assert "open transaction pid " in note and "()" not in note and "user 'postgres'" in note, note
    _, later = env.sync(spec, run_id="after-rollback")
    assert later.inserted == 1 and _synced_ids(env) >= {2000}


def test_lookback_recovers_late_commits_without_the_guard(env: SyncEnv) -> None:
    spec = SyncSpec(
        sync_id="events",
        source_table="events",
        cursor_column="updated_at",
        guard_open_transactions=False,
        lookback=dt.timedelta(minutes=10),
    )
    ids = _late_commit_scenario(env, spec)
    assert {1000, 2000} <= ids


def test_lag_leaves_recent_rows_for_the_next_run(env: SyncEnv) -> None:
    spec = SyncSpec(sync_id="events", source_table="events", cursor_column="updated_at", lag=dt.timedelta(minutes=5))
    with env.source() as conn:
        conn.execute("CREATE TABLE events (id bigint PRIMARY KEY, payload text, updated_at timestamptz NOT NULL)")
        conn.execute("INSERT INTO events VALUES (1, 'old', now() - interval '1 hour'), (2, 'recent', now())")
    manifest, result = env.sync(spec, run_id="lagged")
    assert result.inserted == 1 and _synced_ids(env) == {1}
    assert manifest.upper_bound is not None
