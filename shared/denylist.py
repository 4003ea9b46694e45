"""The in-memory revocation state of a resource service: what must be refused, and until when.

Four kinds of entry, each applied idempotently (applying an event twice changes nothing):

* a revoked access token (``jti``) until its ``exp`` plus the leeway, after which the verifier refuses
  the token as expired anyway;
* a revoked session (``sid``) for one access-token lifetime after the revocation, by when every token
  issued in it has expired;
* a revoked user (``sub``): every token issued at or before ``not_before_ms``, for one lifetime after it;
* a revoked DPoP key binding (``jkt``) for one lifetime after the revocation (the auth service binds no
  new token to it).

Retired signing keys are not kept here: the key cache (:mod:`authmesh._shared.key_cache`) owns them,
evicts them at once and refuses them for the life of the process, and the verifier asks it on every call.

Entries expire on their own, so memory is bounded by the revocations of one access-token lifetime
(plus, after a forward step of the clock, the step: see below). They are kept in *generations*: one
set (or map) per window of expiry times, and a whole generation is dropped once its window has passed.
A lookup asks each live generation (a handful of hash lookups), which keeps every entry exact by
``jti`` whatever ``exp`` an event carried, at the cost of an entry living up to one window longer than
it must.

Tokens authmesh issues carry a UUIDv7 ``jti``; the denylist keys them by 60 of its random bits, a
small int (32 bytes) instead of a 36-character string (~85 bytes). Two jtis sharing those bits is a
false revocation (fail closed) with probability ``revoked / 2**60`` per check. Other jtis are kept as
strings.

**Clock steps.** Whether an entry has expired is judged by the *earliest* reading the wall clock
could plausibly give again, not by its reading now: the lowest ``wall - elapsed`` offset seen so far,
carried forward by a clock that never steps (:func:`boot_clock`). A wall clock stepped forward (by NTP
catching up, an operator, a bad time source) would otherwise purge entries whose tokens its corrected
reading still accepts, and a token revoked by its ``jti`` would be accepted again for the rest of its
life. Held back this way, a step forward delays purging by the size of the step instead; a step back
is followed at once (it only keeps entries longer). The delay is capped at :data:`MAX_CLOCK_STEP`, so
a clock that was simply behind when the process started and is put right does not keep every later
entry for ever: a forward step larger than the cap, later undone, can drop what expires in the part of
the step beyond the cap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from authmesh._shared.claims import AccessClaims
from authmesh._shared.errors import TokenRevoked
from authmesh._shared.events import (
    EventBody,
    KeyBindingRevokedEvent,
    SecurityEvent,
    SessionRevokedEvent,
    TokenRevokedEvent,
    UserRevokedEvent,
)
from authmesh._shared.verifier import Clock

_Generation = TypeVar("_Generation", bound=Sized)

# Generations per access-token lifetime: more means tighter expiry and more lookups per check.
GENERATIONS_PER_LIFETIME = 8
# Seconds a forward step of the wall clock may hold purging back (see the module docstring): a step
# up to this size, later corrected, loses no entry.
MAX_CLOCK_STEP = 3600.0
_BOOT_CLOCK_ID: int = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
_JTI_KEY_MASK = (1 << 60) - 1


def jti_key(jti: str) -> Hashable:
    """The compact key a ``jti`` is stored under: 60 random bits of a UUIDv7, else the string itself.

    The test is deliberately cheap (it runs on every request): anything shaped like a UUIDv7 is keyed
    by those bits. Two jtis sharing them can only make a token be refused, never accepted.
    """
    if len(jti) == 36 and jti[14] == "7" and jti[8] == jti[13] == jti[18] == jti[23] == "-":
        try:
            return int(jti[19:23] + jti[24:], 16) & _JTI_KEY_MASK
        except ValueError:
            pass
    return jti


def boot_clock() -> float:
    """Seconds since boot by a clock that never steps and keeps counting through a suspend (Linux's
    ``CLOCK_BOOTTIME``; the monotonic clock where there is none)."""
    return time.clock_gettime(_BOOT_CLOCK_ID)


class EarliestClock:
    """The earliest Unix time the wall clock could read again: when an entry may be forgotten.

    It is the wall clock's reading now, less the largest forward step seen since it was made (up to
    ``max_step``): the lowest ``wall - elapsed`` offset observed, carried forward by ``elapsed``.

    Args:
        wall: Unix time in seconds (may be stepped).
        elapsed: Seconds from any origin by a clock that never steps.
        max_step: The largest step held back.
    """

    __slots__ = ("_elapsed", "_max_step", "_offset", "_wall")

    def __init__(self, wall: Clock, elapsed: Clock, max_step: float = MAX_CLOCK_STEP) -> None:
        self._wall = wall
        self._elapsed = elapsed
        self._max_step = max_step
        self._offset = wall() - elapsed()

    def read(self) -> tuple[float, float]:
        """The wall clock's reading and the earliest one it could give again, in that order."""
        wall = self._wall()
        elapsed = self._elapsed()
        offset = wall - elapsed
        self._offset = max(min(self._offset, offset), offset - self._max_step)
        return wall, elapsed + self._offset

    def __call__(self) -> float:
        """The earliest reading the wall clock could give again."""
        return self.read()[1]


