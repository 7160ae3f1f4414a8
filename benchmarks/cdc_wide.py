"""CDC with wide rows and real OLTP shapes: peak memory by bytes, and changes/s per transaction shape.

``python -m benchmarks.cdc_wide`` (``--quick`` for a small run).  Starts its own embedded PostgreSQL
(like ``benchmarks.run``), then for each scenario writes the changes at the source, and runs one
``run_cdc_sync`` (extract + load + confirm) **in its own process**, so its peak RSS
(``resource.getrusage``) is the sync's own.  Every scenario checks that the target equals the source
afterwards.  Results: ``benchmarks/results/cdc-wide-<full|quick>-<stamp>.json`` and ``.md``.

Scenarios (issue 13):

- ``memory``: one CDC batch of ~1 GB of 1 MB text values (inserts, one per transaction); the target
  is under 500 MB of RSS for the sync process.
- ``narrow bulk`` / ``narrow 1/txn``: the same updates of a 7-column table in a few big
  transactions, and one per transaction; target: 1/txn within 70% of bulk's changes/s.
- ``wide bulk`` / ``wide 1/txn``: issue 13's mix over rows with ~1 MB TOASTed bodies (updates of a
  small column, the body left out as unchanged; key changes; multi-row transactions; deletes and
  re-inserts with new 1 MB bodies), both shapes.

The throughput shapes run side by side for several rounds in rotating order; medians are reported.

The longest stretch without a log line during each sync is reported (progress every <= 10 s).
"""

# ruff: noqa: S608 - the benchmark's SQL is built from constant identifiers and its own values only
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

RESULTS = Path(__file__).parent / "results"


