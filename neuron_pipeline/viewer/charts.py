"""Inline SVG charts drawn in Python: score histograms and the score-by-layer figure.

Charts use presentation attributes only (no ``style=``), so the pages' strict
Content-Security-Policy applies to them unchanged; every label goes through :func:`esc`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from neuron_pipeline.viewer.safe import esc

PALETTE = ["#2563eb", "#db2777", "#059669", "#ea580c", "#7c3aed", "#0891b2", "#ca8a04", "#4b5563"]
GOOD_SCORE = 0.8  # the paper's bar for a well-explained neuron

# Score histogram bins: [-1, 1] in steps of 0.1.
BIN_EDGES = [round(-1 + 0.1 * i, 1) for i in range(21)]


def histogram_counts(scores: Sequence[float]) -> list[int]:
    counts = [0] * (len(BIN_EDGES) - 1)
    for score in scores:
        if score is None or not math.isfinite(score):
            continue
        index = int(math.floor((min(max(score, -1.0), 1.0) + 1.0) / 0.1 + 1e-9))
        counts[min(index, len(counts) - 1)] += 1
    return counts


def _fmt(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".") if abs(value) >= 10 else f"{value:.2f}".rstrip("0").rstrip(".")


def histogram_svg(
    counts: Sequence[int],
    *,
    color: str = PALETTE[0],
    width: int = 240,
    height: int = 56,
    axis: bool = False,
    label: str = "score distribution",
) -> str:
    """Bars of neuron counts per score bin; each bar's tooltip gives its range and count."""
    pad_left, pad_right = (34, 8) if axis else (2, 2)
    pad_top, pad_bottom = (10, 26) if axis else (3, 12)
    plot_w, plot_h = width - pad_left - pad_right, height - pad_top - pad_bottom
    total = sum(counts)
    peak = max(counts) if counts and max(counts) > 0 else 1
    n = len(counts)
    bar_w = plot_w / n

    def x_of(score: float) -> float:
        return pad_left + (score + 1.0) / 2.0 * plot_w

    parts = [
        f'<svg class="chart hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{esc(label)}: {total} neurons" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{esc(label)}: {total} neurons</title>",
    ]
    base_y = pad_top + plot_h
    if axis:
        for frac in (0.5, 1.0):
            y = base_y - frac * plot_h
            parts.append(f'<line x1="{pad_left}" x2="{width - pad_right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
            parts.append(f'<text x="{pad_left - 5}" y="{y + 3.5:.1f}" text-anchor="end" class="tick">{round(peak * frac)}</text>')
    for i, count in enumerate(counts):
        if count <= 0:
            continue
        h = max(1.0, count / peak * plot_h)
        lo, hi = BIN_EDGES[i], BIN_EDGES[i + 1]
        fill = color
        parts.append(
            f'<rect x="{pad_left + i * bar_w + 0.5:.1f}" y="{base_y - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="{fill}" fill-opacity="{0.95 if lo >= GOOD_SCORE - 1e-9 else 0.7}">'
            f"<title>score {lo:.1f} to {hi:.1f}: {count} neuron{'s' if count != 1 else ''}</title></rect>"
        )
    parts.append(f'<line x1="{pad_left}" x2="{width - pad_right}" y1="{base_y}" y2="{base_y}" class="axis"/>')
    # Reference marks at 0 and at the paper's 0.8 bar.
    for mark, cls in ((0.0, "zero"), (GOOD_SCORE, "good")):
        x = x_of(mark)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad_top}" y2="{base_y}" class="ref {cls}"/>')
    ticks = (-1.0, -0.5, 0.0, 0.5, GOOD_SCORE, 1.0) if axis else (-1.0, 0.0, 1.0)
    for tick in ticks:
        x = x_of(tick)
        anchor = "start" if tick == -1.0 and not axis else "end" if tick == 1.0 and not axis else "middle"
        parts.append(
            f'<text x="{x:.1f}" y="{base_y + (14 if axis else 10)}" text-anchor="{anchor}" class="tick">{_fmt(tick)}</text>'
        )
    if axis:
        parts.append(f'<text x="{pad_left + plot_w / 2:.1f}" y="{height - 2}" text-anchor="middle" class="axis-label">score</text>')
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class LayerStats:
    layer: str
    n: int
    mean: float | None
    p10: float | None
    p25: float | None
    median: float | None
    p75: float | None
    p90: float | None


@dataclass(frozen=True)
class Series:
    label: str
    color: str
    stats: list[LayerStats]


