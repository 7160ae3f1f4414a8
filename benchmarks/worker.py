"""One contender, one workload, in its own process: ``python -m benchmarks.worker '<json job>'``.

Each run is a fresh process so its peak RSS is its own, and the harness's imports (matplotlib, dlt,
Airflow) never inflate the numbers.  The timed span is only the work (not interpreter start-up);
the last stdout line is a JSON result: seconds, rows, peak RSS.  ``rows`` is always counted (a
psql command tag, the tool's own report, or the target), never copied from the job.
"""

# ruff: noqa: S608 - the benchmark's SQL is built from constant identifiers and its own values only
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
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
        row = conn.execute(sql.SQL("SELECT max(updated_at)::text FROM {}").format(_ident(target))).fetchone()
    return row[0] if row else None


def _ident(name: str) -> sql.Identifier:
    """``schema.table`` or ``table`` as a quoted identifier."""
    return sql.Identifier(*name.split("."))


def _psql(job: Job, *args: str) -> list[str]:
    return [job["psql"], "-X", "-v", "ON_ERROR_STOP=1", *args]


def _tags(stdout: str) -> dict[str, int]:
    """Row counts from psql's command tags (``COPY 1000``, ``MERGE 200``): the server's own count."""
    counts: dict[str, int] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("COPY", "MERGE", "INSERT") and parts[-1].isdigit():
            counts[parts[0]] = counts.get(parts[0], 0) + int(parts[-1])
    return counts


def _raw_copy_out(job: Job, target: str) -> tuple[list[str], bytes]:
    """psql argv and its stdin script: COPY the source (binary) to stdout.

    Incremental (workload b) reads the rows past the target's newest cursor.  The value goes in as
    a psql variable quoted by psql (``:'mark'``); psql interpolates variables in scripts, not in
    ``-c`` commands, hence the script on stdin.
    """
    argv = _psql(job, "-q")
    where = ""
    mark = _watermark(job, target) if job["workload"] == "b" else None
    if mark:
        argv += ["-v", f"mark={mark}"]
        where = " WHERE updated_at > :'mark'::timestamptz"
    script = f"COPY ({_select(job['source'], where)}) TO STDOUT (FORMAT binary);\n"
    return [*argv, job["src_dsn"]], script.encode()


def _merge_load_argv(job: Job, target: str) -> list[str]:
    """psql, one transaction: COPY stdin (binary) into a temp stage, then one MERGE skipping unchanged rows."""
    match = " AND ".join(f"t.{c} IS NOT DISTINCT FROM s.{c}" for c in VALUES)
    merge = (
        f"MERGE INTO {target} t USING _raw_stage s ON t.id = s.id "
        f"WHEN MATCHED AND NOT ({match}) THEN UPDATE SET {', '.join(f'{c} = s.{c}' for c in VALUES)} "
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(COLUMNS)}) VALUES ({', '.join('s.' + c for c in COLUMNS)})"
    )
    return _psql(
        job,
        "-1",
        job["tgt_dsn"],
        "-c",
        f"CREATE TEMP TABLE _raw_stage (LIKE {target}) ON COMMIT DROP",
        "-c",
        "COPY _raw_stage FROM STDIN (FORMAT binary)",
        "-c",
        merge,
    )


