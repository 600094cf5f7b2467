"""The report's pictures: matplotlib figures rendered to PNG bytes (embedded in the page as base64)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

# One colour per run, the same in every plot of a report.
COLORS = [matplotlib.colors.to_hex(c) for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]]


def to_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def curve_png(metric: str, series: list[tuple[str, int, list[dict[str, Any]]]]) -> bytes | None:
    """One metric over steps for several runs: series are (run name, colour index, records); train solid, val
    dashed with markers. None when no run logged the metric."""
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    drawn = False
    for name, color, records in series:
        for split, style in (("train", "-"), ("val", "--o")):
            points = [(r["step"], r[metric]) for r in records
                      if r.get("split") == split and isinstance(r.get(metric), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, color=COLORS[color % len(COLORS)], markersize=3, linewidth=1.4,
                        label=f"{name} ({split})")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if metric == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return to_png(fig)


def bars_png(metric: str, values: list[tuple[str, int, float]]) -> bytes:
    """A headline metric of several runs side by side (run name, colour index, value)."""
    fig, ax = plt.subplots(figsize=(max(3.0, 1.1 * len(values) + 1.5), 2.8))
    names = [v[0] for v in values]
    ax.bar(range(len(values)), [v[2] for v in values], color=[COLORS[v[1] % len(COLORS)] for v in values])
    ax.set_xticks(range(len(values)), names, rotation=20, ha="right", fontsize=8)
    for i, v in enumerate(values):
        ax.text(i, v[2], f"{v[2]:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_title(metric)
    ax.grid(axis="y", alpha=0.3)
    return to_png(fig)
