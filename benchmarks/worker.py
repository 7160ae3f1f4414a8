"""One contender, one workload, in its own process: ``python -m benchmarks.worker '<json job>'``.

Each run is a fresh process so its peak RSS is its own, and the harness's imports (matplotlib, dlt,
Airflow) never inflate the numbers.  The timed span is only the work (not interpreter start-up);
the last stdout line is a JSON result: seconds, rows, peak RSS.
"""

# ruff: noqa: S608 - the benchmark's SQL is built from constant identifiers and its own values only
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

#: Columns of the benchmark table (the shape of ../shared/PERFORMANCE.md: 7 columns, ~100 bytes/row).
COLUMNS = ["id", "sku", "qty", "warehouse", "price", "updated_at", "note"]
VALUES = [c for c in COLUMNS if c != "id"]

Job = dict[str, Any]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _select(table: str, where: str = "") -> str:
    """The source query of the raw and Airflow contenders (all columns; identifiers are constants)."""
    columns = ", ".join(COLUMNS)
    return f"SELECT {columns} FROM {table}{where}"


def _watermark(job: Job, target: str) -> str | None:
    with psycopg.connect(job["tgt_dsn"]) as conn:
        row = conn.execute(sql.SQL("SELECT max(updated_at)::text FROM {}").format(sql.Identifier(target))).fetchone()
    return row[0] if row else None


def _raw_copy_out(job: Job, target: str) -> tuple[list[str], bytes]:
    """psql argv and its stdin script: COPY the source (binary) to stdout.

    Incremental (workload b) reads the rows past the target's newest cursor.  The value goes in as
    a psql variable quoted by psql (``:'mark'``); psql interpolates variables in scripts, not in
    ``-c`` commands, hence the script on stdin.
    """
    argv = [job["psql"], "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    where = ""
    mark = _watermark(job, target) if job["workload"] == "b" else None
    if mark:
        argv += ["-v", f"mark={mark}"]
        where = " WHERE updated_at > :'mark'::timestamptz"
    script = f"COPY ({_select(job['source'], where)}) TO STDOUT (FORMAT binary);\n"
    return [*argv, job["src_dsn"]], script.encode()


def _raw_load_argv(job: Job, target: str) -> list[str]:
    """psql, one transaction: COPY stdin (binary) into a temp stage, then one MERGE skipping unchanged rows."""
    match = " AND ".join(f"t.{c} IS NOT DISTINCT FROM s.{c}" for c in VALUES)
    merge = (
        f"MERGE INTO {target} t USING _raw_stage s ON t.id = s.id "
        f"WHEN MATCHED AND NOT ({match}) THEN UPDATE SET {', '.join(f'{c} = s.{c}' for c in VALUES)} "
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(COLUMNS)}) VALUES ({', '.join('s.' + c for c in COLUMNS)})"
    )
    return [
        job["psql"],
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-1",
        job["tgt_dsn"],
        "-c",
        f"CREATE TEMP TABLE _raw_stage (LIKE {target}) ON COMMIT DROP",
        "-c",
        "COPY _raw_stage FROM STDIN (FORMAT binary)",
        "-c",
        merge,
    ]


# --------------------------------------------------------------------------- contenders


