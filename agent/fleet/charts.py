"""Server-rendered SVG line charts of values over time (no scripts, nothing from elsewhere)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


def fmt_ns(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_value(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def time_series_svg(
    series: Mapping[str, Sequence[tuple[int, float]]],
    *,
    title: str,
    unit: str,
    css_class: str,
    width: int = 640,
    height: int = 200,
) -> str:
    """One line per named series of (time_ns, value) points; an empty chart says so.

    The y axis starts at 0 (or the lowest value when one is negative), so a flat line at a
    healthy FPS does not look like a cliff; every polyline carries data-series and
    data-points so a test (or a person with devtools) can check what was drawn.
    """
    label = html.escape(f"{title} ({unit})")
    points = [p for values in series.values() for p in values]
    if not points:
        return (
            f'<svg class="chart {css_class} empty" width="{width}" height="60" role="img" '
            f'aria-label="{label}"><title>{label}</title>'
            f'<text x="10" y="30">{html.escape(title)}: no data reported yet</text></svg>'
        )
    pad_l, pad_r, pad_t, pad_b = 56, 16, 24, 28
    t_min = min(t for t, _ in points)
    t_max = max(t for t, _ in points)
    v_min = min(0.0, min(v for _, v in points))
    v_max = max(v for _, v in points)
    if v_max <= v_min:
        v_max = v_min + 1.0
    t_span = max(1, t_max - t_min)
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b

    def xy(t: int, v: float) -> tuple[float, float]:
        x = pad_l + (t - t_min) / t_span * plot_w if t_max > t_min else pad_l + plot_w / 2
        y = pad_t + plot_h - (v - v_min) / (v_max - v_min) * plot_h
        return x, y

    legend_h = 18 * len(series)
    parts = [
        f'<svg class="chart {css_class}" width="{width}" height="{height + legend_h}" '
        f'role="img" aria-label="{label}"><title>{label}</title>',
        f'<text x="{pad_l}" y="14" font-size="12" font-weight="bold">{html.escape(title)}'
        f" ({html.escape(unit)})</text>",
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" '
        'stroke="#444"/>',
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + plot_h}" stroke="#444"/>',
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l + plot_w}" y2="{pad_t}" stroke="#ddd"/>',
        f'<text class="y-max" x="4" y="{pad_t + 4}" font-size="11">{_fmt_value(v_max)}</text>',
        f'<text class="y-min" x="4" y="{pad_t + plot_h}" font-size="11">{_fmt_value(v_min)}</text>',
        f'<text x="{pad_l}" y="{height - 8}" font-size="11">{fmt_ns(t_min)}</text>',
        f'<text x="{pad_l + plot_w - 118}" y="{height - 8}" font-size="11">{fmt_ns(t_max)}</text>',
    ]
    for n, (name, values) in enumerate(sorted(series.items())):
        color = COLORS[n % len(COLORS)]
        coords = [xy(t, v) for t, v in values]
        if len(coords) == 1:
            x, y = coords[0]
            parts.append(
                f'<circle data-series="{html.escape(name)}" data-points="1" cx="{x:.1f}" '
                f'cy="{y:.1f}" r="3" fill="{color}"/>'
            )
        elif coords:
            text = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            parts.append(
                f'<polyline data-series="{html.escape(name)}" data-points="{len(coords)}" '
                f'fill="none" stroke="{color}" stroke-width="2" points="{text}"/>'
            )
        ly = height + 18 * n + 8
        last = f"{_fmt_value(values[-1][1])} {unit} now" if values else "no data"
        parts.append(f'<rect x="{pad_l}" y="{ly - 9}" width="10" height="10" fill="{color}"/>')
        parts.append(
            f'<text class="legend" x="{pad_l + 16}" y="{ly}" font-size="12">'
            f"{html.escape(name)}: {html.escape(last)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
