"""The one-line texts the demo's acts observe: answers, waits and measured spreads, in words."""

from __future__ import annotations

from collections.abc import Sequence

from authmesh.client import Outcome
from authmesh.demo_report import Propagation, ReplicaTiming


def describe_answers(answers: Sequence[Outcome]) -> str:
    labels = {outcome.label for outcome in answers}
    if len(labels) == 1:
        return f"{labels.pop()} on all {len(answers)}"
    return ", ".join(outcome.label for outcome in answers)


def ms_text(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} ms"


def timing_text(timing: ReplicaTiming) -> str:
    if timing.rejected_before_action:
        return f"already refused before the action ({timing.label})"
    if timing.first_rejected_ms is None:
        return f"still {timing.label} at the deadline"
    return f"{timing.label} after {timing.first_rejected_ms:.1f} ms"


def spread_text(measured: Propagation) -> str:
    if measured.ok:
        labels = "/".join(sorted({timing.label for timing in measured.replicas}))
        return f"{labels} on all {len(measured.replicas)}"
    return "; ".join(f"{timing.replica}: {timing_text(timing)}" for timing in measured.replicas)


def describe_waits(waits: dict[str, float | None], state: str = "accepted") -> str:
    if all(ms is not None for ms in waits.values()):
        return f"{state} on all {len(waits)}"
    return ", ".join(
        f"{name}: {f'not {state}' if ms is None else f'{state} after {ms:.0f} ms'}"
        for name, ms in waits.items()
    )
