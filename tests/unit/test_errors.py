"""``database_error``: the one place that tells a lost connection (retryable) from a failed statement."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa

from airflow_sync_provider.core.errors import (
    SourceUnavailableError,
    SyncError,
    TargetUnavailableError,
    UnavailableError,
    database_error,
)

from ..conftest import SyncEnv


def test_a_refused_connection_is_retryable_and_names_the_side(env: SyncEnv) -> None:
    engine = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/nowhere", poolclass=sa.NullPool)
    with pytest.raises(sa.exc.OperationalError) as refused:
        engine.connect()
    error = database_error(refused.value, "reconciliation reading the source", sync_id="s", table="public.t")
    assert isinstance(error, SourceUnavailableError)
    assert str(error).startswith("[sync='s' table='public.t'] reconciliation reading the source failed: ")
    target = database_error(refused.value, "load", sync_id="s", table="t", unavailable=TargetUnavailableError)
    assert isinstance(target, TargetUnavailableError) and isinstance(target, UnavailableError)


def test_a_failed_statement_is_not_retryable(env: SyncEnv) -> None:
    with env.source() as conn, pytest.raises(psycopg.Error) as failed:
        conn.execute("SELECT * FROM no_such_table")
    error = database_error(failed.value, "extraction", sync_id="s", table="no_such_table")
    assert type(error) is SyncError and "no_such_table" in str(error)
