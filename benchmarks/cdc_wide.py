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
- ``wide bulk`` / ``wide 1/txn``: updates of a small column of rows with ~1 MB TOASTed bodies (the
  body is left out as unchanged), with key changes mixed in, both shapes.

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
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
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


def run(args: argparse.Namespace) -> Path:
    from airflow_sync_provider.local_postgres import local_postgres

    quick = args.quick
    mem_rows = 100 if quick else 1_000  # x 1 MB
    narrow = 5_000 if quick else 50_000
    wide_rows = 200 if quick else 2_000
    wide_changes = 2_000 if quick else 20_000
    workdir = Path(tempfile.mkdtemp(prefix="cdc-wide-"))
    with local_postgres(workdir / "pg") as server:
        bench = Bench(server, workdir, args.verbose)
        # memory: a ~1 GB batch of 1 MB values, one insert per transaction
        bench.table("mem", 1, 1_024)
        bench.sync("snapshot", "mem")
        bench.sql(_per_txn("INSERT INTO mem VALUES (i + 1, 0, 'x', repeat(md5(i::text), 32768))", mem_rows))
        bench.sync(f"memory: {mem_rows} x 1 MB inserts, 1/txn", "mem")

        for shape in ("bulk", "1/txn"):
            table = "narrow_" + ("bulk" if shape == "bulk" else "txn")
            bench.table(table, narrow, 0)
            bench.sync("snapshot", table)
            update = f"UPDATE {table} SET v = v + 1 WHERE id = i"
            bench.sql(_bulk(update, narrow, 5_000) if shape == "bulk" else _per_txn(update, narrow))
            bench.sync(f"narrow {shape}: {narrow:,} updates", table)

        for shape in ("bulk", "1/txn"):
            table = "wide_" + ("bulk" if shape == "bulk" else "txn")
            bench.table(table, wide_rows, 1_024)
            bench.sync("snapshot", table)
            # mostly small-column updates (the 1 MB body is left out as unchanged), every 10th a key change
            change = (
                f"IF i % 10 = 0 THEN UPDATE {table} SET id = id + 1000000 WHERE id = (i % {wide_rows}) + 1; "
                f"UPDATE {table} SET id = id - 1000000 WHERE id = (i % {wide_rows}) + 1000001; "
                f"ELSE UPDATE {table} SET v = v + 1 WHERE id = (i % {wide_rows}) + 1; END IF"
            )
            per = wide_changes // 10
            bench.sql(_bulk(change, wide_changes, per) if shape == "bulk" else _per_txn(change, wide_changes))
            bench.sync(f"wide {shape}: {wide_changes:,} changes, 1 MB bodies", table)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cdc-wide-{'quick' if quick else 'full'}-{stamp}"
    out.with_suffix(".json").write_text(json.dumps(bench.results, indent=2) + "\n")
    lines = [
        "| scenario | changes | txns | files | extract s | load s | changes/s | peak RSS MB | longest load silence s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bench.results:
        lines.append(
            f"| {r['scenario']} | {r['changes']:,} | {r['transactions']:,} | {r['staged_files']} | {r['extract_s']} | "
            f"{r['load_s']} | {r['changes_per_s']:,} | {r['peak_rss_mb']} | {r['longest_silence_in_load_s']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small scale (~100 MB batch)")
    parser.add_argument("--verbose", action="store_true", help="show the syncs' log lines")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    run(args)


if __name__ == "__main__":
    main()
