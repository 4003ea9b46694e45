"""Property tests: whatever bytes arrive, the parsers answer with their own rejections and nothing else.

``decode_compact`` and ``TokenVerifier.verify`` may only raise :class:`authmesh._shared.errors.TokenRejected`
subclasses; ``decode_event`` only ``EventRejected`` or ``UnknownKey``; ``parse_jwks`` only
``InvalidJwk``. A stray ``KeyError`` or ``TypeError`` would surface as an INTERNAL gRPC error (or kill
an event consumer), so the inputs go from random text, through mutations of valid tokens, to
arbitrary JSON that is properly signed and so reaches the claim and event checks behind the signature.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from authmesh._shared.claims import REQUIRED_CLAIMS
from authmesh._shared.errors import EventRejected, TokenRejected, UnknownKey
from authmesh._shared.events import (
    SET_TYPE,
    EventType,
    HeartbeatEvent,
    SecurityEvent,
    decode_event,
    encode_event,
)
from authmesh._shared.jose import b64url_encode, decode_compact
from authmesh._shared.keys import InvalidJwk, parse_jwks
from authmesh._shared.verifier import TokenVerifier
from tests.helpers_tokens import (
    ISSUER,
    KID,
    NOW,
    SigningKey,
    StaticKeys,
    access_header,
    claims_payload,
    make_verifier,
    mint_access_token,
    sign_bytes,
    sign_json,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The trusted signing key."""
    return SigningKey.generate(KID)


@pytest.fixture(scope="module")
def valid_token(key: SigningKey) -> str:
    """One valid access token to mutate."""
    return mint_access_token(key)


def fresh_verifier(key: SigningKey) -> TokenVerifier:
    """A verifier trusting ``key``, with an empty cache."""
    return make_verifier(StaticKeys(key))


def verify_or_reject(verifier: TokenVerifier, token: str) -> bool:
    """True if ``token`` verified, False if it was rejected; any other exception fails the test."""
    try:
        verifier.verify(token)
    except TokenRejected:
        return False
    return True


def decode_or_reject(token: str | bytes) -> None:
    """Decode; a TokenRejected is a fine answer, any other exception fails the test."""
    with contextlib.suppress(TokenRejected):
        decode_compact(token)


# --- decode_compact ------------------------------------------------------------------------------


@given(st.text(max_size=400))
@FUZZ
def test_arbitrary_text_only_ever_raises_token_rejected(text: str) -> None:
    decode_or_reject(text)


@given(st.binary(max_size=400))
@FUZZ
def test_arbitrary_bytes_only_ever_raise_token_rejected(data: bytes) -> None:
    decode_or_reject(data)


@given(st.lists(st.text(alphabet=URL_ALPHABET + "=+/ ", max_size=120), min_size=1, max_size=5))
@FUZZ
def test_dotted_base64ish_text_only_ever_raises_token_rejected(segments: list[str]) -> None:
    decode_or_reject(".".join(segments))


@given(json_values, json_values)
@FUZZ
def test_any_json_header_and_payload_only_ever_raise_token_rejected(header: Any, payload: Any) -> None:
    token = (
        ".".join(b64url_encode(json.dumps(part).encode()) for part in (header, payload))
        + "."
        + b64url_encode(bytes(range(1, 65)))
    )
    decode_or_reject(token)


# --- TokenVerifier.verify on mutated valid tokens ------------------------------------------------


@st.composite
def mutations(draw: st.DrawFn, token: str) -> str:
    """A valid token with one to three random edits."""
    text = token
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        kind = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "swap", "repeat"]))
        position = draw(st.integers(min_value=0, max_value=max(len(text) - 1, 0)))
        character = draw(st.sampled_from(URL_ALPHABET + ".=+/ \n\x00é"))
        if kind == "replace":
            text = text[:position] + character + text[position + 1 :]
        elif kind == "insert":
            text = text[:position] + character + text[position:]
        elif kind == "delete":
            text = text[:position] + text[position + 1 :]
        elif kind == "truncate":
            text = text[:position]
        elif kind == "swap":
            parts = text.split(".")
            draw_order = draw(st.permutations(list(range(len(parts)))))
            text = ".".join(parts[i] for i in draw_order)
        else:
            parts = text.split(".")
            index = draw(st.integers(min_value=0, max_value=len(parts) - 1))
            text = ".".join(parts[: index + 1] + parts[index:])
    return text


