"""Inline SVG charts of a sync's runs, drawn server-side: no JavaScript, no CDN, readable in any browser.

Two charts share the x axis (one slot per run, oldest left): rows changed per run as stacked bars
(inserted, updated, deleted) and the run's latency (extract + load seconds) as a line.  Every mark
has a ``<title>`` (the browser's tooltip) naming the run and its figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from airflow_sync_provider.core.status import RunSummary

WIDTH = 760
HEIGHT = 180
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 12, 14, 26
COLOURS = {"inserted": "#2f855a", "updated": "#3182ce", "deleted": "#c53030", "latency": "#6b46c1"}


def _nice_max(value: float) -> float:
    """The smallest 1/2/5 x 10^n at or above ``value`` (axis top), at least 1."""
    if value <= 1:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return float(step * magnitude)
    return float(10 * magnitude)


def _frame(title: str, top: float, unit: str) -> list[str]:
    plot_h = HEIGHT - _TOP - _BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for i in range(5):  # horizontal grid lines with their values
        y = _TOP + plot_h * i / 4
        value = top * (4 - i) / 4
        label = f"{value:,.0f}" if top >= 4 else f"{value:,.2f}"
        parts.append(f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{label}{unit}</text>')
    return parts


def _x_labels(runs: Sequence[RunSummary], slot: float) -> list[str]:
    if not runs:
        return []
    shown = {0, len(runs) - 1, len(runs) // 2}
    parts = []
    for i in sorted(shown):
        x = _LEFT + slot * (i + 0.5)
        parts.append(
            f'<text x="{x:.1f}" y="{HEIGHT - 8}" text-anchor="middle" class="tick">'
            f"{escape(runs[i].at.strftime('%m-%d %H:%M'))}</text>"
        )
    return parts


def rows_chart(runs: Sequence[RunSummary]) -> str:
    """Stacked bars of inserted/updated/deleted rows per run."""
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    top = _nice_max(max((r.inserted + r.updated + r.deleted for r in runs), default=0))
    parts = _frame("Rows changed per run", top, "")
    slot = plot_w / max(len(runs), 1)
    bar = max(min(slot * 0.7, 40), 1)
    for i, run in enumerate(runs):
        x = _LEFT + slot * i + (slot - bar) / 2
        base = _TOP + plot_h
        for kind in ("inserted", "updated", "deleted"):
            value = getattr(run, kind)
            if not value:
                continue
            h = plot_h * value / top
            base -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{COLOURS[kind]}">'
                f"<title>{escape(run.run_id)}: {value:,} {kind}</title></rect>"
            )
    parts += _x_labels(runs, slot)
    if not runs:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="tick">no loads yet</text>')
    parts.append("</svg>")
    return "".join(parts)


def latency_chart(runs: Sequence[RunSummary]) -> str:
    """A line of each run's extract + load seconds."""
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    top = _nice_max(max((r.seconds for r in runs), default=0.0))
    parts = _frame("Latency per run (seconds)", top, " s")
    slot = plot_w / max(len(runs), 1)
    points = []
    for i, run in enumerate(runs):
        x = _LEFT + slot * (i + 0.5)
        y = _TOP + plot_h * (1 - run.seconds / top)
        points.append((x, y, run))
    if len(points) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{COLOURS["latency"]}" stroke-width="2"/>')
    for x, y, run in points:
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{COLOURS["latency"]}">'
            f"<title>{escape(run.run_id)}: {run.seconds:.2f} s</title></circle>"
        )
    parts += _x_labels(runs, slot)
    parts.append("</svg>")
    return "".join(parts)


__all__ = ["COLOURS", "latency_chart", "rows_chart"]
