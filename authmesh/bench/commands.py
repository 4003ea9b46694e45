"""``authmesh bench …``: one subcommand per benchmark, each printing a table and optionally writing JSON."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

bench_app = typer.Typer(
    help="Measure authmesh against baselines taken in the same run.", no_args_is_help=True
)

JsonOption = Annotated[Path | None, typer.Option("--json", help="also write the result as JSON to this file")]
PlotOption = Annotated[
    Path | None, typer.Option("--plot", help="also draw PNG charts into this directory (needs matplotlib)")
]
ConcurrencyOption = Annotated[
    list[int] | None, typer.Option("--concurrency", min=1, max=1024, help="calls in flight (repeatable)")
]
SlicesOption = Annotated[
    int,
    typer.Option(
        min=1, max=1000, help="timed slices per kind of call and level; contender and baseline alternate"
    ),
]
SliceSecondsOption = Annotated[float, typer.Option(min=0.01, max=60, help="seconds per timed slice")]
TlsOption = Annotated[bool, typer.Option("--tls", help="the stack and every call on TLS")]
PinOption = Annotated[
    bool, typer.Option("--pin/--no-pin", help="pin the server and the load generator to different CPUs")
]


@bench_app.command("verify")
def verify(
    json_path: JsonOption = None,
    rounds: Annotated[int, typer.Option(min=1, max=100, help="rounds; medians are reported")] = 7,
    tokens: Annotated[int, typer.Option(min=10, max=100_000, help="distinct tokens per round")] = 2000,
) -> None:
    """Verifications per second on one core: cold and warm, beside raw ES256, PyJWT and joserfc."""
    from authmesh.bench.verify import main

    raise typer.Exit(main(json_path, rounds, tokens))


@bench_app.command("rpc")
def rpc(
    json_path: JsonOption = None,
    plot_dir: PlotOption = None,
    concurrency: ConcurrencyOption = None,
    slices: SlicesOption = 24,
    slice_seconds: SliceSecondsOption = 0.25,
    pin: PinOption = False,
    tls: TlsOption = False,
) -> None:
    """Protected calls vs the same server's open one: the replica, a sync grpc.server, a FastAPI app."""
    from authmesh.bench.rpc import CONCURRENCY, main

    raise typer.Exit(
        main(
            json_path,
            plot_dir,
            slices=slices,
            slice_s=slice_seconds,
            concurrency=tuple(concurrency or CONCURRENCY),
            pin_cpus=pin,
            tls=tls,
        )
    )


@bench_app.command("refresh")
def refresh(
    json_path: JsonOption = None,
    plot_dir: PlotOption = None,
    concurrency: ConcurrencyOption = None,
    slices: SlicesOption = 24,
    slice_seconds: SliceSecondsOption = 0.25,
    login_seconds: Annotated[
        float, typer.Option(min=0, max=600, help="timed seconds of Login per level (0 skips Login)")
    ] = 4.0,
    pin: PinOption = False,
    tls: TlsOption = False,
    floor: Annotated[
        bool,
        typer.Option(
            "--floor/--no-floor", help="also time the floor: a rotation's fsynced writes and a pair's bytes"
        ),
    ] = True,
) -> None:
    """Refresh (and Login, with its Argon2 cost) vs the auth service's health Check, beside the floor."""
    from authmesh.bench.refresh import main
    from authmesh.bench.rpc import CONCURRENCY

    raise typer.Exit(
        main(
            json_path,
            plot_dir,
            slices=slices,
            slice_s=slice_seconds,
            login_s=login_seconds,
            concurrency=tuple(concurrency or CONCURRENCY),
            pin_cpus=pin,
            tls=tls,
            floor=floor,
        )
    )


