"""Quiet runs: a run that extracts no rows must behave like a run with rows (issue 12).

A transform shapes every batch, so the batch of a run that extracted nothing must have the
transformed columns too: before the fix it carried the raw source columns, and the load took the
transform's columns for dropped ones (``schema drift: freeze``), so every quiet run failed and the
deletes it found never reached the target.  These tests pin the engine's side; the reference DAGs'
quiet runs through Airflow are in ``test_quiet_dags.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from psycopg import sql

from airflow_sync_provider.core import SyncError, SyncSpec

from ..conftest import SyncEnv, table_checksum

TABLE = "Order Items"


def add_total(batch: pd.DataFrame) -> pd.DataFrame:
    """The README's complete example."""
    batch["total"] = batch["quantity"] * batch["unit_price"]
    return batch


def label_by_apply(batch: pd.DataFrame) -> pd.DataFrame:
    """``.apply`` on an empty frame gives an untyped column: its type must come from the record."""
    batch["label"] = batch["id"].apply(lambda value: f"item #{value}")
    return batch


def needs_a_row(batch: pd.DataFrame) -> pd.DataFrame:
    """A transform that cannot run on an empty frame at all."""
    batch["first_quantity"] = batch["quantity"].iloc[0]
    return batch


def _seed(env: SyncEnv, rows: int = 100) -> None:
    with env.source() as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id int PRIMARY KEY, quantity int NOT NULL, unit_price numeric(12, 2) NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            ).format(sql.Identifier(TABLE))
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, quantity, unit_price) SELECT g, g %% 7 + 1, (g * 1.25)::numeric(12, 2) "
                "FROM generate_series(1, %s) g"
            ).format(sql.Identifier(TABLE)),
            (rows,),
        )


def _business(env: SyncEnv, columns: str = "id, quantity, unit_price, total") -> list[tuple[Any, ...]]:
    with env.target() as conn:
        return conn.execute(
            sql.SQL("SELECT {} FROM {} ORDER BY id").format(
                sql.SQL(", ").join(map(sql.Identifier, [c.strip() for c in columns.split(",")])),
                sql.Identifier(TABLE),
            )
        ).fetchall()


def _watermark(env: SyncEnv, sync_id: str) -> Any:
    state = env.state(sync_id)
    assert state is not None
    return state


@pytest.mark.parametrize("drift", ["freeze", "evolve", "discard"])
def test_readme_example_survives_quiet_runs_and_applies_quiet_deletes(
    env: SyncEnv, drift: str, caplog: pytest.LogCaptureFixture
) -> None:
    _seed(env)
    spec = SyncSpec(
        sync_id="order_items",
        source_table=TABLE,
        cursor_column="updated_at",
        detect_deletes=True,
        schema_drift=drift,  # type: ignore[arg-type]
    )
    first, loaded = env.sync(spec, transform=add_total)
    assert (first.rows, loaded.inserted) == (100, 100)
    before = _business(env)
    assert before[0] == (1, 2, pytest.approx(1.25), pytest.approx(2.5))
    state_before = _watermark(env, "order_items")

    caplog.set_level(logging.WARNING)
    for _ in range(2):  # two quiet runs in a row
        quiet, result = env.sync(spec, transform=add_total)
        assert quiet.rows == 0 and result.status == "applied"
        assert [c.name for c in quiet.columns] == [c.name for c in first.columns]
        assert [c.pg_type for c in quiet.columns] == [c.pg_type for c in first.columns]
        assert (result.inserted, result.updated, result.deleted) == (0, 0, 0)
    assert _business(env) == before
    state_after = _watermark(env, "order_items")
    assert state_after[1] == state_before[1]  # the watermark did not move
    assert state_after[0] == state_before[0] + 2  # two committed (empty) loads
    assert not [r for r in caplog.records if "schema drift" in r.getMessage()], "a spurious drift warning"

    # a quiet period in which the source only deleted rows: the deletes reach the target
    with env.source() as conn:
        conn.execute(sql.SQL("DELETE FROM {} WHERE id > 95").format(sql.Identifier(TABLE)))
    quiet, result = env.sync(spec, transform=add_total)
    assert quiet.rows == 0 and result.deleted == 5
    assert _business(env) == before[:95]


def test_quiet_run_state_keeps_its_watermark(env: SyncEnv) -> None:
    _seed(env, 20)
    spec = SyncSpec(sync_id="wm", source_table=TABLE, cursor_column="updated_at")
    _, first = env.sync(spec, transform=add_total)
    _, quiet = env.sync(spec, transform=add_total)
    assert quiet.watermark == first.watermark and quiet.version == first.version + 1


def test_untyped_transform_column_on_a_quiet_run_takes_the_recorded_type(env: SyncEnv) -> None:
    _seed(env, 10)
    spec = SyncSpec(sync_id="labels", source_table=TABLE, cursor_column="updated_at")
    first, _ = env.sync(spec, transform=label_by_apply)
    assert dict((c.name, c.pg_type) for c in first.columns)["label"] == "TEXT"
    quiet, result = env.sync(spec, transform=label_by_apply)
    assert quiet.rows == 0 and result.status == "applied"
    assert dict((c.name, c.pg_type) for c in quiet.columns)["label"] == "TEXT"


def test_transform_that_cannot_see_an_empty_batch(env: SyncEnv) -> None:
    """With a committed load it falls back to the recorded columns (and says so); without one it fails
    naming the empty batch, and nothing is written."""
    _seed(env, rows=0)
    spec = SyncSpec(sync_id="fragile", source_table=TABLE, cursor_column="updated_at")
    with pytest.raises(SyncError, match="empty batch of a run that extracted no rows") as failure:
        env.sync(spec, transform=needs_a_row)
    assert "IndexError" in str(failure.value)
    assert env.state("fragile") is None

    with env.source() as conn:
        conn.execute(
            sql.SQL("INSERT INTO {} (id, quantity, unit_price) VALUES (1, 3, 2.50), (2, 4, 1.00)").format(
                sql.Identifier(TABLE)
            )
        )
    first, _ = env.sync(spec, transform=needs_a_row)
    quiet, result = env.sync(spec, transform=needs_a_row)
    assert result.status == "applied" and quiet.rows == 0
    assert [(c.name, c.pg_type) for c in quiet.columns] == [(c.name, c.pg_type) for c in first.columns]
    assert any("takes the columns of the last committed load" in note for note in quiet.notes)
    with env.target() as conn:
        assert table_checksum(conn, TABLE, ["id", "first_quantity"], ["id"])[0] == 2


def test_masking_shapes_the_empty_batch() -> None:
    """The bank's masking on a typed empty batch gives the masked columns and types."""
    from airflow_sync_provider.core.extract import apply_transform
    from airflow_sync_provider.core.masking import masking_transform, tokenize, year_only

    spec = SyncSpec(sync_id="m", source_table="customers", cursor_column="updated_at")
    empty = pa.schema(
        [("customer_id", pa.int64()), ("national_id", pa.string()), ("birth_date", pa.date32())]
    ).empty_table()
    mask = masking_transform(
        {"national_id": ("national_id_token", tokenize("k")), "birth_date": ("birth_year", year_only)}
    )
    shaped = apply_transform(empty, mask, spec, 0)
    assert shaped.column_names == ["customer_id", "national_id_token", "birth_year"]
    assert shaped.schema.field("birth_year").type == pa.int64()
