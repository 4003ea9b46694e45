"""The SET codec: every event type round-trips; anything a receiver cannot trust is rejected."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from authmesh._shared.errors import EventRejected, Unavailable, UnknownKey
from authmesh._shared.events import (
    EVENT_URI_PREFIX,
    MAX_EVENT_BYTES,
    SET_TYPE,
    STREAM_SUBJECTS,
    EventBody,
    EventType,
    HeartbeatEvent,
    KeyBindingRevokedEvent,
    KeyRevokedEvent,
    KeyRotatedEvent,
    SecurityEvent,
    SessionRevokedEvent,
    TokenRevokedEvent,
    UserRevokedEvent,
    decode_event,
    encode_event,
)
from tests.helpers_tokens import (
    ISSUER,
    KID,
    NOW,
    SigningKey,
    StaticKeys,
    hs256_token,
    json_segment,
    sign_bytes,
    sign_json,
    unsigned_token,
)

NOW_MS = NOW * 1000 + 123

BODIES: list[EventBody] = [
    TokenRevokedEvent(jti="0190a0a0-0000-7000-8000-000000000000", exp=NOW + 300),
    SessionRevokedEvent(sid="session-1", sub="user-1"),
    UserRevokedEvent(sub="user-1", not_before_ms=NOW_MS),
    KeyRotatedEvent(kid="key-2", previous_kid=KID),
    KeyRotatedEvent(kid="key-1", previous_kid=""),
    KeyRevokedEvent(kid=KID),
    KeyBindingRevokedEvent(jkt="0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"),
    HeartbeatEvent(seq=42),
]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The auth service's signing key."""
    return SigningKey.generate(KID)


@pytest.fixture
def keys(key: SigningKey) -> StaticKeys:
    """A receiver's key cache holding the auth service's key."""
    return StaticKeys(key)


def set_header(**overrides: Any) -> dict[str, Any]:
    """The protected header of a SET."""
    return {"alg": "ES256", "typ": SET_TYPE, "kid": KID, **overrides}


def set_payload(
    event_type: EventType = EventType.HEARTBEAT, body: Any = None, **overrides: Any
) -> dict[str, Any]:
    """A valid SET payload; ``overrides`` replace members (a value of None removes one)."""
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "iat": NOW,
        "jti": "event-1",
        "toe": NOW_MS / 1000,
        "events": {event_type.uri: {"seq": 1} if body is None else body},
    }
    payload.update(overrides)
    return {name: value for name, value in payload.items() if value is not None}


def decode(data: str | bytes, keys: StaticKeys, subject: str = EventType.HEARTBEAT.subject) -> SecurityEvent:
    """Decode as a receiver on ``subject`` would."""
    return decode_event(data.encode("ascii") if isinstance(data, str) else data, subject, keys, ISSUER)


@pytest.mark.parametrize("body", BODIES, ids=lambda body: f"{body.TYPE.value}")
def test_every_event_type_round_trips(body: EventBody, key: SigningKey, keys: StaticKeys) -> None:
    event = SecurityEvent.new(body, issuer=ISSUER, origin="auth-1", now_ms=NOW_MS)
    data = encode_event(event, key.private_key, KID)
    decoded = decode_event(data, body.TYPE.subject, keys, ISSUER)
    assert decoded == event
    assert decoded.type is body.TYPE
    assert decoded.occurred_at_ms == NOW_MS
    assert decoded.issued_at == NOW


def test_an_event_without_an_origin_round_trips(key: SigningKey, keys: StaticKeys) -> None:
    event = SecurityEvent.new(HeartbeatEvent(seq=1), issuer=ISSUER, now_ms=NOW_MS)
    assert decode(encode_event(event, key.private_key, KID), keys) == event


