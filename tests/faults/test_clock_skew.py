"""Clocks that disagree by more than the leeway: issuer ahead of or behind a replica by ``leeway + 5`` s.

A process clock cannot be skewed in a test, so the replica's decision path (the interceptor's
:class:`~authmesh._shared.interceptor.Authenticator` over the verifier and the denylist) runs here on an
injected clock, against tokens and events stamped by an issuer whose clock is offset from it.
Each test sweeps the
replica's clock across a token's whole life in small steps.
"""

from __future__ import annotations

import pytest

from authmesh._shared.claims import AccessClaims
from authmesh._shared.denylist import Denylist, SnapshotChunk
from authmesh._shared.errors import TokenRejected
from authmesh._shared.events import EventBody, SessionRevokedEvent, TokenRevokedEvent, UserRevokedEvent
from authmesh._shared.interceptor import Authenticator
from authmesh._shared.key_cache import KeyCache
from authmesh._shared.keys import jwks_json
from authmesh._shared.verifier import NoRevocations, TokenVerifier, VerifierPolicy
from tests.helpers_tokens import (
    AUDIENCE,
    ISSUER,
    NOW,
    FrozenClock,
    SigningKey,
    StaticKeys,
    mint_access_token,
)

LEEWAY = 5.0
SKEW = LEEWAY + 5.0
TTL = 60
STEP = 0.25
SKEWS = [-SKEW, 0.0, SKEW]
# A revocation happens this long after the token is issued, and reaches the replica this much later.
REVOKED_AFTER = 1.0
DELIVERY_DELAY = 0.5


class Replica:
    """A replica's decision path on a clock the test moves: key cache, denylist, verifier, authenticator."""

    def __init__(self, key: SigningKey, clock: FrozenClock, elapsed: FrozenClock | None = None) -> None:
        self.clock = clock
        self.key = key

        async def fetch() -> str:
            return jwks_json({key.kid: key.public_key})

        self.keys = KeyCache(fetch)
        # Moving the clock models time passing unless the test gives a separate never-stepping clock.
        self.denylist = Denylist(
            access_token_ttl=TTL, leeway=LEEWAY, clock=clock, elapsed=clock if elapsed is None else elapsed
        )
        verifier = TokenVerifier(
            self.keys,
            self.denylist,
            VerifierPolicy(issuer=ISSUER, audience=AUDIENCE, leeway=LEEWAY),
            clock,
        )
        self.authenticator = Authenticator(verifier, self.keys)

    async def accepts(self, token: str) -> bool:
        """Whether the interceptor would let a call with ``token`` through now."""
        try:
            await self.authenticator.authenticate(token)
        except TokenRejected:
            return False
        return True


def issue(
    key: SigningKey, issued_at: int, sub: str = "user-1", sid: str = "session-1"
) -> tuple[str, AccessClaims]:
    """A token issued at ``issued_at`` by the issuer's clock, with its claims."""
    token = mint_access_token(key, issued_at, exp=issued_at + TTL, sub=sub, sid=sid)
    policy = VerifierPolicy(issuer=ISSUER, audience=AUDIENCE, leeway=LEEWAY)
    return token, TokenVerifier(StaticKeys(key), NoRevocations(), policy, lambda: issued_at).verify(token)


def revoke(replica: Replica, kind: str, claims: AccessClaims, revoked_at: float) -> None:
    """Apply the event that revokes the token by its ``kind`` (token, session or user)."""
    body: EventBody
    if kind == "token":
        body = TokenRevokedEvent(jti=claims.jti, exp=claims.exp)
    elif kind == "session":
        body = SessionRevokedEvent(sid=claims.sid, sub=claims.sub)
    else:
        body = UserRevokedEvent(sub=claims.sub, not_before_ms=int(revoked_at * 1000))
    replica.denylist.apply_body(body, occurred_at=revoked_at)


def sweep(start: float, stop: float) -> list[float]:
    """Replica clock readings from ``start`` to ``stop`` in steps of :data:`STEP`."""
    count = int((stop - start) / STEP) + 1
    return [start + index * STEP for index in range(count)]


@pytest.mark.parametrize("skew", SKEWS, ids=["replica-behind", "in-step", "replica-ahead"])
async def test_no_token_is_accepted_at_or_past_exp_plus_leeway_whatever_the_skew(skew: float) -> None:
    """Invariant, for a replica whose clock reads issuer time + ``skew`` (skew 0 or ± (leeway + 5 s)):

    - the replica never accepts a token once its own clock reads ``exp + leeway`` or later, nor before
      ``iat - leeway`` (a token from an issuer running ahead is refused until then: fail closed);
    - inside that window it accepts it (the bound is exact, not merely safe).
    """
    key = SigningKey.generate("skew-key")
    clock = FrozenClock(float(NOW))
    replica = Replica(key, clock)
    await replica.keys.refresh()
    token, claims = issue(key, NOW)
    for reading in sweep(NOW + skew - 2 * SKEW, NOW + skew + TTL + 2 * SKEW):
        clock.now = reading
        inside = claims.iat - LEEWAY <= reading < claims.exp + LEEWAY
        assert await replica.accepts(token) is inside, f"replica clock {reading - NOW:+.2f} s after iat"


