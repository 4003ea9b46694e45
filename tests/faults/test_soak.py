"""``authmesh soak``: a short run on a fresh local stack, with NATS faults, through the command itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer
from typer.testing import CliRunner, Result

from authmesh.soak_commands import register

SECONDS = 10
REPLICAS = 2


def cli() -> typer.Typer:
    """The ``soak`` command in an application of its own, as ``authmesh`` has it."""
    app = typer.Typer()
    register(app)

    @app.callback()
    def root() -> None:
        """A group, so that ``soak`` is a subcommand as in ``authmesh``."""

    return app


async def run_cli(*args: str) -> Result:
    """``authmesh ARGS`` off the test's event loop (the command runs a loop of its own)."""
    return await asyncio.to_thread(CliRunner().invoke, cli(), list(args))


async def test_a_short_soak_with_faults_accepts_no_revoked_token_after_the_staleness_bound(
    tmp_path: Path,
) -> None:
    """Invariant, for a 10 s soak of two replicas (a quarter of an hour is the real thing; the test keeps
    the suite fast) with random revocations and NATS links cut and restored:

    - no revoked token is accepted in a call that starts later than the staleness bound after its
      revocation was acknowledged, and no call gets ``UNKNOWN``/``INTERNAL``: the command exits 0;
    - the report shows load on both replicas, revocations, their propagation percentiles (every probe
      saw a refusal), and the faults that were injected.
    """
    report_path = tmp_path / "soak.json"
    result = await run_cli(
        "soak",
        "--seconds",
        str(SECONDS),
        "--replicas",
        str(REPLICAS),
        "--seed",
        "7",
        "--json",
        str(report_path),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["ok"] is True
    assert report["late_acceptances"] == []
    assert report["forbidden_answers"] == 0
    assert report["propagation_timeouts"] == 0
    assert report["revocations"] >= 10
    assert report["verifications"] > report["revocations"]
    assert report["outcomes"]["OK"] > 0
    assert report["replicas"] == ["resource-1", "resource-2"]
    assert report["propagation"]["samples"] == report["revocations"] * REPLICAS
    assert report["faults"], "no fault was injected"
    assert "late acceptances" in result.output
