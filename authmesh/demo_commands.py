"""``authmesh demo``: the token-theft-and-revocation story, told as it happens, with a summary.

By default the demo starts a fresh local stack (NATS, Redis, the auth service, N replicas as local
processes) with a short staleness bound, and stops it at the end. With ``--target-auth``,
``--target-replicas`` and ``--admin`` it runs on a stack that is already up (compose, say); the act
that cuts a replica off from NATS then is skipped, since only a stack the demo started can be cut, and
the gateway act runs when ``--target-gateway`` names the stack's Envoy.

Exit codes: 0 when every act behaved as expected, 1 when one did not (or the stack would not start),
2 for a usage error.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from authmesh._shared.errors import AuthError, ConfigurationError
from authmesh._shared.tls import TlsFiles
from authmesh.demo import (
    LOCAL_STALENESS_BOUND,
    ActResult,
    DemoReport,
    DemoTarget,
    Propagation,
    ReplicaTarget,
    run_demo,
    run_local_demo,
)
from authmesh.terminal import fits
from authmesh.tls_options import TlsCaFileOption, TlsCertFileOption, TlsKeyFileOption, client_tls

EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_REPLICAS = 3


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the ``authmesh`` application."""
    app.command("demo")(demo)


def demo(
    replicas: Annotated[
        int, typer.Option("--replicas", min=1, max=16, help="Resource replicas of the local stack.")
    ] = DEFAULT_REPLICAS,
    staleness_bound: Annotated[
        float,
        typer.Option(
            "--staleness-bound", min=0.2, max=60.0, help="The local stack's staleness bound, seconds."
        ),
    ] = LOCAL_STALENESS_BOUND,
    target_auth: Annotated[
        str | None,
        typer.Option("--target-auth", help="Run on an existing stack: its auth service host:port."),
    ] = None,
    target_replicas: Annotated[
        str | None,
        typer.Option("--target-replicas", help="The existing stack's replicas: host:port,host:port,..."),
    ] = None,
    target_gateway: Annotated[
        str | None,
        typer.Option(
            "--target-gateway",
            help="The existing stack's Envoy with authmesh's ext_authz: its base URL (http://host:port, or "
            "https://host:port verified against --tls-ca-file).",
        ),
    ] = None,
    admin: Annotated[
        str | None,
        typer.Option(
            "--admin",
            envvar="AUTHMESH_BOOTSTRAP_ADMIN",
            help="user:password of an admin of the existing stack.",
            show_default=False,
        ),
    ] = None,
    admin_file: Annotated[
        Path | None,
        typer.Option(
            "--admin-file",
            envvar="AUTHMESH_BOOTSTRAP_ADMIN_FILE",
            dir_okay=False,
            help="Read --admin's user:password from this file instead (a compose secret, say), so the "
            "password is on no command line.",
            show_default=False,
        ),
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", dir_okay=False, help="Also write the results as JSON here.")
    ] = None,
    plot_file: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            dir_okay=False,
            help="Also draw the timeline here (needs matplotlib: pip install 'authmesh\\[plot]').",
        ),
    ] = None,
    tls: Annotated[
        bool, typer.Option("--tls", help="Run the local stack with every hop on TLS (authmesh up --tls).")
    ] = False,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """Simulate a token theft and the revocations that stop it, measured on every replica."""
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        target_tls = client_tls(tls_ca_file, tls_cert_file, tls_key_file)
    except ConfigurationError as error:
        err.print(f"[red]usage error[/red]: {escape(error.message)}")
        raise typer.Exit(EXIT_USAGE) from None
    if admin_file is not None:
        admin = _read_admin_file(admin_file, admin, err)
    target = _existing_stack(target_auth, target_replicas, admin, err, target_tls, gateway=target_gateway)
    if plot_file is not None:
        from authmesh.plot import require_matplotlib

        try:
            require_matplotlib()
        except ConfigurationError as error:
            err.print(f"[red]error[/red]: {escape(error.message)}")
            raise typer.Exit(EXIT_USAGE) from None
    narrator = RichNarrator(out)
    try:
        if target is None:
            out.print(
                f"Starting a local stack: NATS, Redis, the auth service and {replicas} replicas "
                f"(staleness bound {staleness_bound:g} s)…"
            )
            report = asyncio.run(run_local_demo(replicas, narrator, staleness_bound=staleness_bound, tls=tls))
        else:
            out.print(f"Running on the stack at {escape(target.auth_grpc)}…")
            username = f"alice-{secrets.token_hex(3)}"  # a shared stack may already have an alice
            report = asyncio.run(run_demo(target, narrator, username=username))
    except (AuthError, OSError) as error:
        message = error.message if isinstance(error, AuthError) else str(error)
        err.print(f"[red]error[/red]: the demo could not run: {escape(message)}")
        raise typer.Exit(EXIT_FAILURE) from None
    print_summary(out, report)
    if json_file is not None:
        json_file.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        out.print(f"Results written to {escape(str(json_file))}")
    if plot_file is not None:
        from authmesh.plot import draw_timeline

        draw_timeline(report, plot_file)
        out.print(f"Timeline drawn to {escape(str(plot_file))}")
    if not report.ok:
        raise typer.Exit(EXIT_FAILURE)


