"""``authmesh soak``: verifications and random revocations on a fresh local stack, with NATS faults.

Prints what it saw (verifications, revocations, late acceptances, propagation percentiles, faults) and
exits 1 when a revoked token was accepted after the staleness bound, a call got ``UNKNOWN``/``INTERNAL``,
or a revocation never reached a replica; 0 otherwise.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from authmesh._shared.errors import AuthError

EXIT_FAILURE = 1


def register(app: typer.Typer) -> None:
    """Add ``soak`` to the ``authmesh`` application."""
    app.command("soak")(soak)


def soak(
    seconds: Annotated[
        float, typer.Option("--seconds", min=1.0, max=86_400.0, help="How long the load runs.")
    ] = 60.0,
    replicas: Annotated[int, typer.Option("--replicas", min=1, max=16, help="Resource replicas.")] = 3,
    nats_cluster: Annotated[
        int, typer.Option("--nats-cluster", help="NATS nodes: 1, or 3 (or 5) for a replicated stream.")
    ] = 1,
    staleness_bound: Annotated[
        float, typer.Option("--staleness-bound", min=0.2, max=60.0, help="The replicas' staleness bound, s.")
    ] = 1.0,
    faults: Annotated[
        bool, typer.Option("--faults/--no-faults", help="Cut replicas' NATS links now and then.")
    ] = True,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed the random choices.")] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")
    ] = None,
) -> None:
    """Soak a fresh local stack: load on every replica, random revocations, faults; report what it saw."""
    from authmesh.soak import run_local_soak

    console = Console()
    console.print(f"soaking {replicas} replica(s) for {seconds:g} s (staleness bound {staleness_bound:g} s)…")
    try:
        report = asyncio.run(
            run_local_soak(
                seconds,
                replicas,
                staleness_bound=staleness_bound,
                nats_cluster=nats_cluster,
                faults=faults,
                seed=seed,
            )
        )
    except AuthError as error:
        Console(stderr=True).print(f"[red]{error.code}[/red]: {error.message}")
        raise typer.Exit(EXIT_FAILURE) from None
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")

    summary = Table(title="soak", show_header=False)
    summary.add_row("load", f"{report.seconds:.1f} s on {', '.join(report.replicas)}")
    summary.add_row("verifications", str(report.verifications))
    summary.add_row("answers", ", ".join(f"{label} {count}" for label, count in report.outcomes.items()))
    summary.add_row("revocations", f"{report.revocations} ({report.revocation_failures} failed calls)")
    summary.add_row(
        "late acceptances",
        f"{len(report.late_acceptances)} (revoked tokens accepted > {report.staleness_bound:g} s after)",
    )
    summary.add_row("UNKNOWN/INTERNAL answers", str(report.forbidden_answers))
    if report.propagation is not None:
        p = report.propagation
        summary.add_row(
            "propagation",
            f"p50 {p.p50_ms:.1f} ms, p90 {p.p90_ms:.1f} ms, p99 {p.p99_ms:.1f} ms, max {p.max_ms:.1f} ms "
            f"({p.samples} samples, {report.propagation_timeouts} timed out)",
        )
    summary.add_row(
        "faults",
        ", ".join(f"{fault.kind} on {fault.replica} at {fault.at_seconds:.1f} s" for fault in report.faults)
        or "none",
    )
    console.print(summary)
    for late in report.late_acceptances[:20]:
        console.print(
            f"[red]late[/red]: {late.replica} accepted {late.token_id} "
            f"{late.seconds_after_revocation:.3f} s after its revocation"
        )
    console.print("[green]ok[/green]" if report.ok else "[red]FAILED[/red]")
    if not report.ok:
        raise typer.Exit(EXIT_FAILURE)
