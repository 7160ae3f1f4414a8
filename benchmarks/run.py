# ruff: noqa: S608 - the benchmark's SQL is built from constant identifiers and its own values only
"""Benchmark harness: this provider side by side with the raw limits and its peers, in one run.

``python -m benchmarks.run [--quick] [--rounds N] [--rows N]`` starts an embedded PostgreSQL 18,
generates the data, runs every contender on the same data (rotating order, several rounds,
medians), checks after every run that the contender's target equals its source by a full-row
fingerprint (a mismatch fails the run), and writes ``benchmarks/results/<stamp>.json``, ``.md``
and ``.png`` (and ``latest-<full|quick>.*``).  Every contender runs in its own process
(``benchmarks.worker``) and times only its work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg.sql import SQL, Composable, Composed, Identifier

from benchmarks import report, worker
from sync_dev.local_postgres import LocalPostgres, local_postgres

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

TABLE_DDL = (
    "CREATE TABLE {name} (id bigint PRIMARY KEY, sku text, qty integer, warehouse integer, "
    "price numeric(12, 2), updated_at timestamptz NOT NULL, note text)"
)
#: One row of the benchmark table (~100 bytes, 7 columns as in ../shared/PERFORMANCE.md).
ROW_EXPR = (
    "g, 'SKU-' || lpad(g::text, 9, '0'), (g %% 1000)::int, (g %% 17)::int, ((g %% 100000) / 100.0)::numeric(12, 2), "
    "timestamptz '2026-01-01 00:00:00+00' + g * interval '1 millisecond', md5(g::text) || ' lorem ipsum'"
)

#: Full-row fingerprint of a relation: row count and the sum of the first 60 bits of each row's md5.
#: Order-independent (no sort of the table); every column, normalised so that type choices of a tool
#: (dlt's bigint for an int column, a wider numeric scale) do not count, values and keys do.  Run with
#: TimeZone=UTC so timestamptz renders the same on both sides.
FINGERPRINT = SQL(
    "SELECT count(*), coalesce(sum(('x' || left(md5(row(id, sku, qty::bigint, warehouse::bigint, "
    "trim_scale(price), updated_at, note)::text), 15))::bit(60)::bigint), 0) FROM ({}) AS fingerprinted"
)


@dataclass(frozen=True)
class Contender:
    """One contender of workloads (a)/(b): what it syncs into and on how many rows."""

    name: str
    workloads: str  # "ab": initial and incremental; "a": initial only (append-only tools)
    target: str
    #: ``Scale`` attribute of the subset it runs on (row-by-row tools), None: the whole table
    subset: str | None = None
    #: the harness creates its (empty) target; the provider and dlt create their own
    harness_target: bool = True


TABLE_CONTENDERS = (
    Contender("raw_limit", "a", "raw_items"),
    Contender("raw_merge", "ab", "raw_merge_items"),
    Contender("raw_staged", "ab", "raw_staged_items"),
    Contender("provider_incremental", "ab", "prov_incr_items", harness_target=False),
    Contender("provider_full", "ab", "prov_full_items", harness_target=False),
    Contender("dlt_parquet", "ab", "dlt_parquet.items", harness_target=False),
    Contender("dlt_default", "ab", "dlt_default.items", harness_target=False),
    Contender("airflow_upsert_rows", "ab", "airflow_upsert_rows_items", "slow_rows"),
    Contender("airflow_insert_rows_executemany", "ab", "airflow_insert_rows_executemany_items", "slow_rows"),
    Contender("airflow_generic_transfer", "ab", "airflow_generic_transfer_items", "slow_rows"),
    Contender("pandas_copy", "a", "pandas_copy_items", "slow_rows"),
    Contender("pandas_default", "a", "pandas_default_items", "slow_rows"),
    Contender("pandas_multi", "a", "pandas_multi_items", "multi_rows"),
)
CDC_CONTENDERS = ("slot_read", "slot_read_python", "raw_cdc_limit", "provider_cdc", "provider_cdc_per_message")
ALL_CONTENDERS = (*(c.name for c in TABLE_CONTENDERS), *CDC_CONTENDERS)
DLT_SCHEMAS = ("dlt_parquet", "dlt_default")


@dataclass
class Scale:
    rows: int
    big_rows: int
    cdc_changes: int
    rounds: int
    slow_rows: int  # subset of the row-by-row Airflow/pandas contenders (their rate is compared)
    multi_rows: int  # smaller subset of pandas method="multi" (~10k rows/s)
    #: rounds the peers (dlt, Airflow, pandas) run in (None: every round); --quick runs them once
    peer_rounds: int | None = None


FULL = Scale(rows=1_000_000, big_rows=10_000_000, cdc_changes=100_000, rounds=3, slow_rows=200_000, multi_rows=20_000)
QUICK = Scale(
    rows=50_000, big_rows=500_000, cdc_changes=10_000, rounds=2, slow_rows=5_000, multi_rows=2_000, peer_rounds=1
)


@dataclass
class Bench:
    server: LocalPostgres
    scale: Scale
    workdir: Path
    log: list[str] = field(default_factory=list)
    samples: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    profile: bool = False
    contenders: set[str] | None = None  # None: all
    notes: list[str] = field(default_factory=list)
    checks: dict[str, list[bool]] = field(default_factory=dict)
    #: a contender whose target is damaged before each check (proves that the check can fail)
    damage: str | None = None
    _expected: dict[tuple[Any, ...], tuple[int, int]] = field(default_factory=dict)

    def wanted(self, contender: str) -> bool:
        return self.contenders is None or contender in self.contenders

    @property
    def src_db(self) -> str:
        return "bench_src"

    @property
    def tgt_db(self) -> str:
        return "bench_tgt"

    def say(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        self.log.append(line)
        print(line, flush=True)

    def sql(self, db: str, statement: str | SQL | Composed, params: Any = None) -> list[tuple[Any, ...]]:
        with self.server.connect(db) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def job(self, contender: str, workload: str, **extra: Any) -> dict[str, Any]:
        s = self.server
        base = {
            "contender": contender,
            "workload": workload,
            "src_dsn": s.dsn(self.src_db),
            "tgt_dsn": s.dsn(self.tgt_db),
            "src_url": s.url(self.src_db),
            "tgt_url": s.url(self.tgt_db),
            "src_airflow_uri": f"postgres://postgres@{s.host}:{s.port}/{self.src_db}",
            "tgt_airflow_uri": f"postgres://postgres@{s.host}:{s.port}/{self.tgt_db}",
            "psql": str(s.bindir / "psql"),
            "staging": str(self.workdir / "staging"),
        }
        base.update(extra)
        return base

    def run(self, job: dict[str, Any], record: str | None = None) -> dict[str, Any]:
        """Run one job in a fresh process; record its result under ``record`` (workload/contender)."""
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(job)],
            capture_output=True,
            text=True,
            env=self._env(),
            cwd=HERE.parent,
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"{job['contender']} ({job['workload']}) failed:\n{done.stderr[-4000:]}")
        result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
        if record:
            workload, contender = record.split("/", 1)
            self.samples.setdefault(workload, {}).setdefault(contender, []).append(result)
            rate = result["rows"] / result["seconds"] if result["seconds"] else 0
            self.say(
                f"  {record:<45} {result['rows']:>10,} rows {result['seconds']:8.3f} s {rate:>10,.0f} rows/s "
                f"peak RSS {result['peak_rss_mb']:.0f} MB"
            )
        return result

    def start(self, job: dict[str, Any]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env(),
            cwd=HERE.parent,
        )

    def _env(self) -> dict[str, str]:
        return {**os.environ, "AIRFLOW_HOME": str(self.workdir / "airflow"), "PYTHONWARNINGS": "ignore"}

    # ----------------------------------------------------------------------- target == source

    def fingerprint(self, db: str, relation: Composable, params: Any = None) -> tuple[int, int]:
        """(rows, fingerprint) of ``relation`` (a query) in ``db``; see ``FINGERPRINT``."""
        with self.server.connect(db) as conn:
            conn.execute("SET TimeZone = 'UTC'")
            row: Any = conn.execute(FINGERPRINT.format(relation), params).fetchone()
        return int(row[0]), int(row[1])

    def expected(self, relation: Composable, params: Any = None) -> tuple[int, int]:
        """The source's fingerprint, computed once per source state (``forget`` after a change)."""
        key = (relation.as_string(None), params)
        if key not in self._expected:
            self._expected[key] = self.fingerprint(self.src_db, relation, params)
        return self._expected[key]

    def forget(self) -> None:
        self._expected.clear()

    def check(self, record: str, target: str, expected: tuple[int, int]) -> bool:
        """Target ``target`` must have the fingerprint ``expected``; logged, recorded, loud when not."""
        contender = record.split("/", 1)[1]
        if contender == self.damage:
            self.sql(
                self.tgt_db,
                SQL("UPDATE {t} SET sku = sku || '!' WHERE id = (SELECT min(id) FROM {t})").format(t=_ident(target)),
            )
        got = self.fingerprint(self.tgt_db, table(target))
        ok = got == expected
        self.checks.setdefault(record, []).append(ok)
        runs = self.samples.get(record.split("/", 1)[0], {}).get(contender)
        if runs:
            runs[-1]["target_rows"], runs[-1]["check"] = got[0], ok
        if ok:
            self.say(f"  check {record:<39} target == source: {got[0]:,} rows, fingerprint {got[1]:x}")
        else:
            self.say(
                f"  !!! MISMATCH {record}: target {target} has {got[0]:,} rows / fingerprint {got[1]:x}, "
                f"its source {expected[0]:,} rows / {expected[1]:x} !!!"
            )
        return ok


