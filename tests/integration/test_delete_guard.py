"""max_delete_fraction guards delete detection and the reconciliation repair (hard and soft deletes)."""

from __future__ import annotations

import pytest

from airflow_sync_provider.core import SyncSpec
from airflow_sync_provider.core.errors import UnsafeOperationError
from airflow_sync_provider.core.reconcile import reconcile, repair

from ..conftest import SyncEnv


def _source(env: SyncEnv) -> None:
    with env.source() as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g")


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_detection_guard(env: SyncEnv, mode: str) -> None:
    _source(env)
    spec = SyncSpec(sync_id="t", source_table="t", mode="full", delete_mode=mode, max_delete_fraction=0.3)
    env.sync(spec)
    with env.source() as conn:
        conn.execute("DELETE FROM t WHERE id <= 5")
    with pytest.raises(UnsafeOperationError, match=r"delete detection would delete 5 of 10 target rows"):
        env.sync(spec)
    with env.source() as conn:
        conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3) g")
    _, result = env.sync(spec)
    assert result.deleted == 2


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_repair_guard(env: SyncEnv, mode: str) -> None:
    _source(env)
    spec = SyncSpec(sync_id="t", source_table="t", mode="full", delete_mode=mode, max_delete_fraction=0.3)
    env.sync(spec)
    with env.target() as conn:
        conn.execute("INSERT INTO t (id, v) SELECT g, 'x' FROM generate_series(100, 105) g")
    engine = env.source_engine
    with env.target() as target:
        found = reconcile(engine, target, spec, staging=env.staging)
        assert found.extra_count == 6
        with pytest.raises(UnsafeOperationError, match=r"the repair would delete 6 of 16 target rows"):
            repair(engine, target, spec, found, run_id="r1", staging=env.staging)
    with env.target() as conn:
        conn.execute("DELETE FROM t WHERE id >= 103")
    with env.target() as target:
        found = reconcile(engine, target, spec, staging=env.staging)
        fixed = repair(engine, target, spec, found, run_id="r2", staging=env.staging)
        assert fixed.deleted == 3
        live = "" if mode == "hard" else " WHERE _sync_deleted_at IS NULL"
        assert target.execute(f"SELECT count(*) FROM t{live}").fetchone() == (10,)
    engine.dispose()
