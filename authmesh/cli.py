"""The ``authmesh`` command: run the services, the stack, the demo, the client and the benchmarks."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from authmesh import client_commands, demo_commands, soak_commands, stack_commands
from authmesh._shared.errors import AuthError
from authmesh._shared.settings import AuthSettings, CommonSettings, ResourceSettings
from authmesh.bench import commands as bench_commands

SettingsT = TypeVar("SettingsT", bound=CommonSettings)
# Server commands take every AUTHMESH_* setting as a --flag too; pydantic-settings parses them.
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}

app = typer.Typer(
    name="authmesh",
    help="Authentication for fleets of Python gRPC services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_stderr = Console(stderr=True, soft_wrap=True)
DISTRIBUTION = "authmesh"


def _print_version(requested: bool) -> None:
    if requested:
        print(f"authmesh {importlib.metadata.version(DISTRIBUTION)}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the installed version and exit."
        ),
    ] = False,
) -> None:
    """Authentication for fleets of Python gRPC services."""


def load_settings(kind: type[SettingsT], args: list[str], prog: str) -> SettingsT:
    """Settings from the environment and ``--flags`` (flags win); exits 2 with a clear message if invalid."""
    try:
        return kind(_cli_parse_args=args, _cli_kebab_case=True, _cli_prog_name=prog)  # type: ignore[call-arg]
    except ValidationError as error:
        for problem in error.errors():
            name = "_".join(str(part) for part in problem["loc"]) or "settings"
            _stderr.print(f"[red]invalid setting AUTHMESH_{name.upper()}[/red]: {problem['msg']}")
        raise typer.Exit(2) from None


@app.command("auth-server", context_settings=PASSTHROUGH)
def auth_server(ctx: typer.Context) -> None:
    """Run the auth service (gRPC and HTTP). Every AUTHMESH_* variable is also a --flag (see --help)."""
    from authmesh._auth_service.app import run

    settings = load_settings(AuthSettings, ctx.args, "authmesh auth-server")
    _run_service(lambda: run(settings))


@app.command("resource-server", context_settings=PASSTHROUGH)
def resource_server(ctx: typer.Context) -> None:
    """Run one resource-service replica. Every AUTHMESH_* variable is also a --flag (see --help)."""
    from authmesh._resource_service.app import run

    settings = load_settings(ResourceSettings, ctx.args, "authmesh resource-server")
    _run_service(lambda: run(settings))


def _run_service(start: Callable[[], None]) -> None:
    try:
        start()
    except AuthError as error:
        _stderr.print(f"[red]{error.code}[/red]: {error.message}")
        raise typer.Exit(1) from None
    except OSError as error:
        _stderr.print(f"[red]cannot start[/red]: {error}")
        raise typer.Exit(1) from None


for commands in (client_commands, demo_commands, stack_commands, soak_commands, bench_commands):
    commands.register(app)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="authmesh")


if __name__ == "__main__":
    main()
