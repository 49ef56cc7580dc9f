"""``summary.png``: test accuracy against trainable parameters (log x), with fit time beside it.

Drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas: no pyplot state, no display,
safe inside a training process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.fileio import atomic_open

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ftlab.report import Row


def _colours(rows: list[Row]) -> dict[str, tuple[float, ...]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    methods = list(dict.fromkeys(r.run.method for r in rows))
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _number(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _place_labels(ax: Axes, points: list[tuple[float, float, float, str]]) -> None:
    """Label every point beside its marker, trying positions until the label overlaps no other label or marker.

    points: (x, y, marker radius in points, text). Greedy, top to bottom; good enough for a few dozen runs.
    """
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    to_px = ax.figure.dpi / 72.0
    centres = [ax.transData.transform((x, y)) for x, y, _, _ in points]
    markers = [Bbox.from_extents(cx - r * to_px, cy - r * to_px, cx + r * to_px, cy + r * to_px)
               for (cx, cy), (_, _, r, _) in zip(centres, points, strict=True)]
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for i in sorted(range(len(points)), key=lambda k: -points[k][1]):
        x, y, radius, text = points[i]
        others = [m for k, m in enumerate(markers) if k != i]
        candidates = [(side, dy) for dy in (6, -6, 22, -22, 38, -38, 54, -54) for side in (1, -1)]
        chosen = None
        for side, dy in candidates:
            label = ax.annotate(
                text, (x, y), xytext=(side * (radius + 3), dy), textcoords="offset points", fontsize=8,
                ha="left" if side > 0 else "right", va="bottom" if dy > 0 else "top", zorder=4,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.75},
                arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.35", "shrinkA": 0, "shrinkB": 0},
            )
            box = label.get_window_extent(renderer)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(b) for b in placed + others):
                chosen = box
                break
            label.remove()
        if chosen is None:  # crowded: take the first position anyway
            side, dy = candidates[0]
            label = ax.annotate(
                text, (x, y), xytext=(side * (radius + 3), dy), textcoords="offset points", fontsize=8,
                ha="left", va="bottom", zorder=4,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.75},
            )
            chosen = label.get_window_extent(renderer)
        placed.append(chosen)


def _bar_label(row: Row, width: int = 44) -> str:
    """``#3 lora`` plus the differing overrides, wrapped: the bar chart is where the long labels go."""
    lines = [row.tag]
    for override in row.short_overrides:
        if len(lines) > 1 and len(lines[-1]) + 1 + len(override) <= width:
            lines[-1] += " " + override
        else:
            lines.append(override)
    return "\n".join(lines)


def plot_summary(rows: list[Row], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in rows if r.run.ok and _number(r.get("params_trainable")) and _number(r.get("test/acc")) is not None]
    missing = len(rows) - len(done)
    colour = _colours(rows)
    bar_labels = [_bar_label(r) for r in done]
    # Points carry the full label while it is short (a method comparison); otherwise the row tag
    # (#3 lora), spelled out in the bar chart and in summary.md.
    short = all(len(r.label) <= 24 for r in done)
    lines = sum(label.count("\n") + 1 for label in bar_labels)
    height = max(5.0, 0.22 * lines + 0.25 * len(done) + 1.8)
    fig = Figure(figsize=(15, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[1.3, 1])

    # Left: accuracy vs trainable parameters; marker area grows with fit time.
    times = [_number(r.get("fit_seconds")) or 0.0 for r in done]
    longest = max(times, default=0.0) or 1.0
    points = []
    for r, t in zip(done, times, strict=True):
        x, y = float(r.get("params_trainable")), float(r.get("test/acc"))
        std = _number(r.get("test/acc_std"))
        area = 40 + 460 * t / longest  # points^2
        left.scatter([x], [y], s=area, color=colour[r.run.method], alpha=0.75,
                     edgecolors="black", linewidths=0.6, zorder=3)
        if std:
            left.errorbar([x], [y], yerr=[std], color="black", capsize=3, lw=0.8, zorder=2)
        name = r.label if short else r.tag
        points.append((x, y, math.sqrt(area / math.pi), f"{name}\n{y:.3f}, {t:.0f} s"))
    left.set_xscale("log")
    left.set_xlabel("trainable parameters (log scale)")
    left.set_ylabel("test accuracy")
    left.set_title("test accuracy vs trainable parameters (marker area ∝ fit time)", fontsize=10)
    left.grid(True, which="both", alpha=0.3)
    if done:
        xs = [float(r.get("params_trainable")) for r in done]
        left.set_xlim(min(xs) / 3, max(xs) * 6)  # room for the labels on the right
        ys = [float(r.get("test/acc")) for r in done]
        pad = max(0.02, 0.15 * (max(ys) - min(ys)))
        left.set_ylim(min(ys) - pad, min(1.0 + pad / 2, max(ys) + pad))

    # Right: fit time per run, with the accuracy written at the end of each bar.
    ypos = list(range(len(done)))
    right.barh(ypos, times, color=[colour[r.run.method] for r in done], alpha=0.8, edgecolor="black", lw=0.5)
    for yy, r, t in zip(ypos, done, times, strict=True):
        right.text(t, yy, f" {t:.0f} s, acc {float(r.get('test/acc')):.3f}", va="center", fontsize=8)
    right.set_yticks(ypos, bar_labels, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("fit time (s)")
    right.set_title("fit time", fontsize=10)
    right.set_xlim(0, longest * 1.5)
    right.grid(True, axis="x", alpha=0.3)

    suptitle = title if not missing else f"{title} — {missing} run(s) without results not shown (see summary.md)"
    fig.suptitle(suptitle, fontsize=11)
    fig.canvas.draw()  # settle the layout, then freeze it so label positions stay where they were checked
    fig.set_layout_engine("none")
    _place_labels(left, points)
    with atomic_open(path, "wb") as handle:  # concurrent jobs may rebuild it at once
        fig.savefig(handle, format="png", dpi=110)
