"""``authmesh up``, ``authmesh healthcheck`` and ``authmesh compose-env``.

``up`` runs :class:`~authmesh.stack.LocalStack` until Ctrl-C or SIGTERM and prints where each part
listens (or one JSON object with ``--json``); ``--env-file`` also writes what a service of one's own needs
to join it. ``healthcheck`` asks a gRPC server for its health and exits
0 only when it is SERVING (the compose healthchecks run it). ``compose-env`` writes fresh secrets and
certificates for ``docker-compose.yml`` into a directory and prints the ``.env`` that points at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from authmesh._shared.errors import AuthError, ConfigurationError
from authmesh.compose_secrets import dotenv_lines, write_compose_secrets
from authmesh.gateway_stack import GATEWAY_STACK_ENV, LocalGateway
from authmesh.stack import (
    LocalStack,
    ServiceLogin,
    grpc_health_status,
)
from authmesh.terminal import fits
from authmesh.tls_options import TlsCaFileOption, TlsCertFileOption, TlsKeyFileOption, client_tls

EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_REPLICAS = 3
DEFAULT_HEALTH_TARGET = "127.0.0.1:50051"
WATCH_SECONDS = 1.0


def register(app: typer.Typer) -> None:
    """Add ``up``, ``healthcheck`` and ``compose-env`` to the ``authmesh`` command."""
    app.command("up")(up)
    app.command("healthcheck")(healthcheck)
    app.command("compose-env")(compose_env)


def up(
    replicas: Annotated[
        int,
        typer.Option(
            "--replicas",
            min=0,
            max=16,
            help="How many resource-service replicas (0: only the auth side, for services of your own).",
        ),
    ] = DEFAULT_REPLICAS,
    nats_cluster: Annotated[
        int,
        typer.Option(
            "--nats-cluster", help="1 for one NATS server, 3 for a cluster (the stream keeps 3 replicas)."
        ),
    ] = 1,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            file_okay=False,
            help="Keep data, logs and secrets here (reused next time); a temporary directory otherwise. "
            "One running stack per directory.",
        ),
    ] = None,
    env_file: Annotated[
        Path | None,
        typer.Option(
            "--env-file",
            dir_okay=False,
            help="Once the stack is up, write here (mode 600) every AUTHMESH_* variable a service of your "
            "own needs to join it: NATS, the service account, the auth service, issuer and audience.",
        ),
    ] = None,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="Every hop on TLS (gRPC, HTTPS, NATS, Redis or its Sentinels, the Envoy gateway) with "
            "certificates from a throwaway CA in the data directory; NATS and Redis also demand client "
            "certificates.",
        ),
    ] = False,
    service_login: Annotated[
        ServiceLogin,
        typer.Option(
            "--service-login",
            help="With --tls, how the replicas log in to the auth service: 'certificate' (their client "
            "certificates are their identity; the auth service then demands a client certificate from "
            "every caller, the CLI's too: see client_env) or 'password'.",
        ),
    ] = ServiceLogin.CERTIFICATE,
    gateway: Annotated[
        bool,
        typer.Option(
            "--gateway",
            help="Also run Envoy with authmesh's ext_authz before an echo service with no authmesh code.",
        ),
    ] = False,
    redis_sentinel: Annotated[
        bool,
        typer.Option(
            "--redis-sentinel",
            help="Redis as a primary, two replicas and three Sentinels; the auth service follows a failover.",
        ),
    ] = False,
) -> None:
    """Run NATS (JetStream), Redis, the auth service and N resource replicas until interrupted."""
    err = Console(stderr=True)
    if nats_cluster not in (1, 3):
        err.print("[red]--nats-cluster is 1 or 3[/red]")
        raise typer.Exit(EXIT_USAGE)
    if not json_output:
        err.print(f"Starting the stack ({replicas} replica(s), {nats_cluster} NATS node(s))…")
    try:
        asyncio.run(
            _serve(
                replicas,
                nats_cluster,
                data_dir,
                json_output,
                env_file,
                gateway,
                redis_sentinel,
                tls=tls,
                service_login=service_login,
            )
        )
    except AuthError as error:
        err.print(f"[red]the stack did not start[/red]: {escape(error.message)}")
        raise typer.Exit(EXIT_FAILURE) from None
    if not json_output:
        err.print("Stopped.")


async def _serve(
    replicas: int,
    nats_cluster: int,
    data_dir: Path | None,
    json_output: bool,
    env_file: Path | None = None,
    gateway: bool = False,
    redis_sentinel: bool = False,
    *,
    tls: bool = False,
    service_login: ServiceLogin = ServiceLogin.CERTIFICATE,
) -> None:
    """Start the stack, announce it, and stop it on SIGINT or SIGTERM (even while it is starting)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    announced = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None  # asyncio.run runs this as a task

    def interrupt() -> None:
        # While starting, cancel the start; once up, let the stack stop in order.
        if stop.is_set() or not announced.is_set():
            main.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt)
    try:
        env = GATEWAY_STACK_ENV if gateway else None
        async with (
            LocalStack(
                replicas=replicas,
                nats_cluster=nats_cluster,
                base_dir=data_dir,
                env=env,
                redis_sentinel=redis_sentinel,
                tls=tls,
                service_login=service_login,
            ) as stack,
            contextlib.AsyncExitStack() as extras,
        ):
            envoy = (
                await extras.enter_async_context(LocalGateway(stack, stack.data_dir / "gateway"))
                if gateway
                else None
            )
            if env_file is not None:
                write_env_file(env_file, stack.service_env())
            _announce(stack, json_output, envoy)
            announced.set()
            await _watch(stack, stop)
    except asyncio.CancelledError:
        # Our own signal handler cancelled the start; the stack has already stopped what it started.
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _watch(stack: LocalStack, stop: asyncio.Event) -> None:
    """Until ``stop`` is set, say on stderr when a part of the stack exits on its own."""
    err = Console(stderr=True)
    reported: set[str] = set()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WATCH_SECONDS):
                await stop.wait()
        for name, log in stack.exited().items():
            if name not in reported:
                reported.add(name)
                err.print(f"[red]{escape(name)} has exited[/red]; its log: {escape(str(log))}")


