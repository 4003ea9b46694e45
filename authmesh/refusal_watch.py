"""Watching a replica refuse a token: the one probe loop of the demo, the soak run and the benchmark.

A watcher asks one replica about one token again and again — as soon as the previous answer is in, or
every ``interval`` seconds — until the replica refuses it or the deadline passes, and writes down when
the first refusal arrived and when the last accepting probe was sent (so the refusal is known to have
happened between the two). An answer that decides nothing (unreachable, deadline exceeded) is counted
and followed by a short pause, so a dead replica is not asked in a tight loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from authmesh.client import Outcome

UNAUTHENTICATED = "UNAUTHENTICATED"
# After an answer that decides nothing: long enough not to spin on instant failures, short against
# the milliseconds being measured.
UNANSWERED_PAUSE_SECONDS = 0.01


@dataclass(frozen=True, slots=True)
class Answer:
    """What one probe learnt.

    Attributes:
        accepted: The replica accepted the token.
        refused: The replica refused it (for a reason that counts).
        label: ``OK``, the refusal's reason, or why there was no decision.
    """

    accepted: bool
    refused: bool
    label: str

    @classmethod
    def of(cls, outcome: Outcome, refusing: Collection[str] = ()) -> Answer:
        """An :class:`~authmesh.client.Outcome` read as an answer.

        Args:
            outcome: How the replica answered.
            refusing: Labels besides ``UNAUTHENTICATED`` that count as a refusal.
        """
        refused = not outcome.accepted and (outcome.code == UNAUTHENTICATED or outcome.label in refusing)
        return cls(outcome.accepted, refused, outcome.label)


ACCEPTED = Answer(accepted=True, refused=False, label="OK")
REFUSED = Answer(accepted=False, refused=True, label=UNAUTHENTICATED)
NO_ANSWER = Answer(accepted=False, refused=False, label="no answer")


@dataclass(frozen=True, slots=True)
class Watched:
    """How one replica answered while it was watched.

    Attributes:
        refused_at: The clock when the first refusing answer arrived; None if none came in time.
        last_accepted_sent: The clock when the last accepting probe was sent; None if none accepted.
        label: The refusal's label, else what the replica last said.
        probes: How many probes were made.
        unanswered: Probes that decided nothing.
    """

    refused_at: float | None
    last_accepted_sent: float | None
    label: str
    probes: int
    unanswered: int


async def watch_until_refused(
    ask: Callable[[], Awaitable[Answer]],
    *,
    until: float,
    clock: Callable[[], float],
    interval: float = 0.0,
    unanswered_pause: float = UNANSWERED_PAUSE_SECONDS,
) -> Watched:
    """Ask until the first refusal, or until the clock reaches ``until``.

    Args:
        ask: One probe of the replica.
        until: When to give up, on ``clock``.
        clock: The clock every time is read from (seconds, or any unit ``until`` is in).
        interval: Pause after every answer, seconds (0: ask again at once).
        unanswered_pause: Pause after an answer that decides nothing, seconds.

    Returns:
        What the watch saw.
    """
    probes = unanswered = 0
    last_accepted_sent: float | None = None
    label = NO_ANSWER.label
    while (sent := clock()) < until:
        answer = await ask()
        probes += 1
        label = answer.label
        if answer.refused:
            return Watched(clock(), last_accepted_sent, label, probes, unanswered)
        if answer.accepted:
            last_accepted_sent = sent
        else:
            unanswered += 1
        pause = interval if answer.accepted else max(interval, unanswered_pause)
        if pause > 0:
            await asyncio.sleep(pause)
    return Watched(None, last_accepted_sent, label, probes, unanswered)