@pytest.mark.parametrize("skew", SKEWS, ids=["replica-behind", "in-step", "replica-ahead"])
@pytest.mark.parametrize("kind", ["token", "session", "user"])
async def test_a_revoked_token_is_never_accepted_after_its_event_arrives_whatever_the_skew(
    skew: float, kind: str
) -> None:
    """Invariant: once the revocation event (stamped by the issuer's clock) has been applied, the replica
    refuses the token at every later reading of its own clock, until the token has expired anyway."""
    key = SigningKey.generate("skew-key")
    clock = FrozenClock(float(NOW))
    replica = Replica(key, clock)
    await replica.keys.refresh()
    token, claims = issue(key, NOW)
    revoked_at = NOW + REVOKED_AFTER
    applied_at = revoked_at + skew + DELIVERY_DELAY
    clock.now = applied_at
    revoke(replica, kind, claims, revoked_at)
    accepted = []
    for reading in sweep(applied_at, NOW + skew + TTL + 2 * SKEW):
        clock.now = reading
        if await replica.accepts(token):
            accepted.append(reading - NOW)
    assert accepted == []


@pytest.mark.parametrize(
    "skew",
    [
        -SKEW,
        0.0,
        SKEW,
    ],
    ids=["replica-behind", "in-step", "replica-ahead"],
)
async def test_a_session_revocation_loaded_from_a_snapshot_holds_until_its_tokens_expire(skew: float) -> None:
    """Invariant: a replica that learns of a session revocation from ``SnapshotRevocations`` (as a replica
    starting just after the revocation does) refuses the session's token at every later reading of its
    clock until the token has expired anyway."""
    key = SigningKey.generate("skew-key")
    clock = FrozenClock(float(NOW))
    replica = Replica(key, clock)
    await replica.keys.refresh()
    token, claims = issue(key, NOW)
    loaded_at = NOW + REVOKED_AFTER + skew + DELIVERY_DELAY
    clock.now = loaded_at
    replica.denylist.load(
        SnapshotChunk(
            sessions=(SessionRevokedEvent(sid=claims.sid, sub=claims.sub),),
            session_revoked_at_ms={claims.sid: int((NOW + REVOKED_AFTER) * 1000)},
        )
    )
    accepted = []
    for reading in sweep(loaded_at, NOW + skew + TTL + 2 * SKEW):
        clock.now = reading
        if await replica.accepts(token):
            accepted.append(round(reading - NOW, 2))
    assert accepted == []


@pytest.mark.parametrize("kind", ["token", "session", "user"])
async def test_a_forward_step_of_the_replica_clock_and_its_correction_bring_back_no_revoked_token(
    kind: str,
) -> None:
    """Issue 10.7: the replica's wall clock jumps 100 s ahead (past the tokens' expiry, so they are
    refused as expired and their denylist entries look due for purging), events keep arriving, then
    the clock is put right. At every later reading until the tokens expire for real, the replica
    refuses both the token revoked before the step and the one revoked during it."""
    key = SigningKey.generate("skew-key")
    wall, elapsed = FrozenClock(float(NOW)), FrozenClock(float(NOW))
    replica = Replica(key, wall, elapsed)
    await replica.keys.refresh()
    before, before_claims = issue(key, NOW, sub="user-1", sid="session-1")
    during, during_claims = issue(key, NOW, sub="user-2", sid="session-2")
    revoke(replica, kind, before_claims, NOW + REVOKED_AFTER)
    for clock in (wall, elapsed):
        clock.advance(TTL - 20)
    wall.advance(100)
    assert not await replica.accepts(before)
    # Events are stamped by the issuer, whose clock is right (it reads the never-stepping one here).
    revoke(replica, kind, during_claims, elapsed.now)
    for reading in sweep(0.0, 5.0):  # more events, each of which may purge
        elapsed.now = NOW + TTL - 20 + reading
        wall.now = elapsed.now + 100
        other = TokenRevokedEvent(jti=f"other-{reading}", exp=NOW + TTL)
        replica.denylist.apply_body(other, occurred_at=elapsed.now)
    wall.now = elapsed.now
    accepted = []
    for reading in sweep(wall.now, NOW + TTL + LEEWAY - STEP):
        wall.now = elapsed.now = reading
        for name, token in (("before", before), ("during", during)):
            if await replica.accepts(token):
                accepted.append((name, round(reading - NOW, 2)))
    assert accepted == []