# --------------------------------------------------------------------------- child: one sync


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Run one CDC sync (extract, load, confirm) and report its timings, peak RSS and log silence."""
    import sqlalchemy as sa

    from airflow_sync_provider.core.cdc import (
        CdcSpec,
        changes_to_staging,
        committed_cdc_state,
        confirm_applied,
        load_cdc_manifest,
    )
    from airflow_sync_provider.core.cdc.pgoutput import lsn_to_int
    from airflow_sync_provider.core.staging import StagingArea

    stamps: list[float] = []

    class Stamp(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            stamps.append(time.monotonic())
            if job.get("verbose"):
                print(self.format(record), file=sys.stderr)

    logger = logging.getLogger("cdc_wide")
    logger.setLevel(logging.INFO)
    logger.addHandler(Stamp())
    spec = CdcSpec(sync_id=job["sync_id"], tables=(job["table"],), **job.get("spec", {}))
    engine = sa.create_engine(job["src_url"], poolclass=sa.NullPool)
    staging = StagingArea(job["staging"])
    with psycopg.connect(job["tgt_dsn"], autocommit=True) as target:
        start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.monotonic()
        stamps.append(started)
        profiler = None
        if job.get("profile"):
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        manifest = changes_to_staging(
            engine, spec, state=committed_cdc_state(target, spec), staging=staging, run_id="bench", logger=logger
        )
        if profiler is not None:
            import pstats

            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
        extracted = time.monotonic()
        extract_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = load_cdc_manifest(target, manifest, run_id="bench", logger=logger)
        loaded = time.monotonic()
        stamps.append(loaded)
        confirm_applied(engine, spec, lsn_to_int(result.end_lsn))
    engine.dispose()
    load_stamps = [s for s in stamps if s >= extracted] or [loaded]
    gaps = [b - a for a, b in zip([extracted, *load_stamps], load_stamps, strict=False)]
    return {
        "kind": manifest.kind,
        "status": result.status,
        "changes": manifest.changes,
        "transactions": manifest.transactions,
        "staged_files": sum(len(t.files) for t in manifest.tables),
        "extract_s": round(extracted - started, 2),
        "load_s": round(loaded - extracted, 2),
        "total_s": round(loaded - started, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_extract_mb": round(extract_rss, 1),
        "start_rss_mb": round(start_rss, 1),
        "longest_silence_in_load_s": round(max(gaps, default=0.0), 1),
    }


# --------------------------------------------------------------------------- parent


class Bench:
    def __init__(self, server: Any, workdir: Path, verbose: bool) -> None:
        self.server = server
        self.workdir = workdir
        self.verbose = verbose
        self.src_db = server.create_database("cdcw_src")
        self.tgt_db = server.create_database("cdcw_tgt")
        self.results: list[dict[str, Any]] = []

    def sql(self, query: str, params: Any = None, db: str | None = None) -> None:
        with psycopg.connect(self.server.dsn(db or self.src_db), autocommit=True) as conn:
            conn.execute(query, params)

    def sync(self, name: str, table: str, profile: bool = False, **spec: Any) -> dict[str, Any]:
        job = {
            "sync_id": table,
            "table": table,
            "src_url": self.server.url(self.src_db),
            "tgt_dsn": self.server.dsn(self.tgt_db),
            "staging": str(self.workdir / "staging"),
            "spec": spec,
            "verbose": self.verbose or profile,
            "profile": profile,
        }
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.cdc_wide", "--child", json.dumps(job)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name}: child failed:\n{done.stderr[-4000:]}")
        if self.verbose or profile:
            print(done.stderr, file=sys.stderr)
        result = {"scenario": name, **json.loads(done.stdout.strip().splitlines()[-1])}
        if result["kind"] == "changes":
            result["changes_per_s"] = round(result["changes"] / result["total_s"]) if result["total_s"] else None
            self._check(table)
            self.results.append(result)
        print(json.dumps(result), flush=True)
        return result

    def _check(self, table: str) -> None:
        query = (
            "SELECT count(*), md5(coalesce(string_agg(md5(t::text), '' ORDER BY id), '')) "
            f"FROM (SELECT id, v, note, md5(body) FROM {table}) t"
        )
        with (
            psycopg.connect(self.server.dsn(self.src_db)) as src,
            psycopg.connect(self.server.dsn(self.tgt_db)) as tgt,
        ):
            a, b = src.execute(query).fetchone(), tgt.execute(query).fetchone()
        if a != b:
            raise AssertionError(f"{table}: target {b} != source {a}")

    def table(self, table: str, rows: int, body_kb: int) -> None:
        """``rows`` rows; bodies of ``body_kb`` kB (compressible text: small WAL, full size decoded)."""
        self.sql(f"DROP TABLE IF EXISTS {table}")
        self.sql(f"CREATE TABLE {table} (id bigint PRIMARY KEY, v int NOT NULL, note text, body text)")
        self.sql(
            f"INSERT INTO {table} SELECT g, 0, 'n' || g, repeat(md5(g::text), %s) FROM generate_series(1, %s) g",
            (body_kb * 32, rows),
        )


def _per_txn(statement: str, count: int) -> str:
    """A DO block that runs ``statement`` (with ``i`` = 1..count) and commits after each: one change, one txn."""
    return f"DO $$ BEGIN FOR i IN 1..{count} LOOP {statement}; COMMIT; END LOOP; END $$"


def _bulk(statement: str, count: int, per_txn: int) -> str:
    return (
        f"DO $$ BEGIN FOR i IN 1..{count} LOOP {statement}; IF i % {per_txn} = 0 THEN COMMIT; END IF; END LOOP; END $$"
    )


def _wide_change(table: str, rows: int) -> str:
    """One iteration ``i`` of the wide workload (issue 13's mix), over rows with 1 MB TOASTed bodies:
    mostly an update of a small column (the body is left out as unchanged), every 10th a key change
    away and back, every 10th (offset 2) three rows in one transaction, every 50th a delete and a
    re-insert of the key with a new 1 MB body."""
    key = f"(i % {rows}) + 1"
    return (
        f"IF i % 10 = 0 THEN UPDATE {table} SET id = id + 1000000 WHERE id = {key}; "
        f"UPDATE {table} SET id = id - 1000000, v = v + 1 WHERE id = {key} + 1000000; "
        f"ELSIF i % 50 = 1 THEN DELETE FROM {table} WHERE id = {key}; "
        f"INSERT INTO {table} VALUES ({key}, i, 're', repeat(md5(i::text), 32768)); "
        f"ELSIF i % 10 = 2 THEN UPDATE {table} SET v = v + 1 WHERE id IN ({key}, ({key} % {rows}) + 1, "
        f"(({key} + 1) % {rows}) + 1); "
        f"ELSE UPDATE {table} SET v = v + 1 WHERE id = {key}; END IF"
    )


def run(args: argparse.Namespace) -> Path:
    import statistics

    from sync_dev.local_postgres import local_postgres

    quick = args.quick
    rounds = args.rounds or (2 if quick else 3)
    mem_rows = 100 if quick else 1_000  # x 1 MB
    narrow = 5_000 if quick else 50_000
    wide_rows = 100 if quick else 500
    wide_changes = 2_000 if quick else 40_000
    workdir = Path(tempfile.mkdtemp(prefix="cdc-wide-"))
    with local_postgres(workdir / "pg") as server:
        bench = Bench(server, workdir, args.verbose)
        # memory: a ~1 GB batch of 1 MB values, one insert per transaction
        bench.table("mem", 1, 1_024)
        bench.sync("snapshot", "mem")
        bench.sql(_per_txn("INSERT INTO mem VALUES (i + 1, 0, 'x', repeat(md5(i::text), 32768))", mem_rows))
        bench.sync(f"memory: {mem_rows} x 1 MB inserts, 1/txn", "mem")

        # throughput: the same changes in a few big transactions and one per transaction, side by side,
        # rounds in rotating order
        shapes: list[tuple[str, str, str]] = []  # (scenario, table, statement to run)
        for kind in ("narrow", "wide"):
            for shape in ("bulk", "1/txn"):
                table = f"{kind}_{'bulk' if shape == 'bulk' else 'txn'}"
                if kind == "narrow":
                    bench.table(table, narrow, 0)
                    change, count, name = f"UPDATE {table} SET v = v + 1 WHERE id = i", narrow, f"{narrow:,} updates"
                else:
                    bench.table(table, wide_rows, 1_024)
                    change, count = _wide_change(table, wide_rows), wide_changes
                    name = f"{wide_changes:,} iterations, 1 MB bodies"
                bench.sync("snapshot", table)
                statement = _bulk(change, count, max(count // 10, 1)) if shape == "bulk" else _per_txn(change, count)
                shapes.append((f"{kind} {shape}: {name}", table, statement))
        for number in range(rounds):
            for scenario, table, statement in shapes[number % len(shapes) :] + shapes[: number % len(shapes)]:
                bench.sql(statement)
                bench.sync(scenario, table)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cdc-wide-{'quick' if quick else 'full'}-{stamp}"
    summary: dict[str, dict[str, Any]] = {}
    for r in bench.results:
        summary.setdefault(r["scenario"], {"samples": []})["samples"].append(r)
    for entry in summary.values():
        samples = entry["samples"]
        entry.update(
            {
                key: round(statistics.median(s[key] for s in samples), 2)
                for key in ("extract_s", "load_s", "changes_per_s", "peak_rss_mb", "longest_silence_in_load_s")
            }
        )
        entry.update({key: samples[0][key] for key in ("changes", "transactions", "staged_files")})
    ratios = {}
    for kind in ("narrow", "wide"):
        bulk = next(v for k, v in summary.items() if k.startswith(f"{kind} bulk"))
        per_txn = next(v for k, v in summary.items() if k.startswith(f"{kind} 1/txn"))
        ratios[kind] = round(per_txn["changes_per_s"] / bulk["changes_per_s"], 2)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "ratios": ratios}, indent=2) + "\n")
    lines = [
        f"Medians of {rounds} rounds (the memory run once); 1/txn vs bulk changes/s: "
        + ", ".join(f"{k} {v:.0%}" for k, v in ratios.items()),
        "",
        "| scenario | changes | txns | files | extract s | load s | changes/s | peak RSS MB | longest load silence s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, r in summary.items():
        lines.append(
            f"| {scenario} | {r['changes']:,} | {r['transactions']:,} | {r['staged_files']} | {r['extract_s']} | "
            f"{r['load_s']} | {r['changes_per_s']:,.0f} | {r['peak_rss_mb']} | {r['longest_silence_in_load_s']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small scale (~100 MB batch)")
    parser.add_argument("--verbose", action="store_true", help="show the syncs' log lines")
    parser.add_argument("--rounds", type=int, help="rounds of the throughput shapes (default 3; quick 2)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    run(args)


if __name__ == "__main__":
    main()
