"""What the demo story observed: each act's checks, the measured spreads of a change, the whole report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ReplicaTiming:
    """How one replica answered a token while a change spread.

    Attributes:
        replica: The replica's name.
        first_rejected_ms: From the start of the action to the first rejecting answer; None if none came
            before the deadline.
        last_accepted_ms: From the start of the action to the sending of the last probe the replica
            accepted (None if none).
        label: The first rejection's reason (or status code), else ``OK`` or what the replica last said.
        polls: How many calls the poller made.
        unanswered: Calls that failed without a decision (unreachable, deadline exceeded).
        rejected_before_action: The token was already refused before the action started.
    """

    replica: str
    first_rejected_ms: float | None
    last_accepted_ms: float | None
    label: str
    polls: int
    unanswered: int = 0
    rejected_before_action: bool = False


@dataclass(frozen=True, slots=True)
class Propagation:
    """A change, and when each replica started to act on it.

    Attributes:
        what: The token being watched ("the stolen access token").
        action: What changed it ("RevokeSession").
        started_at_s: When the action started, seconds since the demo started.
        action_ms: How long the action's own call took.
        action_result: ``OK`` or the failure the action's call got.
        expected: The rejection reasons that count as correct.
        deadline_s: How long the pollers waited at most.
        replicas: Per replica, in the stack's order.
    """

    what: str
    action: str
    started_at_s: float
    action_ms: float
    action_result: str
    expected: tuple[str, ...]
    deadline_s: float
    replicas: tuple[ReplicaTiming, ...]

    @property
    def ok(self) -> bool:
        """Every replica rejected the token with an expected reason before the deadline."""
        return all(
            timing.first_rejected_ms is not None
            and timing.label in self.expected
            and not timing.rejected_before_action
            for timing in self.replicas
        )


@dataclass(frozen=True, slots=True)
class Check:
    """One expectation inside an act.

    Attributes:
        description: What was checked.
        expected: What the contract promises.
        observed: What happened.
        ok: Whether they agree.
    """

    description: str
    expected: str
    observed: str
    ok: bool


@dataclass(frozen=True, slots=True)
class Mark:
    """A moment on the timeline.

    Attributes:
        at_s: Seconds since the demo started.
        label: What happened.
        replica: The replica it concerns, if one.
    """

    at_s: float
    label: str
    replica: str | None = None


@dataclass(frozen=True, slots=True)
class ActResult:
    """What one act expected and observed.

    Attributes:
        number: 1-based position in the story.
        key: A short stable name (``revocation``).
        title: The act's title.
        expected: What should happen, in one line.
        observed: What did, in one line.
        ok: Whether every check held.
        skipped: The act could not run on this stack (``note`` says why); a skipped act is not a failure.
        note: Anything worth knowing.
        checks: The individual expectations.
        propagations: The measured spreads of a change.
        marks: Moments on the timeline.
        started_at_s: When the act started, seconds since the demo started.
        finished_at_s: When it ended.
    """

    number: int
    key: str
    title: str
    expected: str
    observed: str
    ok: bool
    skipped: bool = False
    note: str = ""
    checks: tuple[Check, ...] = ()
    propagations: tuple[Propagation, ...] = ()
    marks: tuple[Mark, ...] = ()
    started_at_s: float = 0.0
    finished_at_s: float = 0.0

    @property
    def main_propagation(self) -> Propagation | None:
        """The first measured spread, the one a summary shows."""
        return self.propagations[0] if self.propagations else None


@dataclass(frozen=True, slots=True)
class DemoReport:
    """The whole story's outcome.

    Attributes:
        started_at_unix: When the demo started, Unix seconds.
        auth_target: The auth service's address.
        replicas: The replicas' names.
        local: Whether the demo ran on a stack it started.
        staleness_bound: The replicas' staleness bound, when known.
        acts: Every act, in order.
        duration_s: How long the story took.
    """

    started_at_unix: float
    auth_target: str
    replicas: tuple[str, ...]
    local: bool
    staleness_bound: float | None
    acts: tuple[ActResult, ...]
    duration_s: float

    @property
    def ok(self) -> bool:
        """Whether every act that ran behaved as expected."""
        return all(act.ok or act.skipped for act in self.acts)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (what ``--json`` writes)."""
        document = asdict(self)
        document["ok"] = self.ok
        for act, data in zip(self.acts, document["acts"], strict=True):
            for propagation, values in zip(act.propagations, data["propagations"], strict=True):
                values["ok"] = propagation.ok
        return document
