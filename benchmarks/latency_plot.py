"""The plot of ``latest-latency.json`` (``python -m benchmarks.latency_plot [json]``): the latency
distribution of each rate of the real-time DAG and of each variant, as box plots over the samples
on a log scale (a second for the stream, minutes for the five-minute DAG), with the targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
#: p95 targets of issue 16 per rate (changes/s) of the real-time DAG.
TARGETS = {100.0: 1.0, 1000.0: 2.0}


def _series(results: dict[str, Any]) -> list[tuple[str, dict[str, Any], float | None]]:
    series = [
        (f"real-time\n{r['rate_per_s']:,.0f}/s", r, TARGETS.get(float(r["rate_per_s"])))
        for r in results.get("rates", [])
    ]
    names = {"inventory_sync_on_change": "AssetWatcher", "inventory_sync": "every 5 min"}
    for dag_id, label in names.items():
        for r in (results.get("variants") or {}).get(dag_id, {}).get("rates", []):
            steady = "\nafter warm-up" if r.get("warmup_s") is not None else ""  # see benchmarks.latency.measure
            series.append((f"{label}\n{r['rate_per_s']:,.0f}/s{steady}", r, None))
    return series


def plot(source: Path = RESULTS / "latest-latency.json", target: Path | None = None) -> Path | None:
    """Write the PNG next to ``source`` (``latency.png``); None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(source.read_text())
    series = [s for s in _series(results) if s[1].get("latencies_s")]
    target = target or source.parent / "latency.png"
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ax.boxplot([s[1]["latencies_s"] for s in series], whis=(5, 95), showfliers=True)
    ax.set_xticks(range(1, len(series) + 1), [s[0] for s in series])
    for i, (_, record, goal) in enumerate(series, start=1):
        p95 = record["p95_s"]
        ax.annotate(f"p95 {p95:.2f} s", (i, p95), textcoords="offset points", xytext=(8, 0), fontsize=8)
        if goal is not None:
            ax.hlines(goal, i - 0.35, i + 0.35, colors="tab:red", linestyles="dashed")
    ax.set_yscale("log")
    ax.set_ylabel("warehouse commit -> every store (s, log)")
    load = results.get("load_average_at_start")
    ax.set_title(
        f"inventory latency under airflow standalone ({results.get('cpus')} CPUs, load {load[0] if load else '?'}); "
        "whiskers p5-p95, red: p95 target",
        fontsize=9,
    )
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


if __name__ == "__main__":
    print(plot(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "latest-latency.json"))
