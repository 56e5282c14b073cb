"""GPU-hours per queue over time buckets, drawn server-side as an inline SVG (no chart library, no script).

Each bucket is one call of the API's usage function for that caller, so a team sees its own queues and the
pool's idle hours, exactly as GET /v1/usage would answer for the same range.
"""

from __future__ import annotations

import datetime as dt
from html import escape
from typing import Any

from scheduler.service.api import routes_cluster
from scheduler.service.api.auth import Principal
from scheduler.service.core.loop import Core

# period -> (seconds shown, buckets)
RANGES: dict[str, tuple[float, int]] = {
    "1h": (3600, 12),
    "24h": (86400, 24),
    "7d": (7 * 86400, 28),
    "30d": (30 * 86400, 30),
}
# Okabe-Ito: told apart with the common colour-vision deficiencies. Colour is never the only cue: every bar has
# a title, the legend names each colour, and the table under the chart has the numbers.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
W, H, LEFT, BOTTOM, TOP = 720, 260, 56, 28, 12
TOP_USERS = 10


def _label(t: float, span: float) -> str:
    stamp = dt.datetime.fromtimestamp(t, dt.UTC)
    return stamp.strftime("%H:%M") if span <= 86400 else stamp.strftime("%m-%d %H:%M")


def usage_over_time(who: Principal, core: Core, period: str) -> dict[str, Any]:
    span, count = RANGES[period]
    now = core.clock()
    setup = routes_cluster.get_usage(who, core, since=None, until=now)["since"]
    start = max(now - span, setup)  # before Corral was set up there was nothing to use (nor to be idle)
    whole = routes_cluster.get_usage(who, core, since=start, until=now)
    step = max(now - start, 1e-9) / count
    buckets = []
    for i in range(count):
        b0, b1 = start + i * step, start + (i + 1) * step
        got = routes_cluster.get_usage(who, core, since=b0, until=b1)
        buckets.append(
            {
                "since": b0,
                "until": b1,
                "label": _label(b0, span),
                "queues": {q["queue"]: q["gpu_hours"] for q in got["queues"]},
            }
        )
    queues = sorted({q for b in buckets for q in b["queues"]})
    colours = {q: PALETTE[i % len(PALETTE)] for i, q in enumerate(queues)}
    users = sorted(whole["users"], key=lambda u: -u["gpu_hours"])[:TOP_USERS]
    return {
        "buckets": buckets,
        "queues": queues,
        "colours": colours,
        "users": users,
        "pools": whole["pools"],
        "by_queue": whole["queues"],
        "since": start,
        "until": now,
        "svg": svg(buckets, queues, colours),
    }


def svg(buckets: list[dict[str, Any]], queues: list[str], colours: dict[str, str]) -> str:
    """Stacked bars, one per bucket; each piece carries a <title> with its queue and GPU-hours."""
    top = max((sum(b["queues"].values()) for b in buckets), default=0.0) or 1.0
    plot_w, plot_h = W - LEFT - 8, H - TOP - BOTTOM
    slot = plot_w / max(1, len(buckets))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" class="chart" '
        'aria-labelledby="chart-title chart-desc">',
        '<title id="chart-title">GPU-hours per queue over time</title>',
        f'<desc id="chart-desc">Stacked bars, one per time bucket, tallest {top:.2f} GPU-hours; '
        "the table below the chart has every number.</desc>",
    ]
    for frac in (0.0, 0.5, 1.0):  # a light grid with its values, so a bar's height reads without hovering
        y = TOP + plot_h * (1 - frac)
        parts.append(f'<line x1="{LEFT}" x2="{W - 8}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="axis">{top * frac:.2f}</text>')
    for i, b in enumerate(buckets):
        x, base = LEFT + i * slot + slot * 0.1, TOP + plot_h
        for q in queues:
            h = b["queues"].get(q, 0.0)
            if h <= 0:
                continue
            bar = plot_h * h / top
            base -= bar
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{slot * 0.8:.1f}" height="{bar:.1f}" '
                f'fill="{colours[q]}"><title>{escape(q)}, {escape(b["label"])}: {h:.3f} GPU-hours'
                "</title></rect>"
            )
        if i % max(1, len(buckets) // 6) == 0:
            parts.append(
                f'<text x="{x + slot * 0.4:.1f}" y="{H - 8}" text-anchor="middle" class="axis">'
                f"{escape(b['label'])}</text>"
            )
    parts.append(
        f'<text x="12" y="{TOP + plot_h / 2:.1f}" class="axis" transform="rotate(-90 12 '
        f'{TOP + plot_h / 2:.1f})" text-anchor="middle">GPU-hours</text>'
    )
    parts.append("</svg>")
    return "".join(parts)
