"""Exponential backoff with jitter for the loops that retry until they succeed or are cancelled.

Built on ``tenacity``; every background retry of the library goes through :func:`backoff` so they all
wait the same way: ``initial`` seconds, doubling to at most ``maximum``, each wait plus up to
``initial`` of jitter (so replicas cut off together do not come back in lockstep). An error that says
how long to wait (a ``retry_after`` of seconds, as a rate limit's answer carries) is waited out in
full, plus the jitter. Nothing is retried that the caller did not name, and a cancellation always ends
the loop.

::

    async for attempt in backoff(Unavailable, what="key refetch"):
        with attempt:
            await keys.refresh_for(kid)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
import tenacity

RETRY_INITIAL_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0
_log = structlog.get_logger(__name__)


def backoff(
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    *,
    what: str,
    unless: tuple[type[BaseException], ...] = (),
    initial: float = RETRY_INITIAL_SECONDS,
    maximum: float = RETRY_MAX_SECONDS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> tenacity.AsyncRetrying:
    """Attempts of an operation, retried while it raises ``retry_on`` (forever, until cancelled).

    Args:
        retry_on: The exceptions that mean "try again"; anything else propagates at once.
        what: What is retried, for the log line of each retry.
        unless: Subclasses of ``retry_on`` that propagate at once all the same.
        initial: The first wait, seconds (also the most jitter added to each wait).
        maximum: The longest wait, seconds.
        sleep: How to wait between attempts (a wait that may end early, say).

    Returns:
        An async iterator of attempts (``async for attempt in …: with attempt: …``).
    """

    def log(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        _log.warning(f"{what} failed; retrying", error=type(error).__name__, retry_in_s=round(wait, 2))

    exponential = tenacity.wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)
    jitter = tenacity.wait_random(0, initial)

    def wait(state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        asked = getattr(error, "retry_after", 0.0)
        if isinstance(asked, int | float) and asked > 0:
            return max(exponential(state), asked + jitter(state))
        return exponential(state)

    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(
            lambda error: isinstance(error, retry_on) and not isinstance(error, unless)
        ),
        wait=wait,
        sleep=sleep,
        before_sleep=log,
        reraise=True,
    )