@given(st.integers(min_value=0, max_value=2**41 - 1))
@settings(max_examples=300, deadline=None)
def test_the_time_of_event_keeps_every_millisecond(key: SigningKey, now_ms: int) -> None:
    event = SecurityEvent.new(HeartbeatEvent(seq=1), issuer=ISSUER, now_ms=now_ms)
    decoded = decode(encode_event(event, key.private_key, KID), StaticKeys(key))
    assert decoded.occurred_at_ms == now_ms


def test_event_types_map_to_subjects_and_uris_under_the_stream() -> None:
    assert STREAM_SUBJECTS == ("auth.events.>",)
    assert EventType.TOKEN_REVOKED.subject == "auth.events.revoked.token"
    assert EventType.KEY_ROTATED.uri == EVENT_URI_PREFIX + "keys.rotated"
    assert {body.TYPE for body in BODIES} == set(EventType)


def test_an_event_on_the_wrong_subject_is_rejected(key: SigningKey, keys: StaticKeys) -> None:
    event = SecurityEvent.new(KeyRevokedEvent(kid=KID), issuer=ISSUER, now_ms=NOW_MS)
    data = encode_event(event, key.private_key, KID)
    for subject in (EventType.HEARTBEAT.subject, EventType.KEY_ROTATED.subject, "auth.events.keys", ""):
        with pytest.raises(EventRejected, match="subject") as caught:
            decode_event(data, subject, keys, ISSUER)
        assert caught.value.code == "EVENT_WRONG_SUBJECT"


def test_an_event_from_a_foreign_issuer_is_rejected(key: SigningKey, keys: StaticKeys) -> None:
    event = SecurityEvent.new(HeartbeatEvent(seq=1), issuer="someone-else", now_ms=NOW_MS)
    with pytest.raises(EventRejected, match="issuer"):
        decode(encode_event(event, key.private_key, KID), keys)


def test_an_event_signed_by_a_foreign_key_under_our_kid_is_rejected(keys: StaticKeys) -> None:
    forger = SigningKey.generate(KID)
    event = SecurityEvent.new(KeyRevokedEvent(kid=KID), issuer=ISSUER, now_ms=NOW_MS)
    with pytest.raises(EventRejected, match="bad signature"):
        decode_event(
            encode_event(event, forger.private_key, KID), EventType.KEY_REVOKED.subject, keys, ISSUER
        )


def test_an_event_signed_by_an_unknown_key_asks_for_a_key_refresh(keys: StaticKeys) -> None:
    newcomer = SigningKey.generate("key-9")
    event = SecurityEvent.new(HeartbeatEvent(seq=1), issuer=ISSUER, now_ms=NOW_MS)
    with pytest.raises(UnknownKey) as caught:
        decode(encode_event(event, newcomer.private_key, "key-9"), keys)
    assert caught.value.code == "KEY_UNKNOWN"
    keys.add(newcomer)
    assert decode(encode_event(event, newcomer.private_key, "key-9"), keys) == event


def test_an_event_signed_by_a_retired_key_is_rejected(key: SigningKey, keys: StaticKeys) -> None:
    keys.retire(KID)
    event = SecurityEvent.new(HeartbeatEvent(seq=1), issuer=ISSUER, now_ms=NOW_MS)
    with pytest.raises(EventRejected, match="retired"):
        decode(encode_event(event, key.private_key, KID), keys)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_an_unsigned_event_is_rejected_without_a_key_lookup(alg: str, keys: StaticKeys) -> None:
    with pytest.raises(EventRejected):
        decode(unsigned_token(set_header(alg=alg), set_payload()), keys)
    assert keys.lookups == []


def test_an_hmac_event_keyed_with_the_public_key_is_rejected(key: SigningKey, keys: StaticKeys) -> None:
    token = hs256_token(set_header(alg="HS256"), set_payload(), key.public_bytes_uncompressed())
    with pytest.raises(EventRejected):
        decode(token, keys)