def _read_admin_file(path: Path, admin: str | None, err: Console) -> str:
    """``user:password`` from ``path`` (one trailing newline dropped); exits 2 when it cannot be used."""
    problem = None
    if admin is not None:
        problem = "--admin and --admin-file (or their variables) go one at a time"
    else:
        try:
            content = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not text"
            problem = f"cannot read --admin-file {path}: {reason}"
        else:
            admin = content.removesuffix("\n")
    if problem is not None or admin is None:
        err.print(f"[red]usage error[/red]: {escape(problem or '')}")
        raise typer.Exit(EXIT_USAGE)
    return admin


def _existing_stack(
    auth: str | None,
    replicas: str | None,
    admin: str | None,
    err: Console,
    tls: TlsFiles,
    *,
    gateway: str | None = None,
) -> DemoTarget | None:
    """The ``--target-*`` stack, or None for a local one; exits 2 when the flags are incomplete."""
    if auth is None and replicas is None and gateway is None:
        return None
    addresses = [part.strip() for part in (replicas or "").split(",") if part.strip()]
    username, _, password = (admin or "").partition(":")
    problems = []
    if auth is None or not addresses:
        problems.append("--target-auth and --target-replicas go together (and --target-gateway needs them)")
    if gateway is not None and not gateway.startswith(("http://", "https://")):
        problems.append("--target-gateway is a base URL: http://host:port")
    if gateway is not None and gateway.startswith("https://") and tls.ca_file is None:
        problems.append("--target-gateway https://… is verified against --tls-ca-file (AUTHMESH_TLS_CA_FILE)")
    if not username or not password:
        problems.append("--admin user:password (or AUTHMESH_BOOTSTRAP_ADMIN) is needed with --target-auth")
    if problems:
        for problem in problems:
            err.print(f"[red]usage error[/red]: {escape(problem)}")
        raise typer.Exit(EXIT_USAGE)
    assert auth is not None  # checked above
    return DemoTarget(
        auth_grpc=auth,
        replicas=tuple(ReplicaTarget(name=address, grpc=address) for address in addresses),
        admin=(username, password),
        tls=tls,
        gateway=gateway.rstrip("/") if gateway is not None else None,
    )


