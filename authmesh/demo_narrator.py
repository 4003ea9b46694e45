"""Who hears about the demo story as it happens: the command prints it, tests stay silent."""

from __future__ import annotations

from typing import Protocol

from authmesh.demo_report import ActResult, Propagation


class Narrator(Protocol):
    """Hears about the story as it happens (the command prints it; tests stay silent)."""

    def act_started(self, number: int, title: str, story: str) -> None:
        """An act begins."""
        ...

    def step(self, text: str) -> None:
        """Something happened within the act."""
        ...

    def propagation(self, measured: Propagation) -> None:
        """A change was measured on every replica."""
        ...

    def act_finished(self, result: ActResult) -> None:
        """An act ended."""
        ...


class SilentNarrator:
    """A narrator that says nothing."""

    def act_started(self, number: int, title: str, story: str) -> None:
        """Ignore."""

    def step(self, text: str) -> None:
        """Ignore."""

    def propagation(self, measured: Propagation) -> None:
        """Ignore."""

    def act_finished(self, result: ActResult) -> None:
        """Ignore."""
