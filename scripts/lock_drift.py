"""Which installed distributions differ from the lock: ``python scripts/lock_drift.py requirements/lock.txt``.

Run with the interpreter of the environment to compare (``make test-latest`` runs it in ``.venv-latest``).
Prints one line per distribution whose installed version is not the locked one. Exit status 0 when every
locked distribution that is installed has its locked version, 1 when some differ, 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def locked_versions(lock: Path) -> dict[str, str]:
    """The ``name==version`` pins of a pip-compile style lock that apply to this interpreter.

    A universal lock pins some distributions twice, under exclusive markers (``python_full_version``).
    """
    pins: dict[str, str] = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith(("#", "-")):
            continue
        pin = Requirement(text)
        if pin.marker is not None and not pin.marker.evaluate():
            continue
        [specifier] = pin.specifier
        pins[canonicalize_name(pin.name)] = specifier.version
    return pins


def drift(pins: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, locked, installed) for every locked distribution installed at another version."""
    installed: dict[str, str] = {
        canonicalize_name(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()
    }
    return sorted(
        (name, locked, installed[name])
        for name, locked in pins.items()
        if name in installed and installed[name] != locked
    )


def main() -> int:
    """Print the drift; see the module docstring for the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    arguments = parser.parse_args()
    if not arguments.lock.is_file():
        print(f"no lock at {arguments.lock}", file=sys.stderr)
        return 2
    differences = drift(locked_versions(arguments.lock))
    if not differences:
        print(f"every installed distribution has the version {arguments.lock} locks")
        return 0
    print(f"installed versions that differ from {arguments.lock}:")
    for name, locked, installed in differences:
        print(f"  {name}: locked {locked}, installed {installed}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
