"""Where one micro-batch of ``inventory_sync_realtime`` spends its time, outside Airflow.

``python -m benchmarks.latency_profile [rates]`` (default ``100,1000``): an embedded PostgreSQL with
the latency benchmark's data, one :class:`case_studies.inventory.RealtimeInventory`, and per rate a
writer (:class:`benchmarks.latency.Writer`) while ``step()`` runs back to back for 12 s.  Prints the
mean and median micro-batch and the mean of each phase, and writes a pyinstrument profile of ten
batches per rate (main thread: the two warehouses' CDC batches run in threads and show as a wait)
to ``benchmarks/results/latency-profile-<rate>.txt``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow_sync_provider.core import StagingArea
from benchmarks.latency import SCALE, Writer, _add_probes
from case_studies import databases, inventory
from sync_dev.local_postgres import local_postgres

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = {
    "_stream_stock": "stock CDC (both warehouses at once)",
    "recompute": "recompute (ATP, gate, outbox)",
    "_check": "GX gate",
    "push": "push to the stores",
}


def _timed(obj: Any, name: str, label: str, phases: dict[str, list[float]]) -> None:
    inner: Callable[..., Any] = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            phases.setdefault(label, []).append(time.perf_counter() - started)

    setattr(obj, name, wrapper)


def main(argv: list[str]) -> int:
    import pyinstrument

    rates = [float(r) for r in (argv[0] if argv else "100,1000").split(",")]
    work = Path(tempfile.mkdtemp(prefix="sync-latency-profile-"))
    out: dict[str, Any] = {}
    with local_postgres(work / "pg") as server:
        with server.connect() as admin:
            databases.create_databases(admin, "", (*databases.INVENTORY_SOURCES, databases.INVENTORY_TARGET))
        uris = databases.connection_uris("127.0.0.1", server.port)
        inventory.seed(uris, scale=SCALE)
        _add_probes(uris)
        with inventory.RealtimeInventory(uris, staging=StagingArea(work / "staging")) as stream:
            stream.step()  # the snapshot
            phases: dict[str, list[float]] = {}
            for name, label in PHASES.items():
                _timed(stream, name, label, phases)
            for orders in stream.order_streams.values():
                _timed(orders, "probe", "orders probe", phases)
            for rate in rates:
                phases.clear()
                writer = Writer(uris, rate)
                time.sleep(1.0)
                profiler = pyinstrument.Profiler(interval=0.001)
                batches: list[tuple[float, int]] = []
                deadline = time.monotonic() + 12
                while time.monotonic() < deadline:
                    profiled = 3 <= len(batches) < 13
                    if profiled:
                        profiler.start()
                    started = time.perf_counter()
                    outcome = stream.step()
                    batches.append((time.perf_counter() - started, outcome.changes))
                    if profiled:
                        profiler.stop()
                writer.stop()
                RESULTS.mkdir(exist_ok=True)
                (RESULTS / f"latency-profile-{rate:.0f}.txt").write_text(profiler.output_text(color=False))
                seconds = [s for s, _ in batches[3:]] or [s for s, _ in batches]
                out[f"{rate:.0f}"] = {
                    "batches": len(seconds),
                    "batch_mean_s": round(statistics.mean(seconds), 3),
                    "batch_median_s": round(statistics.median(seconds), 3),
                    "changes_per_batch": round(statistics.mean(c for _, c in batches[3:] or batches), 1),
                    "phase_mean_s": {k: round(statistics.mean(v), 3) for k, v in phases.items()},
                }
                print(f"{rate:,.0f}/s: {json.dumps(out[f'{rate:.0f}'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
