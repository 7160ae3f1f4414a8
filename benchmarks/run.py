# ruff: noqa: S608 - the benchmark's SQL is built from constant identifiers and its own values only
"""Benchmark harness: this provider side by side with the raw limit and its peers, in one run.

``python -m benchmarks.run [--quick] [--rounds N] [--rows N]`` starts an embedded PostgreSQL 18,
generates the data, runs every contender on the same data (alternating order, several rounds,
medians), and writes ``benchmarks/results/<stamp>.json``, ``.md`` and ``.png`` (and ``latest.*``).
Every contender runs in its own process (``benchmarks.worker``) and times only its work.
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

from benchmarks import report
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


ALL_CONTENDERS = (
    "raw_limit",
    "raw_staged",
    "provider_incremental",
    "provider_full",
    "dlt_merge",
    "airflow_upsert_rows",
    "airflow_insert_rows_executemany",
    "airflow_generic_transfer",
    "pandas_to_sql",
)


#: Contenders that sync the whole table (checked target == source after (b)), and their target.
FULL_TABLE_CONTENDERS = {
    "raw_limit": "raw_items",
    "raw_staged": "raw_staged_items",
    "provider_incremental": "prov_incr_items",
    "provider_full": "prov_full_items",
    "dlt_merge": "dlt_bench.items",
}


@dataclass
class Scale:
    rows: int
    big_rows: int
    cdc_changes: int
    rounds: int
    slow_rows: int  # subset for the row-by-row Airflow/pandas contenders (their rate is scaled)
    dlt_rows: int


FULL = Scale(rows=1_000_000, big_rows=10_000_000, cdc_changes=100_000, rounds=3, slow_rows=20_000, dlt_rows=1_000_000)
QUICK = Scale(rows=50_000, big_rows=500_000, cdc_changes=10_000, rounds=2, slow_rows=2_000, dlt_rows=50_000)


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

    def sql(self, db: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
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
        env = {**os.environ, "AIRFLOW_HOME": str(self.workdir / "airflow"), "PYTHONWARNINGS": "ignore"}
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(job)],
            capture_output=True,
            text=True,
            env=env,
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

    def start(self, contender: str, job: dict[str, Any]) -> subprocess.Popen[str]:
        env = {**os.environ, "AIRFLOW_HOME": str(self.workdir / "airflow"), "PYTHONWARNINGS": "ignore"}
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=HERE.parent,
        )


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


def change_source(bench: Bench) -> int:
    """Workload (b): update 10% of the rows and insert 10% new ones (cursor = now())."""
    n = bench.scale.rows
    update = "UPDATE items SET price = price + 1, qty = qty + 1, updated_at = clock_timestamp() WHERE id % 10 = 3"
    bench.sql(bench.src_db, update)
    bench.sql(
        bench.src_db,
        f"INSERT INTO items SELECT g, 'SKU-' || g, 1, 2, 3.00, clock_timestamp(), md5(g::text) "
        f"FROM generate_series({n + 1}::bigint, {n + n // 10}) g",
    )
    bench.sql(bench.src_db, "VACUUM ANALYZE items")
    return n // 10 + n // 10


def drop_targets(bench: Bench, names: list[str]) -> None:
    for name in names:
        bench.sql(bench.tgt_db, f"DROP TABLE IF EXISTS {name}")
    bench.sql(bench.tgt_db, "DROP SCHEMA IF EXISTS dlt_bench CASCADE")
    bench.sql(bench.tgt_db, "DROP SCHEMA IF EXISTS dlt_bench_staging CASCADE")
    if bench.sql(bench.tgt_db, "SELECT to_regclass('public._sync_state')")[0][0]:
        bench.sql(bench.tgt_db, "DELETE FROM _sync_state WHERE sync_id LIKE 'bench%%'")


def clone_target(bench: Bench, source: str, name: str) -> None:
    """Give a slow contender the initial target state for (b) without running it on all rows."""
    bench.sql(bench.tgt_db, f"DROP TABLE IF EXISTS {name}")
    columns = "id, sku, qty, warehouse, price, updated_at, note"
    bench.sql(bench.tgt_db, f"CREATE TABLE {name} AS SELECT {columns} FROM {source}")
    bench.sql(bench.tgt_db, f"ALTER TABLE {name} ADD PRIMARY KEY (id)")


# --------------------------------------------------------------------------- workloads


def initial_and_incremental(bench: Bench) -> None:
    """(a) initial sync, (b) incremental after 10% updates + 10% inserts, (e) no-change run."""
    scale = bench.scale
    slow = ["airflow_upsert_rows", "airflow_insert_rows_executemany", "airflow_generic_transfer", "pandas_to_sql"]
    for round_ in range(scale.rounds):
        bench.say(f"round {round_ + 1}/{scale.rounds}: (a) initial sync of {scale.rows:,} rows")
        reset_source(bench)
        targets = ["raw_items", "raw_staged_items", "prov_incr_items", "prov_full_items", *(f"{c}_items" for c in slow)]
        drop_targets(bench, targets)
        for name in ["raw_items", "raw_staged_items", *(f"{c}_items" for c in slow)]:
            bench.sql(bench.tgt_db, TABLE_DDL.format(name=name))
        shutil.rmtree(bench.workdir / "dlt", ignore_errors=True)
        order = [
            c
            for c in ["raw_limit", "raw_staged", "provider_incremental", "provider_full", "dlt_merge", *slow]
            if bench.wanted(c)
        ]
        order = order[round_ % len(order) :] + order[: round_ % len(order)]  # alternate who goes first
        for contender in order:
            bench.run(_job(bench, contender, "a", round_), f"a/{contender}")
        changed = change_source(bench)
        bench.say(f"round {round_ + 1}/{scale.rounds}: (b) incremental after {changed:,} changed/new rows")
        for contender in slow:
            if contender != "pandas_to_sql" and bench.wanted(contender):
                clone_target(bench, "raw_items", f"{contender}_items")
        for contender in order:
            if contender == "pandas_to_sql":
                continue  # append-only: it cannot apply updates
            job = _job(bench, contender, "b", round_)
            if contender in ("raw_limit", "raw_staged", "provider_incremental", "provider_full", "dlt_merge"):
                job["rows"] = changed
            bench.run(job, f"b/{contender}")
        verify(bench, [c for c in order if c in FULL_TABLE_CONTENDERS])
        bench.say(f"round {round_ + 1}/{scale.rounds}: (e) no-change run")
        bench.run(_job(bench, "provider_incremental", "e", round_), "e/provider_incremental")


def verify(bench: Bench, contenders: list[str]) -> None:
    """After (b): every full-table contender's target must equal the source (count, sums, latest cursor)."""
    fingerprint = "SELECT count(*), sum(price), sum(qty), max(updated_at), sum(length(note)) FROM {}"
    expected = bench.sql(bench.src_db, fingerprint.format("items"))[0]
    for contender in contenders:
        got = bench.sql(bench.tgt_db, fingerprint.format(FULL_TABLE_CONTENDERS[contender]))[0]
        ok = tuple(got) == tuple(expected)
        bench.checks.setdefault(contender, []).append(ok)
        bench.say(f"  check {contender:<30} target == source: {'YES' if ok else f'NO ({got} != {expected})'}")