@bench_app.command("replica-ack")
def replica_ack(
    json_path: JsonOption = None,
    plot_dir: PlotOption = None,
    concurrency: ConcurrencyOption = None,
    slices: SlicesOption = 24,
    slice_seconds: SliceSecondsOption = 0.25,
    floor_calls: Annotated[
        int,
        typer.Option(
            min=0,
            max=10_000,
            help="calls per slice of the floor (Redis alone, with and without WAIT; 0 skips)",
        ),
    ] = 100,
    tls: TlsOption = False,
) -> None:
    """Refresh and RevokeToken acknowledged once a Redis replica has them (WAIT) vs at once, on Sentinel."""
    from authmesh.bench.replica_ack import CONCURRENCY, main

    raise typer.Exit(
        main(
            json_path,
            plot_dir,
            slices=slices,
            slice_s=slice_seconds,
            floor_calls=floor_calls,
            concurrency=tuple(concurrency or CONCURRENCY),
            tls=tls,
        )
    )


@bench_app.command("propagation")
def propagation(
    json_path: JsonOption = None,
    plot_dir: PlotOption = None,
    replicas: Annotated[
        list[int] | None, typer.Option("--replicas", min=1, max=50, help="replica counts (repeatable)")
    ] = None,
    revocations: Annotated[int, typer.Option(min=1, max=100_000, help="revocations per replica count")] = 200,
    interval_ms: Annotated[
        float, typer.Option(min=0, max=1000, help="a probe's pause after an answer that still accepts")
    ] = 1.0,
    probers: Annotated[
        int | None, typer.Option(min=1, max=64, help="prober processes (default: one per CPU)")
    ] = None,
    floor: Annotated[bool, typer.Option("--floor/--no-floor", help="measure the NATS fan-out floor")] = True,
    check_at_ms: Annotated[
        float,
        typer.Option(
            min=0, max=10_000, help="also ask every replica once this long after each revocation (0: skip)"
        ),
    ] = 10.0,
) -> None:
    """RevokeToken → last replica refusing, for 1, 3 and 10 replicas, beside the NATS fan-out floor."""
    from authmesh.bench.propagation import REPLICA_COUNTS, main

    raise typer.Exit(
        main(
            json_path,
            plot_dir,
            revocations=revocations,
            interval_ms=interval_ms,
            probers=probers,
            with_floor=floor,
            check_at_ms=check_at_ms or None,
            replica_counts=tuple(replicas or REPLICA_COUNTS),
        )
    )


@bench_app.command("catchup")
def catchup(
    json_path: JsonOption = None,
    plot_dir: PlotOption = None,
    events: Annotated[
        list[int] | None,
        typer.Option("--events", min=0, max=10_000_000, help="events in the stream (repeatable)"),
    ] = None,
    path: Annotated[
        list[str] | None, typer.Option("--path", help="snapshot and/or stream (repeatable)")
    ] = None,
    rounds: Annotated[int, typer.Option(min=1, max=50, help="fresh replicas per count, snapshot path")] = 3,
    stream_rounds: Annotated[
        int, typer.Option(min=1, max=50, help="fresh replicas per count, stream path")
    ] = 1,
) -> None:
    """A fresh replica's time from process start to SERVING with 10k and 100k events in the stream."""
    from authmesh.bench.catchup import EVENT_COUNTS, PATHS, main

    chosen = tuple(path or PATHS)
    unknown = sorted(set(chosen) - set(PATHS))
    if unknown:
        raise typer.BadParameter(
            f"unknown path {', '.join(unknown)}: snapshot or stream", param_hint="--path"
        )
    raise typer.Exit(
        main(
            json_path,
            plot_dir,
            rounds=rounds,
            stream_rounds=stream_rounds,
            event_counts=tuple(events or EVENT_COUNTS),
            paths=chosen,
        )
    )


@bench_app.command("memory")
def memory(
    json_path: JsonOption = None,
    plot_dir: PlotOption = None,
    entries: Annotated[int, typer.Option(min=1, max=50_000_000, help="revoked tokens held")] = 1_000_000,
) -> None:
    """Denylist bytes per revoked token at a million, against a plain dict of jti → exp."""
    from authmesh.bench.memory import main

    raise typer.Exit(main(json_path, plot_dir, entries=entries))


