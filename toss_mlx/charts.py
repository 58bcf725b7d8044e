"""Charts as inline SVG strings: no plotting library, no scripts, no fonts to fetch.

Each function takes plain numbers and returns one `<svg>` element sized in
CSS pixels that scales to the page width. Every bar and point carries a
`<title>`, so hovering it in a browser shows its exact numbers.
"""

from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 720, 300
MARGIN = {"left": 64, "right": 20, "top": 24, "bottom": 56}
KEPT, REMOVED, ACCENT, GRID, TEXT = "#94a3b8", "#dc2626", "#1d4ed8", "#e2e8f0", "#1e293b"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2g}"
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _percent(v: float) -> str:
    return f"{100 * v:.0f}%"


class _Frame:
    """Maps data coordinates to pixels inside the plot area and draws the axes."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float,
                 width: int = WIDTH, height: int = HEIGHT):
        self.x0, self.x1 = x0, (x1 if x1 > x0 else x0 + 1)
        self.y0, self.y1 = y0, (y1 if y1 > y0 else y0 + 1)
        self.w, self.h = width, height
        self.left, self.right = MARGIN["left"], width - MARGIN["right"]
        self.top, self.bottom = MARGIN["top"], height - MARGIN["bottom"]

    def x(self, v: float) -> float:
        return self.left + (v - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def y(self, v: float) -> float:
        return self.bottom - (v - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def axes(self, xlabel: str, ylabel: str, xticks: list[float] | None,
             yticks: list[float], yfmt=fmt) -> list[str]:
        out = []
        for t in yticks:
            py = self.y(t)
            out.append(f'<line x1="{self.left}" y1="{py:.1f}" x2="{self.right}" y2="{py:.1f}" '
                       f'stroke="{GRID}"/>')
            out.append(f'<text x="{self.left - 6}" y="{py + 4:.1f}" text-anchor="end">{yfmt(t)}</text>')
        for t in xticks or []:
            px = self.x(t)
            out.append(f'<line x1="{px:.1f}" y1="{self.bottom}" x2="{px:.1f}" y2="{self.bottom + 4}" '
                       f'stroke="{TEXT}"/>')
            out.append(f'<text x="{px:.1f}" y="{self.bottom + 18}" text-anchor="middle">{fmt(t)}</text>')
        out.append(f'<line x1="{self.left}" y1="{self.bottom}" x2="{self.right}" y2="{self.bottom}" '
                   f'stroke="{TEXT}"/>')
        out.append(f'<line x1="{self.left}" y1="{self.top}" x2="{self.left}" y2="{self.bottom}" '
                   f'stroke="{TEXT}"/>')
        out.append(f'<text x="{(self.left + self.right) / 2:.1f}" y="{self.h - 12}" '
                   f'text-anchor="middle" class="label">{escape(xlabel)}</text>')
        cy = (self.top + self.bottom) / 2
        out.append(f'<text x="14" y="{cy:.1f}" text-anchor="middle" class="label" '
                   f'transform="rotate(-90 14 {cy:.1f})">{escape(ylabel)}</text>')
        return out

    def svg(self, body: list[str], label: str) -> str:
        return (f'<svg class="chart" viewBox="0 0 {self.w} {self.h}" role="img" '
                f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg" '
                f'font-family="system-ui, sans-serif" font-size="11" fill="{TEXT}">'
                + "".join(body) + "</svg>")


def histogram_svg(edges: list[float], kept: list[int], removed: list[int],
                  threshold: float | None, xlabel: str = "token score S") -> str:
    """Stacked histogram (kept below, removed on top) with a dashed threshold line."""
    top = max([k + r for k, r in zip(kept, removed, strict=True)] + [1])
    f = _Frame(edges[0], edges[-1], 0, top * 1.08)
    body = f.axes(xlabel, "tokens", nice_ticks(edges[0], edges[-1], 8), nice_ticks(0, top, 5))
    for i, (k, r) in enumerate(zip(kept, removed, strict=True)):
        xa, xb = f.x(edges[i]), f.x(edges[i + 1])
        tip = (f"S in [{fmt(edges[i])}, {fmt(edges[i + 1])}): {k + r} tokens, "
               f"{r} removed, {k} kept")
        for y0, y1, colour in ((0, k, KEPT), (k, k + r, REMOVED)):
            if y1 > y0:
                body.append(f'<rect x="{xa:.1f}" y="{f.y(y1):.1f}" width="{max(xb - xa - 0.5, 0.5):.1f}" '
                            f'height="{f.y(y0) - f.y(y1):.1f}" fill="{colour}"><title>{tip}</title></rect>')
    if threshold is not None and edges[0] <= threshold <= edges[-1]:
        px = f.x(threshold)
        body.append(f'<line x1="{px:.1f}" y1="{f.top}" x2="{px:.1f}" y2="{f.bottom}" stroke="{TEXT}" '
                    f'stroke-width="1.5" stroke-dasharray="5 3"><title>threshold S = {threshold:.4g}'
                    f'</title></line>')
        body.append(f'<text x="{px + 4:.1f}" y="{f.top + 10}">threshold {fmt(threshold)}</text>')
    body += _legend(f, [(KEPT, "kept"), (REMOVED, "removed")])
    return f.svg(body, "histogram of token scores")


def bars_svg(labels: list[str], rates: list[float], counts: list[tuple[int, int]],
             overall: float | None, xlabel: str, ylabel: str) -> str:
    """Bars of rates (0-1) per category; `counts` are (removed, total) shown on hover."""
    n = len(labels)
    top = max(rates + [overall or 0, 1e-9]) * 1.15
    f = _Frame(0, max(n, 1), 0, top)
    body = f.axes(xlabel, ylabel, None, nice_ticks(0, top, 5), yfmt=_percent)
    slot = (f.right - f.left) / max(n, 1)
    for i, (label, r, (k, total)) in enumerate(zip(labels, rates, counts, strict=True)):
        xa = f.left + i * slot + slot * 0.12
        body.append(f'<rect x="{xa:.1f}" y="{f.y(r):.1f}" width="{slot * 0.76:.1f}" '
                    f'height="{f.y(0) - f.y(r):.1f}" fill="{REMOVED}"><title>position {escape(label)}: '
                    f'{k} of {total} tokens removed ({100 * r:.1f}%)</title></rect>')
        body.append(f'<text x="{xa + slot * 0.38:.1f}" y="{f.bottom + 16}" '
                    f'text-anchor="middle">{escape(label)}</text>')
    if overall is not None:
        py = f.y(overall)
        body.append(f'<line x1="{f.left}" y1="{py:.1f}" x2="{f.right}" y2="{py:.1f}" stroke="{ACCENT}" '
                    f'stroke-dasharray="5 3"><title>all response tokens: {100 * overall:.1f}%</title></line>')
        body.append(f'<text x="{f.right - 4}" y="{py - 4:.1f}" text-anchor="end" fill="{ACCENT}">'
                    f'overall {100 * overall:.1f}%</text>')
    return f.svg(body, ylabel + " by " + xlabel)


def scatter_svg(points: list[dict], xlabel: str, ylabel: str, x_is_rate: bool) -> str:
    """Labelled points with optional 95% intervals: dicts of label, x, y, x_ci, y_ci (pairs or None)."""
    xs = [p["x"] for p in points] + [v for p in points for v in (p.get("x_ci") or [])]
    x0, x1 = (0.0, 1.0) if x_is_rate else (min(xs), max(xs))
    if not x_is_rate:
        pad = (x1 - x0) * 0.1 or max(abs(x0) * 0.1, 0.1)
        x0, x1 = x0 - pad, x1 + pad
    f = _Frame(x0, x1, 0, 1)
    body = f.axes(xlabel, ylabel, nice_ticks(x0, x1, 6), nice_ticks(0, 1, 5), yfmt=_percent)
    used: list[tuple[float, float]] = []
    palette = ["#1d4ed8", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4d7c0f"]
    for i, p in enumerate(points):
        colour = palette[i % len(palette)]
        px, py = f.x(p["x"]), f.y(p["y"])
        if p.get("y_ci"):
            body.append(f'<line x1="{px:.1f}" y1="{f.y(p["y_ci"][0]):.1f}" x2="{px:.1f}" '
                        f'y2="{f.y(p["y_ci"][1]):.1f}" stroke="{colour}" stroke-width="1.5"/>')
        if p.get("x_ci"):
            body.append(f'<line x1="{f.x(p["x_ci"][0]):.1f}" y1="{py:.1f}" x2="{f.x(p["x_ci"][1]):.1f}" '
                        f'y2="{py:.1f}" stroke="{colour}" stroke-width="1.5"/>')
        xv = f"{100 * p['x']:.1f}%" if x_is_rate else f"{p['x']:.4g}"
        body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{colour}"><title>'
                    f'{escape(p["label"])}: {escape(ylabel)} {100 * p["y"]:.1f}%, {escape(xlabel)} {xv}'
                    f'</title></circle>')
        ly = py - 8
        while any(abs(ly - uy) < 13 and abs(px - ux) < 80 for ux, uy in used):
            ly += 14  # points that coincide get their labels stacked, not overprinted
        used.append((px, ly))
        body.append(f'<text x="{px + 8:.1f}" y="{ly:.1f}" fill="{colour}">{escape(p["label"])}</text>')
    return f.svg(body, f"{ylabel} against {xlabel}")


def _legend(f: _Frame, items: list[tuple[str, str]]) -> list[str]:
    out, x = [], f.right - 90 * len(items)
    for colour, label in items:
        out.append(f'<rect x="{x}" y="{f.top - 16}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="{f.top - 7}">{escape(label)}</text>')
        x += 90
    return out


PALETTE = ["#1d4ed8", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4d7c0f"]


def lines_svg(categories: list[str], series: list[dict], xlabel: str, ylabel: str,
              y_is_rate: bool, connect: bool = True) -> str:
    """One line (or row of points) per series over evenly spaced categories.

    series: dicts of label, values (a float or None per category) and optional
    cis (a [lo, hi] pair or None per category), drawn as whiskers. Rates run
    from 0 to 1; other values get a range with 0 in it (a gap's sign shows).
    """
    vals = [v for s in series for v in s["values"] if v is not None]
    vals += [b for s in series for ci in (s.get("cis") or []) if ci for b in ci]
    if y_is_rate:
        y0, y1 = 0.0, 1.0
    else:
        y0, y1 = min(vals + [0.0]), max(vals + [0.0])
        pad = (y1 - y0) * 0.08 or 0.1
        y0, y1 = y0 - pad, y1 + pad
    n = max(len(categories), 1)
    f = _Frame(-0.5, n - 0.5, y0, y1)
    body = f.axes(xlabel, ylabel, None, nice_ticks(y0, y1, 5), yfmt=_percent if y_is_rate else fmt)
    for i, cat in enumerate(categories):
        body.append(f'<text x="{f.x(i):.1f}" y="{f.bottom + 16}" text-anchor="middle">{escape(cat)}</text>')
    if not y_is_rate and y0 < 0 < y1:
        body.append(f'<line x1="{f.left}" y1="{f.y(0):.1f}" x2="{f.right}" y2="{f.y(0):.1f}" '
                    f'stroke="{TEXT}" stroke-dasharray="3 3"/>')
    for j, s in enumerate(series):
        colour = PALETTE[j % len(PALETTE)]
        dx = (j - (len(series) - 1) / 2) * min(6.0, 40.0 / max(len(series), 1))  # whiskers side by side
        points = [(f.x(i) + dx, f.y(v), i, v) for i, v in enumerate(s["values"]) if v is not None]
        if connect and len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in points)
            body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        cis = s.get("cis") or [None] * len(s["values"])
        for px, py, i, v in points:
            if cis[i]:
                body.append(f'<line x1="{px:.1f}" y1="{f.y(cis[i][0]):.1f}" x2="{px:.1f}" '
                            f'y2="{f.y(cis[i][1]):.1f}" stroke="{colour}" stroke-width="1.5"/>')
            shown = f"{100 * v:.1f}%" if y_is_rate else f"{v:.4g}"
            body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{colour}"><title>'
                        f'{escape(s["label"])}, {escape(categories[i])}: {escape(ylabel)} {shown}'
                        f'</title></circle>')
    body += _series_legend(f, [(PALETTE[j % len(PALETTE)], s["label"]) for j, s in enumerate(series)])
    return f.svg(body, f"{ylabel} by {xlabel}")


def _series_legend(f: _Frame, items: list[tuple[str, str]]) -> list[str]:
    """Legend entries in a row above the plot, left to right."""
    out, x = [], f.left
    for colour, label in items:
        out.append(f'<rect x="{x}" y="{f.top - 16}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="{f.top - 7}">{escape(label)}</text>')
        x += 20 + 7 * len(label)
    return out