class RichNarrator:
    """Tells the story on a terminal as it happens.

    Args:
        console: Where to print.
    """

    def __init__(self, console: Console) -> None:
        self._console = console

    def act_started(self, number: int, title: str, story: str) -> None:
        """A rule with the act's title, then its story."""
        self._console.print()
        self._console.rule(f"[bold]Act {number}[/bold] · {escape(title)}", align="left")
        self._console.print(f"[dim]{escape(story)}[/dim]")

    def step(self, text: str) -> None:
        """One line."""
        self._console.print(f"  • {escape(text)}")

    def propagation(self, measured: Propagation) -> None:
        """The action, then each replica's first rejection."""
        self._console.print(
            f"  ⏱ {escape(measured.action)} took {measured.action_ms:.1f} ms "
            f"({escape(measured.action_result)}); watching {escape(measured.what)} on every replica:"
        )
        for timing in measured.replicas:
            if timing.first_rejected_ms is not None and timing.label in measured.expected:
                verdict = f"[green]refused after {timing.first_rejected_ms:8.1f} ms[/green]"
            elif timing.rejected_before_action:
                verdict = f"[red]refused before the action ({escape(timing.label)})[/red]"
            elif timing.first_rejected_ms is not None:
                verdict = f"[red]refused after {timing.first_rejected_ms:8.1f} ms[/red]"
            else:
                verdict = f"[red]still {escape(timing.label)} after {measured.deadline_s:g} s[/red]"
            self._console.print(
                f"      {escape(timing.replica):<16} {verdict}  {escape(timing.label)}  "
                f"[dim]{timing.polls} polls[/dim]"
            )

    def act_finished(self, result: ActResult) -> None:
        """The verdict, with every check that did not hold."""
        if result.skipped:
            self._console.print(f"  [yellow]– skipped[/yellow]: {escape(result.note or result.observed)}")
            return
        if result.ok:
            self._console.print("  [green]✔ as expected[/green]")
            return
        self._console.print(f"  [red]✘ not as expected[/red]: {escape(result.observed)}")
        for check in result.checks:
            if not check.ok:
                self._console.print(
                    f"      {escape(check.description)}: expected {escape(check.expected)}, "
                    f"observed {escape(check.observed)}"
                )


# Below this many columns an expected or observed text would wrap into a column of a few words.
_TEXT_MIN_WIDTH = 24


def print_summary(console: Console, report: DemoReport) -> None:
    """The summary: act, expected, observed, latency per replica (ms), verdict.

    A table where it fits the console with readable columns; one block per act otherwise (a narrow
    terminal, or a log file, which rich lays out for 80 columns).
    """
    table = _summary_table(report)
    console.print()
    console.print(table if fits(console, table) else _summary_blocks(report))
    failed = [act for act in report.acts if not act.ok and not act.skipped]
    if failed:
        console.print(f"[red]{len(failed)} act(s) did not behave as expected.[/red]")
    else:
        console.print(f"[green]Every act behaved as expected[/green] ({report.duration_s:.1f} s).")


def _verdict(act: ActResult) -> str:
    return "[yellow]skipped[/yellow]" if act.skipped else "[green]✔[/green]" if act.ok else "[red]✘[/red]"


def _summary_table(report: DemoReport) -> Table:
    table = Table(title="Summary", show_lines=True, title_justify="left")
    table.add_column("act", no_wrap=True)
    table.add_column("expected", ratio=1, min_width=_TEXT_MIN_WIDTH)
    table.add_column("observed", ratio=1, min_width=_TEXT_MIN_WIDTH)
    for name in report.replicas:
        table.add_column(f"{escape(name)}\nms", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for act in report.acts:
        main = act.main_propagation
        table.add_row(
            f"{act.number} {escape(act.key)}",
            escape(act.expected),
            escape(act.observed),
            *(_latency(main, name) for name in report.replicas),
            _verdict(act),
        )
    return table


def _summary_blocks(report: DemoReport) -> Table:
    """One block per act: verdict and act, then what was expected, observed and measured."""
    blocks = Table.grid(padding=(0, 1))
    blocks.title, blocks.title_justify = "Summary", "left"
    blocks.add_column(no_wrap=True)
    blocks.add_column(no_wrap=True)
    blocks.add_column(ratio=1)
    for act in report.acts:
        details = Table.grid(padding=(0, 1))
        details.add_column(style="dim", no_wrap=True)
        # A word longer than the line (on a very narrow terminal) folds rather than losing its end.
        details.add_column(ratio=1, overflow="fold")
        details.add_row("expected", escape(act.expected))
        details.add_row("observed", escape(act.observed))
        main = act.main_propagation
        if main is not None:
            latencies = " · ".join(f"{escape(name)} {_latency(main, name)}" for name in report.replicas)
            details.add_row("ms", latencies)
        blocks.add_row(_verdict(act), f"{act.number} {escape(act.key)}", details)
    return blocks


def _latency(propagation: Propagation | None, replica: str) -> str:
    if propagation is None:
        return "–"
    for timing in propagation.replicas:
        if timing.replica == replica:
            return "never" if timing.first_rejected_ms is None else f"{timing.first_rejected_ms:.1f}"
    return "–"