def _announce(stack: LocalStack, json_output: bool, gateway: LocalGateway | None = None) -> None:
    description = stack.describe()
    if gateway is not None:
        description["gateway"] = gateway.describe()
    if json_output:
        print(json.dumps(description), flush=True)
        return
    print_stack(Console(), description)


def print_stack(console: Console, description: dict[str, Any]) -> None:
    """Where each part of the stack listens, the admin's credentials and the client's environment.

    A table where it fits the console; one block per part otherwise (a narrow terminal, or a log file,
    which rich lays out for 80 columns). Addresses, credentials and paths are never cut or broken by
    the layout: they are copied from here.
    """
    rows = _stack_rows(description)
    table = Table(title="authmesh stack", title_justify="left")
    for column in ("part", "address", "HTTP"):
        table.add_column(column, no_wrap=True, overflow="fold")
    longest_word = max((len(word) for *_, notes in rows for word in notes.split()), default=0)
    table.add_column("notes", min_width=longest_word)
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    if fits(console, table):
        console.print(table)
    else:
        # One block per part: its address on the first line, the rest under it, folded if need be.
        blocks = Table.grid(padding=(0, 1))
        blocks.title, blocks.title_justify = "authmesh stack", "left"
        blocks.add_column(no_wrap=True)
        blocks.add_column(ratio=1, overflow="fold")
        for part, address, http, notes in rows:
            rest = f"HTTP {http} · {notes}" if http else notes
            blocks.add_row(escape(part), f"{escape(address)}\n[dim]{escape(rest)}[/dim]")
        console.print(blocks)
    admin = description["admin"]
    # Whole lines, never broken by the layout: a terminal wraps them, a log file keeps them intact.
    console.print(
        f"admin: [bold]{escape(admin['username'])}[/bold] / [bold]{escape(admin['password'])}[/bold]",
        soft_wrap=True,
    )
    console.print(
        f"  (admin commands: authmesh login {escape(admin['username'])} --scope admin)", soft_wrap=True
    )
    console.print("client environment:")
    for name, value in description["client_env"].items():
        console.print(f"  export {name}={escape(value)}", soft_wrap=True)
    console.print(f"data and logs: {escape(description['data_dir'])}", soft_wrap=True)
    console.print("Press Ctrl-C to stop.")