@pytest.mark.parametrize("typ", ["at+jwt", "JWT", None])
def test_a_token_of_another_type_is_not_an_event(typ: str | None, key: SigningKey, keys: StaticKeys) -> None:
    header = set_header(typ=typ)
    if typ is None:
        del header["typ"]
    with pytest.raises(EventRejected, match="secevent"):
        decode(sign_json(header, set_payload(), key), keys)


def test_an_oversized_event_is_rejected(key: SigningKey, keys: StaticKeys) -> None:
    token = sign_json(set_header(), set_payload(pad="x" * MAX_EVENT_BYTES), key)
    with pytest.raises(EventRejected):
        decode(token, keys)


@pytest.mark.parametrize(
    ("event_type", "body"),
    [
        pytest.param(EventType.TOKEN_REVOKED, {"jti": "j"}, id="token-without-exp"),
        pytest.param(EventType.TOKEN_REVOKED, {"exp": NOW}, id="token-without-jti"),
        pytest.param(EventType.TOKEN_REVOKED, {"jti": "j", "exp": "soon"}, id="token-exp-string"),
        pytest.param(EventType.TOKEN_REVOKED, {"jti": "j", "exp": float(NOW)}, id="token-exp-float"),
        pytest.param(EventType.TOKEN_REVOKED, {"jti": "j", "exp": True}, id="token-exp-bool"),
        pytest.param(EventType.TOKEN_REVOKED, {"jti": "j", "exp": -1}, id="token-exp-negative"),
        pytest.param(EventType.TOKEN_REVOKED, {"jti": "j", "exp": 2**64}, id="token-exp-huge"),
        pytest.param(EventType.TOKEN_REVOKED, {"jti": "", "exp": NOW}, id="token-jti-empty"),
        pytest.param(EventType.TOKEN_REVOKED, {"jti": "j" * 257, "exp": NOW}, id="token-jti-long"),
        pytest.param(EventType.SESSION_REVOKED, {"sid": "s"}, id="session-without-sub"),
        pytest.param(EventType.SESSION_REVOKED, {"sid": 1, "sub": "u"}, id="session-sid-number"),
        pytest.param(EventType.USER_REVOKED, {"sub": "u"}, id="user-without-instant"),
        pytest.param(EventType.USER_REVOKED, {"sub": "u", "not_before_ms": None}, id="user-instant-null"),
        pytest.param(EventType.KEY_ROTATED, {"kid": "k"}, id="rotated-without-previous"),
        pytest.param(EventType.KEY_ROTATED, {"kid": "", "previous_kid": "k"}, id="rotated-empty-kid"),
        pytest.param(EventType.KEY_REVOKED, {}, id="key-revoked-empty"),
        pytest.param(EventType.HEARTBEAT, {"seq": "1"}, id="heartbeat-seq-string"),
        pytest.param(EventType.HEARTBEAT, [1], id="body-not-an-object"),
        pytest.param(EventType.HEARTBEAT, None, id="body-null"),
    ],
)
def test_an_event_body_with_missing_or_mistyped_members_is_rejected(
    event_type: EventType, body: Any, key: SigningKey, keys: StaticKeys
) -> None:
    payload = set_payload(event_type, body if body is not None else {})
    if body is None:
        payload["events"] = {event_type.uri: None}
    with pytest.raises(EventRejected):
        decode(sign_json(set_header(), payload, key), keys, event_type.subject)


@pytest.mark.parametrize(
    "events",
    [
        pytest.param({}, id="no-event"),
        pytest.param(
            {EventType.HEARTBEAT.uri: {"seq": 1}, EventType.KEY_REVOKED.uri: {"kid": KID}}, id="two-events"
        ),
        pytest.param({"urn:other:event": {"seq": 1}}, id="foreign-uri"),
        pytest.param({EVENT_URI_PREFIX + "revoked.everything": {"seq": 1}}, id="unknown-type"),
        pytest.param([{"seq": 1}], id="events-a-list"),
        pytest.param("heartbeat", id="events-a-string"),
    ],
)
def test_the_events_claim_must_hold_exactly_one_known_event(
    events: Any, key: SigningKey, keys: StaticKeys
) -> None:
    with pytest.raises(EventRejected):
        decode(sign_json(set_header(), set_payload(events=events), key), keys)