def raw_limit(job: Job) -> dict[str, Any]:
    """COPY TO STDOUT (binary) piped into COPY FROM STDIN + one MERGE: two psql processes, no Python per row."""
    target = job["target"]
    copy_out, script = _raw_copy_out(job, target)
    started = time.perf_counter()
    reader = subprocess.Popen(copy_out, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert reader.stdin is not None
    reader.stdin.write(script)
    reader.stdin.close()
    writer = subprocess.run(
        _raw_load_argv(job, target),
        stdin=reader.stdout,
        capture_output=True,
        text=True,
        check=False,
    )
    assert reader.stdout is not None
    reader.stdout.close()
    if reader.wait() != 0 or writer.returncode != 0:
        raise RuntimeError(f"raw pipe failed: {writer.stderr}")
    return {"rows": job["rows"], "seconds": time.perf_counter() - started}


def raw_staged(job: Job) -> dict[str, Any]:
    """The raw limit without the pipe: COPY TO a file, then COPY FROM it + MERGE (two steps in a row,
    like any staged design; still no Python per row).  Shows what staging itself costs."""
    target = job["target"]
    copy_out, script = _raw_copy_out(job, target)
    path = os.path.join(job["staging"], f"raw-staged-{os.getpid()}.bin")
    os.makedirs(job["staging"], exist_ok=True)
    started = time.perf_counter()
    with open(path, "wb") as out:
        subprocess.run(copy_out, input=script, stdout=out, check=True)
    with open(path, "rb") as data:
        subprocess.run(
            _raw_load_argv(job, target),
            stdin=data,
            capture_output=True,
            check=True,
        )
    seconds = time.perf_counter() - started
    os.remove(path)
    return {"rows": job["rows"], "seconds": seconds}


def provider(job: Job) -> dict[str, Any]:
    """This provider: ``run_sync`` (extract -> Parquet -> COPY + merge + state, one transaction)."""
    import sqlalchemy as sa

    from airflow_sync_provider.core.spec import SyncSpec
    from airflow_sync_provider.core.staging import StagingArea
    from airflow_sync_provider.core.sync import run_sync

    engine = sa.create_engine(job["src_url"], poolclass=sa.NullPool)
    options: dict[str, Any] = {"primary_key": ("id",)} if job.get("declare_key") else {}
    if job.get("no_deletes"):  # a key-range partition must not delete the other partitions' rows
        options["delete_mode"] = "none"
    spec = SyncSpec(
        sync_id=job["sync_id"],
        source_table=job["source"],
        target_table=job["target"],
        mode=job["mode"],
        cursor_column="updated_at" if job["mode"] == "incremental" else None,
        **options,
    )
    staging = StagingArea(job["staging"])
    profiler = _profiler(job)
    started, clock = time.time(), time.perf_counter()
    with psycopg.connect(job["tgt_dsn"]) as target:
        manifest, result = run_sync(engine, target, spec, staging=staging, run_id=job.get("run_id", "bench"))
    seconds, ended = time.perf_counter() - clock, time.time()
    _save_profile(profiler, job)
    engine.dispose()
    return {
        "rows": manifest.rows,
        "inserted": result.inserted,
        "updated": result.updated,
        "deleted": result.deleted,
        "extract_seconds": manifest.extract_seconds,
        "load_seconds": result.seconds,
        "started": started,
        "ended": ended,
        "seconds": seconds,
    }


def provider_cdc(job: Job) -> dict[str, Any]:
    """This provider's CDC: read the slot (pgoutput), stage, apply with the LSN in one transaction."""
    import sqlalchemy as sa

    from airflow_sync_provider.core.cdc import CdcSpec, run_cdc_sync
    from airflow_sync_provider.core.staging import StagingArea

    engine = sa.create_engine(job["src_url"], poolclass=sa.NullPool)
    spec = CdcSpec(sync_id=job["sync_id"], tables=(job["source"],))
    profiler = _profiler(job)
    clock = time.perf_counter()
    with psycopg.connect(job["tgt_dsn"]) as target:
        manifest, result = run_cdc_sync(engine, target, spec, staging=StagingArea(job["staging"]), run_id="bench")
    seconds = time.perf_counter() - clock
    _save_profile(profiler, job)
    engine.dispose()
    changes = getattr(manifest, "changes", 0) or result.inserted + result.updated + result.deleted
    return {
        "rows": changes,
        "inserted": result.inserted,
        "updated": result.updated,
        "deleted": result.deleted,
        "seconds": seconds,
    }


def slot_read(job: Job) -> dict[str, Any]:
    """The rate the slot can be read: peek all pending pgoutput messages and discard them (psql, C only)."""
    script = (  # psql quotes the variables (:'slot'); it interpolates them in scripts, not in -c
        "COPY (SELECT data FROM pg_logical_slot_peek_binary_changes("
        ":'slot', NULL, NULL, 'proto_version', '1', 'publication_names', :'publication', "
        "'messages', 'true')) TO STDOUT (FORMAT binary);\n"
    )
    argv = [job["psql"], "-X", "-q", "-v", f"slot={job['slot']}", "-v", f"publication={job['publication']}"]
    started = time.perf_counter()
    done = subprocess.run([*argv, job["src_dsn"]], input=script.encode(), stdout=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise RuntimeError("slot read failed")
    return {"rows": job["rows"], "seconds": time.perf_counter() - started}


def slot_read_python(job: Job) -> dict[str, Any]:
    """The slot read the way the provider reads it (psycopg, server-side cursor), messages discarded."""
    query = (
        "SELECT xid::text::bigint, data FROM pg_logical_slot_peek_binary_changes("
        "%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')"
    )
    started = time.perf_counter()
    messages = 0
    with psycopg.connect(job["src_dsn"]) as conn, conn.transaction(), conn.cursor(name="bench_peek") as cursor:
        cursor.itersize = 5_000
        cursor.execute(query, (job["slot"], job["publication"]))
        for _ in cursor:
            messages += 1
    return {"rows": job["rows"], "messages": messages, "seconds": time.perf_counter() - started}


def _airflow_env(job: Job) -> None:
    os.environ["AIRFLOW_CONN_BENCH_SOURCE"] = job["src_airflow_uri"]
    os.environ["AIRFLOW_CONN_BENCH_TARGET"] = job["tgt_airflow_uri"]


def _subset_query(job: Job) -> str:
    """The row-by-row contenders' source query (a subset, see the README).

    Its bounds are written into a one-row source table with bound parameters and the query reads
    them from there, so no value is formatted into SQL (``GenericTransfer`` takes no parameters).
    """
    mark = _watermark(job, job["target"]) if job["workload"] == "b" else None
    with psycopg.connect(job["src_dsn"], autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_subset (mark timestamptz, row_limit bigint)")
        conn.execute("TRUNCATE bench_subset")
        conn.execute("INSERT INTO bench_subset VALUES (%s::timestamptz, %s)", (mark, int(job["rows"])))
    if job["workload"] == "b":
        where = (
            " WHERE updated_at > (SELECT mark FROM bench_subset) ORDER BY updated_at, id"
            " LIMIT (SELECT row_limit FROM bench_subset)"
        )
    else:
        where = " WHERE id <= (SELECT row_limit FROM bench_subset)"
    return _select(job["source"], where)


def airflow_upsert_rows(job: Job) -> dict[str, Any]:
    """Airflow's ``PostgresHook.upsert_rows`` with its defaults (one INSERT ... ON CONFLICT per row,
    commit every 1000): rows read with ``get_records`` from the source hook."""
    _airflow_env(job)
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    source, target = PostgresHook(postgres_conn_id="bench_source"), PostgresHook(postgres_conn_id="bench_target")
    started = time.perf_counter()
    rows = source.get_records(_subset_query(job))
    target.upsert_rows(job["target"], rows, target_fields=COLUMNS, conflict_fields=["id"], commit_every=1000)
    return {"rows": len(rows), "seconds": time.perf_counter() - started}


def airflow_insert_rows_executemany(job: Job) -> dict[str, Any]:
    """``insert_rows(replace=True, executemany=True)``: Airflow's fastest upsert (psycopg 3 pipelined)."""
    _airflow_env(job)
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    source, target = PostgresHook(postgres_conn_id="bench_source"), PostgresHook(postgres_conn_id="bench_target")
    started = time.perf_counter()
    rows = source.get_records(_subset_query(job))
    target.insert_rows(
        job["target"],
        rows,
        target_fields=COLUMNS,
        replace=True,
        replace_index=["id"],
        executemany=True,
        commit_every=10_000,
    )
    return {"rows": len(rows), "seconds": time.perf_counter() - started}


def airflow_generic_transfer(job: Job) -> dict[str, Any]:
    """``GenericTransfer`` (source ``get_records`` -> destination ``insert_rows(replace=True)``), executed
    outside a scheduler with connections from ``AIRFLOW_CONN_*``."""
    _airflow_env(job)
    from airflow.providers.common.sql.operators.generic_transfer import GenericTransfer

    started = time.perf_counter()
    query = _subset_query(job)
    bench_generic_transfer = GenericTransfer(
        task_id="bench_generic_transfer",
        sql=query,
        destination_table=job["target"],
        source_conn_id="bench_source",
        destination_conn_id="bench_target",
        insert_args={"replace": True, "replace_index": ["id"], "target_fields": COLUMNS, "commit_every": 1000},
    )
    bench_generic_transfer.execute(context={})  # type: ignore[arg-type]
    return {"rows": job["rows"], "seconds": time.perf_counter() - started}


def pandas_to_sql(job: Job) -> dict[str, Any]:
    """pandas ``read_sql`` + ``DataFrame.to_sql(method="multi")`` append (no upsert: reference only)."""
    import pandas as pd
    import sqlalchemy as sa

    source = sa.create_engine(job["src_url"], poolclass=sa.NullPool)
    target = sa.create_engine(job["tgt_url"], poolclass=sa.NullPool)
    started = time.perf_counter()
    frame = pd.read_sql(sa.text(_subset_query(job)), source)
    frame.to_sql(job["target"], target, if_exists="append", index=False, method="multi", chunksize=1000)
    return {"rows": len(frame), "seconds": time.perf_counter() - started}


def dlt_merge(job: Job) -> dict[str, Any]:
    """dlt ``sql_table`` (pyarrow backend, incremental on updated_at) -> postgres, write_disposition=merge."""
    import dlt
    from dlt.sources.sql_database import sql_table

    os.environ["RUNTIME__LOG_LEVEL"] = "WARNING"
    started = time.perf_counter()
    resource_ = sql_table(
        credentials=job["src_url"],
        table=job["source"],
        incremental=dlt.sources.incremental("updated_at"),
        backend="pyarrow",
        write_disposition="merge",
        primary_key="id",
    )
    pipeline = dlt.pipeline(
        pipeline_name="bench_dlt",
        pipelines_dir=job["pipelines_dir"],
        # the embedded server trusts local connections; dlt insists on a password, any will do
        destination=dlt.destinations.postgres(
            credentials=job["tgt_url"].replace("+psycopg://postgres@", "://postgres:x@")
        ),
        dataset_name=job["dataset"],
        progress=None,
    )
    info = pipeline.run(resource_)
    info.raise_on_failed_jobs()
    trace = pipeline.last_trace
    rows = sum(trace.last_normalize_info.row_counts.get(t, 0) for t in [job["source"]]) if trace else job["rows"]
    return {"rows": rows, "seconds": time.perf_counter() - started}


CONTENDERS: dict[str, Callable[[Job], dict[str, Any]]] = {
    "raw_limit": raw_limit,
    "raw_staged": raw_staged,
    "provider_incremental": provider,
    "provider_full": provider,
    "provider_cdc": provider_cdc,
    "slot_read": slot_read,
    "slot_read_python": slot_read_python,
    "airflow_upsert_rows": airflow_upsert_rows,
    "airflow_insert_rows_executemany": airflow_insert_rows_executemany,
    "airflow_generic_transfer": airflow_generic_transfer,
    "pandas_to_sql": pandas_to_sql,
    "dlt_merge": dlt_merge,
}


# --------------------------------------------------------------------------- profiling


def _profiler(job: Job) -> Any:
    if not job.get("profile"):
        return None
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.002)
    profiler.start()
    return profiler


def _save_profile(profiler: Any, job: Job) -> None:
    if profiler is None:
        return
    profiler.stop()
    path = job["profile"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as out:
        out.write(profiler.output_text(unicode=False, color=False, show_all=False))


def main(argv: list[str]) -> int:
    job: Job = json.loads(argv[0])
    if job.get("clean_dir"):
        shutil.rmtree(job["clean_dir"], ignore_errors=True)
    contender = CONTENDERS[job["contender"]]
    result = contender(job)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # psql processes of the raw contenders
    cpu = usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime
    result.update(seconds=round(result["seconds"], 4), peak_rss_mb=round(_peak_rss_mb(), 1), cpu_seconds=round(cpu, 3))
    with contextlib.suppress(BrokenPipeError):
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