class RevokedTokenEntry(Protocol):
    """One revoked access token of a snapshot: a :class:`~authmesh._shared.events.TokenRevokedEvent`, or any
    record with the same two fields (the snapshot's wire messages as they arrived)."""

    @property
    def jti(self) -> str:
        """The token's ``jti``."""
        ...

    @property
    def exp(self) -> int:
        """The token's expiry (seconds since the epoch)."""
        ...


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """A part of the auth service's revocation snapshot, as plain values.

    Attributes:
        tokens: Revoked access tokens. A snapshot holds up to hundreds of thousands, so the client hands
            them over as the records it received rather than building a value object for each.
        sessions: Revoked sessions.
        users: Revoked users.
        key_bindings: Revoked DPoP key bindings, as ``(jkt, revoked_at_ms)``.
        retired_key_ids: Retired signing keys.
        stream_sequence: The last ``AUTH_EVENTS`` sequence the snapshot reflects (0: an empty stream).
        session_revoked_at_ms: When each session was revoked, by the issuer's clock, where known.
    """

    tokens: Sequence[RevokedTokenEntry] = ()
    sessions: tuple[SessionRevokedEvent, ...] = ()
    users: tuple[UserRevokedEvent, ...] = ()
    key_bindings: tuple[tuple[str, int], ...] = ()
    retired_key_ids: tuple[str, ...] = ()
    stream_sequence: int = 0
    session_revoked_at_ms: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DenylistSizes:
    """How many entries of each kind the denylist holds."""

    tokens: int
    sessions: int
    users: int
    key_bindings: int = 0

    @property
    def total(self) -> int:
        """All entries."""
        return self.tokens + self.sessions + self.users + self.key_bindings


class _Generations(Generic[_Generation]):
    """Entries kept in generations of ``width`` seconds by expiry, so whole generations expire at once."""

    __slots__ = ("_generations", "_live", "_new", "_width")

    def __init__(self, width: float, new: Callable[[], _Generation]) -> None:
        self._width = width
        self._new = new
        self._generations: dict[int, _Generation] = {}
        # The generations as a list, for the lookup loop (rebuilt only when one is added or dropped).
        self._live: list[_Generation] = []

    def _generation(self, expires_at: float) -> _Generation:
        index = math.floor(expires_at / self._width)
        generation = self._generations.get(index)
        if generation is None:
            generation = self._generations[index] = self._new()
            self._live = list(self._generations.values())
        return generation

    def __len__(self) -> int:
        return sum(len(generation) for generation in self._live)

    def purge(self, now: float) -> None:
        expired = [index for index in self._generations if (index + 1) * self._width <= now]
        for index in expired:
            del self._generations[index]
        if expired:
            self._live = list(self._generations.values())