def test_a_duplicate_event_member_is_rejected(key: SigningKey, keys: StaticKeys) -> None:
    uri = EventType.HEARTBEAT.uri
    payload = json.dumps(set_payload())
    forged = payload.replace(f'"{uri}": {{"seq": 1}}', f'"{uri}": {{"seq": 1}}, "{uri}": {{"seq": 2}}')
    assert forged != payload
    with pytest.raises(EventRejected):
        decode(sign_bytes(json.dumps(set_header()).encode(), forged.encode(), key), keys)


def test_unknown_members_in_a_body_are_ignored_for_rolling_upgrades(
    key: SigningKey, keys: StaticKeys
) -> None:
    # A newer publisher may add a member; an older receiver must still apply the revocation.
    payload = set_payload(EventType.KEY_REVOKED, {"kid": KID, "reason": "compromise"})
    decoded = decode(sign_json(set_header(), payload, key), keys, EventType.KEY_REVOKED.subject)
    assert decoded.body == KeyRevokedEvent(kid=KID)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"jti": None}, id="no-id"),
        pytest.param({"jti": ""}, id="empty-id"),
        pytest.param({"jti": 5}, id="numeric-id"),
        pytest.param({"iat": None}, id="no-iat"),
        pytest.param({"iat": "now"}, id="string-iat"),
        pytest.param({"iat": True}, id="bool-iat"),
        pytest.param({"iat": -5}, id="negative-iat"),
        pytest.param({"toe": None}, id="no-toe"),
        pytest.param({"toe": "now"}, id="string-toe"),
        pytest.param({"toe": False}, id="bool-toe"),
        pytest.param({"toe": -1.5}, id="negative-toe"),
        pytest.param({"toe": 1e300}, id="huge-toe"),
        pytest.param({"iss": None}, id="no-issuer"),
    ],
)
def test_an_envelope_with_missing_or_mistyped_members_is_rejected(
    overrides: dict[str, Any], key: SigningKey, keys: StaticKeys
) -> None:
    with pytest.raises(EventRejected):
        decode(sign_json(set_header(), set_payload(**overrides), key), keys)


def test_an_infinite_time_of_event_is_rejected(key: SigningKey, keys: StaticKeys) -> None:
    payload = json.dumps(set_payload(toe=1)).replace('"toe": 1', '"toe": 1e999')
    with pytest.raises(EventRejected):
        decode(sign_bytes(json.dumps(set_header()).encode(), payload.encode(), key), keys)


def test_a_non_string_origin_is_dropped_rather_than_trusted(key: SigningKey, keys: StaticKeys) -> None:
    assert decode(sign_json(set_header(), set_payload(txn=["x"]), key), keys).origin == ""


@pytest.mark.parametrize("data", [b"", b"...", b"not a token", json_segment({"a": 1}).encode()])
def test_garbage_is_rejected(data: bytes, keys: StaticKeys) -> None:
    with pytest.raises(EventRejected):
        decode(data, keys)


def test_a_key_source_that_cannot_answer_is_not_mistaken_for_a_bad_event(key: SigningKey) -> None:
    # Dropping the event would lose a revocation; the caller must retry it instead.
    class Unreachable:
        def public_key(self, kid: str) -> ec.EllipticCurvePublicKey:
            raise Unavailable("keys unavailable", code="KEYS_UNAVAILABLE")

    event = SecurityEvent.new(HeartbeatEvent(seq=1), issuer=ISSUER, now_ms=NOW_MS)
    with pytest.raises(Unavailable):
        decode_event(
            encode_event(event, key.private_key, KID), EventType.HEARTBEAT.subject, Unreachable(), ISSUER
        )