def _pipe(copy_out: list[str], script: bytes, load: list[str]) -> dict[str, int]:
    """Run ``copy_out | load`` (two psql processes, two server backends at once); the loader's tags."""
    reader = subprocess.Popen(copy_out, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert reader.stdin is not None and reader.stdout is not None
    reader.stdin.write(script)
    reader.stdin.close()
    writer = subprocess.run(load, stdin=reader.stdout, capture_output=True, text=True, check=False)
    reader.stdout.close()
    if reader.wait() != 0 or writer.returncode != 0:
        raise RuntimeError(f"raw pipe failed: {writer.stderr}")
    return _tags(writer.stdout)


# --------------------------------------------------------------------------- raw contenders


def raw_limit(job: Job) -> dict[str, Any]:
    """The fastest raw path into an empty target: binary COPY TO STDOUT piped straight into COPY FROM
    STDIN of the target (no stage, no merge; two psql processes, no Python per row)."""
    target = job["target"]
    copy_out, script = _raw_copy_out(job, target)
    load = _psql(job, "-1", job["tgt_dsn"], "-c", f"COPY {target} FROM STDIN (FORMAT binary)")
    started = time.perf_counter()
    tags = _pipe(copy_out, script, load)
    return {"rows": tags["COPY"], "seconds": time.perf_counter() - started}


def raw_merge(job: Job) -> dict[str, Any]:
    """Binary COPY TO STDOUT piped into COPY FROM STDIN of a temp stage + one MERGE (one transaction)."""
    target = job["target"]
    copy_out, script = _raw_copy_out(job, target)
    started = time.perf_counter()
    tags = _pipe(copy_out, script, _merge_load_argv(job, target))
    return {"rows": tags["COPY"], "merged": tags.get("MERGE", 0), "seconds": time.perf_counter() - started}


def raw_staged(job: Job) -> dict[str, Any]:
    """The raw merge without the pipe: COPY TO a file, then COPY FROM it + MERGE (two steps in a row,
    like any staged design; still no Python per row).  Shows what staging itself costs."""
    target = job["target"]
    copy_out, script = _raw_copy_out(job, target)
    path = os.path.join(job["staging"], f"raw-staged-{os.getpid()}.bin")
    os.makedirs(job["staging"], exist_ok=True)
    started = time.perf_counter()
    with open(path, "wb") as out:
        subprocess.run(copy_out, input=script, stdout=out, check=True)
    with open(path, "rb") as data:
        done = subprocess.run(_merge_load_argv(job, target), stdin=data, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    os.remove(path)
    tags = _tags(done.stdout)
    return {"rows": tags["COPY"], "merged": tags.get("MERGE", 0), "seconds": seconds}


def _peek(job: Job) -> tuple[list[str], bytes]:
    """psql peeking every pending pgoutput message of the slot (binary COPY to stdout)."""
    script = (  # psql quotes the variables (:'slot'); it interpolates them in scripts, not in -c
        "COPY (SELECT data FROM pg_logical_slot_peek_binary_changes("
        ":'slot', NULL, NULL, 'proto_version', '1', 'publication_names', :'publication', "
        "'messages', 'true')) TO STDOUT (FORMAT binary);\n"
    )
    argv = _psql(job, "-q", "-v", f"slot={job['slot']}", "-v", f"publication={job['publication']}")
    return [*argv, job["src_dsn"]], script.encode()


def _count_changes(job: Job) -> int:
    """Insert, update and delete messages pending in the slot (untimed, after the timed read)."""
    query = (
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
        "'publication_names', %s, 'messages', 'true') WHERE get_byte(data, 0) IN (73, 85, 68)"  # I, U, D
    )
    with psycopg.connect(job["src_dsn"]) as conn:
        row = conn.execute(query, (job["slot"], job["publication"])).fetchone()
    return int(row[0]) if row else 0


def slot_read(job: Job) -> dict[str, Any]:
    """The rate the slot can be read: peek all pending pgoutput messages and discard them (psql, C only)."""
    argv, script = _peek(job)
    started = time.perf_counter()
    done = subprocess.run(argv, input=script, stdout=subprocess.DEVNULL, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError("slot read failed")
    return {"rows": _count_changes(job), "seconds": seconds}


def slot_read_python(job: Job) -> dict[str, Any]:
    """The slot read the way the provider reads it (psycopg, server-side cursor), messages discarded."""
    query = (
        "SELECT xid::text::bigint, data FROM pg_logical_slot_peek_binary_changes("
        "%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')"
    )
    started = time.perf_counter()
    messages = changes = 0
    with psycopg.connect(job["src_dsn"]) as conn, conn.transaction(), conn.cursor(name="bench_peek") as cursor:
        cursor.itersize = 5_000
        cursor.execute(query, (job["slot"], job["publication"]))
        for _, data in cursor:
            messages += 1
            changes += data[0] in b"IUD"
    return {"rows": changes, "messages": messages, "seconds": time.perf_counter() - started}


def raw_cdc_limit(job: Job) -> dict[str, Any]:
    """The raw CDC limit: the psql slot read (as ``slot_read``) plus a raw apply of the decoded net rows.

    The net rows (the final image of every key the round changed, with an ``op`` column: ``U`` upsert,
    ``D`` delete) were prepared untimed as a binary COPY file (``job["net_rows"]``); the apply is one
    psql transaction: COPY into a temp stage + one MERGE that inserts, updates and deletes.  Time =
    read + apply.
    """
    target = job["target"]
    peek, script = _peek(job)
    assignments = ", ".join(f"{c} = s.{c}" for c in VALUES)
    merge = (
        f"MERGE INTO {target} t USING _raw_cdc s ON t.id = s.id "
        "WHEN MATCHED AND s.op = 'D' THEN DELETE "
        f"WHEN MATCHED THEN UPDATE SET {assignments} "
        f"WHEN NOT MATCHED AND s.op <> 'D' THEN INSERT ({', '.join(COLUMNS)}) "
        f"VALUES ({', '.join('s.' + c for c in COLUMNS)})"
    )
    load = _psql(
        job,
        "-1",
        job["tgt_dsn"],
        "-c",
        f"CREATE TEMP TABLE _raw_cdc ON COMMIT DROP AS SELECT ''::text AS op, * FROM {target} WITH NO DATA",
        "-c",
        "COPY _raw_cdc FROM STDIN (FORMAT binary)",
        "-c",
        merge,
    )
    started = time.perf_counter()
    read = subprocess.run(peek, input=script, stdout=subprocess.DEVNULL, check=False)
    read_seconds = time.perf_counter() - started
    with open(job["net_rows"], "rb") as data:
        applied = subprocess.run(load, stdin=data, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if read.returncode != 0 or applied.returncode != 0:
        raise RuntimeError(f"raw CDC limit failed: {applied.stderr}")
    tags = _tags(applied.stdout)
    return {
        "rows": _count_changes(job),
        "net_rows": tags["COPY"],
        "merged": tags.get("MERGE", 0),
        "read_seconds": read_seconds,
        "apply_seconds": seconds - read_seconds,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- this provider


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


def cdc_decoders() -> tuple[str, ...]:
    """The values of ``CdcSpec.decoder`` this code base has; empty when the field does not exist."""
    from airflow_sync_provider.core.cdc import CdcSpec

    if "decoder" not in {f.name for f in dataclasses.fields(CdcSpec)}:
        return ()
    return ("bulk", "per_message")


def provider_cdc(job: Job) -> dict[str, Any]:
    """This provider's CDC: read the slot (pgoutput), stage, apply with the LSN in one transaction.

    ``job["decoder"]`` is passed to ``CdcSpec`` only when set (the harness sets it only when the field
    exists), so this runs before and after ``CdcSpec(decoder=...)`` lands.
    """
    import sqlalchemy as sa

    from airflow_sync_provider.core.cdc import CdcSpec, run_cdc_sync
    from airflow_sync_provider.core.staging import StagingArea

    engine = sa.create_engine(job["src_url"], poolclass=sa.NullPool)
    options: dict[str, Any] = {"target_schema": job.get("target_schema", "public")}
    if job.get("decoder"):
        options["decoder"] = job["decoder"]
    spec = CdcSpec(sync_id=job["sync_id"], tables=(job["source"],), **options)
    profiler = _profiler(job)
    clock = time.perf_counter()
    with psycopg.connect(job["tgt_dsn"]) as target:
        manifest, result = run_cdc_sync(engine, target, spec, staging=StagingArea(job["staging"]), run_id="bench")
    seconds = time.perf_counter() - clock
    _save_profile(profiler, job)
    engine.dispose()
    return {
        "rows": manifest.changes if manifest.kind == "changes" else manifest.rows,
        "kind": manifest.kind,
        "inserted": result.inserted,
        "updated": result.updated,
        "deleted": result.deleted,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- Airflow


def _airflow_env(job: Job) -> None:
    os.environ["AIRFLOW_CONN_BENCH_SOURCE"] = job["src_airflow_uri"]
    os.environ["AIRFLOW_CONN_BENCH_TARGET"] = job["tgt_airflow_uri"]


def _subset_query(job: Job) -> tuple[str, str | None]:
    """The subset contenders' source query (see the README); called before the clock starts.

    Its bounds are written into a one-row source table with bound parameters and the query reads
    them from there, so no value is formatted into SQL (``GenericTransfer`` takes no parameters).
    (a): the rows ``id <= rows``; (b): the first ``rows`` rows past the target's newest cursor,
    in (cursor, key) order (the harness checks the target against exactly these).  Returns the
    query and the cursor mark ((b)) that ``_loaded`` counts from.
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
        where = " WHERE id <= (SELECT row_limit FROM bench_subset) ORDER BY id"
    return _select(job["source"], where), mark


def _loaded(job: Job, mark: str | None) -> int:
    """Rows the subset contender put in its target, counted there (untimed): all rows in (a), whose
    target started empty; in (b) the rows past the initial state's newest cursor."""
    count = sql.SQL("SELECT count(*) FROM {} WHERE updated_at > coalesce(%s::timestamptz, '-infinity')")
    with psycopg.connect(job["tgt_dsn"]) as conn:
        row = conn.execute(count.format(_ident(job["target"])), (mark,)).fetchone()
    return int(row[0]) if row else 0


def airflow_upsert_rows(job: Job) -> dict[str, Any]:
    """Airflow's ``PostgresHook.upsert_rows`` with its defaults (INSERT ... ON CONFLICT, commit every
    1000; providers-postgres 7.x pipelines executemany): rows read with ``get_records``."""
    _airflow_env(job)
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    source, target = PostgresHook(postgres_conn_id="bench_source"), PostgresHook(postgres_conn_id="bench_target")
    query, mark = _subset_query(job)
    started = time.perf_counter()
    rows = source.get_records(query)
    target.upsert_rows(job["target"], rows, target_fields=COLUMNS, conflict_fields=["id"], commit_every=1000)
    seconds = time.perf_counter() - started
    return {"rows": _loaded(job, mark), "rows_read": len(rows), "seconds": seconds}


def airflow_insert_rows_executemany(job: Job) -> dict[str, Any]:
    """``insert_rows(replace=True, executemany=True)``: Airflow's fastest upsert (psycopg 3 pipelined)."""
    _airflow_env(job)
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    source, target = PostgresHook(postgres_conn_id="bench_source"), PostgresHook(postgres_conn_id="bench_target")
    query, mark = _subset_query(job)
    started = time.perf_counter()
    rows = source.get_records(query)
    target.insert_rows(
        job["target"],
        rows,
        target_fields=COLUMNS,
        replace=True,
        replace_index=["id"],
        executemany=True,
        commit_every=10_000,  # not 0: common-sql 2.4.0 loads 0 rows with commit_every=0
    )
    seconds = time.perf_counter() - started
    return {"rows": _loaded(job, mark), "rows_read": len(rows), "seconds": seconds}


def airflow_generic_transfer(job: Job) -> dict[str, Any]:
    """``GenericTransfer`` (source ``get_records`` -> destination ``insert_rows(replace=True)``), executed
    outside a scheduler with connections from ``AIRFLOW_CONN_*``."""
    _airflow_env(job)
    from airflow.providers.common.sql.operators.generic_transfer import GenericTransfer

    query, mark = _subset_query(job)
    started = time.perf_counter()
    bench_generic_transfer = GenericTransfer(
        task_id="bench_generic_transfer",
        sql=query,
        destination_table=job["target"],
        source_conn_id="bench_source",
        destination_conn_id="bench_target",
        insert_args={"replace": True, "replace_index": ["id"], "target_fields": COLUMNS, "commit_every": 1000},
    )
    bench_generic_transfer.execute(context={})
    seconds = time.perf_counter() - started
    return {"rows": _loaded(job, mark), "seconds": seconds}


# --------------------------------------------------------------------------- pandas


def _pandas_copy(table: Any, conn: Any, keys: list[str], data_iter: Iterable[tuple[Any, ...]]) -> int:
    """The COPY insertion ``method`` from pandas' docs (``io.sql``, "Insertion method"), with
    psycopg 3's ``cursor.copy`` in place of psycopg2's ``copy_expert``: rows as CSV, one COPY."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows(data_iter)
    name = sql.Identifier(table.schema, table.name) if table.schema else sql.Identifier(table.name)
    statement = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
        name, sql.SQL(", ").join(map(sql.Identifier, keys))
    )
    with conn.connection.cursor() as cursor:
        with cursor.copy(statement) as copy:
            copy.write(buffer.getvalue())
        return int(cursor.rowcount)


def _pandas(job: Job, method: Any, chunksize: int | None) -> dict[str, Any]:
    """pandas ``read_sql`` + ``DataFrame.to_sql(..., if_exists="append")`` (append only: no (b))."""
    import pandas as pd
    import sqlalchemy as sa

    source = sa.create_engine(job["src_url"], poolclass=sa.NullPool)
    target = sa.create_engine(job["tgt_url"], poolclass=sa.NullPool)
    query, mark = _subset_query(job)
    started = time.perf_counter()
    frame = pd.read_sql(sa.text(query), source)
    written = frame.to_sql(job["target"], target, if_exists="append", index=False, method=method, chunksize=chunksize)
    seconds = time.perf_counter() - started
    return {"rows": _loaded(job, mark), "rows_read": len(frame), "rows_reported": written, "seconds": seconds}


def pandas_copy(job: Job) -> dict[str, Any]:
    """pandas at its best: ``to_sql(method=<the COPY callable from pandas' docs>)``."""
    return _pandas(job, _pandas_copy, None)


def pandas_default(job: Job) -> dict[str, Any]:
    """pandas at its default: ``to_sql(method=None)`` (executemany of INSERTs, one chunk)."""
    return _pandas(job, None, None)


def pandas_multi(job: Job) -> dict[str, Any]:
    """``to_sql(method="multi", chunksize=1000)`` (multi-row INSERTs; slower than the default here)."""
    return _pandas(job, "multi", 1000)


# --------------------------------------------------------------------------- dlt


def _dlt(job: Job, loader_file_format: str | None) -> dict[str, Any]:
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
        pipeline_name=f"bench_{job['contender']}",
        pipelines_dir=job["pipelines_dir"],
        # the embedded server trusts local connections; dlt insists on a password, any will do
        destination=dlt.destinations.postgres(
            credentials=job["tgt_url"].replace("+psycopg://postgres@", "://postgres:x@")
        ),
        dataset_name=job["dataset"],
    )
    info = pipeline.run(resource_, loader_file_format=loader_file_format)  # type: ignore[arg-type]
    info.raise_on_failed_jobs()
    seconds = time.perf_counter() - started
    trace = pipeline.last_trace
    if trace is None or trace.last_normalize_info is None:
        raise RuntimeError("dlt reported no normalize info: no row count")
    formats = sorted(
        {job_.job_file_info.file_format for package in info.load_packages for job_ in package.jobs["completed_jobs"]}
    )
    return {
        "rows": int(trace.last_normalize_info.row_counts.get(job["source"], 0)),
        "seconds": seconds,
        "file_formats": formats,
    }


def dlt_parquet(job: Job) -> dict[str, Any]:
    """dlt at its best: ``loader_file_format="parquet"``, loaded by ADBC (``adbc-driver-postgresql``)."""
    import adbc_driver_postgresql  # noqa: F401 - dlt loads parquet into postgres only through ADBC

    return _dlt(job, "parquet")


def dlt_default(job: Job) -> dict[str, Any]:
    """dlt at its default loader file format (``insert_values`` for postgres)."""
    return _dlt(job, None)


CONTENDERS: dict[str, Callable[[Job], dict[str, Any]]] = {
    "raw_limit": raw_limit,
    "raw_merge": raw_merge,
    "raw_staged": raw_staged,
    "provider_incremental": provider,
    "provider_full": provider,
    "provider_cdc": provider_cdc,
    "provider_cdc_per_message": provider_cdc,
    "slot_read": slot_read,
    "slot_read_python": slot_read_python,
    "raw_cdc_limit": raw_cdc_limit,
    "airflow_upsert_rows": airflow_upsert_rows,
    "airflow_insert_rows_executemany": airflow_insert_rows_executemany,
    "airflow_generic_transfer": airflow_generic_transfer,
    "pandas_copy": pandas_copy,
    "pandas_default": pandas_default,
    "pandas_multi": pandas_multi,
    "dlt_parquet": dlt_parquet,
    "dlt_default": dlt_default,
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
