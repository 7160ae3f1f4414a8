"""Latency under the real scheduler: warehouse commit -> visible in every store's ``catalog_availability``.

``python -m benchmarks.latency`` (``--quick``: shorter phases; ``--no-variants``: the real-time DAG
only; ``--variants``: which comparison DAGs; ``--keep``: keep the Airflow home and its logs).
Starts an embedded PostgreSQL with the inventory case study's databases (seeded) and
``airflow standalone`` (scheduler, dag-processor, triggerer, api-server; LocalExecutor; the metadata
database on the same PostgreSQL server), then measures the three inventory DAGs one after the other
in the same run:

1. ``inventory_sync_realtime`` (one streaming task), per rate: a writer commits stock changes at
   the warehouses at a steady rate (10, 100, 1,000 changes/s; one row per transaction, both
   warehouses), receipts only; a sampler sets a probe SKU's stock to a new value every half second
   (its own transaction, part of the stream) and timestamps the commit; a watcher polls both stores
   until each shows the allocation that value gives (``floor(share * on_hand)``): that interval is
   the sample; a checker reads the stores throughout (:func:`case_studies.inventory.observe_oversell`);
2. ``inventory_sync_on_change`` (AssetWatchers on the warehouses' slots start a DAG run), at 10
   changes/s, one probe every 5 s;
3. ``inventory_sync`` (every five minutes), at 10 changes/s, one probe every 30 s over two periods
   (``--periods``; its samples are minutes: the wait for the next run, plus the run).

Each comparison DAG is unpaused with a parse request for its file (Airflow starts an AssetWatcher
only when it parses the file of an unpaused DAG), and sampled only once its first run has ended
(the writer commits meanwhile): the samples are the steady state; the start-up is recorded apart
(``startup``: seconds after the unpause until the watchers exist, the first asset event, and the
first two runs with their tasks, from Airflow's metadata database).

Results: ``benchmarks/results/latest-latency.json``: per rate of the real-time DAG (``rates``)
``rate_per_s``, ``achieved_per_s``, ``samples``, ``p50_s``, ``p95_s``, ``p99_s``, ``max_s``,
``oversell_observations``, the machine's load average and the samples themselves; the same fields
per DAG under ``variants``; top level ``scheduler``, ``commit``.  ``benchmarks/results/latency.png``
plots the distributions (:mod:`benchmarks.latency_plot`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psycopg

from case_studies import databases, inventory
from case_studies.databases import connect
from sync_dev import DAGS_FOLDER
from sync_dev.local_postgres import LocalPostgres, free_port, local_postgres
from sync_dev.standalone import ui_environment

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROBES = 40
SCALE = 500
#: The comparison DAGs measured after the real-time one (``--variants``).
VARIANTS = ("inventory_sync_on_change", "inventory_sync")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 3)


class Airflow:
    """``airflow standalone`` in a temporary home, its metadata on the benchmark's PostgreSQL."""

    def __init__(self, server: LocalPostgres, uris: Mapping[str, str], home: Path, stream_seconds: float) -> None:
        self.server = server
        with server.connect() as admin:
            admin.execute("CREATE DATABASE airflow_meta")
        self.environment = {
            **os.environ,
            **databases.airflow_environment(uris),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",  # LocalExecutor forks this many workers up front
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",  # a busy 2-CPU machine answers slowly
            # At a load average of ~20 (other jobs on the 2 CPUs) a DAG file takes over the default 30 s to
            # import, and the dag-processor never stores the DAGs; re-parsing every file every 30 s (the
            # default) would also take a CPU from the stream: every 120 s here (see SCHEDULER below).
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "300",
            "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "360",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "120",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/airflow_meta",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW_VAR_SYNC_TOKEN_KEY": "benchmark-token-key",
            "SYNC_STAGING_DIR": str(home / "staging"),
            "SYNC_REALTIME_STREAM_SECONDS": str(stream_seconds),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **ui_environment(free_port()),
        }
        self.airflow = shutil.which("airflow", path=str(Path(sys.executable).parent)) or "airflow"
        home.mkdir(parents=True, exist_ok=True)
        self.log = (home / "standalone.log").open("w")
        self.process = subprocess.Popen(  # its own process group: stop() ends every process it forked
            [self.airflow, "standalone"],
            env=self.environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.airflow, *args], env=self.environment, capture_output=True, text=True, timeout=300, check=False
        )

    def unpause(self, dag_id: str, timeout: float = 900) -> None:
        """Unpause once the dag-processor has stored the DAG (``unpause`` of an unknown DAG is a no-op)."""
        deadline = time.monotonic() + timeout
        while True:
            self.cli("dags", "unpause", dag_id)
            details = self.cli("dags", "details", dag_id, "-o", "json").stdout
            lines = [line for line in details.splitlines() if line.startswith("[{")]  # past the CLI's warnings
            try:
                paused = json.loads(lines[0])[0]["is_paused"]
            except (ValueError, KeyError, IndexError):
                paused = True
            if paused in (False, "False", "false"):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cannot unpause {dag_id} (standalone exit {self.process.poll()})")
            time.sleep(5)

    def pause(self, dag_id: str) -> None:
        self.cli("dags", "pause", dag_id)

    def request_parse(self, dag_id: str) -> None:
        """Have the dag-processor parse the DAG's file next (what the UI's "Reparse Dag" button writes).

        Airflow creates an AssetWatcher's triggers only when it parses the file of an *unpaused* DAG
        (``dag_processing/collection.py``, ``add_asset_trigger_references``): unpausing alone starts
        no watcher until the next parse, ``min_file_process_interval`` later (120 s here).
        """
        with self.server.connect("airflow_meta") as meta:
            meta.execute(_PARSE_REQUEST, (dag_id,))

    def wait_idle(self, dag_id: str, timeout: float, quiet: float = 8) -> None:
        """Until ``dag_id`` has had no queued or running run for ``quiet`` seconds (longer than a peek
        plus the event -> run step), so that pausing it strands no run: the scheduler starts no further
        task of a paused DAG's run, which stays "running" until the DAG is unpaused."""
        deadline = time.monotonic() + timeout
        idle_since: float | None = None
        with self.server.connect("airflow_meta") as meta:
            while time.monotonic() < deadline:
                busy = meta.execute(_ACTIVE_RUNS, (dag_id,)).fetchone()
                if busy and busy[0]:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= quiet:
                    return
                time.sleep(1)
        raise RuntimeError(f"{dag_id} still had a queued or running run after {timeout:.0f} s")

    def wait_first_run(self, dag_id: str, since: dt.datetime, timeout: float) -> str:
        """Until a run of ``dag_id`` created after ``since`` has ended; its state."""
        deadline = time.monotonic() + timeout
        with self.server.connect("airflow_meta") as meta:
            while time.monotonic() < deadline:
                row = meta.execute(_FIRST_RUN, (dag_id, since)).fetchone()
                if row and row[0] in ("success", "failed"):
                    return str(row[0])
                time.sleep(1)
        raise RuntimeError(f"no run of {dag_id} ended within {timeout:.0f} s of the unpause")

    def wait_no_running_run(self, dag_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.cli("dags", "list-runs", dag_id, "--state", "running", "-o", "json").stdout
            runs = [line for line in out.splitlines() if line.startswith("[")]  # past the CLI's warnings
            if "No data found" in out or runs == ["[]"]:
                return
            time.sleep(5)
        raise RuntimeError(f"{dag_id} still has a running run")

    def version(self) -> str:
        return self.cli("version").stdout.strip()

    def stop(self) -> None:
        """SIGTERM to standalone's process group, SIGKILL to what is left of it after 60 s."""
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(60)
        with contextlib.suppress(ProcessLookupError):
            time.sleep(5)
            os.killpg(group, signal.SIGKILL)
        self.log.close()


class Writer:
    """Commits receipts at ``rate`` per second (one row per transaction), spread over both warehouses."""

    def __init__(self, uris: Mapping[str, str], rate: float) -> None:
        self.uris, self.rate = uris, rate
        self.running = threading.Event()
        self.running.set()
        self.commits = 0
        self.threads = [
            threading.Thread(target=self._run, args=(w, i), daemon=True) for i, w in enumerate(inventory.WAREHOUSES)
        ]
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()

    def _run(self, warehouse: str, seed: int) -> None:
        rng = random.Random(seed)
        period = len(self.threads) / self.rate
        with connect(self.uris[warehouse]) as conn:
            due = time.monotonic()
            while self.running.is_set():
                conn.execute(
                    "UPDATE stock SET on_hand = on_hand + 1, updated_at = now() WHERE sku = %s",
                    (f"SKU-{rng.randint(1, SCALE):06d}",),
                )
                self.commits += 1
                due += period
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)

    def stop(self) -> float:
        self.running.clear()
        for thread in self.threads:
            thread.join(30)
        return self.commits / max(time.monotonic() - self.started, 1e-9)