def score_by_layer_svg(layers: Sequence[str], series: Sequence[Series], *, width: int = 760, height: int = 320) -> str:
    """Per layer and series: a box (25th-75th percentile), whiskers (10th-90th), the median tick,
    and the mean joined across layers — the paper's "scores fall with depth" figure."""
    pad_left, pad_right, pad_top, pad_bottom = 46, 14, 16, 42
    plot_w, plot_h = width - pad_left - pad_right, height - pad_top - pad_bottom
    values = [v for s in series for st in s.stats for v in (st.p10, st.p90, st.mean) if v is not None]
    lo = min([0.0, *values])
    lo = math.floor(lo * 5) / 5  # round down to a multiple of 0.2
    hi = 1.0 if not values or max(values) <= 1.0 else math.ceil(max(values) * 5) / 5
    span = hi - lo or 1.0
    slot = plot_w / max(len(layers), 1)
    position = {layer: i for i, layer in enumerate(layers)}

    def y_of(value: float) -> float:
        return pad_top + (hi - value) / span * plot_h

    parts = [
        f'<svg class="chart by-layer" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="score by layer" xmlns="http://www.w3.org/2000/svg">',
        "<title>Explanation score by layer: mean (line), median, 25th-75th and 10th-90th percentiles</title>",
    ]
    ticks = []
    tick = lo
    while tick <= hi + 1e-9:
        ticks.append(round(tick, 1))
        tick += 0.2
    for value in ticks:
        y = y_of(value)
        cls = "grid zero-line" if abs(value) < 1e-9 else "grid"
        parts.append(f'<line x1="{pad_left}" x2="{width - pad_right}" y1="{y:.1f}" y2="{y:.1f}" class="{cls}"/>')
        parts.append(f'<text x="{pad_left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{value:.1f}</text>')
    if lo <= GOOD_SCORE <= hi:
        y = y_of(GOOD_SCORE)
        parts.append(f'<line x1="{pad_left}" x2="{width - pad_right}" y1="{y:.1f}" y2="{y:.1f}" class="ref good"/>')
        parts.append(f'<text x="{width - pad_right - 2}" y="{y - 4:.1f}" text-anchor="end" class="tick good">0.8</text>')
    # Layer labels: thin them out so they never overlap.
    every = max(1, math.ceil(len(layers) / (plot_w / 28)))
    for i, layer in enumerate(layers):
        if i % every == 0 or i == len(layers) - 1:
            x = pad_left + (i + 0.5) * slot
            parts.append(f'<text x="{x:.1f}" y="{pad_top + plot_h + 16}" text-anchor="middle" class="tick">{esc(layer)}</text>')
    parts.append(
        f'<text x="{pad_left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle" class="axis-label">layer</text>'
        f'<text x="12" y="{pad_top + plot_h / 2:.1f}" text-anchor="middle" class="axis-label" '
        f'transform="rotate(-90 12 {pad_top + plot_h / 2:.1f})">score</text>'
    )
    k = max(len(series), 1)
    box_w = max(min(slot * 0.7 / k, 18.0), 2.0)
    for s_index, s in enumerate(series):
        offset = (s_index - (k - 1) / 2) * box_w * 1.15
        mean_points = []
        for st in s.stats:
            if st.layer not in position or st.n == 0:
                continue
            cx = pad_left + (position[st.layer] + 0.5) * slot + offset
            tip = (
                f"layer {st.layer}, {s.label}: {st.n} neurons; mean {_num(st.mean)}, median {_num(st.median)}, "
                f"25-75th pct {_num(st.p25)} to {_num(st.p75)}, 10-90th pct {_num(st.p10)} to {_num(st.p90)}"
            )
            parts.append(f"<g><title>{esc(tip)}</title>")
            if st.p10 is not None and st.p90 is not None:
                parts.append(
                    f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y_of(st.p90):.1f}" y2="{y_of(st.p10):.1f}" '
                    f'stroke="{s.color}" stroke-width="1.2" stroke-opacity="0.8"/>'
                )
            if st.p25 is not None and st.p75 is not None:
                top, bottom = y_of(st.p75), y_of(st.p25)
                parts.append(
                    f'<rect x="{cx - box_w / 2:.1f}" y="{top:.1f}" width="{box_w:.1f}" height="{max(bottom - top, 1):.1f}" '
                    f'fill="{s.color}" fill-opacity="0.22" stroke="{s.color}" stroke-width="1" rx="1.5"/>'
                )
            if st.median is not None:
                y = y_of(st.median)
                parts.append(
                    f'<line x1="{cx - box_w / 2:.1f}" x2="{cx + box_w / 2:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                    f'stroke="{s.color}" stroke-width="2"/>'
                )
            parts.append("</g>")
            if st.mean is not None:
                mean_points.append((cx, y_of(st.mean)))
        if len(mean_points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in mean_points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="2" stroke-linejoin="round"/>')
        for x, y in mean_points:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.2" fill="#fff" stroke="{s.color}" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
