"""Records/s from a REST API into PostgreSQL, against the fetch limit (a plain ``requests`` loop).

    python -m benchmarks.api [--records 100000] [--page-size 1000] [--out benchmarks/results/latest-api.json]

Our API server (``sync_dev.api_server``) runs in a process of its own and serves N customers of a
credit bureau (~150 bytes of JSON each) with cursor (keyset) pagination.  Each run is a process of
its own (its peak RSS is its own):

* ``fetch``: a plain ``requests.Session`` loop that GETs every page, parses the JSON and counts the
  records, nothing else: the fetch limit (the server's and HTTP's rate), the ceiling of any API sync;
* ``sync``: the API sync proper (``run_api_sync``), first run into an empty target: the same pages
  with retries, records typed by the declared columns, staged as Parquet, the dedupe check, then
  COPY + the watermark in one commit;
* ``resync``: a full-mode run over the loaded target (every record again: merge of unchanged rows
  plus delete detection), the steady state of a sync that lists every key;
* ``noop``: an incremental run with nothing new (one request).

``fetch`` and ``sync`` run ``--repeat`` times (the fastest counts: the machine is shared).

Then the target's fingerprint (count and md5 of every row's text in key order) is compared with the
same fingerprint of the served data set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sync_dev.api_server import customer_records
from sync_dev.local_postgres import local_postgres

COLUMNS = (
    {"name": "id", "type": "bigint"},
    {"name": "name", "type": "text"},
    {"name": "segment", "type": "text", "required": False},
    {"name": "credit_limit", "type": "bigint", "required": False},
    {"name": "risk_score", "type": "integer", "required": False},
    {"name": "updated_at", "type": "timestamptz"},
)
FINGERPRINT_SQL = (
    "SELECT count(*), md5(coalesce(string_agg(concat_ws('|', id, name, segment, credit_limit, risk_score, "
    "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')), E'\\n' ORDER BY id), '')) "
    "FROM customers"
)
DEFAULT_OUT = Path(__file__).parent / "results" / "latest-api.json"


def served_fingerprint(records: list[dict[str, Any]]) -> tuple[int, str]:
    """The fingerprint of the served records, rendered the way ``FINGERPRINT_SQL`` renders rows."""
    lines = [
        "|".join(str(r[k]) for k in ("id", "name", "segment", "credit_limit", "risk_score", "updated_at"))
        for r in sorted(records, key=lambda r: r["id"])
    ]
    return len(lines), hashlib.md5("\n".join(lines).encode(), usedforsecurity=False).hexdigest()


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """One measured run (in its own process)."""
    import psycopg
    import requests

    from airflow_sync_provider.core import StagingArea
    from airflow_sync_provider.core.api import ApiClient, ApiSpec, CursorPaginator, run_api_sync
    from airflow_sync_provider.operators.events import event_columns

    base = config["base_url"]
    started = time.perf_counter()
    records = pages = 0
    result: dict[str, Any] = {}
    if config["mode"] == "fetch":
        session = requests.Session()
        params: dict[str, Any] = {"limit": config["page_size"]}
        while True:
            body = session.get(f"{base}/v1/cursor/customers", params=params, timeout=30).json()
            records += len(body["items"])
            pages += 1
            token = body["meta"]["next_cursor"]
            if not token:
                break
            params = {"limit": config["page_size"], "cursor": token}
    else:
        full = config["mode"] == "resync"
        spec = ApiSpec(
            sync_id="bench_customers_full" if full else "bench_customers",
            endpoint="/v1/cursor/customers",
            target_table="customers",
            primary_key=("id",),
            records_path="items",
            params={"limit": config["page_size"]},
            paginator=CursorPaginator("meta.next_cursor", "cursor"),
            columns=event_columns(COLUMNS),
            mode="full" if full else "incremental",
            cursor_field="updated_at",
            cursor_param=None if full else "updated_since",
        )
        client = ApiClient(base)
        with psycopg.connect(config["dsn"], autocommit=True) as conn:
            manifest, load = run_api_sync(client, conn, spec, staging=StagingArea(config["staging"]))
        records, pages = manifest.rows, client.requests
        result = {"inserted": load.inserted, "updated": load.updated, "deleted": load.deleted}
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"records": records, "pages": pages, "seconds": round(seconds, 3), "peak_rss_mb": round(rss, 1), **result}


def run_worker(config: dict[str, Any]) -> dict[str, Any]:
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.api", "--worker", json.dumps(config)], capture_output=True, text=True
    )
    if process.returncode:
        raise RuntimeError(process.stderr[-3000:])
    return dict(json.loads(process.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--page-size", type=int, default=1_000)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each kind; the fastest counts (a shared machine)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sync_dev.api_server",
            "--records",
            str(args.records),
            "--page-size",
            str(args.page_size),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        base = f"http://127.0.0.1:{port}"
        print(f"{args.records:,} customers served by sync_dev.api_server on {base}, pages of {args.page_size:,}")
        runs: dict[str, Any] = {}
        with local_postgres() as pg, tempfile.TemporaryDirectory() as staging:
            pg.create_database("api_bench")
            for mode in ("fetch", "sync", "resync", "noop"):
                config = {"mode": "sync" if mode == "noop" else mode, "base_url": base, "page_size": args.page_size}
                config.update(dsn=pg.dsn("api_bench"), staging=staging)
                tries = []
                for attempt in range(args.repeat if mode in ("fetch", "sync") else 1):
                    if mode == "sync" and attempt:  # a first run again: into an empty target
                        pg.create_database("api_bench")
                    tries.append(run_worker(config))
                best = min(tries, key=lambda run: run["seconds"])
                best["all_seconds"] = [run["seconds"] for run in tries]
                rate = best["records"] / best["seconds"] if best["seconds"] else 0.0
                best["records_per_s"] = round(rate)
                runs[mode] = best
                print(
                    f"  {mode:7} {best['records']:>9,} records {best['pages']:>5} requests "
                    f"{best['seconds']:>7.2f} s {rate:>10,.0f} records/s  "
                    f"peak RSS {best['peak_rss_mb']:.0f} MB  (runs: {', '.join(map(str, best['all_seconds']))} s)"
                )
            with pg.connect("api_bench") as conn:
                row = conn.execute(FINGERPRINT_SQL).fetchone()
            assert row is not None
            target = (int(row[0]), str(row[1]))
    finally:
        server.terminate()
        server.wait(timeout=10)
    expected = served_fingerprint(customer_records(args.records))
    fetch, sync = runs["fetch"], runs["sync"]
    ratio = sync["records_per_s"] / fetch["records_per_s"] if fetch["records_per_s"] else 0.0
    report = {
        "benchmark": "api",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "records": args.records,
        "page_size": args.page_size,
        "repeat": args.repeat,
        "runs": runs,
        "sync_vs_fetch_limit": round(ratio, 3),
        "fingerprint": {"target": list(target), "served": list(expected), "equal": target == expected},
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_1m": os.getloadavg()[0]},
    }
    print(
        f"  sync = {ratio:.2f} x the fetch limit; fingerprint {'equal' if target == expected else 'DIFFERENT'} "
        f"({target[0]:,} rows, md5 {target[1][:12]}...)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"  results: {args.out}")
    if target != expected:
        raise SystemExit("the target differs from the served data")


if __name__ == "__main__":
    main()
