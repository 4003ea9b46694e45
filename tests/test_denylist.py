"""The denylist: what it refuses, for how long, and that applying an event twice changes nothing."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authmesh._shared.claims import AccessClaims, new_uuid7
from authmesh._shared.denylist import (
    GENERATIONS_PER_LIFETIME,
    MAX_CLOCK_STEP,
    Denylist,
    DenylistSizes,
    EarliestClock,
    SnapshotChunk,
    boot_clock,
    jti_key,
)
from authmesh._shared.errors import KeyRevoked, TokenRevoked
from authmesh._shared.events import (
    EventBody,
    HeartbeatEvent,
    KeyBindingRevokedEvent,
    KeyRevokedEvent,
    KeyRotatedEvent,
    SecurityEvent,
    SessionRevokedEvent,
    TokenRevokedEvent,
    UserRevokedEvent,
)

TTL = 300
LEEWAY = 5
NOW = 1_800_000_000.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def claims(
    *,
    sub: str = "user-1",
    sid: str = "session-1",
    kid: str = "key-1",
    issued_ms: int | None = None,
    jti: str | None = None,
) -> AccessClaims:
    ms = int(NOW * 1000) if issued_ms is None else issued_ms
    iat = ms // 1000
    return AccessClaims(
        iss="authmesh",
        sub=sub,
        aud=("authmesh-resources",),
        exp=iat + TTL,
        iat=iat,
        nbf=iat,
        jti=jti or new_uuid7(ms),
        sid=sid,
        scopes=("docs:read",),
        client_id="cli",
        kid=kid,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def denylist(clock: FakeClock) -> Denylist:
    # The test moves the clock to model time passing, so the never-stepping clock moves with it.
    return Denylist(access_token_ttl=TTL, leeway=LEEWAY, clock=clock, elapsed=clock)


class SteppedClock:
    """A wall clock and a clock that never steps, both at ``NOW``; the test moves them apart."""

    def __init__(self) -> None:
        self.wall = FakeClock()
        self.elapsed = FakeClock()

    def advance(self, seconds: float) -> None:
        """Time passes: both move."""
        self.wall.now += seconds
        self.elapsed.now += seconds

    def step(self, seconds: float) -> None:
        """The wall clock alone jumps (forward, or back with a negative number)."""
        self.wall.now += seconds

    def denylist(self) -> Denylist:
        return Denylist(access_token_ttl=TTL, leeway=LEEWAY, clock=self.wall, elapsed=self.elapsed)


def event(body: EventBody, occurred_ms: int | None = None) -> SecurityEvent:
    return SecurityEvent.new(body, "authmesh", now_ms=int(NOW * 1000) if occurred_ms is None else occurred_ms)


def test_a_token_that_was_never_revoked_passes(denylist: Denylist) -> None:
    denylist.check(claims())


def test_a_revoked_token_is_refused_as_token_revoked(denylist: Denylist) -> None:
    token = claims()
    denylist.revoke_token(token.jti, token.exp)
    with pytest.raises(TokenRevoked) as caught:
        denylist.check(token)
    assert caught.value.code == "TOKEN_REVOKED"


def test_revoking_one_token_leaves_other_tokens_of_the_same_session_alone(denylist: Denylist) -> None:
    revoked, other = claims(), claims()
    denylist.revoke_token(revoked.jti, revoked.exp)
    denylist.check(other)


def test_a_revoked_token_entry_expires_once_the_token_itself_has_expired(
    denylist: Denylist, clock: FakeClock
) -> None:
    token = claims()
    denylist.revoke_token(token.jti, token.exp)
    clock.now = token.exp + LEEWAY - 1
    with pytest.raises(TokenRevoked):
        denylist.check(token)
    clock.now = token.exp + LEEWAY + TTL  # well past the last generation boundary
    denylist.purge()
    assert denylist.sizes().tokens == 0


def test_a_revocation_that_has_already_expired_is_not_stored(denylist: Denylist) -> None:
    assert denylist.revoke_token(new_uuid7(), int(NOW) - LEEWAY - 1) is False
    assert len(denylist) == 0


def test_a_jti_that_is_not_a_uuid_is_kept_exactly(denylist: Denylist) -> None:
    token = claims(jti="opaque-token-id")
    denylist.revoke_token("opaque-token-id", token.exp)
    with pytest.raises(TokenRevoked):
        denylist.check(token)
    denylist.check(claims(jti="opaque-token-id-2"))


def test_uuid7_jtis_are_stored_as_small_integers() -> None:
    key = jti_key(new_uuid7())
    assert isinstance(key, int)
    assert 0 <= key < 2**60


def test_a_revoked_session_refuses_every_token_issued_in_it(denylist: Denylist) -> None:
    denylist.revoke_session("session-1", revoked_at=NOW)
    with pytest.raises(TokenRevoked) as caught:
        denylist.check(claims(sid="session-1"))
    assert caught.value.code == "SESSION_REVOKED"
    denylist.check(claims(sid="session-2"))


def test_a_session_revocation_lasts_one_token_lifetime(denylist: Denylist, clock: FakeClock) -> None:
    denylist.revoke_session("session-1", revoked_at=NOW)
    clock.now = NOW + TTL + LEEWAY - 1
    with pytest.raises(TokenRevoked):
        denylist.check(claims(sid="session-1"))
    clock.now = NOW + 2 * (TTL + LEEWAY)
    assert denylist.sizes().sessions == 0


def test_a_user_revocation_refuses_tokens_issued_up_to_and_including_its_instant(denylist: Denylist) -> None:
    cut = int(NOW * 1000) + 500
    denylist.revoke_user("user-1", cut)
    for issued in (cut - 1000, cut - 1, cut):
        with pytest.raises(TokenRevoked) as caught:
            denylist.check(claims(sub="user-1", issued_ms=issued))
        assert caught.value.code == "USER_REVOKED"
    denylist.check(claims(sub="user-1", issued_ms=cut + 1))
    denylist.check(claims(sub="user-2", issued_ms=cut - 1))


def test_an_older_user_revocation_does_not_shorten_a_newer_one(denylist: Denylist) -> None:
    cut = int(NOW * 1000)
    denylist.revoke_user("user-1", cut)
    assert denylist.revoke_user("user-1", cut - 5000) is False
    with pytest.raises(TokenRevoked):
        denylist.check(claims(sub="user-1", issued_ms=cut - 1))


def test_each_revocation_event_is_applied_and_applying_it_again_changes_nothing(denylist: Denylist) -> None:
    token = claims()
    events = [
        event(TokenRevokedEvent(jti=token.jti, exp=token.exp)),
        event(SessionRevokedEvent(sid="session-9", sub="user-9")),
        event(UserRevokedEvent(sub="user-8", not_before_ms=int(NOW * 1000))),
    ]
    assert all(denylist.apply(e) for e in events)
    sizes = denylist.sizes()
    assert (sizes.tokens, sizes.sessions, sizes.users) == (1, 1, 1)
    assert not any(denylist.apply(e) for e in events)
    assert denylist.sizes() == sizes


def test_heartbeats_and_key_events_are_not_the_denylists(denylist: Denylist) -> None:
    # Retired keys belong to the key cache alone (tests/test_key_cache.py).
    assert denylist.apply(event(HeartbeatEvent(seq=1))) is False
    assert denylist.apply(event(KeyRotatedEvent(kid="key-2", previous_kid="key-1"))) is False
    assert denylist.apply(event(KeyRevokedEvent(kid="key-1"))) is False
    assert len(denylist) == 0


def test_a_snapshot_is_merged_into_what_is_already_known(denylist: Denylist) -> None:
    earlier, from_snapshot = claims(), claims()
    denylist.revoke_token(earlier.jti, earlier.exp)
    denylist.load(
        SnapshotChunk(
            tokens=(TokenRevokedEvent(jti=from_snapshot.jti, exp=from_snapshot.exp),),
            sessions=(SessionRevokedEvent(sid="session-3", sub="user-3"),),
            users=(UserRevokedEvent(sub="user-4", not_before_ms=int(NOW * 1000)),),
            retired_key_ids=("key-old",),
            stream_sequence=42,
        )
    )
    for refused in (
        earlier,
        from_snapshot,
        claims(sid="session-3"),
        claims(sub="user-4", issued_ms=int(NOW * 1000)),
    ):
        with pytest.raises(TokenRevoked):
            denylist.check(refused)


def test_memory_is_bounded_by_one_token_lifetime_of_revocations(denylist: Denylist, clock: FakeClock) -> None:
    # One revocation a second for ten lifetimes: only about one lifetime's worth is ever held.
    held = []
    for second in range(10 * TTL):
        clock.now = NOW + second
        denylist.revoke_token(new_uuid7(int(clock.now * 1000)), int(clock.now) + TTL)
        held.append(denylist.sizes().tokens)
    assert max(held) <= (TTL + LEEWAY) * 1.25 + 1


def test_a_forward_clock_step_and_its_correction_forget_no_revocation() -> None:
    # Issue 10.7: the clock jumps 100 s ahead, past the revoked tokens' expiry, and is put right. While
    # it is ahead, the verifier refuses the tokens as expired; once corrected, they are live again and
    # must still be refused, both the one revoked before the step and the one revoked during it.
    clocks = SteppedClock()
    denylist = clocks.denylist()
    before, during = claims(sid="session-1"), claims(sid="session-2")
    denylist.revoke_token(before.jti, before.exp)
    denylist.revoke_session("session-3", revoked_at=NOW)
    denylist.revoke_user("user-9", int(NOW * 1000))
    clocks.advance(TTL - 50)
    clocks.step(100)
    # Past the end of the tokens' generation: by the wall clock, their entries are due to go.
    assert clocks.wall.now > before.exp + LEEWAY + (TTL + LEEWAY) / GENERATIONS_PER_LIFETIME
    assert denylist.revoke_token(during.jti, during.exp) is True
    denylist.purge()
    assert denylist.sizes() == DenylistSizes(tokens=2, sessions=1, users=1)
    clocks.step(-100)
    for token, code in [
        (before, "TOKEN_REVOKED"),
        (during, "TOKEN_REVOKED"),
        (claims(sid="session-3"), "SESSION_REVOKED"),
        (claims(sub="user-9", sid="session-4"), "USER_REVOKED"),
    ]:
        assert outcome(denylist, token) == code


def test_a_snapshot_loaded_while_the_clock_is_ahead_keeps_what_the_corrected_clock_needs() -> None:
    clocks = SteppedClock()
    denylist = clocks.denylist()
    clocks.advance(TTL - 50)
    clocks.step(100)
    token = claims()
    denylist.load(SnapshotChunk(tokens=[TokenRevokedEvent(jti=token.jti, exp=token.exp)]))
    clocks.step(-100)
    assert outcome(denylist, token) == "TOKEN_REVOKED"


def test_after_a_forward_step_entries_are_purged_once_the_step_is_also_behind_them() -> None:
    # A clock that was behind and is put right keeps entries for the size of the step, no longer.
    clocks = SteppedClock()
    denylist = clocks.denylist()
    clocks.step(100)
    token = claims()
    denylist.revoke_token(token.jti, token.exp)
    clocks.advance(TTL + LEEWAY + TTL / 4 - 100)
    denylist.purge()
    assert denylist.sizes().tokens == 1
    clocks.advance(100)
    denylist.purge()
    assert denylist.sizes().tokens == 0


def test_a_step_back_is_followed_at_once() -> None:
    clocks = SteppedClock()
    denylist = clocks.denylist()
    token = claims()
    denylist.revoke_token(token.jti, token.exp)
    clocks.step(-100)
    clocks.advance(TTL + LEEWAY + TTL / 4)
    assert outcome(denylist, token) == "TOKEN_REVOKED"  # the wall clock still reads before its exp
    clocks.advance(100)
    denylist.purge()
    assert denylist.sizes().tokens == 0


def test_a_forward_step_holds_purging_back_by_at_most_max_clock_step() -> None:
    # Memory stays bounded whatever the step: past MAX_CLOCK_STEP, the step is believed.
    clocks = SteppedClock()
    denylist = clocks.denylist()
    token = claims()
    denylist.revoke_token(token.jti, token.exp)
    clocks.step(MAX_CLOCK_STEP + 2 * TTL)
    denylist.purge()
    assert denylist.sizes().tokens == 0


def test_the_earliest_clock_is_the_wall_clock_less_the_largest_forward_step() -> None:
    clocks = SteppedClock()
    earliest = EarliestClock(clocks.wall, clocks.elapsed, max_step=1000)
    assert earliest.read() == (NOW, NOW)
    clocks.step(100)
    clocks.advance(10)
    assert earliest.read() == (NOW + 110, NOW + 10)
    clocks.step(-30)
    assert earliest.read() == (NOW + 80, NOW + 10)
    clocks.step(-100)
    assert earliest.read() == (NOW - 20, NOW - 20)
    clocks.step(5000)
    assert earliest.read() == (NOW + 4980, NOW + 3980)


def test_the_boot_clock_never_goes_back() -> None:
    readings = [boot_clock() for _ in range(1000)]
    assert readings == sorted(readings)


@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2)), max_size=40), st.randoms(use_true_random=False)
)
def test_the_state_does_not_depend_on_order_or_repetition(
    revocations: list[tuple[int, int]], shuffler: random.Random
) -> None:
    tokens = [
        claims(sub=f"user-{i}", sid=f"session-{i}", issued_ms=int(NOW * 1000) - 10_000 + i) for i in range(5)
    ]
    bodies: list[EventBody] = []
    for index, kind in revocations:
        token = tokens[index]
        choices: list[EventBody] = [
            TokenRevokedEvent(jti=token.jti, exp=token.exp),
            SessionRevokedEvent(sid=token.sid, sub=token.sub),
            UserRevokedEvent(sub=token.sub, not_before_ms=token.issued_at_ms),
        ]
        bodies.append(choices[kind])
    once = Denylist(access_token_ttl=TTL, leeway=LEEWAY, clock=FakeClock(), elapsed=FakeClock())
    for body in bodies:
        once.apply(event(body))
    shuffled = bodies * 2
    shuffler.shuffle(shuffled)
    twice = Denylist(access_token_ttl=TTL, leeway=LEEWAY, clock=FakeClock(), elapsed=FakeClock())
    for body in shuffled:
        twice.apply(event(body))
    assert once.sizes() == twice.sizes()
    for token in tokens:
        assert outcome(once, token) == outcome(twice, token)


def outcome(denylist: Denylist, token: AccessClaims) -> str:
    try:
        denylist.check(token)
    except (TokenRevoked, KeyRevoked) as error:
        return error.code
    return "ACCEPTED"


def test_a_revoked_key_binding_refuses_the_tokens_bound_to_it_for_one_lifetime(
    denylist: Denylist, clock: FakeClock
) -> None:
    bound = dataclasses.replace(claims(), jkt="lost-key-thumbprint")
    other = dataclasses.replace(claims(), jkt="kept-key-thumbprint")
    assert denylist.apply_body(KeyBindingRevokedEvent(jkt="lost-key-thumbprint"), occurred_at=clock.now)
    assert not denylist.apply_body(KeyBindingRevokedEvent(jkt="lost-key-thumbprint"), occurred_at=clock.now)
    with pytest.raises(TokenRevoked):
        denylist.check(bound)
    denylist.check(other)
    denylist.check(claims())
    assert denylist.sizes().key_bindings == 1
    clock.now += TTL + LEEWAY + TTL  # every token bound before the revocation has expired
    denylist.check(bound)
    assert denylist.sizes().key_bindings == 0


def test_a_snapshot_carries_revoked_key_bindings(denylist: Denylist, clock: FakeClock) -> None:
    denylist.load(SnapshotChunk(key_bindings=(("lost-key-thumbprint", int(clock.now * 1000)),)))
    with pytest.raises(TokenRevoked):
        denylist.check(dataclasses.replace(claims(), jkt="lost-key-thumbprint"))
