"""How far behind the revocation state may be, and the fallback when it is too far behind.

The auth service publishes a heartbeat every second. A resource service whose last heartbeat is older
than its staleness bound cannot promise it has seen every revocation, so it is *degraded*: each token
that verifies locally is also checked with the auth service's ``Introspect`` (the answer cached for at
most the bound), and when that fails too the call is refused with ``UNAVAILABLE``
(``REVOCATION_STATE_STALE``). So no replica accepts a revoked token for longer than the bound.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from authmesh._shared.claims import AccessClaims
from authmesh._shared.errors import KeyRevoked, TokenExpired, TokenRejected, TokenRevoked, Unavailable

REVOCATION_STATE_STALE = "REVOCATION_STATE_STALE"
_REVOKED_REASONS = frozenset({"TOKEN_REVOKED", "SESSION_REVOKED", "USER_REVOKED"})
_log = structlog.get_logger(__name__)


class StalenessMonitor:
    """Tracks the age of the last heartbeat against the staleness bound.

    Args:
        bound: Seconds without a heartbeat after which the state is stale.
        clock: Monotonic seconds.
    """

    def __init__(self, bound: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._bound = bound
        self._clock = clock
        self._created = clock()
        self._last: float | None = None
        self._held_until: float | None = None

    @property
    def bound(self) -> float:
        """The staleness bound, seconds."""
        return self._bound

    def heartbeat(self, age: float = 0.0) -> None:
        """Record a heartbeat that was ``age`` seconds old when it arrived."""
        at = self._clock() - max(0.0, age)
        if self._last is None or at > self._last:
            self._last = at

    def hold(self, seconds: float) -> None:
        """Stay degraded for ``seconds`` whatever the heartbeats say (revocations are known to be lost)."""
        until = self._clock() + seconds
        if self._held_until is None or until > self._held_until:
            self._held_until = until

    def release(self) -> None:
        """End a :meth:`hold` early (what was lost has been recovered)."""
        self._held_until = None

    @property
    def held(self) -> bool:
        """Whether a :meth:`hold` keeps the state degraded."""
        return self._held_until is not None and self._clock() < self._held_until

    @property
    def seconds(self) -> float:
        """Seconds since the last heartbeat (since start when none has arrived)."""
        return max(0.0, self._clock() - (self._created if self._last is None else self._last))

    @property
    def degraded(self) -> bool:
        """Whether the last heartbeat is older than the bound (or none has arrived), or a hold is on."""
        return self._last is None or self._clock() - self._last > self._bound or self.held


@dataclass(frozen=True, slots=True)
class Introspection:
    """The auth service's answer about one token (RFC 7662, the fields a resource service needs).

    Attributes:
        active: Whether the token is currently valid.
        subject: ``sub`` when active.
        session_id: ``sid`` when active.
        token_id: ``jti`` when active.
        inactive_reason: Why not, as a stable code (``TOKEN_REVOKED``, ...); empty when active.
    """

    active: bool
    subject: str = ""
    session_id: str = ""
    token_id: str = ""
    inactive_reason: str = ""


class Introspector(Protocol):
    """Asks the auth service about a token."""

    async def introspect(self, token: str) -> Introspection:
        """The auth service's answer.

        Raises:
            Unavailable: The auth service could not be asked.
        """
        ...


def inactive_error(reason: str) -> TokenRejected:
    """The error for a token the auth service called inactive, by its reason code."""
    if reason == KeyRevoked.code:
        return KeyRevoked()
    if reason in _REVOKED_REASONS:
        return TokenRevoked(reason.split("_")[0].lower() + " revoked", code=reason)
    if reason == TokenExpired.code:
        return TokenExpired()
    return TokenRejected("token not active", code=reason or "TOKEN_INACTIVE")


class IntrospectionFallback:
    """Checks tokens with ``Introspect`` while degraded; answers cached briefly, one call per token at once.

    Args:
        introspector: The auth service client.
        max_age: Longest time an answer is reused, seconds (the staleness bound).
        timeout: Deadline of one ``Introspect`` call, seconds.
        max_entries: Cache size.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        introspector: Introspector,
        *,
        max_age: float,
        timeout: float = 1.0,
        max_entries: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._introspector = introspector
        self._max_age = max_age
        self._timeout = timeout
        self._max_entries = max_entries
        self._clock = clock
        self._answers: OrderedDict[str, tuple[float, Introspection]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[Introspection]] = {}
        self._calls = 0

    @property
    def calls(self) -> int:
        """``Introspect`` calls made so far."""
        return self._calls

    async def check(self, token: str, claims: AccessClaims) -> None:
        """Ask the auth service whether a locally verified token is still active.

        Args:
            token: The token as presented.
            claims: Its locally verified claims (``jti`` keys the cache).

        Raises:
            TokenRejected: The auth service says the token is not active.
            Unavailable: With code ``REVOCATION_STATE_STALE`` when it could not be asked.
        """
        answer = self._cached(claims.jti)
        if answer is None:
            answer = await self._ask(token, claims.jti)
        if not answer.active:
            raise inactive_error(answer.inactive_reason)

    def forget(self) -> None:
        """Drop every cached answer (when the local state is fresh again)."""
        self._answers.clear()

    def _cached(self, jti: str) -> Introspection | None:
        entry = self._answers.get(jti)
        if entry is None:
            return None
        until, answer = entry
        if until > self._clock():
            return answer
        del self._answers[jti]
        return None

    async def _ask(self, token: str, jti: str) -> Introspection:
        task = self._inflight.get(jti)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._call(token, jti), name="introspect")
            self._inflight[jti] = task
            task.add_done_callback(lambda done: self._finished(jti, done))
        return await asyncio.shield(task)

    def _finished(self, jti: str, task: asyncio.Task[Introspection]) -> None:
        if self._inflight.get(jti) is task:
            del self._inflight[jti]
        if not task.cancelled():
            task.exception()  # retrieved by the waiters; this keeps an orphan from being logged

    async def _call(self, token: str, jti: str) -> Introspection:
        self._calls += 1
        # The answer describes the auth service's state when it was asked: age it from then.
        asked_at = self._clock()
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._introspector.introspect(token)
        except Exception as error:  # any failure to ask leaves us unable to decide: refuse
            _log.warning("introspection failed", error=type(error).__name__)
            raise Unavailable("revocation state stale", code=REVOCATION_STATE_STALE) from error
        self._answers[jti] = (asked_at + self._max_age, answer)
        while len(self._answers) > self._max_entries:
            self._answers.popitem(last=False)
        return answer

    async def aclose(self) -> None:
        """Cancel calls still in flight."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