class Sampler:
    """Sets a probe SKU to a new quantity every ``every`` seconds and times its arrival in every store."""

    def __init__(self, uris: Mapping[str, str], every: float = 0.5, timeout: float = 120) -> None:
        self.uris, self.every, self.timeout = uris, every, timeout
        self.latencies: list[float] = []
        self.lost = 0
        self.pending: dict[str, tuple[float, dict[str, int]]] = {}
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.running.set()
        # rising across samplers too: a lower value would be a stock decrease, which stores can oversell
        # until it arrives (the checker would count that window, not a push's fault)
        self.value = int((time.time() - 1.79e9) * 20)
        self.threads = [
            threading.Thread(target=self._write, daemon=True),
            threading.Thread(target=self._watch, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _write(self) -> None:
        n = 0
        with connect(self.uris[inventory.WAREHOUSES[0]]) as conn:
            while self.running.is_set():
                sku = f"PROBE-{n % PROBES:03d}"
                with self.lock:
                    busy = sku in self.pending
                if not busy:
                    self.value += 7
                    conn.execute("UPDATE stock SET on_hand = %s, updated_at = now() WHERE sku = %s", (self.value, sku))
                    committed = time.monotonic()
                    expected = {s: math.floor(self.value * inventory.STORE_SHARES[s]) for s in inventory.STORES}
                    with self.lock:
                        self.pending[sku] = (committed, expected)
                n += 1
                time.sleep(self.every)

    def _watch(self) -> None:
        stores = {s: connect(self.uris[s]) for s in inventory.STORES}
        seen: dict[str, set[str]] = {}
        try:
            while self.running.is_set() or self.pending:
                with self.lock:
                    pending = dict(self.pending)
                if not pending:
                    time.sleep(0.005)
                    continue
                skus = list(pending)
                for store, conn in stores.items():
                    rows = conn.execute(
                        "SELECT sku, available_qty FROM catalog_availability WHERE sku = ANY(%s)", (skus,)
                    ).fetchall()
                    for sku, qty in rows:
                        if qty == pending[sku][1][store]:
                            seen.setdefault(sku, set()).add(store)
                now = time.monotonic()
                with self.lock:
                    for sku, (committed, _) in pending.items():
                        if seen.get(sku, set()) >= set(inventory.STORES):
                            self.latencies.append(now - committed)
                            del self.pending[sku]
                            seen.pop(sku, None)
                        elif now - committed > self.timeout:
                            self.lost += 1
                            del self.pending[sku]
                            seen.pop(sku, None)
                time.sleep(0.005)
        finally:
            for conn in stores.values():
                conn.close()

    def stop(self) -> None:
        self.running.clear()
        for thread in self.threads:
            thread.join(self.timeout + 30)


class Checker:
    def __init__(self, uris: Mapping[str, str]) -> None:
        self.uris = uris
        self.observations, self.violations = 0, []  # type: tuple[int, list[str]]
        self.running = threading.Event()
        self.running.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running.is_set():
            try:
                self.violations += inventory.observe_oversell(self.uris)
                self.observations += 1
            except psycopg.errors.UndefinedTable:
                pass
            time.sleep(0.05)

    def stop(self) -> None:
        self.running.clear()
        self.thread.join(60)


def _wait_streaming(uris: Mapping[str, str], timeout: float) -> None:
    """Until every store has received a push (the stream runs and took its snapshot)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ok = True
            for store in inventory.STORES:
                with connect(uris[store]) as conn:
                    row = conn.execute("SELECT seq FROM _allocation_position").fetchone()
                    ok = ok and bool(row and row[0])
            if ok:
                return
        except psycopg.Error:
            pass
        time.sleep(2)
    raise RuntimeError("the realtime stream did not push to the stores in time")


_PARSE_REQUEST = """
INSERT INTO dag_priority_parsing_request (id, bundle_name, relative_fileloc)
SELECT md5(bundle_name || ':' || relative_fileloc), bundle_name, relative_fileloc FROM dag WHERE dag_id = %s
ON CONFLICT (id) DO NOTHING
"""
_ACTIVE_RUNS = "SELECT count(*) FROM dag_run WHERE dag_id = %s AND state IN ('queued', 'running')"
_FIRST_RUN = "SELECT state FROM dag_run WHERE dag_id = %s AND created_at >= %s ORDER BY created_at LIMIT 1"
_WATCHERS = """
SELECT min(t.created_date) FROM trigger t
JOIN asset_watcher w ON w.trigger_id = t.id
JOIN dag_schedule_asset_reference r ON r.asset_id = w.asset_id
WHERE r.dag_id = %s
"""
_EVENTS = """
SELECT min(e.timestamp), count(*) FROM asset_event e
JOIN dag_schedule_asset_reference r ON r.asset_id = e.asset_id
WHERE r.dag_id = %s AND e.timestamp >= %s
"""
_RUNS = """
SELECT run_id, created_at, queued_at, start_date, end_date, state FROM dag_run
WHERE dag_id = %s AND created_at >= %s ORDER BY created_at LIMIT %s
"""
_TASKS = """
SELECT task_id, map_index, try_number, scheduled_dttm, queued_dttm, start_date, end_date, state FROM task_instance
WHERE dag_id = %s AND run_id = %s ORDER BY start_date NULLS LAST, task_id
"""


def timeline(server: LocalPostgres, dag_id: str, since: dt.datetime, runs: int = 3) -> dict[str, Any]:
    """Where the time went after ``since`` (just before the unpause), from Airflow's metadata: seconds after it.

    ``watchers_registered``: the AssetWatcher triggers exist (the dag-processor writes them when it
    parses the file of an unpaused DAG), ``first_asset_event``: a trigger fired; then the first
    ``runs`` DAG runs created since, each with its tasks (scheduled, queued, started, ended).
    """

    def after(moment: Any) -> float | None:
        return None if moment is None else round((moment - since).total_seconds(), 2)

    with server.connect("airflow_meta") as meta:
        watchers = meta.execute(_WATCHERS, (dag_id,)).fetchone()
        first_event, events = meta.execute(_EVENTS, (dag_id, since)).fetchone() or (None, 0)
        result: dict[str, Any] = {
            "since": since.isoformat(timespec="milliseconds"),
            "watchers_registered": after(watchers[0]) if watchers else None,
            "first_asset_event": after(first_event),
            "asset_events": events,
            "runs": [],
        }
        for run_id, created, queued, started, ended, state in meta.execute(_RUNS, (dag_id, since, runs)):
            tasks = [
                {
                    "task": task_id if map_index == -1 else f"{task_id}[{map_index}]",
                    "try": attempt,
                    "scheduled": after(scheduled),
                    "queued": after(queued_t),
                    "started": after(start),
                    "ended": after(end),
                    "state": task_state,
                }
                for task_id, map_index, attempt, scheduled, queued_t, start, end, task_state in meta.execute(
                    _TASKS, (dag_id, run_id)
                )
            ]
            result["runs"].append(
                {
                    "run_id": run_id,
                    "created": after(created),
                    "queued": after(queued),
                    "started": after(started),
                    "ended": after(ended),
                    "state": state,
                    "tasks": tasks,
                }
            )
    return result


def _print_startup(startup: dict[str, Any]) -> None:
    first = (startup["runs"] or [{}])[0]
    print(
        f"  start-up (s after unpause): watchers registered {startup['watchers_registered']}, first asset event "
        f"{startup['first_asset_event']}, first run created {first.get('created')}, started {first.get('started')}, "
        f"ended {first.get('ended')} ({first.get('state')})",
        flush=True,
    )


def _load() -> list[float]:
    """The machine's load average (1, 5, 15 min), as ``uptime`` shows it."""
    return [round(x, 2) for x in os.getloadavg()]


def measure(
    uris: Mapping[str, str],
    rate: float,
    seconds: float,
    every: float = 0.5,
    timeout: float = 120,
    warmup: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Samples for ``seconds``; ``warmup`` runs first, while the writer already commits (a DAG's start-up
    is not a sample: the first probes would measure it, not the steady state)."""
    load_before = _load()
    checker = Checker(uris)
    writer = Writer(uris, rate)
    warmup_s = None
    if warmup is not None:
        started = time.monotonic()
        warmup()
        warmup_s = round(time.monotonic() - started, 1)
        print(f"  warm-up: {warmup_s} s", flush=True)
    sampler = Sampler(uris, every=every, timeout=timeout)
    time.sleep(seconds)
    sampler.running.clear()
    achieved = writer.stop()
    sampler.stop()
    checker.stop()
    values = sampler.latencies
    result = {
        "rate_per_s": rate,
        "probe_every_s": every,
        "warmup_s": warmup_s,
        "achieved_per_s": round(achieved + (1 / every), 1),
        "samples": len(values),
        "lost_samples": sampler.lost,
        "p50_s": _percentile(values, 0.50),
        "p95_s": _percentile(values, 0.95),
        "p99_s": _percentile(values, 0.99),
        "max_s": round(max(values), 3) if values else None,
        "oversell_observations": len(checker.violations),
        "checker_observations": checker.observations,
        "load_average": {"before": load_before, "after": _load()},
        "latencies_s": sorted(round(v, 3) for v in values),
    }
    print(
        f"  {rate:>6,.0f}/s (achieved {result['achieved_per_s']:>7,.1f}/s): {len(values):>3} samples  "
        f"p50 {result['p50_s']} s  p95 {result['p95_s']} s  p99 {result['p99_s']} s  max {result['max_s']} s  "
        f"oversell {len(checker.violations)} in {checker.observations} observations",
        flush=True,
    )
    return result


def _add_probes(uris: Mapping[str, str]) -> None:
    with connect(uris[inventory.WAREHOUSES[0]]) as conn:
        conn.execute(
            "INSERT INTO stock SELECT 'PROBE-' || lpad(g::text, 3, '0'), 0, 0, now() FROM generate_series(0, %s) g",
            (PROBES - 1,),
        )


def _write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 s per rate instead of 40 s, one 5-minute period")
    parser.add_argument("--no-variants", action="store_true", help="only the real-time DAG")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"which comparison DAGs to measure, in this order (default: {','.join(VARIANTS)})",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (Airflow home with its logs, PostgreSQL data)"
    )
    parser.add_argument("--periods", type=int, default=2, help="periods of the five-minute DAG to sample")
    parser.add_argument("--rates", default="10,100,1000")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest-latency.json")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop Airflow and PostgreSQL
    seconds = 10.0 if args.quick else 40.0
    work = Path(tempfile.mkdtemp(prefix="sync-latency-"))
    results: dict[str, Any] = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=False
        ).stdout.strip(),
        "what": "warehouse commit -> visible in every store's catalog_availability (probe SKUs, one sample "
        "every 0.5 s) while a writer commits receipts at the rate; the stream polls every 0.2 s",
        "cpus": os.cpu_count(),
        "load_average_at_start": _load(),
        "rates": [],
    }
    rates = [float(r) for r in args.rates.split(",")]
    # The stream's run covers the measurement, then ends (the DAG is paused once it streams), so no
    # run boundary (a new run to schedule) falls inside a rate's samples.
    stream_seconds = len(rates) * (seconds + 20) + 120
    with local_postgres(work / "pg") as server:
        with server.connect() as admin:
            databases.create_databases(admin, "", (*databases.INVENTORY_SOURCES, databases.INVENTORY_TARGET))
        uris = databases.connection_uris("127.0.0.1", server.port)
        inventory.seed(uris, scale=SCALE)
        _add_probes(uris)
        airflow = Airflow(server, uris, work / "airflow", stream_seconds=stream_seconds)
        try:
            print(f"airflow standalone starting in {work / 'airflow'} ...", flush=True)
            airflow.unpause("inventory_sync_realtime")
            _wait_streaming(uris, timeout=600)
            airflow.pause("inventory_sync_realtime")  # the run streams on until stream_seconds, then ends
            results["scheduler"] = (
                f"airflow standalone {airflow.version()} (scheduler, dag-processor, triggerer, api-server; "
                "LocalExecutor; metadata on PostgreSQL; DAG files re-parsed every 120 s, import timeout 300 s); "
                "DAG inventory_sync_realtime (@continuous, one streaming task)"
            )
            print(f"inventory_sync_realtime is streaming; measuring {seconds:.0f} s per rate", flush=True)
            for rate in rates:
                results["rates"].append(measure(uris, rate, seconds))
            _write(args.output, results)
            if not args.no_variants:
                results["variants"] = _variants(
                    airflow,
                    uris,
                    results["rates"],
                    seconds,
                    stream_seconds,
                    1 if args.quick else args.periods,
                    [v for v in args.variants.split(",") if v],
                )
        finally:
            airflow.stop()
    results["load_average_at_end"] = _load()
    _write(args.output, results)
    if args.keep:
        print(f"kept {work} (Airflow home: {work / 'airflow'})", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    from benchmarks.latency_plot import plot

    print(f"plot: {plot(args.output)}", flush=True)
    return 0


def _variants(
    airflow: Airflow,
    uris: Mapping[str, str],
    realtime: list[dict[str, Any]],
    seconds: float,
    stream_seconds: float,
    periods: int,
    names: list[str],
) -> dict[str, Any]:
    """The AssetWatcher and five-minute DAGs, one after the other once the stream's run ended.

    A sample is lost when it has not arrived after its timeout (10 and 15 minutes: on a loaded
    machine one DAG run of seven tasks takes minutes); a variant that fails is recorded with its
    error and the next one still runs.
    """
    variants: dict[str, Any] = {
        "inventory_sync_realtime": {
            "how": "one streaming task, micro-batches for stream_seconds per run (@continuous)",
            "rates": realtime,
        }
    }
    plan: list[tuple[str, str, dict[str, float]]] = [
        (
            "inventory_sync_on_change",
            "AssetWatchers (CdcChangesEventTrigger, poll 5 s) on both warehouses' slots start a DAG run",
            {"seconds": max(seconds, 90), "every": 5, "timeout": 600},
        ),
        (
            "inventory_sync",
            f"a DAG run every 5 minutes; probes every 30 s over {periods} period(s)",
            {"seconds": periods * 300, "every": 30, "timeout": 900},
        ),
    ]
    previous = "inventory_sync_realtime"
    unknown = set(names) - {dag_id for dag_id, _, _ in plan}
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; known: {VARIANTS}")
    for dag_id, how, options in sorted((p for p in plan if p[0] in names), key=lambda p: names.index(p[0])):
        entry: dict[str, Any] = {"how": how}
        variants[dag_id] = entry
        try:
            try:
                airflow.wait_no_running_run(previous, timeout=stream_seconds + 300)
            except RuntimeError as error:  # measured anyway: the runs share the sync state, safely
                entry["note"] = f"{error} when this variant started"
            # Just before: the scheduler may create a run while the CLI still confirms the unpause
            # (the five-minute DAG's first run did, and the warm-up then waited for the second).
            unpaused = dt.datetime.now(dt.UTC)
            airflow.unpause(dag_id)
            entry["unpause_cli_s"] = round((dt.datetime.now(dt.UTC) - unpaused).total_seconds(), 2)
            airflow.request_parse(dag_id)  # starts the AssetWatchers now, not at the next periodic parse
            print(f"{dag_id}: unpaused at {unpaused.isoformat(timespec='seconds')}; warming up", flush=True)
            warmup = functools.partial(airflow.wait_first_run, dag_id, unpaused, options["timeout"])
            entry["rates"] = [
                measure(uris, 10, options["seconds"], every=options["every"], timeout=options["timeout"], warmup=warmup)
            ]
            entry["startup"] = timeline(airflow.server, dag_id, unpaused, runs=2)
            _print_startup(entry["startup"])
            airflow.wait_idle(dag_id, timeout=options["timeout"])  # the writer stopped: the last runs end
        except Exception as error:
            entry["error"] = f"{type(error).__name__}: {error}"
            print(f"{dag_id} failed: {entry['error']}", flush=True)
        finally:
            airflow.pause(dag_id)
        previous = dag_id
    return variants


if __name__ == "__main__":
    sys.exit(main())
