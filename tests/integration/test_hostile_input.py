"""Hostile and odd input: identifiers and values that break naive SQL, CSV, JSON or Python handling.

Extends ``test_identifiers_and_keys.py`` (quotes, spaces, capitals, unicode, keywords in schema,
table and column names) with backslashes, dots, tabs, surrounding blanks, 63-byte names and
``%`` signs, and covers values: binary with and without NUL bytes, emoji, 10 MB text, the CSV NULL
marker as data, NaN/Infinity, 1000-digit numerics, integer extremes, year 9999 and time zones,
nested JSON (whose exact text ``json`` keeps), arrays, ranges and other types PostgreSQL has and
Python has not.  Values no Python type can carry (BC timestamps, ``infinity``, ``24:00``) fail
with a clear error and change nothing; CDC streams them as text and syncs them.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

from airflow_sync_provider.core import DataError, SchemaError, SyncError, SyncSpec
from airflow_sync_provider.core.cdc import CdcSpec

from ..conftest import CdcEnv, SyncEnv, source_columns, table_checksum


def _create(env: SyncEnv, table: str, columns: list[str], schema: str = "public") -> None:
    with env.source() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} ({} int PRIMARY KEY, {} text, {} timestamptz NOT NULL DEFAULT clock_timestamp())"
            ).format(sql.Identifier(schema, table), *map(sql.Identifier, columns))
        )
        conn.execute(
            sql.SQL("INSERT INTO {} ({}, {}) SELECT g, 'v' || g FROM generate_series(1, 60) g").format(
                sql.Identifier(schema, table), sql.Identifier(columns[0]), sql.Identifier(columns[1])
            )
        )


def _touch(env: SyncEnv, table: str, columns: list[str], schema: str = "public") -> None:
    with env.source() as conn:
        conn.execute(
            sql.SQL("UPDATE {t} SET {v} = 'changed ' || {v}, {u} = clock_timestamp() WHERE {k} <= 7").format(
                t=sql.Identifier(schema, table),
                v=sql.Identifier(columns[1]),
                u=sql.Identifier(columns[2]),
                k=sql.Identifier(columns[0]),
            )
        )


def _assert_same(
    env: SyncEnv, table: str, key: str, source_schema: str = "public", target_schema: str = "public"
) -> None:
    with env.source() as src, env.target() as tgt:
        columns = source_columns(src, table, source_schema)
        assert table_checksum(tgt, table, columns, [key], target_schema) == table_checksum(
            src, table, columns, [key], source_schema
        )


IDENTIFIERS = {
    "backslashes": ("back\\slash\\", ['i"d\\', "v\\n", "updated_at"]),
    "63-byte unicode": ("é" * 31, ["ü" * 31, "v", "updated_at"]),
    "dots": ("a.b", ["x.y", "Select", "updated.at"]),
    "blanks and tabs": (" lead trail ", [" id ", "tab\there", "up dated"]),
    "keywords": ("user", ["order", "group", "limit"]),
    "sql in names": ("t'; DROP TABLE t; --", ["1=1 OR", "$$", "-- x"]),
}


@pytest.mark.parametrize("mode", ["incremental", "full"])
@pytest.mark.parametrize("case", list(IDENTIFIERS))
def test_odd_identifiers_round_trip(env: SyncEnv, case: str, mode: str) -> None:
    table, columns = IDENTIFIERS[case]
    _create(env, table, columns, schema="Src Ünï")
    spec = SyncSpec(
        sync_id="odd",
        source_table=table,
        source_schema="Src Ünï",
        target_schema=f"{case} tgt",
        mode=mode,  # type: ignore[arg-type]
        cursor_column=columns[2] if mode == "incremental" else None,
        batch_rows=13,
    )
    assert env.sync(spec, run_id="r1")[1].inserted == 60
    _touch(env, table, columns, schema="Src Ünï")
    assert env.sync(spec, run_id="r2")[1].updated == 7
    _assert_same(env, table, columns[0], "Src Ünï", f"{case} tgt")


def test_percent_signs_in_identifiers(env: SyncEnv) -> None:
    table, columns = "rate %s %(x)s 100%", ["id %s", "v %(name)s", "updated_at"]
    _create(env, table, columns)
    spec = SyncSpec(sync_id="pct", source_table=table, cursor_column="updated_at", target_schema="100% target")
    env.sync(spec, run_id="r1")
    _touch(env, table, columns)
    assert env.sync(spec, run_id="r2")[1].updated == 7
    _assert_same(env, table, columns[0], target_schema="100% target")


def test_source_column_named_like_a_metadata_column(env: SyncEnv) -> None:
    """A table synced onward from a target already has ``_sync_*`` columns: a clear error, and a way out."""
    _create(env, "chained", ["id", "_sync_run_id", "updated_at"])
    spec = SyncSpec(sync_id="chained", source_table="chained", cursor_column="updated_at")
    with pytest.raises(
        SchemaError,
        match=r"^\[sync='chained' table='public.chained' column='_sync_run_id' rule=reserved column name\] "
        r"the source has column\(s\) \['_sync_run_id'\] named like the metadata columns",
    ):
        env.sync(spec, run_id="r1")
    assert env.sync(spec.with_options(columns=("id", "updated_at")), run_id="r2")[1].inserted == 60


# --------------------------------------------------------------------------- values

ODD_COLUMNS = {
    "b": "bytea",
    "t": "text",
    "f8": "double precision",
    "f4": "real",
    "n": "numeric",
    "n38": "numeric(38,10)",
    "i8": "bigint",
    "i2": "smallint",
    "ts": "timestamp",
    "tstz": "timestamptz",
    "d": "date",
    "tt": "time with time zone",
    "iv": "interval",
    "j": "json",
    "jb": "jsonb",
    "ia": "integer[]",
    "ta": "text[]",
    "u": "uuid",
    "ip": "inet",
    "m": "money",
    "bits": "bit varying",
    "p": "point",
    "r": "tstzrange",
}

# One row per list position; a missing value is NULL.
ODD_VALUES: dict[str, list[str]] = {
    "b": ["'\\x000102ff00'", "''", "'\\x41'", "decode(repeat('00ff', 300000), 'hex')", "'\\x0a0d2c22'"],
    "t": [
        "E'emoji 😀👍🏽, family 👨\u200d👩\u200d👧, rtl שלום, combining e\\u0301'",
        "''",
        "'\\N'",
        "'NULL'",
        "E'a,b\"c\\nd\\re\\tf\\\\g'",
        "repeat('long text ', 1024 * 1024 + 3)",  # ~10 MB
    ],
    "f8": ["'NaN'", "'Infinity'", "'-Infinity'", "'-0'", "5e-324", "1.7976931348623157e308", "0.1::float8 + 0.2"],
    "f4": ["'NaN'", "'Infinity'", "'-Infinity'", "1.4e-45", "3.4028235e38"],
    "n": [
        "'NaN'",
        "'Infinity'",
        "'-Infinity'",
        "(repeat('9', 500) || '.' || repeat('1', 500))::numeric",
        "'-0.000000000000000000000000000000000001'",
    ],
    "n38": ["'9999999999999999999999999999.9999999999'", "'-9999999999999999999999999999.9999999999'", "0"],
    "i8": ["-9223372036854775808", "9223372036854775807", "0"],
    "i2": ["-32768", "32767"],
    "ts": ["'9999-12-31 23:59:59.999999'", "'0001-01-01 00:00:00'", "'2024-02-29 12:00:00.123456'"],
    "tstz": [
        "'9999-12-31 23:59:59.999999+00'",
        "'2024-06-01 12:00:00+05:30'",
        "'2024-03-31 02:30:00 Europe/Berlin'",
        "'2024-11-03 01:30:00 America/New_York'",
        "'0001-01-01 00:00:00+00'",
    ],
    "d": ["'9999-12-31'", "'0001-01-01'", "'2024-02-29'"],
    "tt": ["'12:00:00+05:30'", "'23:59:59.999999-12'"],
    "iv": ["'178000000 years'", "'-178000000 years'", "'1 day -1 second'", "'1 mon 1.5 days'"],
    "j": [
        '\'{"b": 1,  "a": [1, {"x": {"y": [null, true, "\\u00e9"]}}], "a": 2}\'',
        "'[]'",
        "(repeat('[', 300) || repeat(']', 300))::json",
    ],
    "jb": ['\'{"b": 1, "a": [1, {"x": {"y": [null, true, "é 😀"]}}]}\'', "'\"str\"'", "'null'"],
    "ia": ["'{1,NULL,3}'", "'{{1,2},{3,4}}'", "'{}'", "'[0:1]={7,8}'"],
    "ta": ["ARRAY['a\"b', NULL, 'NULL', 'c,d', '', E'x\\ny', '😀']"],
    "u": ["'00000000-0000-0000-0000-000000000000'", "'ffffffff-ffff-ffff-ffff-ffffffffffff'"],
    "ip": ["'::1/128'", "'192.168.0.1/24'"],
    "m": ["'-92233720368547758.08'", "'92233720368547758.07'"],
    "bits": ["B'1010'", "B''"],
    "p": ["'(1.5,NaN)'", "'(-0,1e308)'"],
    "r": ["'[2020-01-01,infinity)'", "'empty'", "'(,)'"],
}


def _odd_table(conn: psycopg.Connection[Any], table: str = "odd", first_id: int = 1) -> int:
    if first_id == 1:
        definitions = ", ".join(f"{name} {pg_type}" for name, pg_type in ODD_COLUMNS.items())
        conn.execute(
            f"CREATE TABLE {table} (id int PRIMARY KEY, {definitions}, "
            "updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
    rows = max(len(v) for v in ODD_VALUES.values())
    for i in range(rows):
        names = [n for n in ODD_COLUMNS if i < len(ODD_VALUES[n])]
        values = [ODD_VALUES[n][i] for n in names]
        conn.execute(f"INSERT INTO {table} (id, {', '.join(names)}) VALUES ({first_id + i}, {', '.join(values)})")
    conn.execute(f"INSERT INTO {table} (id) VALUES ({first_id + rows})")  # all NULL
    return rows + 1


@pytest.mark.parametrize("mode", ["incremental", "full"])
def test_odd_values_round_trip_exactly(env: SyncEnv, mode: str) -> None:
    with env.source() as conn:
        rows = _odd_table(conn)
    spec = SyncSpec(
        sync_id="odd",
        source_table="odd",
        mode=mode,  # type: ignore[arg-type]
        cursor_column="updated_at" if mode == "incremental" else None,
        batch_rows=3,
    )
    assert env.sync(spec, run_id="r1")[1].inserted == rows
    _assert_same(env, "odd", "id")
    _, again = env.sync(spec.with_options(mode="full"), run_id="r2")  # every row re-read: none is "changed"
    assert (again.rows_staged, again.inserted, again.updated) == (rows, 0, 0)
    with env.source() as conn:
        conn.execute(
            "UPDATE odd SET t = t || '!', b = b || '\\x00'::bytea, updated_at = clock_timestamp() WHERE id <= 3"
        )
    assert env.sync(spec, run_id="r3")[1].updated == 3
    _assert_same(env, "odd", "id")
    with env.target() as conn:  # spot checks beyond the text rendering
        big = conn.execute("SELECT octet_length(t), octet_length(b) FROM odd WHERE id = 6 OR id = 4 ORDER BY id")
        assert big.fetchall() == [(4, 600000), (10485790, None)]  # the text "NULL"; 10 MB
        nan = conn.execute("SELECT f8 = 'NaN', f4 = 'Infinity', n = 'NaN' FROM odd WHERE id = 1").fetchone()
        assert nan == (True, False, True)
        json_text = conn.execute("SELECT j::text FROM odd WHERE id = 1").fetchone()
        assert json_text == ('{"b": 1,  "a": [1, {"x": {"y": [null, true, "\\u00e9"]}}], "a": 2}',)


@pytest.mark.parametrize(
    ("pg_type", "value", "error", "message"),
    [
        ("timestamp", "'4713-01-01 00:00:00 BC'", SyncError, r"timestamp too small \(before year 1\)"),
        ("timestamptz", "'infinity'", SyncError, r"timestamp too large \(after year 10K\)"),
        ("date", "'0044-03-15 BC'", SyncError, r"date too small \(before year 1\)"),
        ("time", "'24:00:00'", SyncError, r"can't parse time '24:00:00'"),
        (
            "numeric(12,2)",
            "'NaN'",
            DataError,
            r"column='v' key=\(id=2\) rule=type\] value Decimal\('NaN'\) cannot be staged",
        ),
    ],
    ids=["timestamp BC", "timestamptz infinity", "date BC", "time 24:00", "bounded numeric NaN"],
)
def test_values_python_cannot_carry_fail_clearly_and_change_nothing(
    env: SyncEnv, pg_type: str, value: str, error: type[SyncError], message: str
) -> None:
    with env.source() as conn:
        conn.execute(f"CREATE TABLE t (id int PRIMARY KEY, v {pg_type})")
        conn.execute("INSERT INTO t (id) VALUES (1)")
    spec = SyncSpec(sync_id="t", source_table="t", mode="full")
    env.sync(spec, run_id="r1")
    with env.target() as conn:
        before = table_checksum(conn, "t", source_columns(conn, "t"), ["id"]), env.state("t")
    with env.source() as conn:
        conn.execute(f"INSERT INTO t VALUES (2, {value})")
    with pytest.raises(error, match=r"^\[sync='t' table='t'.*" + message):
        env.sync(spec, run_id="r2")
    with env.target() as conn:
        assert (table_checksum(conn, "t", source_columns(conn, "t"), ["id"]), env.state("t")) == before


def test_cdc_streams_odd_values_exactly(cdc: CdcEnv) -> None:
    """The change stream carries values as text: also those Python has no type for (BC, infinity)."""
    with cdc.env.source() as conn:
        rows = _odd_table(conn)
    spec = CdcSpec(sync_id="odd_cdc", tables=("odd",), batch_rows=3)
    cdc.run(spec, run_id="snapshot")
    cdc.assert_converged("odd", ["id"])
    with cdc.env.source() as conn:
        _odd_table(conn, first_id=100)
        conn.execute("UPDATE odd SET ts = '4713-01-01 BC', tstz = 'infinity', d = '-infinity' WHERE id = 100")
        conn.execute("UPDATE odd SET f8 = 'NaN', jb = '{\"deep\": [[[[{}]]]]}' WHERE id <= 3")
        conn.execute("DELETE FROM odd WHERE id = 2")
    _, result = cdc.run(spec, run_id="changes")
    assert (result.inserted, result.deleted) == (rows, 1)
    assert cdc.assert_converged("odd", ["id"]) == 2 * rows - 1


@pytest.mark.parametrize("table", ["back\\slash", "ünï", "with blank"])
def test_cdc_tables_with_odd_names(cdc: CdcEnv, table: str) -> None:
    with cdc.env.source() as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(sql.Identifier(table)))
        conn.execute(
            sql.SQL("INSERT INTO {} SELECT g, 'v' FROM generate_series(1, 10) g").format(sql.Identifier(table))
        )
    spec = CdcSpec(sync_id="odd_names", tables=(table,))
    cdc.run(spec, run_id="snapshot")
    with cdc.env.source() as conn:
        conn.execute(sql.SQL("UPDATE {} SET v = 'changed' WHERE id <= 3").format(sql.Identifier(table)))
    cdc.run(spec, run_id="changes")
    cdc.assert_converged(table, ["id"])
