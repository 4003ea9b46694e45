"""The demo's timeline as a picture (``authmesh demo --plot FILE.png``).

matplotlib is the optional extra ``plot`` (``pip install 'authmesh[plot]'``): it is imported only
here, only when a picture is asked for, and its absence is reported with that install line.

Two panels: above, the story on a time axis (acts as bands; each action, and each replica's first
rejection, NATS cut and recovery as a mark on that replica's lane); below, every measured propagation
as one bar per replica, in milliseconds on a log scale, since milliseconds vanish on an axis of seconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from authmesh._shared.errors import ConfigurationError
from authmesh.demo import DemoReport

INSTALL_HINT = "pip install 'authmesh[plot]'"
_AUTH_LANE = "auth service"
_MARK_STYLES: dict[str, tuple[str, str]] = {
    "NATS cut": ("v", "black"),
    "degraded": ("D", "tab:orange"),
    "NATS restored": ("^", "tab:green"),
    "recovered": ("o", "tab:green"),
}
_REJECTION_STYLE = ("x", "tab:red")


def require_matplotlib() -> None:
    """Fail early, before the demo runs, when a picture cannot be drawn.

    Raises:
        ConfigurationError: matplotlib is not installed.
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigurationError(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}")


def draw_timeline(report: DemoReport, path: Path) -> None:
    """Draw the report's timeline and latencies into an image file (its suffix picks the format).

    Args:
        report: A finished demo.
        path: Where to write, e.g. ``timeline.png``.

    Raises:
        ConfigurationError: matplotlib is not installed.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    figure, (story, latencies) = plt.subplots(
        2, 1, figsize=(12, 8), gridspec_kw={"height_ratios": [3, 2]}, constrained_layout=True
    )
    try:
        _draw_story(story, report)
        _draw_latencies(latencies, report)
        figure.suptitle(
            f"authmesh demo: {len(report.replicas)} replicas, "
            f"{'all acts as expected' if report.ok else 'SOME ACTS FAILED'} ({report.duration_s:.1f} s)"
        )
        figure.savefig(path, dpi=120)
    finally:
        plt.close(figure)


def _draw_story(axes: Any, report: DemoReport) -> None:
    lanes = [_AUTH_LANE, *report.replicas]
    row = {name: index for index, name in enumerate(reversed(lanes))}
    for act in report.acts:
        shade = "whitesmoke" if act.number % 2 else "white"
        colour = shade if act.ok or act.skipped else "mistyrose"
        axes.axvspan(act.started_at_s, act.finished_at_s, color=colour, zorder=0)
        axes.text(
            (act.started_at_s + act.finished_at_s) / 2, len(lanes) - 0.4, str(act.number),
            ha="center", va="bottom", fontsize=9,
        )  # fmt: skip
        for mark in act.marks:
            if mark.replica is None:
                axes.axvline(mark.at_s, color="tab:blue", linestyle="--", linewidth=0.8, zorder=1)
                axes.plot(mark.at_s, row[_AUTH_LANE], marker="s", color="tab:blue", zorder=3)
                continue
            marker, colour = _MARK_STYLES.get(mark.label, _REJECTION_STYLE)
            axes.plot(mark.at_s, row.get(mark.replica, 0), marker=marker, color=colour, zorder=3)
    axes.set_yticks(range(len(lanes)), list(reversed(lanes)))
    axes.set_ylim(-0.7, len(lanes) - 0.1)
    axes.set_xlabel("seconds since the demo started")
    axes.set_title(
        "acts (numbered bands), actions (blue ■), first rejections (red ×); "
        "NATS cut ▼, degraded ◆, reconnected ▲, current again ●",
        fontsize=10,
    )


def _draw_latencies(axes: Any, report: DemoReport) -> None:
    measured = [(act, propagation) for act in report.acts for propagation in act.propagations]
    if not measured:
        axes.text(0.5, 0.5, "no propagation was measured", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return
    width = 0.8 / max(1, len(report.replicas))
    for offset, replica in enumerate(report.replicas):
        xs: list[float] = []
        heights: list[float] = []
        for position, (_, propagation) in enumerate(measured):
            for timing in propagation.replicas:
                if timing.replica == replica and timing.first_rejected_ms is not None:
                    xs.append(position + (offset - (len(report.replicas) - 1) / 2) * width)
                    heights.append(max(timing.first_rejected_ms, 0.01))
        bars = axes.bar(xs, heights, width=width, label=replica)
        axes.bar_label(bars, labels=[f"{height:.1f}" for height in heights], fontsize=7)
    axes.set_yscale("log")
    tallest = max((t.first_rejected_ms or 0.0 for _, p in measured for t in p.replicas), default=1.0)
    axes.set_ylim(bottom=1, top=max(10.0, tallest * 4))  # room for the value labels above the bars
    axes.set_xticks(
        range(len(measured)),
        [f"{act.number}. {propagation.action}" for act, propagation in measured],
        rotation=15,
        ha="right",
        fontsize=8,
    )
    axes.set_ylabel("ms to first rejection")
    axes.legend(fontsize=8)
    axes.set_title("from the start of the action to each replica's first rejection")