@bench_app.command("all")
def run_all(
    json_dir: Annotated[
        Path | None, typer.Option("--json-dir", help="write each result as <bench>.json into this directory")
    ] = None,
    plot_dir: PlotOption = None,
) -> None:
    """Every benchmark with its defaults, one after another (several minutes), then a summary of the goals."""
    from rich.console import Console
    from rich.table import Table

    from authmesh.bench import catchup, common, memory, propagation, refresh, rpc, verify

    if plot_dir is not None:
        common.require_matplotlib()
    benches: dict[str, tuple[Callable[[], Mapping[str, Any]], Callable[[Any], Any], Any]] = {
        "verify": (lambda: verify.run(), verify.render, None),
        "rpc": (lambda: rpc.run(), rpc.render, rpc.draw),
        "refresh": (lambda: refresh.run(), refresh.render, refresh.draw),
        "propagation": (lambda: propagation.run(), propagation.render, propagation.draw),
        "catchup": (lambda: catchup.run(), catchup.render, catchup.draw),
        "memory": (lambda: memory.run(), memory.render, memory.draw),
    }
    console = Console()
    summary = Table(title="authmesh bench all: goals")
    for column in ("bench", "goal", "measured", "verdict"):
        summary.add_column(column, justify="right" if column == "measured" else "left")
    everything_met = True
    for name, (measure, render, draw) in benches.items():
        with console.status(f"bench {name}…"):
            result = measure()
        console.print(render(result))
        if json_dir is not None:
            json_dir.mkdir(parents=True, exist_ok=True)
            common.write_json(json_dir / f"{name}.json", result)
        if plot_dir is not None and draw is not None:
            plot_dir.mkdir(parents=True, exist_ok=True)
            for chart in draw(result, plot_dir):
                console.print(f"chart written to {chart}")
        everything_met = everything_met and bool(result.get("ok", True))
        for row in _goal_rows(result):
            summary.add_row(name, *row)
    console.print(summary)
    raise typer.Exit(0 if everything_met else 1)


def _goal_rows(result: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(goal, measured, verdict)`` for each goal of a result, in either shape a bench reports."""
    from authmesh.bench.common import format_value

    rows = []
    goals = result.get("goals", {})
    for name, goal in goals.items():
        met = result["passed"][name]
        verdict = "[green]met[/green]" if met else "[red]missed[/red]"
        if isinstance(goal, Mapping):
            sign = "≥" if goal["higher_is_better"] else "≤"
            label = f"{goal['label']} {sign} {format_value(goal['target'], goal['unit'])}"
            rows.append((label, format_value(goal["value"], goal["unit"]), verdict))
        else:  # bench verify: a bare target and a ratio
            rows.append((f"{name} ≥ {goal:g}×", format_value(result["ratios"][name], "ratio"), verdict))
    return rows


@bench_app.command("gateway")
def gateway(
    json_path: JsonOption = None,
    plot_dir: PlotOption = None,
    concurrency: Annotated[int, typer.Option(min=1, max=1024, help="HTTP clients in flight")] = 16,
    slices: SlicesOption = 10,
    slice_seconds: SliceSecondsOption = 1.0,
    revocations: Annotated[int, typer.Option(min=1, max=10_000, help="revocation rounds")] = 50,
) -> None:
    """Envoy with authmesh ext_authz vs Envoy with jwt_authn: throughput, latency, revoked-token refusal."""
    from authmesh.bench.gateway import main

    raise typer.Exit(
        main(
            json_path,
            plot_dir,
            concurrency=concurrency,
            slices=slices,
            slice_s=slice_seconds,
            revocations=revocations,
        )
    )


def register(app: typer.Typer) -> None:
    """Add the ``bench`` group to the ``authmesh`` command."""
    app.add_typer(bench_app, name="bench")