class _ExpiringSet(_Generations[set[Hashable]]):
    """Members that expire at a given time."""

    __slots__ = ()

    def __init__(self, width: float) -> None:
        super().__init__(width, set)

    def add(self, member: Hashable, expires_at: float) -> bool:
        generation = self._generation(expires_at)
        if member in generation:
            return False
        generation.add(member)
        return True

    def __contains__(self, member: Hashable) -> bool:
        # A plain loop: any() with a generator costs several times more, and this runs per request.
        for generation in self._live:  # noqa: SIM110
            if member in generation:
                return True
        return False


class _ExpiringMax(_Generations[dict[str, int]]):
    """A map to the largest value given for each key, whose entries expire."""

    __slots__ = ()

    def __init__(self, width: float) -> None:
        super().__init__(width, dict)

    def put(self, key: str, value: int, expires_at: float) -> bool:
        generation = self._generation(expires_at)
        previous = generation.get(key)
        if previous is not None and previous >= value:
            return False
        generation[key] = value
        return True

    def get(self, key: str) -> int | None:
        found: int | None = None
        for generation in self._live:
            value = generation.get(key)
            if value is not None and (found is None or value > found):
                found = value
        return found


class Denylist:
    """Revoked tokens, sessions and users; a :class:`authmesh._shared.verifier.RevocationCheck`.

    Args:
        access_token_ttl: Longest access-token lifetime, seconds (must match the auth service's).
        leeway: Clock leeway the verifier allows on ``exp``, seconds.
        clock: Current Unix time in seconds (the one the verifier reads).
        elapsed: Seconds from any origin by a clock that never steps, to tell a step of ``clock`` from
            time passing. A test that moves ``clock`` by hand to model time passing gives it here too.
    """

    def __init__(
        self,
        *,
        access_token_ttl: float,
        leeway: float,
        clock: Clock = time.time,
        elapsed: Clock = boot_clock,
    ) -> None:
        self._lifetime = access_token_ttl + leeway
        self._leeway = leeway
        self._clock = clock
        # Expiry is judged by the earliest time the clock could read again, never by a step forward.
        self._earliest = EarliestClock(clock, elapsed)
        width = max(1.0, self._lifetime / GENERATIONS_PER_LIFETIME)
        self._tokens = _ExpiringSet(width)
        self._sessions = _ExpiringSet(width)
        self._users = _ExpiringMax(width)
        self._key_bindings = _ExpiringSet(width)
        self._width = width
        self._next_purge = 0.0

    @property
    def retention(self) -> float:
        """Seconds a session or user revocation is kept: the longest token lifetime plus the leeway."""
        return self._lifetime

    def check(self, claims: AccessClaims) -> None:
        """Raise if the token, its session or its user is revoked.

        Raises:
            TokenRevoked: With code ``TOKEN_REVOKED``, ``SESSION_REVOKED`` or ``USER_REVOKED``.
        """
        self._purge_if_due()
        if jti_key(claims.jti) in self._tokens:
            raise TokenRevoked("token revoked", code="TOKEN_REVOKED")
        if claims.sid in self._sessions:
            raise TokenRevoked("session revoked", code="SESSION_REVOKED")
        not_before_ms = self._users.get(claims.sub)
        if not_before_ms is not None and claims.issued_at_ms <= not_before_ms:
            raise TokenRevoked("user revoked", code="USER_REVOKED")
        if claims.jkt is not None and claims.jkt in self._key_bindings:
            raise TokenRevoked("key binding revoked", code="TOKEN_REVOKED")

    def apply(self, event: SecurityEvent) -> bool:
        """Apply one broadcast event; events that revoke no token, session or user are ignored.

        Returns:
            Whether the state changed (False for a repeat or an already expired entry).
        """
        return self.apply_body(event.body, occurred_at=event.occurred_at_ms / 1000)

    def apply_body(self, body: EventBody, *, occurred_at: float) -> bool:
        """Apply an event body that happened at ``occurred_at`` (Unix seconds).

        Returns:
            Whether the state changed.
        """
        self._purge_if_due()
        match body:
            case TokenRevokedEvent(jti=jti, exp=exp):
                return self.revoke_token(jti, exp)
            case SessionRevokedEvent(sid=sid):
                return self.revoke_session(sid, revoked_at=occurred_at)
            case UserRevokedEvent(sub=sub, not_before_ms=not_before_ms):
                return self.revoke_user(sub, not_before_ms)
            case KeyBindingRevokedEvent(jkt=jkt):
                return self.revoke_key_binding(jkt, revoked_at=occurred_at)
            case _:
                return False

    def revoke_token(self, jti: str, exp: int) -> bool:
        """Refuse the token ``jti`` until ``exp`` (plus the leeway).

        Returns:
            Whether the state changed.
        """
        expires_at = exp + self._leeway
        if expires_at <= self._earliest():
            return False
        return self._tokens.add(jti_key(jti), expires_at)

    def revoke_session(self, sid: str, *, revoked_at: float) -> bool:
        """Refuse every token of session ``sid`` for one token lifetime after ``revoked_at``.

        Returns:
            Whether the state changed.
        """
        return self._add_for_a_lifetime(self._sessions, sid, revoked_at)

    def _add_for_a_lifetime(self, entries: _ExpiringSet, member: str, revoked_at: float) -> bool:
        expires_at = revoked_at + self._lifetime
        if expires_at <= self._earliest():
            return False
        return entries.add(member, expires_at)

    def revoke_user(self, sub: str, not_before_ms: int) -> bool:
        """Refuse every token of ``sub`` issued at or before ``not_before_ms``.

        Returns:
            Whether the state changed.
        """
        expires_at = not_before_ms / 1000 + self._lifetime
        if expires_at <= self._earliest():
            return False
        return self._users.put(sub, not_before_ms, expires_at)

    def revoke_key_binding(self, jkt: str, *, revoked_at: float) -> bool:
        """Refuse every token bound to the DPoP key ``jkt`` for one token lifetime after ``revoked_at``.

        The auth service mints no token bound to it afterwards, so one lifetime covers them all.

        Returns:
            Whether the state changed.
        """
        return self._add_for_a_lifetime(self._key_bindings, jkt, revoked_at)

    def load(self, chunk: SnapshotChunk) -> None:
        """Merge a snapshot chunk (revocations only ever add, so merging is always safe); its retired keys
        are the key cache's to apply."""
        now, earliest = self._earliest.read()
        # revoke_token() inlined, with the clock read once: a snapshot holds up to hundreds of thousands
        # of tokens, and a starting replica serves nothing until they are in.
        leeway = self._leeway
        add = self._tokens.add
        for token in chunk.tokens:
            expires_at = token.exp + leeway
            if expires_at > earliest:
                add(jti_key(token.jti), expires_at)
        for session in chunk.sessions:
            # The entry lives one token lifetime from the revocation by the issuer's clock; a replica
            # whose own clock is behind would otherwise forget it before the session's tokens expire.
            # Where the time is unknown, now is a bound on it.
            revoked_ms = chunk.session_revoked_at_ms.get(session.sid)
            self.revoke_session(session.sid, revoked_at=now if revoked_ms is None else revoked_ms / 1000)
        for user in chunk.users:
            self.revoke_user(user.sub, user.not_before_ms)
        for jkt, revoked_ms in chunk.key_bindings:
            self.revoke_key_binding(jkt, revoked_at=revoked_ms / 1000)

    def purge(self) -> None:
        """Drop every generation whose entries have all expired, by the earliest time the clock could read."""
        now, earliest = self._earliest.read()
        self._tokens.purge(earliest)
        self._sessions.purge(earliest)
        self._users.purge(earliest)
        self._key_bindings.purge(earliest)
        # The next generation boundary, in the wall clock's terms (the hot path reads only that clock);
        # a step in between only makes the next purge come early or late, and it judges anew.
        self._next_purge = now + (math.floor(earliest / self._width) + 1) * self._width - earliest

    def sizes(self) -> DenylistSizes:
        """Entries held of each kind."""
        self._purge_if_due()
        return DenylistSizes(
            tokens=len(self._tokens),
            sessions=len(self._sessions),
            users=len(self._users),
            key_bindings=len(self._key_bindings),
        )

    def __len__(self) -> int:
        return self.sizes().total

    def _purge_if_due(self) -> None:
        if self._clock() >= self._next_purge:
            self.purge()
