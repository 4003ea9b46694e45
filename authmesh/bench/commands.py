"""``authmesh bench …``: one subcommand per benchmark, each printing a table and optionally writing JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

bench_app = typer.Typer(
    help="Measure authmesh against baselines taken in the same run.", no_args_is_help=True
)

JsonOption = Annotated[Path | None, typer.Option("--json", help="also write the result as JSON to this file")]


@bench_app.command("verify")
def verify(
    json_path: JsonOption = None,
    rounds: Annotated[int, typer.Option(min=1, max=100, help="rounds; medians are reported")] = 7,
    tokens: Annotated[int, typer.Option(min=10, max=100_000, help="distinct tokens per round")] = 2000,
) -> None:
    """Verifications per second on one core: cold and warm, beside raw ES256, PyJWT and joserfc."""
    from authmesh.bench.verify import main

    raise typer.Exit(main(json_path, rounds, tokens))


def register(app: typer.Typer) -> None:
    """Add the ``bench`` group to the ``authmesh`` command."""
    app.add_typer(bench_app, name="bench")