def _ident(name: str) -> Identifier:
    return Identifier(*name.split("."))


def table(name: str) -> Composed:
    """The relation ``SELECT * FROM name`` (``schema.name`` allowed)."""
    return SQL("SELECT * FROM {}").format(_ident(name))


# --------------------------------------------------------------------------- data


def seed(bench: Bench, name: str, rows: int, start: int = 1) -> None:
    bench.sql(bench.src_db, f"DROP TABLE IF EXISTS {name} CASCADE")
    bench.sql(bench.src_db, TABLE_DDL.format(name=name))
    insert = f"INSERT INTO {name} SELECT {ROW_EXPR} FROM generate_series(%s::bigint, %s) g"
    bench.sql(bench.src_db, insert, (start, rows))
    bench.sql(bench.src_db, f"CREATE INDEX ON {name} (updated_at, id)")
    bench.sql(bench.src_db, f"VACUUM ANALYZE {name}")


def reset_source(bench: Bench) -> None:
    """``items`` back to its initial state (a copy of ``items_base``)."""
    bench.sql(bench.src_db, "TRUNCATE items")
    bench.sql(bench.src_db, "INSERT INTO items SELECT * FROM items_base")
    bench.sql(bench.src_db, "VACUUM ANALYZE items")
    bench.forget()


