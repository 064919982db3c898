"""A picture of one request through a placement: one lane per device, compute and transfer boxes over time.

:func:`timeline_svg` writes SVG with the standard library only. :func:`save_timeline` picks the format from
the file suffix; ``.png`` needs matplotlib (not a dependency) and says so clearly when it is missing.

Lanes: every device that runs a stage, plus the source and the sink. A transfer is drawn on the lane of the
device that receives it (hatched), from the moment the previous step ends; a stage's hop overhead (its
process receiving, decoding, dispatching, encoding and sending) is a grey box just before its compute.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from layerline.errors import PlanError
from layerline.plan.costs import Placement

__all__ = ["TimelineBox", "save_timeline", "timeline_boxes", "timeline_lanes", "timeline_svg"]

COMPUTE_COLOR = "#4c78a8"
TRANSFER_COLOR = "#f58518"
OVERHEAD_COLOR = "#9d9d9d"


@dataclass(frozen=True)
class TimelineBox:
    """One step of the request: ``kind`` is ``"compute"``, ``"overhead"`` or ``"transfer"``; times in s."""

    kind: str
    device: str
    start_s: float
    duration_s: float
    label: str
    stage: int | None


def timeline_lanes(placement: Placement, source: str, sink: str | None = None) -> list[str]:
    """The devices drawn, top to bottom: the source, then the stage devices in order, then the sink."""
    lanes: list[str] = [source]
    for _, _, device in placement.stages:
        if device not in lanes:
            lanes.append(device)
    sink = source if sink is None else sink
    if sink not in lanes:
        lanes.append(sink)
    return lanes


def timeline_boxes(placement: Placement, source: str, sink: str | None = None) -> list[TimelineBox]:
    """The transfer, overhead and compute steps of one request along the time axis.

    Transfers between stages on the same device and zero overheads are left out.
    """
    sink = source if sink is None else sink
    boxes: list[TimelineBox] = []
    t = 0.0
    prev = source
    for i, s in enumerate(placement.breakdown):
        if s.device != prev:
            boxes.append(TimelineBox("transfer", s.device, t, s.transfer_in_s, f"{prev} → {s.device}", i))
            t += s.transfer_in_s
        if s.overhead_s > 0:
            boxes.append(TimelineBox("overhead", s.device, t, s.overhead_s, f"stage {i}: hop overhead", i))
            t += s.overhead_s
        blocks = f"{s.start}" if s.stop - s.start == 1 else f"{s.start}-{s.stop - 1}"
        boxes.append(TimelineBox("compute", s.device, t, s.compute_s, f"stage {i}: blocks {blocks}", i))
        t += s.compute_s
        prev = s.device
    if prev != sink:
        boxes.append(TimelineBox("transfer", sink, t, placement.transfer_out_s, f"{prev} → {sink}", None))
    return boxes


def _fmt_s(s: float) -> str:
    if s == 0:
        return "0"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def _ticks(total: float) -> list[float]:
    if total <= 0:
        return [0.0]
    raw = total / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    n = int(total / step + 1e-9)
    return [k * step for k in range(n + 1)]


def timeline_svg(placement: Placement, source: str, sink: str | None = None, title: str = "") -> str:
    """The timeline as an SVG document (a string)."""
    lanes = timeline_lanes(placement, source, sink)
    boxes = timeline_boxes(placement, source, sink)
    total = max((b.start_s + b.duration_s for b in boxes), default=0.0) or 1e-9
    left, right, top, lane_h, gap = 170, 30, 70, 36, 10
    plot_w = 760
    width = left + plot_w + right
    axis_y = top + len(lanes) * (lane_h + gap)
    height = axis_y + 80
    scale = plot_w / total
    sink_name = source if sink is None else sink
    thr = placement.throughput_rps
    thr_txt = f"{thr:.3g} requests/s" if math.isfinite(thr) else "unbounded"
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        "<defs>",
        '<pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)">',
        f'<rect width="6" height="6" fill="{TRANSFER_COLOR}" fill-opacity="0.55"/>',
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{TRANSFER_COLOR}" stroke-width="3"/>',
        "</pattern>",
        "</defs>",
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="15" font-weight="bold">{escape(title or "placement")}</text>',
        f'<text class="summary" x="{left}" y="44">predicted latency {_fmt_s(placement.latency_s)} · '
        f"throughput {thr_txt} · bottleneck {_fmt_s(placement.bottleneck_s)}</text>",
    ]
    lane_y: dict[str, float] = {}
    for i, device in enumerate(lanes):
        y = top + i * (lane_h + gap)
        lane_y[device] = y
        roles = [r for r, d in (("source", source), ("sink", sink_name)) if d == device]
        label = device + (f" ({', '.join(roles)})" if roles else "")
        out.append(f'<g class="lane" data-device="{escape(device)}">')
        out.append(f'<rect x="{left}" y="{y}" width="{plot_w}" height="{lane_h}" fill="#f3f3f3"/>')
        out.append(f'<text x="{left - 8}" y="{y + lane_h / 2 + 4}" text-anchor="end">{escape(label)}</text>')
        out.append("</g>")
    for b in boxes:
        x = left + b.start_s * scale
        w = max(b.duration_s * scale, 1.0)
        y = lane_y[b.device] + 4
        h = lane_h - 8
        fill = {"compute": COMPUTE_COLOR, "overhead": OVERHEAD_COLOR}.get(b.kind, "url(#hatch)")
        stage = "" if b.stage is None else f' data-stage="{b.stage}"'
        tip = f"{b.label}: {_fmt_s(b.duration_s)}"
        out.append(
            f'<rect class="{b.kind}" data-device="{escape(b.device)}"{stage} x="{x:.2f}" y="{y}" '
            f'width="{w:.2f}" height="{h}" fill="{fill}" stroke="#333" stroke-width="0.5">'
            f"<title>{escape(tip)}</title></rect>"
        )
        if b.kind == "compute" and w > 60:
            out.append(
                f'<text x="{x + w / 2:.2f}" y="{y + h / 2 + 4}" text-anchor="middle" fill="white">'
                f"{escape(b.label.split(':')[0])}</text>"
            )
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#333"/>')
    for t in _ticks(total):
        x = left + t * scale
        out.append(f'<line x1="{x:.2f}" y1="{axis_y}" x2="{x:.2f}" y2="{axis_y + 5}" stroke="#333"/>')
        out.append(f'<text x="{x:.2f}" y="{axis_y + 18}" text-anchor="middle">{_fmt_s(t)}</text>')
    ly = axis_y + 45
    out.append('<g class="legend">')
    out.append(f'<rect x="{left}" y="{ly - 10}" width="14" height="12" fill="{COMPUTE_COLOR}"/>')
    out.append(f'<text x="{left + 20}" y="{ly}">compute</text>')
    out.append(f'<rect x="{left + 100}" y="{ly - 10}" width="14" height="12" fill="url(#hatch)"/>')
    out.append(f'<text x="{left + 120}" y="{ly}">transfer (on the receiving device)</text>')
    out.append(f'<text x="{left + 360}" y="{ly}">time since the request left the source →</text>')
    if any(b.kind == "overhead" for b in boxes):
        oy = ly + 18
        out.append(f'<rect x="{left}" y="{oy - 10}" width="14" height="12" fill="{OVERHEAD_COLOR}"/>')
        out.append(
            f'<text x="{left + 20}" y="{oy}">stage hop overhead (receive, decode, encode, send)</text>'
        )
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def save_timeline(
    placement: Placement,
    path: str | os.PathLike[str],
    source: str,
    sink: str | None = None,
    title: str = "",
) -> Path:
    """Write the timeline to ``path`` (``.svg``, or ``.png`` when matplotlib is installed)."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix == ".svg":
        target.write_text(timeline_svg(placement, source, sink, title), encoding="utf-8")
        return target
    if suffix == ".png":
        try:
            import matplotlib
        except ImportError:
            raise PlanError(
                f"--picture {target}: PNG needs matplotlib, which is not installed; write an SVG instead "
                f"(--picture {target.with_suffix('.svg')}) or `pip install matplotlib`"
            ) from None
        matplotlib.use("Agg")
        _save_png(placement, target, source, sink, title)
        return target
    raise PlanError(f"--picture {target}: unknown picture format {suffix or '(none)'!r}; use .svg or .png")


def _save_png(placement: Placement, target: Path, source: str, sink: str | None, title: str) -> None:
    import matplotlib.pyplot as plt

    lanes = timeline_lanes(placement, source, sink)
    boxes = timeline_boxes(placement, source, sink)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.5 * len(lanes)))
    for b in boxes:
        row = len(lanes) - 1 - lanes.index(b.device)
        style = {
            "compute": {"color": COMPUTE_COLOR},
            "overhead": {"color": OVERHEAD_COLOR},
        }.get(b.kind, {"color": TRANSFER_COLOR, "hatch": "//"})
        ax.broken_barh([(b.start_s * 1e3, b.duration_s * 1e3)], (row - 0.35, 0.7), **style)
    ax.set_yticks(range(len(lanes)), list(reversed(lanes)))
    ax.set_xlabel("ms since the request left the source")
    ax.set_title(f"{title} — predicted latency {_fmt_s(placement.latency_s)}")
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