@given(data=st.data())
@FUZZ
def test_mutated_tokens_are_rejected_with_token_rejected_only(
    key: SigningKey, valid_token: str, data: st.DataObject
) -> None:
    mutated = data.draw(mutations(valid_token))
    if verify_or_reject(fresh_verifier(key), mutated):
        # Only a no-op edit (say, a character replaced by itself) may still verify.
        assert mutated == valid_token


@given(st.text(max_size=300))
@FUZZ
def test_arbitrary_text_through_the_verifier_only_raises_token_rejected(key: SigningKey, text: str) -> None:
    assert not verify_or_reject(fresh_verifier(key), text)


@given(st.dictionaries(st.sampled_from([*REQUIRED_CLAIMS, "extra"]), json_values, max_size=4))
@FUZZ
def test_signed_payloads_with_arbitrary_claim_values_only_raise_token_rejected(
    key: SigningKey, overrides: dict[str, Any]
) -> None:
    # Properly signed, so every claim check behind the signature is reached.
    token = sign_json(access_header(KID), claims_payload(**overrides), key)
    verify_or_reject(fresh_verifier(key), token)


@given(json_values)
@FUZZ
def test_signed_arbitrary_json_payloads_only_raise_token_rejected(key: SigningKey, payload: Any) -> None:
    token = sign_bytes(json.dumps(access_header(KID)).encode(), json.dumps(payload).encode(), key)
    assert not verify_or_reject(fresh_verifier(key), token)


@given(st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit", "cty", "x"]), json_values, max_size=4))
@FUZZ
def test_signed_headers_with_arbitrary_values_only_raise_token_rejected(
    key: SigningKey, overrides: dict[str, Any]
) -> None:
    header = {**access_header(KID), **overrides}
    token = sign_json(header, claims_payload(), key)
    verified = verify_or_reject(fresh_verifier(key), token)
    if verified:
        assert header["alg"] == "ES256"
        assert header["kid"] == KID
        assert header["typ"] in {"at+jwt", "application/at+jwt"}


# --- decode_event --------------------------------------------------------------------------------


def decode_event_or_reject(data: bytes, keys: StaticKeys, subject: str = EventType.HEARTBEAT.subject) -> None:
    """Decode an event; EventRejected and UnknownKey are fine answers, anything else fails the test."""
    with contextlib.suppress(EventRejected, UnknownKey):
        decode_event(data, subject, keys, ISSUER)


@given(st.binary(max_size=400))
@FUZZ
def test_arbitrary_event_bytes_only_raise_event_rejected(key: SigningKey, data: bytes) -> None:
    decode_event_or_reject(data, StaticKeys(key))


@given(data=st.data())
@FUZZ
def test_mutated_events_only_raise_event_rejected(key: SigningKey, data: st.DataObject) -> None:
    event = SecurityEvent.new(HeartbeatEvent(seq=7), issuer=ISSUER, now_ms=NOW * 1000)
    encoded = encode_event(event, key.private_key, KID).decode("ascii")
    mutated = data.draw(mutations(encoded))
    assume(mutated.isascii())
    decode_event_or_reject(mutated.encode("ascii"), StaticKeys(key))


@given(
    st.dictionaries(st.sampled_from(["iss", "iat", "jti", "toe", "txn", "events"]), json_values, max_size=4),
    st.sampled_from(list(EventType)),
    json_values,
)
@FUZZ
def test_signed_events_with_arbitrary_members_only_raise_event_rejected(
    key: SigningKey, overrides: dict[str, Any], event_type: EventType, body: Any
) -> None:
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "iat": NOW,
        "jti": "event-1",
        "toe": NOW,
        "events": {event_type.uri: body},
        **overrides,
    }
    token = sign_json({"alg": "ES256", "typ": SET_TYPE, "kid": KID}, payload, key)
    decode_event_or_reject(token.encode("ascii"), StaticKeys(key), event_type.subject)


# --- parse_jwks ----------------------------------------------------------------------------------


@given(st.text(max_size=300) | json_values.map(json.dumps))
@FUZZ
def test_arbitrary_key_sets_only_raise_invalid_jwk(text: str) -> None:
    with contextlib.suppress(InvalidJwk):
        parse_jwks(text)


@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["kty", "crv", "x", "y", "kid", "alg", "use", "d", "key_ops"]), json_values
        ),
        max_size=3,
    )
)
@FUZZ
def test_arbitrary_key_entries_only_raise_invalid_jwk(entries: list[dict[str, Any]]) -> None:
    with contextlib.suppress(InvalidJwk):
        parse_jwks(json.dumps({"keys": entries}))
