"""The ``authmesh`` command itself: its version."""

from __future__ import annotations

import asyncio
import importlib.metadata

from typer.testing import CliRunner

from authmesh.cli import DISTRIBUTION, app
from authmesh.stack import authmesh_command


def test_version_is_the_installed_distributions() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"authmesh {importlib.metadata.version(DISTRIBUTION)}\n"


async def test_the_installed_command_prints_its_version_and_exits_zero() -> None:
    process = await asyncio.create_subprocess_exec(
        *authmesh_command("--version"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().split() == ["authmesh", importlib.metadata.version(DISTRIBUTION)]