def change_source(bench: Bench) -> int:
    """Workload (b): update 10% of the rows and insert 10% new ones (cursor = now())."""
    n = bench.scale.rows
    update = "UPDATE items SET price = price + 1, qty = qty + 1, updated_at = clock_timestamp() WHERE id % 10 = 3"
    bench.sql(bench.src_db, update)
    bench.sql(
        bench.src_db,
        "INSERT INTO items SELECT g, 'SKU-' || g, 1, 2, 3.00, clock_timestamp(), md5(g::text) "
        "FROM generate_series(%s::bigint, %s) g",
        (n + 1, n + n // 10),
    )
    bench.sql(bench.src_db, "VACUUM ANALYZE items")
    bench.forget()
    return n // 10 + n // 10


def drop_targets(bench: Bench, names: list[str]) -> None:
    for name in names:
        bench.sql(bench.tgt_db, SQL("DROP TABLE IF EXISTS {}").format(_ident(name)))
    for schema in DLT_SCHEMAS:
        for suffix in ("", "_staging"):
            bench.sql(bench.tgt_db, SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(Identifier(schema + suffix)))
    if bench.sql(bench.tgt_db, "SELECT to_regclass('public._sync_state')")[0][0]:
        bench.sql(bench.tgt_db, "DELETE FROM _sync_state WHERE sync_id LIKE 'bench%%'")


def create_target(bench: Bench, name: str) -> None:
    bench.sql(bench.tgt_db, SQL("DROP TABLE IF EXISTS {}").format(_ident(name)))
    bench.sql(bench.tgt_db, TABLE_DDL.format(name=_ident(name).as_string(None)))


def copy_table(bench: Bench, source: str, target: str) -> None:
    """Untimed: ``target`` (created empty here) gets ``source``'s rows by the raw pipe."""
    create_target(bench, target)
    worker.raw_limit(bench.job("raw_limit", "seed", source=source, target=target))  # psql only: no process of ours


# --------------------------------------------------------------------------- workloads (a), (b), (e)


def source_of(bench: Bench, contender: Contender, workload: str) -> tuple[Composable, Any]:
    """What ``contender``'s target must equal after ``workload``: the whole source, or for a subset
    contender exactly the rows its worker read (see ``worker._subset_query``) on top of (b)'s
    initial state."""
    if contender.subset is None:
        return table("items"), None
    rows = getattr(bench.scale, contender.subset)
    if workload == "a":
        return SQL("SELECT * FROM items WHERE id <= %s"), (rows,)
    subset = SQL(
        "WITH s AS (SELECT id FROM items WHERE updated_at > (SELECT max(updated_at) FROM items_base) "
        "ORDER BY updated_at, id LIMIT %s) "
        "SELECT i.* FROM items i JOIN s USING (id) "
        "UNION ALL SELECT b.* FROM items_base b WHERE NOT EXISTS (SELECT FROM s WHERE s.id = b.id)"
    )
    return subset, (rows,)


def initial_and_incremental(bench: Bench, workloads: str = "abe") -> None:
    """(a) initial sync, (b) incremental after 10% updates + 10% inserts, (e) no-change run.

    (a) always runs (it is the state (b) and (e) start from); (b) and (e) when in ``workloads``.
    """
    scale = bench.scale
    chosen = [c for c in TABLE_CONTENDERS if bench.wanted(c.name)]
    for round_ in range(scale.rounds):
        bench.say(f"round {round_ + 1}/{scale.rounds}: (a) initial sync of {scale.rows:,} rows")
        reset_source(bench)
        drop_targets(bench, [c.target for c in chosen if "." not in c.target])
        for contender in chosen:
            if contender.harness_target:
                create_target(bench, contender.target)
        shutil.rmtree(bench.workdir / "dlt", ignore_errors=True)
        order = chosen[round_ % len(chosen) :] + chosen[: round_ % len(chosen)]  # rotate who goes first
        if scale.peer_rounds is not None and round_ >= scale.peer_rounds:
            order = [c for c in order if c.name.startswith(("raw_", "provider_"))]
        for contender in order:
            bench.run(_job(bench, contender, "a", round_), f"a/{contender.name}")
            bench.check(f"a/{contender.name}", contender.target, bench.expected(*source_of(bench, contender, "a")))
        if "b" in workloads:
            incremental_round(bench, order, round_)
        incremental = next((c for c in chosen if c.name == "provider_incremental"), None)
        if incremental and "e" in workloads:
            bench.say(f"round {round_ + 1}/{scale.rounds}: (e) no-change run")
            bench.run(_job(bench, incremental, "e", round_), "e/provider_incremental")
            bench.check("e/provider_incremental", incremental.target, bench.expected(table("items")))


def incremental_round(bench: Bench, order: list[Contender], round_: int) -> None:
    """(b): change the source, then every contender with a (b) figure applies the changes."""
    changed = change_source(bench)
    bench.say(f"round {round_ + 1}/{bench.scale.rounds}: (b) incremental after {changed:,} changed/new rows")
    for contender in order:
        if "b" in contender.workloads and contender.subset:
            copy_table(bench, "items_base", contender.target)  # (b) starts from the initial state
    for contender in order:
        if "b" in contender.workloads:
            bench.run(_job(bench, contender, "b", round_), f"b/{contender.name}")
            bench.check(f"b/{contender.name}", contender.target, bench.expected(*source_of(bench, contender, "b")))


def _job(bench: Bench, contender: Contender, workload: str, round_: int) -> dict[str, Any]:
    scale = bench.scale
    name = contender.name
    rows = getattr(scale, contender.subset) if contender.subset else scale.rows
    job = bench.job(name, workload, source="items", target=contender.target, rows=rows)
    if name.startswith("provider_"):
        mode = "incremental" if name == "provider_incremental" else "full"
        job.update(mode=mode, sync_id=f"bench_{mode}")
        if bench.profile and round_ == 0:
            job["profile"] = str(bench.workdir / "profiles" / f"{workload}_{name}.txt")
    elif name.startswith("dlt_"):
        job.update(pipelines_dir=str(bench.workdir / "dlt" / name), dataset=contender.target.split(".")[0])
    return job


# --------------------------------------------------------------------------- workload (c): CDC


def cdc(bench: Bench) -> None:
    """(c) CDC apply of N changes vs the raw CDC limit, the reference decoder and the slot read rate.

    Each provider contender has its own sync (slot, publication, target schema), so each reads the
    same changes; the slot readers and the raw CDC limit peek the first provider's slot before it
    consumes it.
    """
    scale = bench.scale
    n = scale.cdc_changes
    if not bench.wanted("provider_cdc"):
        bench.say("(c) skipped: provider_cdc (whose slot the readers peek) is not among the contenders")
        return
    decoders = worker.cdc_decoders()
    providers: list[tuple[str, str, str, str | None]] = [("provider_cdc", "bench_cdc", "public", None)]
    if decoders:
        providers[0] = ("provider_cdc", "bench_cdc", "public", "bulk")
        if bench.wanted("provider_cdc_per_message"):
            providers.append(("provider_cdc_per_message", "bench_cdc_pm", "cdc_pm", "per_message"))
    else:
        note = (
            "CdcSpec has no `decoder` field in this code: the one CDC decoder that exists (per message) ran "
            "as `provider_cdc`; there is no reference decoder contender, so the 2.5x target is not measured"
        )
        bench.notes.append(note)
        bench.say(note)
    seed(bench, "cdc_items", n * scale.rounds)  # each round changes its own slice of the rows
    bench.sql(bench.src_db, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
    for _, sync_id, _, _ in providers:
        bench.sql(bench.src_db, SQL("DROP PUBLICATION IF EXISTS {}").format(Identifier(f"sync_{sync_id}")))
    bench.sql(bench.tgt_db, "DROP TABLE IF EXISTS cdc_items")
    for schema in ("cdc_pm", "cdc_raw"):
        bench.sql(bench.tgt_db, SQL("DROP SCHEMA IF EXISTS {0} CASCADE; CREATE SCHEMA {0}").format(Identifier(schema)))
    if bench.sql(bench.tgt_db, "SELECT to_regclass('public._sync_state')")[0][0]:
        bench.sql(bench.tgt_db, "DELETE FROM _sync_state WHERE sync_id LIKE 'bench_cdc%%'")
    bench.forget()
    source = table("cdc_items")
    targets = {name: f"{schema}.cdc_items" for name, _, schema, _ in providers}
    bench.say(f"(c) CDC: initial snapshot of {n * scale.rounds:,} rows ({', '.join(targets)})")
    for name, sync_id, schema, decoder in providers:
        bench.run(_cdc_job(bench, name, sync_id, schema, decoder, 0))
        bench.check(f"c-snapshot/{name}", targets[name], bench.expected(source))
    raw = bench.wanted("raw_cdc_limit")
    if raw:
        copy_table(bench, "cdc_items", "cdc_raw.cdc_items")
        bench.check("c-snapshot/raw_cdc_limit", "cdc_raw.cdc_items", bench.expected(source))
    net_rows = bench.workdir / "cdc-net-rows.bin"
    next_id = n * scale.rounds + 1
    for round_ in range(scale.rounds):
        # n changes in 10 transactions: 50% updates, 30% inserts, 20% deletes
        per = n // 10
        changed: list[int] = []
        for t in range(10):
            low = round_ * n + t * per + 1
            updates = (low, low + per // 2 - 1)
            inserts = (next_id, next_id + per * 3 // 10 - 1)
            deletes = (low + per // 2, low + per // 2 + per // 5 - 1)
            with bench.server.connect(bench.src_db) as conn, conn.transaction():
                conn.execute(
                    "UPDATE cdc_items SET qty = qty + 1, updated_at = clock_timestamp() WHERE id BETWEEN %s AND %s",
                    updates,
                )
                conn.execute(f"INSERT INTO cdc_items SELECT {ROW_EXPR} FROM generate_series(%s::bigint, %s) g", inserts)
                conn.execute("DELETE FROM cdc_items WHERE id BETWEEN %s AND %s", deletes)
            for first, last in (updates, inserts, deletes):
                changed.extend(range(first, last + 1))
            next_id = inserts[1] + 1
        bench.forget()
        bench.say(f"round {round_ + 1}/{scale.rounds}: (c) {n:,} changes")
        if raw:
            _prepare_net_rows(bench, changed, net_rows)
        slot = {"slot": "sync_bench_cdc", "publication": "sync_bench_cdc"}
        readers = [c for c in ("slot_read", "slot_read_python", "raw_cdc_limit") if bench.wanted(c)]
        for reader in readers[round_ % max(len(readers), 1) :] + readers[: round_ % max(len(readers), 1)]:
            extra = {"target": "cdc_raw.cdc_items", "net_rows": str(net_rows)} if reader == "raw_cdc_limit" else {}
            bench.run(bench.job(reader, "c", **slot, **extra), f"c/{reader}")
            if reader == "raw_cdc_limit":
                bench.check("c/raw_cdc_limit", "cdc_raw.cdc_items", bench.expected(source))
        order = providers[round_ % len(providers) :] + providers[: round_ % len(providers)]
        for name, sync_id, schema, decoder in order:
            bench.run(_cdc_job(bench, name, sync_id, schema, decoder, round_ + 1), f"c/{name}")
            bench.check(f"c/{name}", targets[name], bench.expected(source))
    for _, sync_id, _, _ in providers:
        bench.sql(bench.src_db, "SELECT pg_drop_replication_slot(%s)", (f"sync_{sync_id}",))


def _cdc_job(bench: Bench, name: str, sync_id: str, schema: str, decoder: str | None, round_: int) -> dict[str, Any]:
    job = bench.job(name, "c", source="cdc_items", sync_id=sync_id, target_schema=schema, decoder=decoder)
    if bench.profile and round_ == 1:
        job["profile"] = str(bench.workdir / "profiles" / f"c_{name}.txt")
    return job


def _prepare_net_rows(bench: Bench, keys: list[int], path: Path) -> None:
    """Untimed: the decoded net rows of a round for the raw CDC limit, as a binary COPY file: per
    changed key its final image at the source (op ``U``) or, when gone, the key alone (op ``D``)."""
    query = (
        "COPY (SELECT CASE WHEN s.id IS NULL THEN 'D' ELSE 'U' END, k.id, s.sku, s.qty, s.warehouse, s.price, "
        "s.updated_at, s.note FROM unnest(%s::bigint[]) AS k(id) LEFT JOIN cdc_items s ON s.id = k.id) "
        "TO STDOUT (FORMAT binary)"
    )
    with bench.server.connect(bench.src_db) as conn, open(path, "wb") as out:
        cursor = conn.cursor()
        with cursor.copy(query, (keys,)) as copy:
            for block in copy:
                out.write(block)


# --------------------------------------------------------------------------- (d) memory, parallel


def memory(bench: Bench) -> None:
    """(d) peak RSS of an initial sync of big_rows vs rows (one process each)."""
    scale = bench.scale
    bench.say(f"(d) seeding {scale.big_rows:,} rows for the peak-memory run")
    seed(bench, "items_big", scale.big_rows)
    for rows, source in ((scale.rows, "items_base"), (scale.big_rows, "items_big")):
        bench.sql(bench.tgt_db, "DROP TABLE IF EXISTS mem_items")
        drop_targets(bench, [])
        job = bench.job(
            "provider_incremental",
            "d",
            source=source,
            target="mem_items",
            mode="incremental",
            sync_id="bench_mem",
            rows=rows,
        )
        record = f"d/provider_incremental_{'big' if source == 'items_big' else 'base'}"
        bench.run(job, record)
        bench.check(record, "mem_items", bench.fingerprint(bench.src_db, table(source)))
    bench.sql(bench.tgt_db, "DROP TABLE IF EXISTS mem_items")
    bench.sql(bench.src_db, "DROP TABLE IF EXISTS items_big")


def parallel(bench: Bench) -> None:
    """Partitioned initial sync: two processes on two key ranges (as two mapped tasks) vs one.

    Each partition is a full sync (keyset by primary key, no delete detection) of a view holding one
    key range, so a page query is a range scan of the key index; one process syncs the whole table.
    """
    scale = bench.scale
    half = scale.rows // 2
    bench.sql(bench.src_db, f"CREATE OR REPLACE VIEW items_p0 AS SELECT * FROM items_base WHERE id <= {half:d}")
    bench.sql(bench.src_db, f"CREATE OR REPLACE VIEW items_p1 AS SELECT * FROM items_base WHERE id > {half:d}")
    for round_ in range(scale.rounds):
        for variant in (("one",), ("p0", "p1")) if round_ % 2 == 0 else (("p0", "p1"), ("one",)):
            drop_targets(bench, ["part_items"])
            bench.sql(bench.tgt_db, TABLE_DDL.format(name="part_items"))
            bench.sql(bench.tgt_db, "ALTER TABLE part_items ADD _sync_run_id text, ADD _sync_synced_at timestamptz")
            procs = []
            for part in variant:
                job = bench.job(
                    "provider_incremental",
                    "parallel",
                    source="items_base" if part == "one" else f"items_{part}",
                    target="part_items",
                    mode="full",  # keyset by the primary key: each partition reads only its key range
                    sync_id=f"bench_part_{part}",
                    declare_key=True,
                    no_deletes=True,
                    staging=str(bench.workdir / "staging" / part),
                )
                procs.append(bench.start(job))
            results = []
            for proc in procs:
                out, err = proc.communicate()
                lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    raise RuntimeError(f"partitioned sync failed:\n{err[-4000:]}")
                results.append(json.loads(lines[-1][len("RESULT ") :]))
            wall = max(r["ended"] for r in results) - min(r["started"] for r in results)
            rows = sum(r["rows"] for r in results)
            name = "one_process" if variant == ("one",) else "two_processes"
            result = {"rows": rows, "seconds": wall, "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}
            bench.samples.setdefault("parallel", {}).setdefault(name, []).append(result)
            bench.say(f"  parallel/{name:<36} {rows:>10,} rows {wall:8.3f} s {rows / wall:>10,.0f} rows/s")
            bench.check(f"parallel/{name}", "part_items", bench.expected(table("items_base")))


# --------------------------------------------------------------------------- main


def summarise(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for workload, contenders in samples.items():
        summary[workload] = {}
        for contender, runs in contenders.items():
            seconds = statistics.median(r["seconds"] for r in runs)
            if workload == "b" and contender == "provider_full":
                # the full sync reads the whole table; its (b) rate counts the changed rows like the others
                rows = statistics.median(r["inserted"] + r["updated"] for r in runs)
            else:
                rows = statistics.median(r["rows"] for r in runs)
            entry = {
                "median_seconds": round(seconds, 4),
                "rows": rows,
                "rows_per_s": round(rows / seconds, 1) if seconds else None,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "runs": len(runs),
            }
            for key in ("cpu_seconds", "read_seconds", "apply_seconds", "extract_seconds", "load_seconds"):
                values = [r[key] for r in runs if r.get(key) is not None]
                if values:
                    entry[key] = round(statistics.median(values), 4)
            summary[workload][contender] = entry
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small scale (a minute or two)")
    parser.add_argument("--rows", type=int, help="rows of the main table (default 1M; quick 50k)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--cdc-changes", type=int, help="changes per CDC round (default 100k; quick 10k)")
    parser.add_argument("--only", default="abcdep", help="workloads: a, b, e (b and e run after a), c, d, p(arallel)")
    parser.add_argument("--profile", action="store_true", help="pyinstrument profiles of the provider's first round")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--contenders", help="comma-separated subset of contenders (default: all)")
    parser.add_argument("--report", metavar="JSON", help="only re-render the markdown and plot of a results file")
    parser.add_argument(
        "--damage",
        metavar="CONTENDER",
        help="self-test of the check: change one value in this contender's target before each check (the run fails)",
    )
    args = parser.parse_args(argv)
    if args.report:
        return rerender(Path(args.report))
    scale = Scale(**vars(QUICK if args.quick else FULL))
    if args.rows:
        scale.rows = args.rows
        scale.big_rows = args.rows * 10
        scale.slow_rows = min(scale.slow_rows, args.rows)
        scale.multi_rows = min(scale.multi_rows, args.rows)
    if args.rounds:
        scale.rounds = args.rounds
    if args.cdc_changes:
        scale.cdc_changes = args.cdc_changes

    workdir = Path(tempfile.mkdtemp(prefix="sync-bench-"))
    started = time.monotonic()
    with local_postgres() as server:
        bench = Bench(server=server, scale=scale, workdir=workdir, profile=args.profile, damage=args.damage)
        if args.contenders:
            bench.contenders = set(args.contenders.split(","))
            unknown = bench.contenders - set(ALL_CONTENDERS)
            if unknown:
                parser.error(f"unknown contenders {sorted(unknown)}; known: {', '.join(ALL_CONTENDERS)}")
        if importlib.util.find_spec("dlt") is None:
            bench.contenders = (bench.contenders or set(ALL_CONTENDERS)) - {"dlt_parquet", "dlt_default"}
            bench.notes.append("dlt is not installed (pip install -e '.[bench]'): no dlt figures")
        elif importlib.util.find_spec("adbc_driver_postgresql") is None:
            bench.contenders = (bench.contenders or set(ALL_CONTENDERS)) - {"dlt_parquet"}
            bench.notes.append("adbc-driver-postgresql is not installed: no figure of dlt at its best (parquet)")
        for note in bench.notes:
            bench.say(note)
        version = bench.sql("postgres", "SHOW server_version")[0][0]
        bench.say(f"PostgreSQL {version} on port {server.port}; scale {scale}")
        server.create_database(bench.src_db)
        server.create_database(bench.tgt_db)
        bench.say(f"seeding items_base with {scale.rows:,} rows")
        seed(bench, "items_base", scale.rows)
        bench.sql(bench.src_db, TABLE_DDL.format(name="items"))
        bench.sql(bench.src_db, "CREATE INDEX ON items (updated_at, id)")
        if set("abe") & set(args.only):
            initial_and_incremental(bench, args.only)
        if "c" in args.only:
            cdc(bench)
        if "p" in args.only:
            parallel(bench)
        if "d" in args.only:
            memory(bench)
    results = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "scale": vars(scale),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "postgresql": version,
        },
        "commit": _commit(),
        "wall_seconds": round(time.monotonic() - started, 1),
        "summary": summarise(bench.samples),
        "checks": bench.checks,
        "notes": bench.notes,
        "samples": bench.samples,
        "log": bench.log,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "quick" if args.quick else "full"
    stem = f"{kind}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    markdown = report.markdown(results)
    (out / f"{stem}.md").write_text(markdown)
    plotted = report.plot(results, out / f"{stem}.png")
    if all(all(oks) for oks in bench.checks.values()):  # a failed run never becomes the latest
        for suffix in ("json", "md", "png") if plotted else ("json", "md"):
            shutil.copyfile(out / f"{stem}.{suffix}", out / f"latest-{kind}.{suffix}")
    profiles = workdir / "profiles"
    if profiles.exists():
        shutil.copytree(profiles, out / f"{stem}-profiles", dirs_exist_ok=True)
    shutil.rmtree(workdir, ignore_errors=True)
    print(markdown)
    print(f"results: {out / stem}.json/.md{'/.png' if plotted else ''}")
    failed = [c for c, oks in bench.checks.items() if not all(oks)]
    if failed:
        print("!" * 100)
        print(f"FAILED: TARGET != SOURCE (full-row fingerprint) for: {', '.join(failed)}")
        print(f"latest-{kind}.* were not replaced; the failed run is {out / stem}.json")
        print("!" * 100)
        return 1
    return 0


def _commit() -> str:
    """The code's commit (and whether the working tree had local changes), for the record."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "../airflow_sync_provider"], cwd=HERE, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")


def rerender(path: Path) -> int:
    """Recompute the summary of a results file from its samples and write its .md and .png again."""
    results = json.loads(path.read_text())
    results["summary"] = summarise(results["samples"])
    path.write_text(json.dumps(results, indent=2, default=str))
    path.with_suffix(".md").write_text(report.markdown(results))
    report.plot(results, path.with_suffix(".png"))
    print(report.markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
