"""The propagation benchmark's goal, and its result as a table and a chart."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from authmesh.bench.common import Goal, add_goal_rows, bar_chart
from authmesh.bench.propagation_cpu import CPU_PARTS

GOAL_P99_MS = 10.0
GOALS = (Goal("p99_ms_at_10", "p99, RevokeToken → last of 10 replicas refusing", GOAL_P99_MS, False, "ms"),)


def render(result: Mapping[str, Any]) -> Table:
    """A propagation result (:func:`~authmesh.bench.propagation.run`) as a table."""
    config = result["config"]
    table = Table(
        title=f"revocation propagation: RevokeToken start → last replica refusing, {config['revocations']} "
        f"revocations per row, probes {config['interval_ms']:g} ms apart"
    )
    for column in ("replicas", "what", "p50 ms", "p99 ms", "max ms", "note"):
        table.add_column(column, justify="left" if column in ("what", "note") else "right")
    for level in result["levels"]:
        last = level["last_replica"]
        missing = f"{level['missing']} never refused" if level["missing"] else ""
        shown = _view_shares(level.get("replica_view_within"))
        note = f"replicas' own view: {shown}" if shown else ""
        table.add_row(
            str(level["replicas"]),
            "authmesh: last replica refusing",
            f"{last['p50']:.2f}",
            f"{last['p99']:.2f}",
            f"{last['max']:.2f}",
            missing or note,
        )
        rpc = level["rpc"]
        table.add_row(
            "", "RevokeToken RPC itself", f"{rpc['p50']:.2f}", f"{rpc['p99']:.2f}", f"{rpc['max']:.2f}", ""
        )
        seen = level["event_seen"]
        table.add_row(
            "",
            "event on the wire (prober's subscription)",
            f"{seen['p50']:.2f}",
            f"{seen['p99']:.2f}",
            f"{seen['max']:.2f}",
            "",
        )
        check = level.get("unperturbed")
        if check is not None and check["all_refused_share"] is not None:
            table.add_row(
                "",
                f"no probe before: every replica refusing when asked at {check['at_ms']:g} ms",
                "",
                "",
                "",
                f"{check['all_refused_share']:.1%} of {check['rounds']} (asked at p50 "
                f"{check['asked']['p50']:.1f}, max {check['asked']['max']:.1f} ms)",
            )
            quiet_shown = _view_shares(check.get("replica_view_within"))
            if quiet_shown:
                table.add_row(
                    "",
                    "no probe before: replicas' own view (slowest replica applied)",
                    "",
                    "",
                    "",
                    quiet_shown,
                )
        cpu = level.get("cpu_ms_per_round")
        if cpu is not None:
            table.add_row(
                "",
                f"CPU per revocation, all processes: {cpu['total']:.1f} ms; on "
                f"{result['environment'].get('cpus', '?')} CPUs it needs ≥ {level['cpu_floor_ms']:.1f} ms",
                "",
                "",
                "",
                ", ".join(f"{part} {cpu[part]:.1f}" for part in CPU_PARTS),
            )
        for mode, label in (
            ("jetstream", "floor: JetStream publish → last subscriber"),
            ("core", "floor: core NATS"),
        ):
            floor = (level.get("floor") or {}).get(mode)
            if floor is None:
                continue
            latency = floor["latency"]
            lost = f"{floor['missing']} lost" if floor["missing"] else ""
            table.add_row(
                "", label, f"{latency['p50']:.2f}", f"{latency['p99']:.2f}", f"{latency['max']:.2f}", lost
            )
        table.add_section()
    add_goal_rows(table, result, 4)
    return table


def _view_shares(view: Mapping[str, float | None] | None) -> str:
    """A replicas'-own-view entry as text: the slowest replica's shares within 5 and 10 ms."""
    return ", ".join(
        f"{share:.0%} ≤ {bound} ms"
        for bound, share in (view or {}).items()
        if share is not None and bound in ("5", "10")
    )


def draw(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """A chart of a propagation result: p50 and p99 by replica count, beside the floor."""
    levels = result["levels"]
    series: dict[str, list[float]] = {}
    for quantile in ("p50", "p99"):
        series[f"authmesh {quantile}"] = [level["last_replica"][quantile] for level in levels]
        series[f"JetStream floor {quantile}"] = [
            (level.get("floor") or {}).get("jetstream", {}).get("latency", {}).get(quantile, float("nan"))
            for level in levels
        ]
    chart = bar_chart(
        directory / "propagation.png",
        title="RevokeToken start → last replica refusing, beside the NATS fan-out floor",
        groups=[f"{level['replicas']} replica{'s' if level['replicas'] > 1 else ''}" for level in levels],
        series=series,
        ylabel="ms",
        goal=GOAL_P99_MS,
        goal_label="goal: p99 at 10 replicas",
    )
    return [chart]