def _stack_rows(description: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Part, address, HTTP address and notes of each part of the stack."""
    nats = description["nats"]
    rows = [
        (f"nats-{index}", url, monitor.removeprefix("http://"), "JetStream, /healthz")
        for index, (url, monitor) in enumerate(zip(nats["urls"], nats["monitor"], strict=True))
    ]
    rows.append(("redis", description["redis"]["url"], "", "append-only, noeviction"))
    auth = description["auth"]
    # HTTPS on a TLS stack: the URL says so.
    https = "https, " if auth["url"].startswith("https://") else ""
    rows.append(("auth", auth["grpc"], auth["http"], f"{https}/.well-known/jwks.json"))
    rows += [
        (replica["name"], replica["grpc"], replica["http"], f"{https}/healthz, /metrics")
        for replica in description["replicas"]
    ]
    gateway = description.get("gateway")
    if gateway is not None:
        routes = ", ".join(
            f"{prefix} {scopes or 'any valid token'}" for prefix, scopes in gateway["routes"].items()
        )
        rows.append(
            (
                "gateway",
                gateway["url"].removeprefix("http://").removeprefix("https://"),
                gateway["admin"].removeprefix("http://"),
                f"Envoy + ext_authz{' (https)' if gateway['url'].startswith('https://') else ''}: {routes}",
            )
        )
        rows.append(
            ("upstream", gateway["upstream"].removeprefix("http://"), "", "echo service, no authmesh code")
        )
    return rows


def write_env_file(path: Path, variables: dict[str, str]) -> None:
    """Write ``NAME=value`` lines, readable by the owner only (it holds passwords), replacing the file.

    The values are URLs, names and generated passwords of letters and digits: nothing to quote, so the
    file works for ``set -a; . FILE``, ``docker --env-file`` and python-dotenv alike.
    """
    lines = ["# Written by `authmesh up --env-file`: a service of your own joins the stack with these."]
    lines += [f"{name}={value}" for name, value in variables.items()]
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    temporary.replace(path)  # a reader never sees half a file


def healthcheck(
    target: Annotated[
        str, typer.Option("--target", help="The gRPC server's host:port.")
    ] = DEFAULT_HEALTH_TARGET,
    service: Annotated[
        str, typer.Option("--service", help="The service to ask about; empty for the whole server.")
    ] = "",
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, max=60, help="Seconds to wait.")] = 3.0,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """Exit 0 when the gRPC server at --target reports SERVING (grpc.health.v1), else 1."""
    try:
        tls = client_tls(tls_ca_file, tls_cert_file, tls_key_file)
    except ConfigurationError as error:
        Console(stderr=True).print(f"[red]usage error[/red]: {escape(error.message)}")
        raise typer.Exit(EXIT_USAGE) from None
    status = asyncio.run(grpc_health_status(target, timeout, service, tls=tls))
    if status == "SERVING":
        print(status)
        return
    Console(stderr=True).print(f"{escape(target)}: {status or 'no answer'}")
    raise typer.Exit(EXIT_FAILURE)


def compose_env(
    secrets_dir: Annotated[
        Path,
        typer.Option(
            "--secrets-dir",
            file_okay=False,
            help="Write the secrets, the configuration that carries passwords and the certificates here "
            "(made 0700).",
        ),
    ] = Path("secrets"),
    force: Annotated[
        bool, typer.Option("--force", help="Replace the secrets of a directory that already holds some.")
    ] = False,
    sentinel: Annotated[
        bool,
        typer.Option(
            "--sentinel",
            help="Turn on the sentinel profile (a Redis replica, three Sentinels the auth service follows).",
        ),
    ] = False,
) -> None:
    """Write secrets and certificates for docker-compose.yml, print its .env: authmesh compose-env > .env"""
    try:
        write_compose_secrets(secrets_dir, force=force)
    except ConfigurationError as error:
        Console(stderr=True, soft_wrap=True).print(f"[red]error[/red]: {escape(error.message)}")
        raise typer.Exit(EXIT_FAILURE) from None
    with contextlib.suppress(BrokenPipeError):
        print("\n".join(dotenv_lines(secrets_dir, sentinel=sentinel)), flush=True)
