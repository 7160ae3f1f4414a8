"""``CdcResnapshotOperator`` against the real PostgreSQL the suite starts: a table whose target copy
cannot be trusted is copied anew while the sync's other table keeps its rows and position."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airflow_sync_provider.core.cdc import CdcPosition, CdcSpec, committed_cdc_state
from airflow_sync_provider.core.cdc import slot as cdc_slot

from ..conftest import SyncEnv, source_columns, table_checksum

#: ~32 kB of hex text per row, stored out of line: an update of another column leaves it out.
BIG = "".join(f"{i:08x}" for i in range(4_000))
DOCS, ITEMS = 20, 50


@dataclass
class Shop:
    """Two source tables of one CDC sync (``docs``, TOASTed bodies; ``items``) and the Airflow
    connections ``sync_source`` / ``sync_target`` to the test databases."""

    env: SyncEnv
    sync_id: str

    @property
    def spec(self) -> CdcSpec:
        return CdcSpec(sync_id=self.sync_id, tables=("docs", "items"))

    def source(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        with self.env.source() as conn:
            conn.execute(statement, params)

    def target_rows(self, query: str) -> list[tuple[Any, ...]]:
        with self.env.target() as conn:
            return conn.execute(query).fetchall()

    def converged(self, table: str) -> bool:
        with self.env.source() as src, self.env.target() as tgt:
            columns = source_columns(src, table)
            return table_checksum(src, table, columns, ["id"]) == table_checksum(tgt, table, columns, ["id"])

    def position(self) -> tuple[int, CdcPosition]:
        """The committed state version and position."""
        with closing(self.env.target()) as target:
            state = committed_cdc_state(target, self.spec)
        position = CdcPosition.from_state(state)
        assert state is not None and position is not None
        return state.version, position

    def sync(self) -> Any:
        from airflow_sync_provider.operators.cdc import CdcSyncOperator

        return CdcSyncOperator(task_id="cdc_sync", **self.declaration())

    def resnapshot(self, tables: str | list[str], **kwargs: Any) -> Any:
        from airflow_sync_provider.operators.cdc import CdcResnapshotOperator

        return CdcResnapshotOperator(task_id="resnapshot", resnapshot=tables, **self.declaration(), **kwargs)

    def declaration(self) -> dict[str, Any]:
        return {
            "source_conn_id": "sync_source",
            "target_conn_id": "sync_target",
            "sync_id": self.sync_id,
            "tables": ["docs", "items"],
        }


@pytest.fixture
def shop(env: SyncEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    port = env.server.port
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_SOURCE", f"postgres://postgres@127.0.0.1:{port}/{env.source_db}")
    monkeypatch.setenv("AIRFLOW_CONN_SYNC_TARGET", f"postgres://postgres@127.0.0.1:{port}/{env.target_db}")
    monkeypatch.setenv("SYNC_STAGING_DIR", str(Path(env.staging.base_uri.removeprefix("file://"))))
    with env.source() as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, version int)")
        conn.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")
        conn.execute("INSERT INTO docs SELECT g, %s || g, 1 FROM generate_series(1, %s) g", (BIG, DOCS))
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, sku text, qty int)")
        conn.execute("INSERT INTO items SELECT g, 'sku-' || g, g FROM generate_series(1, %s) g", (ITEMS,))
    shop = Shop(env, f"shop_{uuid.uuid4().hex[:10]}")
    first = shop.sync().execute(context("manual__snapshot"))
    assert (first["manifest"]["kind"], first["load"]["inserted"]) == ("snapshot", DOCS + ITEMS)
    yield shop
    # Slots are cluster-wide and block DROP DATABASE: drop this database's slots first.
    with env.source() as conn:
        for (name,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
        ).fetchall():
            cdc_slot.drop_slot(conn, name)


def context(run_id: str) -> Any:
    return {"run_id": run_id}


def damage_docs(shop: Shop) -> None:
    """Rows 1 and 2 removed in the target; at the source row 1 moves to 100 and is then updated with
    its body left out as unchanged, so the change batch cannot be applied: the documented failure."""
    from airflow.sdk.exceptions import AirflowFailException

    with shop.env.target() as conn:
        conn.execute("DELETE FROM docs WHERE id IN (1, 2)")
    shop.source("UPDATE docs SET id = 100 WHERE id = 1")
    shop.source("UPDATE docs SET version = 2 WHERE id = 100")
    with pytest.raises(AirflowFailException, match=r"table='public.docs'.*rule=unchanged TOAST value"):
        shop.sync().execute(context("manual__damaged"))


def test_a_damaged_table_is_repaired_while_the_other_keeps_its_rows_and_position(shop: Shop) -> None:
    damage_docs(shop)
    shop.source("UPDATE items SET qty = -1 WHERE id <= 10")  # pending in the slot for items
    version, before = shop.position()

    operator = shop.resnapshot("{{ params.table }}")
    assert {"resnapshot", "tables", "sync_id", "staging_uri"} <= set(operator.template_fields)
    operator.render_template_fields({"params": {"table": "docs"}})
    assert operator.resnapshot == "docs"
    out = operator.execute(context("manual__resnapshot"))

    assert out["manifest"]["kind"] == "table_snapshot"
    assert out["manifest"]["tables"] == {"public.docs": DOCS}  # only docs was copied
    load = out["load"]
    assert (load["status"], load["inserted"], load["version"]) == ("applied", 2, version + 1)  # rows 2 and 100
    assert shop.converged("docs")
    _, after = shop.position()
    # items: its position is the sync's, untouched; its pending change is not in the target yet.
    assert (after.commit_lsn, after.end_lsn) == (before.commit_lsn, before.end_lsn)
    assert set(after.table_snapshots) == {"public.docs"}
    assert shop.target_rows("SELECT count(*) FROM items WHERE qty = -1") == [(0,)]
    assert not shop.converged("items")

    # The next sync applies items' change once and skips, for docs, what the new copy holds.
    shop.source("UPDATE docs SET version = 3 WHERE id = 5")
    applied = shop.sync().execute(context("manual__after"))["load"]
    assert applied["status"] == "applied"
    assert applied["tables"]["public.items"] == {"inserted": 0, "updated": 10, "deleted": 0}
    assert applied["tables"]["public.docs"] == {"inserted": 0, "updated": 1, "deleted": 0}
    assert shop.converged("docs") and shop.converged("items")


def test_an_unknown_table_fails_naming_it_and_changes_nothing(shop: Shop) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    version, before = shop.position()
    with pytest.raises(AirflowFailException, match=r"re-snapshot needs tables of the sync.*got public\.no_such"):
        shop.resnapshot("docs, no_such").execute(context("manual__unknown"))
    with pytest.raises(AirflowFailException, match="got none"):
        shop.resnapshot([]).execute(context("manual__none"))
    assert shop.position() == (version, before)


def test_the_same_run_twice_is_fine(shop: Shop) -> None:
    damage_docs(shop)
    version, _ = shop.position()
    operator = shop.resnapshot(["docs"])
    first = operator.execute(context("manual__twice"))
    second = operator.execute(context("manual__twice"))  # an Airflow retry, or the task cleared
    assert (first["load"]["status"], first["load"]["version"]) == ("applied", version + 1)
    assert (second["load"]["status"], second["load"]["version"]) == ("applied", version + 2)
    assert second["load"]["inserted"] == 0  # nothing was missing any more
    assert first["manifest"]["manifest_id"] != second["manifest"]["manifest_id"]
    assert shop.converged("docs")

    # The sync streams on from the second copy: a later change of docs arrives once.
    shop.source("UPDATE docs SET version = 4 WHERE id = 100")
    applied = shop.sync().execute(context("manual__after"))["load"]
    assert applied["tables"]["public.docs"] == {"inserted": 0, "updated": 1, "deleted": 0}
    assert shop.converged("docs") and shop.converged("items")
