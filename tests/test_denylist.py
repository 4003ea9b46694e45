"""The denylist: what it refuses, for how long, and that applying an event twice changes nothing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authmesh._shared.claims import AccessClaims, new_uuid7
from authmesh._shared.denylist import Denylist, SnapshotChunk, jti_key
from authmesh._shared.errors import KeyRevoked, TokenRevoked
from authmesh._shared.events import (
    EventBody,
    HeartbeatEvent,
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
    return Denylist(access_token_ttl=TTL, leeway=LEEWAY, clock=clock)


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
    once = Denylist(access_token_ttl=TTL, leeway=LEEWAY, clock=FakeClock())
    for body in bodies:
        once.apply(event(body))
    shuffled = bodies * 2
    shuffler.shuffle(shuffled)
    twice = Denylist(access_token_ttl=TTL, leeway=LEEWAY, clock=FakeClock())
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
