"""Turn a benchmark result into the markdown tables (the targets of issue 15) and a PNG plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

LABELS = {
    "raw_limit": "raw limit: binary COPY piped straight into the empty target",
    "raw_merge": "raw: binary COPY piped into a temp stage + one MERGE",
    "raw_staged": "raw, staged: COPY to a file, then COPY into a stage + MERGE",
    "provider_incremental": "this provider, incremental",
    "provider_full": "this provider, full sync",
    "dlt_parquet": "dlt at its best: parquet loaded by ADBC (merge)",
    "dlt_default": "dlt at its default loader file format (merge)",
    "airflow_upsert_rows": "Airflow PostgresHook.upsert_rows *",
    "airflow_insert_rows_executemany": "Airflow insert_rows(replace, executemany) *",
    "airflow_generic_transfer": "Airflow GenericTransfer (replace) *",
    "pandas_copy": "pandas to_sql(method=COPY callable) append *",
    "pandas_default": "pandas to_sql(method=None, its default) append *",
    "pandas_multi": "pandas to_sql(method='multi') append **",
    "slot_read": "slot read (pgoutput peek, psql, discarded)",
    "slot_read_python": "slot read into Python (psycopg, as the provider reads)",
    "raw_cdc_limit": "raw CDC limit: slot read (psql) + COPY of the net rows + one MERGE",
    "provider_cdc": "this provider, CDC",
    "provider_cdc_per_message": "this provider, CDC, per-message decoder (reference)",
}

WORKLOADS = {
    "a": "(a) initial sync",
    "b": "(b) incremental: 10% updated + 10% new",
    "c": "(c) CDC apply",
    "e": "(e) no-change run",
}

RAW_A = ("raw_limit", "raw_merge", "raw_staged")  # the stricter (a) limit is the fastest of these
DLT = ("dlt_parquet", "dlt_default")

Target = tuple[str, str, str, bool | None]


def _entry(summary: dict[str, Any], workload: str, contender: str) -> dict[str, Any] | None:
    entry: dict[str, Any] | None = summary.get(workload, {}).get(contender)
    return entry


def _rate(summary: dict[str, Any], workload: str, contender: str) -> float | None:
    entry = _entry(summary, workload, contender)
    return entry["rows_per_s"] if entry else None


def _fastest(summary: dict[str, Any], workload: str, contenders: tuple[str, ...]) -> str | None:
    rated = [(_rate(summary, workload, c) or 0, c) for c in contenders if _rate(summary, workload, c)]
    return max(rated)[1] if rated else None


def targets(results: dict[str, Any]) -> list[Target]:
    """(target, measured, required, met) for every target of issue 15 that this run measured;
    met is None for reference rows and for targets this run could not judge."""
    summary = results["summary"]
    rows: list[Target] = []
    pct: Callable[[float], str] = "{:.0%}".format
    times: Callable[[float], str] = "{:.2f}x".format

    def ratio(
        name: str,
        workload: str,
        top: str | None,
        bottom: str | None,
        minimum: float | None,
        fmt: Callable[[float], str],
    ) -> bool:
        a = _rate(summary, workload, top) if top else None
        b = _rate(summary, workload, bottom) if bottom else None
        if a is None or b is None:
            return False
        value = a / b
        if minimum is None:
            rows.append((name, fmt(value), "(reference)", None))
        else:
            rows.append((name, fmt(value), f">= {fmt(minimum)}", value >= minimum))
        return True

    strict = _fastest(summary, "a", RAW_A)
    if strict:
        ratio(
            f"(a) provider incremental / stricter raw limit ({strict})", "a", "provider_incremental", strict, 0.7, pct
        )
        ratio(f"(a) provider full / stricter raw limit ({strict})", "a", "provider_full", strict, None, pct)
    ratio("(a) raw COPY + MERGE / raw limit (COPY straight in)", "a", "raw_merge", "raw_limit", None, pct)
    ratio(
        "(b) changed rows: provider incremental / raw COPY + MERGE", "b", "provider_incremental", "raw_merge", 0.75, pct
    )
    ratio("(b) full refresh: provider full / raw COPY + MERGE", "b", "provider_full", "raw_merge", 0.4, pct)
    ratio("(b) raw staged / raw COPY + MERGE", "b", "raw_staged", "raw_merge", None, pct)
    ratio("(c) provider CDC / raw CDC limit", "c", "provider_cdc", "raw_cdc_limit", 0.6, pct)
    if _entry(summary, "c", "provider_cdc"):
        if _entry(summary, "c", "provider_cdc_per_message"):
            ratio("(c) provider CDC / per-message decoder", "c", "provider_cdc", "provider_cdc_per_message", 2.5, times)
        else:
            rows.append(("(c) provider CDC / per-message decoder", "not run (see the notes)", ">= 2.50x", None))
    ratio("(c) provider CDC / slot read (psql)", "c", "provider_cdc", "slot_read", None, pct)
    ratio("(c) provider CDC / slot read into Python", "c", "provider_cdc", "slot_read_python", None, pct)
    for w in ("a", "b"):
        best = _fastest(summary, w, DLT)
        ratio(f"({w}) provider incremental / dlt at its best ({best})", w, "provider_incremental", best, 2.0, times)
        ratio(f"({w}) provider incremental / dlt at its default", w, "provider_incremental", "dlt_default", None, times)
        upsert = _entry(summary, w, "airflow_upsert_rows")
        if upsert:
            at_scale = upsert["rows"] >= 200_000
            added = ratio(
                f"({w}) provider incremental / upsert_rows ({upsert['rows']:,.0f} rows)",
                w,
                "provider_incremental",
                "airflow_upsert_rows",
                8.0 if at_scale else None,
                times,
            )
            if added and not at_scale:  # the target is set at >= 200k rows: a smaller subset cannot judge it
                name, measured, _, _ = rows[-1]
                rows[-1] = (name, measured, ">= 8.00x at >= 200,000 rows (not judged: smaller subset)", None)
    mem = summary.get("d", {})
    base, big = mem.get("provider_incremental_base"), mem.get("provider_incremental_big")
    if base and big:
        scale = results["scale"]
        rss = big["peak_rss_mb"]
        rows.append((f"(d) peak RSS, {scale['big_rows']:,}-row sync", f"{rss:.0f} MB", "< 400 MB", rss < 400))
        growth = rss / base["peak_rss_mb"] - 1
        rows.append(
            (
                f"(d) peak RSS {scale['big_rows']:,} vs {scale['rows']:,} rows",
                f"{growth:+.0%} ({base['peak_rss_mb']:.0f} -> {rss:.0f} MB)",
                "within 20%",
                abs(growth) <= 0.2,
            )
        )
    noop = _entry(summary, "e", "provider_incremental")
    if noop:
        seconds = noop["median_seconds"]
        rows.append(("(e) no-change run, work in the task", f"{seconds:.3f} s", "< 0.3 s", seconds < 0.3))
    prov, raw = _entry(summary, "a", "provider_incremental"), _entry(summary, "a", "raw_limit")
    if prov and raw and prov.get("cpu_seconds") and raw.get("cpu_seconds"):
        cpu = prov["cpu_seconds"] / raw["cpu_seconds"]
        rows.append(("(a) client CPU s: provider / raw limit (psql)", f"{cpu:.1f}x", "(reference)", None))
    par = summary.get("parallel", {})
    if "one_process" in par and "two_processes" in par:
        speedup = par["one_process"]["median_seconds"] / par["two_processes"]["median_seconds"]
        rows.append(("parallel: 2 key-range partitions vs 1", f"{speedup:.2f}x", "uses both cores (report)", None))
    return rows


def _checks(results: dict[str, Any]) -> list[str]:
    checks: dict[str, list[bool]] = results.get("checks") or {}
    if not checks:
        return []
    failed = {k: v for k, v in checks.items() if not all(v)}
    total = sum(len(v) for v in checks.values())
    lines = [
        "",
        f"Target == source by a full-row fingerprint (count + md5 of every row's columns) after every run: "
        f"{total - sum(v.count(False) for v in checks.values())} of {total} checks passed "
        f"({', '.join(f'{k} {sum(v)}/{len(v)}' for k, v in checks.items())}).",
    ]
    if failed:
        lines.append(f"**MISMATCH** (the run failed): {', '.join(sorted(failed))}.")
    return lines


def markdown(results: dict[str, Any]) -> str:
    summary, scale = results["summary"], results["scale"]
    failed = [k for k, v in (results.get("checks") or {}).items() if not all(v)]
    lines = [
        f"## Benchmark results ({'quick' if results['quick'] else 'full'} run, {results['when']})",
        "",
    ]
    if failed:
        lines += [f"**FAILED: a target differed from its source ({', '.join(failed)}); figures not valid.**", ""]
    lines += [
        f"Machine: {results['machine']['cpus']} CPUs, Python {results['machine']['python']}, "
        f"PostgreSQL {results['machine']['postgresql']} (embedded, loopback TCP). "
        f"{scale['rows']:,}-row table (7 columns, ~100 bytes/row); medians of {scale['rounds']} rounds; "
        f"wall time {results['wall_seconds']:.0f} s; code at commit {results.get('commit', '?')}.",
        "",
        "### Targets (issue 15)",
        "",
        "| target | measured | required | met |",
        "|---|---|---|---|",
    ]
    for name, measured, required, ok in targets(results):
        verdict = "n/a" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {name} | {measured} | {required} | {verdict} |")
    if scale["rounds"] < 3:
        lines += ["", f"Only {scale['rounds']} rounds: the targets are set on medians of >= 3; indicative only."]
    if scale.get("peer_rounds") is not None and scale["peer_rounds"] < scale["rounds"]:
        lines += ["", f"The peers (dlt, Airflow, pandas) ran in {scale['peer_rounds']} round(s) only."]
    lines += ["", "### Throughput", "", "| workload | contender | rows | median s | rows/s | peak RSS MB |"]
    lines.append("|---|---|---|---|---|---|")
    for workload in ("a", "b", "c", "e"):
        entries = summary.get(workload, {})
        for contender, entry in sorted(entries.items(), key=lambda kv: -(kv[1]["rows_per_s"] or 0)):
            lines.append(
                f"| {WORKLOADS[workload]} | {LABELS.get(contender, contender)} | {entry['rows']:,.0f} | "
                f"{entry['median_seconds']:.3f} | {entry['rows_per_s'] or 0:,.0f} | {entry['peak_rss_mb']:.0f} |"
            )
    for contender, entry in summary.get("d", {}).items():
        lines.append(
            f"| (d) peak memory | {contender.replace('provider_incremental_', 'provider, ')} | {entry['rows']:,.0f} | "
            f"{entry['median_seconds']:.3f} | {entry['rows_per_s'] or 0:,.0f} | {entry['peak_rss_mb']:.0f} |"
        )
    for contender, entry in summary.get("parallel", {}).items():
        lines.append(
            f"| parallel initial sync | provider, {contender.replace('_', ' ')} | {entry['rows']:,.0f} | "
            f"{entry['median_seconds']:.3f} | {entry['rows_per_s'] or 0:,.0f} | {entry['peak_rss_mb']:.0f} |"
        )
    raw_cdc = _entry(summary, "c", "raw_cdc_limit")
    if raw_cdc and "read_seconds" in raw_cdc:
        lines += [
            "",
            f"Raw CDC limit = slot read {raw_cdc['read_seconds']:.3f} s + apply (COPY of the net rows into a "
            f"stage + one MERGE) {raw_cdc['apply_seconds']:.3f} s (medians).",
        ]
    formats = {
        c: sorted({f for run in runs for f in run.get("file_formats", [])})
        for workload in results.get("samples", {}).values()
        for c, runs in workload.items()
        if c.startswith("dlt_")
    }
    if formats:
        lines += [
            "",
            "dlt load job file formats (its own state tables and the merge's SQL jobs included): "
            + "; ".join(f"{c}: {', '.join(f) or '?'}" for c, f in formats.items())
            + ".",
        ]
    lines += _checks(results)
    for note in results.get("notes") or []:
        lines += ["", f"Note: {note}"]
    lines += [
        "",
        f"\\* run on a subset ({scale.get('slow_rows', 0):,} rows per run); \\*\\* on {scale.get('multi_rows', 0):,} "
        "rows (row-by-row paths); their rows/s is compared as a rate and their target is checked against the "
        "same subset of the source. pandas `to_sql` appends only, so it has no (b) figure.",
        "(b) rows = changed + new rows; the full sync reads the whole table to apply them (and to detect deletes).",
        "",
    ]
    return "\n".join(lines)


def _color(contender: str) -> str:
    if contender.startswith("provider"):
        return "tab:green"
    if contender.startswith(("raw", "slot")):
        return "dimgray"
    return "silver"


def plot(results: dict[str, Any], path: Path) -> bool:
    """Write the PNG; False (and no plot) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    panels = [w for w in ("a", "b", "c") if summary.get(w)]
    mem = summary.get("d", {})
    heights = [max(len(summary[w]), 2) for w in panels] + ([2] if mem else [])
    if not heights:
        return False
    fig, axes = plt.subplots(
        len(heights), 1, figsize=(11, 1.8 + 0.38 * sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    axes = axes[:, 0]
    fig.suptitle("green: this provider; dark: raw paths (no Python per row); light: peers")
    for ax, workload in zip(axes, panels, strict=False):
        entries = sorted(summary[workload].items(), key=lambda kv: kv[1]["rows_per_s"] or 0)
        names = [LABELS.get(c, c) for c, _ in entries]
        rates = [e["rows_per_s"] or 0 for _, e in entries]
        ax.barh(names, rates, color=[_color(c) for c, _ in entries])
        ax.set_xscale("log")
        ax.set_title(WORKLOADS[workload] + ": rows/s (log scale)")
        for y, rate in enumerate(rates):
            ax.text(rate, y, f" {rate:,.0f}", va="center", fontsize=8)
    if mem:
        ax = axes[-1]
        bars = [(k.replace("provider_incremental_", "provider initial sync, "), v) for k, v in mem.items()]
        labels = [f"{label} ({v['rows']:,.0f} rows)" for label, v in bars]
        ax.barh(labels, [v["peak_rss_mb"] for _, v in bars], color="tab:blue")
        ax.axvline(400, color="tab:red", linestyle="--", label="400 MB target")
        ax.legend(loc="lower right")
        ax.set_title("(d) peak RSS of the sync process (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