def _job(bench: Bench, contender: str, workload: str, round_: int) -> dict[str, Any]:
    scale = bench.scale
    job = bench.job(contender, workload, source="items", target=f"{contender}_items", rows=scale.rows)
    if contender == "raw_limit":
        job["target"] = "raw_items"
    elif contender == "raw_staged":
        job["target"] = "raw_staged_items"
    elif contender.startswith("provider_"):
        mode = "incremental" if contender == "provider_incremental" else "full"
        job.update(
            mode=mode,
            sync_id=f"bench_{mode}",
            target="prov_incr_items" if mode == "incremental" else "prov_full_items",
        )
        if bench.profile and round_ == 0:
            job["profile"] = str(bench.workdir / "profiles" / f"{workload}_{contender}.txt")
    elif contender == "dlt_merge":
        job.update(pipelines_dir=str(bench.workdir / "dlt"), dataset="dlt_bench", rows=scale.dlt_rows)
    else:
        job["rows"] = scale.slow_rows
    return job


def cdc(bench: Bench) -> None:
    """(c) CDC apply of N changes vs the rate the slot can be read (pgoutput, same publication)."""
    scale = bench.scale
    n = scale.cdc_changes
    seed(bench, "cdc_items", n * scale.rounds)  # each round changes its own slice of the rows
    bench.sql(bench.src_db, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
    bench.sql(bench.src_db, "DROP PUBLICATION IF EXISTS sync_bench_cdc")
    bench.sql(bench.tgt_db, "DROP TABLE IF EXISTS cdc_items")
    if bench.sql(bench.tgt_db, "SELECT to_regclass('public._sync_state')")[0][0]:
        bench.sql(bench.tgt_db, "DELETE FROM _sync_state WHERE sync_id = 'bench_cdc'")
    snapshot = bench.job("provider_cdc", "c", source="cdc_items", sync_id="bench_cdc", rows=n)
    bench.say(f"(c) CDC: initial snapshot of {n * scale.rounds:,} rows")
    bench.run(snapshot)
    next_id = n * scale.rounds + 1
    for round_ in range(scale.rounds):
        # n changes in 10 transactions: 50% updates, 30% inserts, 20% deletes
        per = n // 10
        for t in range(10):
            low = round_ * n + t * per + 1
            with bench.server.connect(bench.src_db) as conn, conn.transaction():
                conn.execute(
                    "UPDATE cdc_items SET qty = qty + 1, updated_at = clock_timestamp() WHERE id BETWEEN %s AND %s",
                    (low, low + per // 2 - 1),
                )
                conn.execute(
                    f"INSERT INTO cdc_items SELECT {ROW_EXPR} FROM generate_series(%s::bigint, %s) g",
                    (next_id, next_id + per * 3 // 10 - 1),
                )
                delete = "DELETE FROM cdc_items WHERE id BETWEEN %s AND %s"
                conn.execute(delete, (low + per // 2, low + per // 2 + per // 5 - 1))
                next_id += per * 3 // 10
        bench.say(f"round {round_ + 1}/{scale.rounds}: (c) {n:,} changes")
        slot = bench.job("slot_read", "c", slot="sync_bench_cdc", publication="sync_bench_cdc", rows=n)
        bench.run(slot, "c/slot_read")
        bench.run({**slot, "contender": "slot_read_python"}, "c/slot_read_python")
        job = bench.job("provider_cdc", "c", source="cdc_items", sync_id="bench_cdc", rows=n)
        if bench.profile and round_ == 0:
            job["profile"] = str(bench.workdir / "profiles" / "c_provider_cdc.txt")
        bench.run(job, "c/provider_cdc")
    bench.sql(bench.src_db, "SELECT pg_drop_replication_slot('sync_bench_cdc')")


def memory(bench: Bench) -> None:
    """(d) peak RSS of an initial sync of big_rows vs rows (one process each)."""
    scale = bench.scale
    bench.say(f"(d) seeding {scale.big_rows:,} rows for the peak-memory run")
    seed(bench, "items_big", scale.big_rows)
    for rows, table in ((scale.rows, "items_base"), (scale.big_rows, "items_big")):
        bench.sql(bench.tgt_db, "DROP TABLE IF EXISTS mem_items")
        drop_targets(bench, [])
        job = bench.job(
            "provider_incremental",
            "d",
            source=table,
            target="mem_items",
            mode="incremental",
            sync_id="bench_mem",
            rows=rows,
        )
        bench.run(job, f"d/provider_incremental_{'big' if table == 'items_big' else 'base'}")
    bench.sql(bench.tgt_db, "DROP TABLE IF EXISTS mem_items")
    bench.sql(bench.src_db, "DROP TABLE IF EXISTS items_big")


def parallel(bench: Bench) -> None:
    """Partitioned initial sync: two processes on two key ranges (as two mapped tasks) vs one.

    Each partition is a full sync (keyset by primary key, no delete detection) of a view holding one
    key range, so a page query is a range scan of the key index; one process syncs the whole table.
    """
    scale = bench.scale
    half = scale.rows // 2
    bench.sql(bench.src_db, f"CREATE OR REPLACE VIEW items_p0 AS SELECT * FROM items_base WHERE id <= {half}")
    bench.sql(bench.src_db, f"CREATE OR REPLACE VIEW items_p1 AS SELECT * FROM items_base WHERE id > {half}")
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
                    rows=scale.rows if part == "one" else half,
                )
                procs.append(bench.start("provider_incremental", job))
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
            summary[workload][contender] = {
                "median_seconds": round(seconds, 4),
                "rows": rows,
                "rows_per_s": round(rows / seconds, 1) if seconds else None,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "runs": len(runs),
            }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small scale (a minute or two)")
    parser.add_argument("--rows", type=int, help="rows of the main table (default 1M; quick 50k)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--cdc-changes", type=int, help="changes per CDC round (default 100k; quick 10k)")
    parser.add_argument("--only", default="abcdep", help="workloads to run: a/b/e together, c, d, p(arallel)")
    parser.add_argument("--profile", action="store_true", help="pyinstrument profiles of the provider's first round")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--contenders", help="comma-separated subset of contenders (default: all)")
    parser.add_argument("--report", metavar="JSON", help="only re-render the markdown and plot of a results file")
    args = parser.parse_args(argv)
    if args.report:
        return rerender(Path(args.report))
    scale = Scale(**vars(QUICK if args.quick else FULL))
    if args.rows:
        scale.rows = args.rows
        scale.big_rows = args.rows * 10
        scale.dlt_rows = min(scale.dlt_rows, args.rows)
    if args.rounds:
        scale.rounds = args.rounds
    if args.cdc_changes:
        scale.cdc_changes = args.cdc_changes

    workdir = Path(tempfile.mkdtemp(prefix="sync-bench-"))
    started = time.monotonic()
    with local_postgres() as server:
        bench = Bench(server=server, scale=scale, workdir=workdir, profile=args.profile)
        if args.contenders:
            bench.contenders = set(args.contenders.split(","))
        if importlib.util.find_spec("dlt") is None:
            bench.contenders = (bench.contenders or set(ALL_CONTENDERS)) - {"dlt_merge"}
            bench.notes.append("dlt is not installed (pip install -e '.[bench]'): no dlt figures")
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
            initial_and_incremental(bench)
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
    stem = f"{'quick' if args.quick else 'full'}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    markdown = report.markdown(results)
    (out / f"{stem}.md").write_text(markdown)
    plotted = report.plot(results, out / f"{stem}.png")
    for suffix in ("json", "md", "png") if plotted else ("json", "md"):
        shutil.copyfile(out / f"{stem}.{suffix}", out / f"latest-{'quick' if args.quick else 'full'}.{suffix}")
    profiles = workdir / "profiles"
    if profiles.exists():
        shutil.copytree(profiles, out / f"{stem}-profiles", dirs_exist_ok=True)
    shutil.rmtree(workdir, ignore_errors=True)
    print(markdown)
    print(f"results: {out / stem}.json/.md{'/.png' if plotted else ''}")
    failed = [c for c, oks in bench.checks.items() if not all(oks)]
    if failed:
        print(f"TARGET != SOURCE after the incremental run for: {', '.join(failed)}")
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
