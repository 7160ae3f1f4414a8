"""Property: for random change streams, the bulk decoder stages exactly the per-message reference's rows,
and applying its batches makes every target table equal its source.

Hypothesis draws transactions over two tables (one keyed by an int with a TOASTed body, one by a
composite key): inserts, updates of plain and TOASTed columns (NULLs included), key changes,
deletes, truncates, logical messages, and an ALTER TABLE that adds a column mid-stream; REPLICA
IDENTITY DEFAULT or FULL; the batch limits (rows and bytes per file, bytes per batch) drawn too, so
batches end at byte limits and relation changes.  Every batch is staged by both decoders from the
same committed state and compared row for row (tests/integration/test_cdc_bulk.py ``stage_both``);
the bulk batch is then applied and, at the end, both tables must equal the source by a full-row
fingerprint.  A few examples in CI; ``-m slow`` runs a few hundred.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from airflow_sync_provider.core.cdc import CdcSpec

from ..conftest import CdcEnv
from ..integration.test_cdc_bulk import catch_up

_examples = itertools.count()

KEYS = (1, 2, 3, 4, 5, 201, 202, -1)
KINDS = (
    ["insert_a"] * 3
    + ["insert_b"] * 2
    + ["set_v", "set_v", "set_body", "set_note_null", "move_a", "move_a", "delete_a", "delete_b"]
    + ["move_b", "set_b", "truncate_b", "message", "alter"]
)


def _body(seed: int | None) -> str | None:
    if seed is None:
        return None
    if seed % 3 == 0:
        return f"short-{seed}"
    return (hashlib.sha256(str(seed).encode()).hexdigest() * 40)[: 2_200 + seed % 1_000]  # out of line


BODY = st.one_of(st.none(), st.integers(0, 10**6))


def _statement(
    data: st.DataObject, conn: psycopg.Connection[Any], altered: list[str], a: str, b: str
) -> tuple[str, tuple[Any, ...]]:
    """One statement drawn against the keys the source holds now (tables ``a`` and ``b`` of this example)."""
    held_a = [r[0] for r in conn.execute(f"SELECT id FROM {a} ORDER BY id")]
    held_b = [tuple(r) for r in conn.execute(f"SELECT k1, k2 FROM {b} ORDER BY k1, k2")]
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    free_a = [k for k in KEYS if k not in held_a]
    if kind in ("set_v", "set_body", "set_note_null", "move_a", "delete_a") and not held_a:
        kind = "insert_a"
    if kind in ("move_b", "set_b", "delete_b") and not held_b:
        kind = "insert_b"
    if kind == "insert_a" and not free_a:
        kind = "set_v"
    if kind == "insert_a":
        key = data.draw(st.sampled_from(free_a), label="key")
        return f"INSERT INTO {a} (id, v, note, body) VALUES (%s, 0, 'new', %s)", (key, _body(data.draw(BODY)))
    if kind == "insert_b":
        k1, k2 = data.draw(st.integers(0, 3), label="k1"), data.draw(st.sampled_from(["x", "y", "z é"]), label="k2")
        n = data.draw(st.integers(-(2**63), 2**63 - 1))  # n is a bigint: outside, the source refuses the row
        return f"INSERT INTO {b} VALUES (%s, %s, %s, now()) ON CONFLICT DO NOTHING", (k1, k2, n)
    if kind == "truncate_b":
        return f"TRUNCATE {b}", ()
    if kind == "message":
        return "SELECT pg_logical_emit_message(%s, 'prop', 'x')", (data.draw(st.booleans()),)
    if kind == "alter":
        column = f"c{len(altered)}"
        altered.append(column)
        return f"ALTER TABLE {a} ADD COLUMN {column} text", ()
    if kind in ("move_b", "set_b", "delete_b"):
        k1, k2 = data.draw(st.sampled_from(held_b), label="b key")
        if kind == "move_b":
            return f"UPDATE {b} SET k2 = k2 || '+' WHERE k1 = %s AND k2 = %s", (k1, k2)
        if kind == "set_b":
            return f"UPDATE {b} SET n = NULL WHERE k1 = %s", (k1,)
        return f"DELETE FROM {b} WHERE k1 = %s AND k2 = %s", (k1, k2)
    key = data.draw(st.sampled_from(held_a), label="a key")
    if kind == "set_v":
        return f"UPDATE {a} SET v = v + 1 WHERE id <= %s", (key,)
    if kind == "set_body":
        return f"UPDATE {a} SET body = %s WHERE id = %s", (_body(data.draw(BODY)), key)
    if kind == "set_note_null":
        return f"UPDATE {a} SET note = NULL WHERE id = %s", (key,)
    if kind == "delete_a":
        return f"DELETE FROM {a} WHERE id = %s", (key,)
    other = data.draw(st.sampled_from(free_a or [999]), label="to")
    return f"UPDATE {a} SET id = %s WHERE id = %s", (other, key)


def _run(cdc: CdcEnv, data: st.DataObject, identity: str, limits: dict[str, Any]) -> None:
    n = next(_examples)
    a, b = f"a{n}", f"b{n}"  # each example its own tables (the databases are shared by the examples)
    spec = CdcSpec(sync_id=f"bulkprop{n}", tables=(a, b), schema_drift="evolve", **limits)
    with cdc.env.source() as conn:
        conn.execute(f"CREATE TABLE {a} (id int PRIMARY KEY, v int NOT NULL, note text, body text)")
        conn.execute(f"ALTER TABLE {a} ALTER COLUMN body SET STORAGE EXTERNAL")
        conn.execute(f"ALTER TABLE {a} REPLICA IDENTITY {identity}")
        conn.execute(f"CREATE TABLE {b} (k1 int, k2 text, n bigint, at timestamptz, PRIMARY KEY (k1, k2))")
        conn.execute(f"INSERT INTO {a} VALUES (1, 0, 'init', %s), (2, 0, NULL, NULL)", (_body(7),))
    try:
        _, snapshot = cdc.run(spec, run_id="snap")
        assert snapshot.kind == "snapshot"
        altered: list[str] = []
        with cdc.env.source(autocommit=False) as conn:
            for number in range(data.draw(st.integers(1, 8), label="transactions")):
                with conn.transaction():
                    for _ in range(data.draw(st.integers(1, 4), label="statements")):
                        query, params = _statement(data, conn, altered, a, b)
                        try:
                            with conn.transaction():  # a savepoint: a taken key skips the statement
                                conn.execute(query, params)
                        except psycopg.errors.UniqueViolation:
                            pass
                conn.commit()
                if data.draw(st.booleans(), label="batch ends"):
                    batches = catch_up(cdc, spec, [(a, ["id"]), (b, ["k1", "k2"])], recover=True)
                    note(f"after transaction {number}: {batches} batch(es)")
        catch_up(cdc, spec, [(a, ["id"]), (b, ["k1", "k2"])], recover=True)
    finally:
        with cdc.env.source() as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                (spec.slot_name,),
            )
            conn.execute(f"DROP PUBLICATION IF EXISTS {spec.publication}")


LIMITS = st.fixed_dictionaries(
    {
        "batch_rows": st.sampled_from([2, 50_000]),
        "batch_bytes": st.sampled_from([3_000, 16 * 1024 * 1024]),
        "max_batch_bytes": st.sampled_from([None, 6_000]),
    }
)


def _property(max_examples: int) -> Any:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=max_examples <= 40,
        database=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if max_examples > 40 else [])],
    )


@_property(15)
@given(data=st.data(), identity=st.sampled_from(["DEFAULT", "FULL"]), limits=LIMITS)
def test_bulk_decoder_stages_what_the_reference_stages(
    cdc: CdcEnv, data: st.DataObject, identity: str, limits: dict[str, Any]
) -> None:
    _run(cdc, data, identity, limits)


@pytest.mark.slow
@pytest.mark.timeout(5_400)
@_property(300)
@given(data=st.data(), identity=st.sampled_from(["DEFAULT", "FULL"]), limits=LIMITS)
def test_bulk_decoder_stages_what_the_reference_stages_soak(
    cdc: CdcEnv, data: st.DataObject, identity: str, limits: dict[str, Any]
) -> None:
    _run(cdc, data, identity, limits)
