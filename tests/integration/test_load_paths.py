"""The load's fast paths (issue 15): COPY straight into an empty target, the ledger checksum from the
Arrow batches, and extraction overlapped with the load in ``run_sync``.

Each path must give what the staged path gives, name a rejected row the same way, and commit
nothing when anything fails -- including an extraction that fails after the load took its first
files.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pandas as pd
import psycopg
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from airflow_sync_provider.core import SyncSpec, extract_for, load_manifest
from airflow_sync_provider.core.audit import BatchChecksum, table_checksum
from airflow_sync_provider.core.errors import DataError, SyncError
from airflow_sync_provider.core.staging import staged_schema

from ..conftest import SyncEnv, source_columns
from ..conftest import table_checksum as content_checksum

COLUMNS = ["id", "sku", "qty", "amount", "updated_at", "note", "blob"]


def _seed(env: SyncEnv, rows: int = 1000) -> None:
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, sku text, qty int, amount numeric(12, 2), "
            "updated_at timestamptz NOT NULL DEFAULT clock_timestamp(), note text, blob bytea)"
        )
        conn.execute(
            "INSERT INTO items (id, sku, qty, amount, note, blob) SELECT g, 'S' || g, g %% 7, g / 8.0, "
            "CASE WHEN g %% 5 = 0 THEN NULL WHEN g %% 5 = 1 THEN '' ELSE 'a \"b\", c' || E'\\n' || g END, "
            "CASE WHEN g %% 3 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') END FROM generate_series(1, %s) g",
            (rows,),
        )


def _spec(target: str, **options: Any) -> SyncSpec:
    return SyncSpec(sync_id=f"sync_{target}", source_table="items", target_table=target, batch_rows=150, **options)


def _ledger(env: SyncEnv, sync_id: str) -> list[dict[str, Any]]:
    with env.target() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cursor:
        query = "SELECT * FROM _sync_audit WHERE sync_id = %s ORDER BY entry_id"
        return cursor.execute(query, (sync_id,)).fetchall()


def _phases(into: list[str]) -> Any:
    def observe(phase: str, facts: dict[str, Any]) -> None:
        if phase == "staged":
            into.append(facts["into"])

    return observe


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_an_empty_target_takes_the_batch_straight_and_ends_as_the_staged_path_does(env: SyncEnv, mode: str) -> None:
    _seed(env)
    cursor = {"cursor_column": "updated_at"} if mode == "incremental" else {}
    with env.target() as conn:  # b: not empty (a row the source does not have), so the batch goes through a stage
        for table in ("b", "c"):  # c: created empty beforehand (the metadata columns come with the COPY)
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (id bigint PRIMARY KEY, sku text, qty int, amount numeric(12, 2), "
                    "updated_at timestamptz NOT NULL, note text, blob bytea)"
                ).format(sql.Identifier(table))
            )
        conn.execute("INSERT INTO b (id, updated_at) VALUES (-1, now())")
    paths: list[str] = []
    manifest_a, result_a = env.sync(
        _spec("a", mode=mode, **cursor), run_id="r1", observer=_phases(paths), keep_staged=True
    )
    _, result_b = env.sync(_spec("b", mode=mode, detect_deletes=True, **cursor), run_id="r1", observer=_phases(paths))
    _, result_c = env.sync(_spec("c", mode=mode, **cursor), run_id="r1", observer=_phases(paths))
    assert paths == ["target", "stage", "target"]
    assert (result_a.inserted, result_a.updated, result_a.deleted) == (1000, 0, 0)
    assert (result_b.inserted, result_b.updated, result_b.deleted) == (1000, 0, 1)
    assert (result_c.inserted, result_c.updated, result_c.deleted) == (1000, 0, 0)
    with env.target() as conn:
        expected = content_checksum(conn, "b", COLUMNS, ["id"])
        assert content_checksum(conn, "a", COLUMNS, ["id"]) == expected == content_checksum(conn, "c", COLUMNS, ["id"])
        assert expected[0] == 1000
        defaults = conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name IN ('a', 'b', 'c') "
            "AND column_default IS NOT NULL"
        ).fetchone()
        assert defaults == (0,)  # the created target's COPY-time defaults are gone
        for table in ("a", "b", "c"):  # the metadata columns as the merge writes them
            row = conn.execute(
                sql.SQL(
                    "SELECT count(*) FILTER (WHERE _sync_run_id = 'r1'), count(*) FILTER (WHERE _sync_synced_at "
                    "BETWEEN now() - interval '10 minutes' AND now()) FROM {}"
                ).format(sql.Identifier(table))
            ).fetchone()
            assert row == (1000, 1000)
        assert source_columns(conn, "a") == [*COLUMNS, "_sync_run_id", "_sync_synced_at"]
        schema = staged_schema(manifest_a.files[0].uri)
        recomputed = table_checksum(conn, sql.Identifier("a"), schema)
    checksums = {_ledger(env, f"sync_{t}")[0]["batch_checksum"] for t in ("a", "b", "c")}
    assert checksums == {recomputed}
    assert recomputed.startswith("1000:")


def test_a_bad_value_on_the_fast_path_names_its_row_and_commits_nothing(env: SyncEnv) -> None:
    _seed(env)
    with env.source() as conn:
        conn.execute("UPDATE items SET qty = 70000 WHERE id = 777")
    with env.target() as conn:  # empty and pre-created with a narrower column: the fast path is taken
        conn.execute(
            "CREATE TABLE narrow (id bigint PRIMARY KEY, sku text, qty smallint, amount numeric(12, 2), "
            "updated_at timestamptz NOT NULL, note text, blob bytea)"
        )
    for overlapped in (True, False):
        if overlapped:
            with pytest.raises(DataError) as raised:
                env.sync(_spec("narrow", mode="full"), run_id="bad")
        else:  # the split operators' way: extract, then load the manifest
            engine = env.source_engine
            with env.target() as target:
                manifest = extract_for(engine, target, _spec("narrow", mode="full"), staging=env.staging, run_id="bad")
                with pytest.raises(DataError) as raised:
                    load_manifest(target, manifest)
            engine.dispose()
        error = raised.value
        expected = ("public.narrow", "qty", {"id": 777}, "target type")
        assert (error.table, error.column, error.key, error.rule) == expected
        with env.target() as conn:
            assert conn.execute("SELECT count(*) FROM narrow").fetchone() == (0,)
        assert env.state("sync_narrow") is None
        assert _ledger(env, "sync_narrow") == [] if _has_ledger(env) else True


def _has_ledger(env: SyncEnv) -> bool:
    with env.target() as conn:
        row = conn.execute("SELECT to_regclass('public._sync_audit')").fetchone()
        return bool(row and row[0])


def test_a_duplicate_key_on_the_fast_path_is_named_as_in_the_batch(env: SyncEnv) -> None:
    _seed(env, rows=400)

    def collide(frame: pd.DataFrame) -> pd.DataFrame:
        frame["id"] = frame["id"].where(frame["id"] != 333, 3)
        return frame

    with pytest.raises(DataError) as raised:
        env.sync(_spec("dup", mode="full"), run_id="dup", transform=collide)
    assert raised.value.rule == "duplicate key in batch"
    assert raised.value.key == {"id": 3}
    with env.target() as conn:
        assert conn.execute("SELECT to_regclass('public.dup')").fetchone() == (None,)


@pytest.mark.parametrize("first_sync", [False, True])
def test_an_extraction_failing_after_the_load_took_files_rolls_everything_back(env: SyncEnv, first_sync: bool) -> None:
    _seed(env, rows=3000)  # pages of ~40 kB: psycopg sends a COPY's data in chunks of 32 kB
    spec = replace(_spec("t", cursor_column="updated_at"), batch_rows=500)
    if first_sync:  # the target has rows: the failing run loads through a stage
        env.sync(spec, run_id="first")
        with env.source() as conn:
            conn.execute("UPDATE items SET qty = qty + 1, updated_at = clock_timestamp()")
    with env.target() as conn:
        before = content_checksum(conn, "t", [*COLUMNS, "_sync_run_id"], ["id"]) if first_sync else None
    state_before = env.state("sync_t")
    ledger_before = len(_ledger(env, "sync_t")) if first_sync else 0
    copied: list[int] = []

    def fail_once_loading(frame: pd.DataFrame) -> pd.DataFrame:
        if int(frame["id"].min()) > 2000:  # a later page: wait until the load has COPYed earlier files, then fail
            with env.target() as watch:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    row = watch.execute(
                        "SELECT coalesce(max(tuples_processed), 0) FROM pg_stat_progress_copy WHERE datname = %s",
                        (env.target_db,),
                    ).fetchone()
                    if row and row[0] > 0:
                        copied.append(int(row[0]))
                        break
                    time.sleep(0.01)
            raise RuntimeError("the source went away mid-extraction")
        return frame

    with pytest.raises(SyncError, match="the source went away"):
        env.sync(spec, run_id="broken", transform=fail_once_loading)
    assert copied and copied[0] > 0  # the load had rows of this run in its transaction when the extraction failed
    assert env.state("sync_t") == state_before
    with env.target() as conn:
        if first_sync:
            assert content_checksum(conn, "t", [*COLUMNS, "_sync_run_id"], ["id"]) == before
        else:
            assert conn.execute("SELECT to_regclass('public.t')").fetchone() == (None,)
    assert len(_ledger(env, "sync_t")) == ledger_before if _has_ledger(env) else not first_sync
    _, result = env.sync(spec, run_id="again")  # the next run applies what the failed one held back
    assert result.status == "applied" and result.inserted + result.updated == 3000


# --------------------------------------------------------------------------- the checksum's definition

_ROW = st.tuples(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.one_of(st.none(), st.text(max_size=12)),
    st.one_of(st.none(), st.binary(max_size=6)),
    st.one_of(st.none(), st.floats(allow_nan=False)),
)
_SCHEMA = pa.schema([("k", pa.int64()), ("t", pa.string()), ("b", pa.binary()), ("f", pa.float64())])


def _checksum(rows: list[tuple[Any, ...]], split: int, schema: pa.Schema = _SCHEMA) -> str:
    table = pa.Table.from_pylist([dict(zip(schema.names, r, strict=True)) for r in rows], schema=schema)
    checksum = BatchChecksum()
    for start in range(0, max(len(rows), 1), max(split, 1)):
        checksum.add(table.slice(start, split), schema.names)
    return checksum.value


@settings(max_examples=150, deadline=None)
@given(st.lists(_ROW, max_size=40), st.integers(min_value=1, max_value=50), st.randoms())
def test_the_checksum_ignores_row_order_and_batch_splits(rows: list[tuple[Any, ...]], split: int, rnd: Any) -> None:
    shuffled = list(rows)
    rnd.shuffle(shuffled)
    assert _checksum(shuffled, split) == _checksum(rows, len(rows) or 1)
    assert _checksum(rows, split).startswith(f"{len(rows)}:")
    large = pa.schema([("k", pa.int64()), ("t", pa.large_string()), ("b", pa.large_binary()), ("f", pa.float64())])
    assert _checksum(rows, split, large) == _checksum(rows, split)  # same values, same checksum


@settings(max_examples=150, deadline=None)
@given(st.lists(_ROW, min_size=1, max_size=20, unique_by=lambda r: r[0]), st.data())
def test_the_checksum_sees_any_changed_value(rows: list[tuple[Any, ...]], data: Any) -> None:
    index = data.draw(st.integers(min_value=0, max_value=len(rows) - 1))
    column = data.draw(st.integers(min_value=0, max_value=3))
    replacement = data.draw(_ROW)[column]
    changed = list(rows)
    row = list(changed[index])
    if row[column] == replacement and type(row[column]) is type(replacement):
        return
    row[column] = replacement
    changed[index] = tuple(row)
    assert _checksum(changed, 7) != _checksum(rows, 7)


def test_the_checksum_tells_null_from_empty_and_columns_apart() -> None:
    base = [(1, "", b"", 0.0)]
    assert _checksum(base, 1) != _checksum([(1, None, b"", 0.0)], 1)
    assert _checksum(base, 1) != _checksum([(1, "", None, 0.0)], 1)
    assert _checksum([(1, "ab", b"", 0.0)], 1) != _checksum([(1, "ba", b"", 0.0)], 1)
    assert _checksum([(1, "ab", b"c", 0.0)], 1) != _checksum([(1, "a", b"bc", 0.0)], 1)


def test_the_checksum_of_a_long_value_matches_the_vectorised_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_sync_provider.core import audit

    values = ["x" * 5000 + "y", "short", "z" * 20_000]
    expected = _checksum([(i, v, None, None) for i, v in enumerate(values)], 3)
    monkeypatch.setattr(audit, "_CHUNK_BYTES", 1024)  # every long value now takes the slice-by-slice path
    monkeypatch.setattr(audit, "_powers", None)
    monkeypatch.setattr(audit, "_local", type(audit._local)())
    assert _checksum([(i, v, None, None) for i, v in enumerate(values)], 3) == expected
