"""TokenVerifier against the attacks of RFC 8725 and friends, the clock, and its verified-token cache.

Each rejection asserts the exact exception class and its stable ``code`` (what the gRPC edge sends as
``ErrorInfo.reason``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from authmesh._shared.errors import (
    BadSignature,
    InvalidClaim,
    KeyRevoked,
    MalformedToken,
    TokenExpired,
    TokenNotYetValid,
    TokenRejected,
    TokenRevoked,
    TokenTooLarge,
    UnknownKey,
    UnsupportedAlgorithm,
    WrongAudience,
    WrongIssuer,
    WrongTokenType,
)
from authmesh._shared.events import HeartbeatEvent, SecurityEvent, encode_event
from authmesh._shared.jose import MAX_TOKEN_BYTES, P256_ORDER, b64url_encode
from authmesh._shared.keys import public_jwk
from authmesh._shared.verifier import NoRevocations, TokenVerifier, VerifierPolicy
from tests.helpers_tokens import (
    AUDIENCE,
    ISSUER,
    KID,
    LIFETIME,
    NOW,
    OMIT,
    FrozenClock,
    SetRevocations,
    SigningKey,
    StaticKeys,
    access_header,
    claims_payload,
    der_signed,
    hs256_token,
    json_segment,
    make_verifier,
    malleated,
    mint_access_token,
    sign_bytes,
    sign_json,
    sign_segments,
    signature_of,
    unsigned_token,
    with_signature,
)

LEEWAY = 5


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The issuer's signing key."""
    return SigningKey.generate(KID)


@pytest.fixture(scope="module")
def attacker() -> SigningKey:
    """A key the verifier does not trust."""
    return SigningKey.generate("attacker")


@pytest.fixture
def keys(key: SigningKey) -> StaticKeys:
    """A key source serving only the issuer's key (and recording lookups)."""
    return StaticKeys(key)


@pytest.fixture
def clock() -> FrozenClock:
    """A clock standing at NOW."""
    return FrozenClock()


@pytest.fixture
def revocations() -> SetRevocations:
    """An empty denylist."""
    return SetRevocations()


@pytest.fixture
def verifier(keys: StaticKeys, revocations: SetRevocations, clock: FrozenClock) -> TokenVerifier:
    """The verifier under test: issuer ``authmesh``, audience ``authmesh-resources``, 5 s leeway."""
    return make_verifier(keys, revocations=revocations, clock=clock, leeway=LEEWAY, cache_size=8)


def rejects(verifier: TokenVerifier, token: str, error: type[TokenRejected], code: str) -> TokenRejected:
    """Assert ``token`` is rejected with exactly ``error`` and ``code``; return the exception."""
    with pytest.raises(error) as caught:
        verifier.verify(token)
    assert type(caught.value) is error, f"{type(caught.value).__name__} raised instead of {error.__name__}"
    assert caught.value.code == code
    return caught.value


# --- the happy path ------------------------------------------------------------------------------


def test_a_valid_token_verifies_to_its_claims(verifier: TokenVerifier, key: SigningKey) -> None:
    claims = verifier.verify(mint_access_token(key, sub="alice", scope="docs:read"))
    assert claims.sub == "alice"
    assert claims.scopes == ("docs:read",)
    assert claims.kid == KID
    assert claims.exp == NOW + LIFETIME


def test_the_media_type_spelling_of_the_access_token_type_is_accepted(
    verifier: TokenVerifier, key: SigningKey
) -> None:
    # RFC 9068 §4 names both "at+jwt" and "application/at+jwt".
    token = mint_access_token(key, header={"typ": "application/at+jwt"})
    assert verifier.verify(token).sub == "user-1"


def test_a_token_listing_several_audiences_including_ours_is_accepted(
    verifier: TokenVerifier, key: SigningKey
) -> None:
    assert verifier.verify(mint_access_token(key, aud=["other", AUDIENCE])).aud == ("other", AUDIENCE)


def test_the_verifier_exposes_its_policy(verifier: TokenVerifier) -> None:
    assert verifier.policy == VerifierPolicy(issuer=ISSUER, audience=AUDIENCE, leeway=LEEWAY, cache_size=8)


# --- algorithms and keys chosen by the token -----------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_in_any_case_is_refused_without_a_key_lookup(
    alg: str, verifier: TokenVerifier, keys: StaticKeys, key: SigningKey
) -> None:
    header = access_header(KID, alg=alg)
    rejects(verifier, unsigned_token(header, claims_payload()), UnsupportedAlgorithm, "UNSUPPORTED_ALGORITHM")
    # With a (real) signature attached, too.
    rejects(verifier, sign_json(header, claims_payload(), key), UnsupportedAlgorithm, "UNSUPPORTED_ALGORITHM")
    assert keys.lookups == []


def public_key_spellings(key: SigningKey) -> dict[str, bytes]:
    """Every byte string an algorithm-confusion attacker might guess we use as an HMAC secret."""
    public = key.public_key
    return {
        "uncompressed-point": key.public_bytes_uncompressed(),
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "openssh": public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        "jwk": json.dumps(public_jwk(public, KID)).encode(),
    }


@pytest.mark.parametrize("spelling", ["uncompressed-point", "pem", "der", "openssh", "jwk"])
@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_keyed_with_the_public_key_is_refused(
    spelling: str, alg: str, verifier: TokenVerifier, keys: StaticKeys, key: SigningKey
) -> None:
    secret = public_key_spellings(key)[spelling]
    token = hs256_token(access_header(KID, alg=alg), claims_payload(), secret)
    rejects(verifier, token, UnsupportedAlgorithm, "UNSUPPORTED_ALGORITHM")
    assert keys.lookups == []


@pytest.mark.parametrize("parameter", ["jwk", "jku", "x5u", "x5c"])
def test_a_token_naming_its_own_key_is_refused(
    parameter: str, verifier: TokenVerifier, keys: StaticKeys, attacker: SigningKey
) -> None:
    values: dict[str, Any] = {
        "jwk": public_jwk(attacker.public_key, KID),
        "jku": "https://attacker.example/jwks.json",
        "x5u": "https://attacker.example/cert.pem",
        "x5c": ["MIIBszCCAVmgAwIBAgIUQ"],
    }
    token = sign_json(access_header(KID, **{parameter: values[parameter]}), claims_payload(), attacker)
    rejects(verifier, token, UnsupportedAlgorithm, "UNSUPPORTED_ALGORITHM")
    assert keys.lookups == []


def test_a_critical_header_parameter_we_do_not_know_is_refused(
    verifier: TokenVerifier, key: SigningKey
) -> None:
    token = sign_json(access_header(KID, crit=["exp"], exp=NOW), claims_payload(), key)
    rejects(verifier, token, UnsupportedAlgorithm, "UNSUPPORTED_ALGORITHM")


def test_a_token_signed_by_another_key_under_our_kid_has_a_bad_signature(
    verifier: TokenVerifier, attacker: SigningKey
) -> None:
    token = sign_json(access_header(KID), claims_payload(), attacker)
    rejects(verifier, token, BadSignature, "BAD_SIGNATURE")


def test_a_retired_key_is_refused(verifier: TokenVerifier, keys: StaticKeys, key: SigningKey) -> None:
    keys.retire(KID)
    rejects(verifier, mint_access_token(key), KeyRevoked, "KEY_REVOKED")


# --- kid tricks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kid",
    [
        pytest.param("../../../../../../dev/null", id="path-traversal"),
        pytest.param("/etc/passwd", id="absolute-path"),
        pytest.param("1'OR'1'='1", id="sql-without-spaces"),
        pytest.param("test-key-1;DROP", id="sql-suffix"),
        pytest.param("TEST-KEY-1", id="case-variant"),
        pytest.param("unknown", id="unknown"),
        pytest.param("k" * 128, id="longest-allowed"),
    ],
)
def test_a_kid_we_do_not_hold_is_an_unknown_key_looked_up_verbatim(
    kid: str, verifier: TokenVerifier, keys: StaticKeys, key: SigningKey
) -> None:
    rejects(verifier, mint_access_token(key, header={"kid": kid}), UnknownKey, "KEY_UNKNOWN")
    assert keys.lookups == [kid]


@pytest.mark.parametrize(
    "kid",
    [
        pytest.param("x' OR '1'='1", id="sql-with-spaces"),
        pytest.param("k" * 129, id="too-long"),
        pytest.param("k" * 1000, id="very-long"),
        pytest.param("", id="empty"),
        pytest.param(42, id="number"),
        pytest.param(None, id="null"),
        pytest.param(["test-key-1"], id="list"),
        pytest.param({"kid": "test-key-1"}, id="object"),
        pytest.param(OMIT, id="missing"),
        pytest.param("test-key-1\x00", id="nul"),
        pytest.param("kéy", id="non-ascii"),
    ],
)
def test_a_kid_that_is_not_short_printable_text_is_malformed_and_never_looked_up(
    kid: Any, verifier: TokenVerifier, keys: StaticKeys, key: SigningKey
) -> None:
    rejects(verifier, mint_access_token(key, header={"kid": kid}), MalformedToken, "MALFORMED_TOKEN")
    assert keys.lookups == []


# --- signature encodings -------------------------------------------------------------------------


def test_a_der_encoded_signature_is_refused(verifier: TokenVerifier, key: SigningKey) -> None:
    rejects(verifier, der_signed(mint_access_token(key)), BadSignature, "BAD_SIGNATURE")


@pytest.mark.parametrize(
    ("r", "s"),
    [
        pytest.param(0, 0, id="r-and-s-zero"),
        pytest.param(0, None, id="r-zero"),
        pytest.param(None, 0, id="s-zero"),
        pytest.param(P256_ORDER, None, id="r-equals-n"),
        pytest.param(None, P256_ORDER, id="s-equals-n"),
        pytest.param(P256_ORDER + 5, None, id="r-above-n"),
        pytest.param(None, 2**256 - 1, id="s-all-ones"),
    ],
)
def test_signature_scalars_outside_one_to_n_minus_one_are_refused(
    r: int | None, s: int | None, verifier: TokenVerifier, keys: StaticKeys, key: SigningKey
) -> None:
    token = mint_access_token(key)
    signature = signature_of(token)
    r_bytes = signature[:32] if r is None else r.to_bytes(32, "big")
    s_bytes = signature[32:] if s is None else s.to_bytes(32, "big")
    rejects(verifier, with_signature(token, r_bytes + s_bytes), BadSignature, "BAD_SIGNATURE")
    assert keys.lookups == []


def test_the_malleated_twin_signature_verifies_but_nothing_keys_on_signature_bytes(
    verifier: TokenVerifier, revocations: SetRevocations, key: SigningKey
) -> None:
    # (r, n - s) is a second valid ECDSA signature over the same bytes: a different token string with
    # the same claims. The verified-token cache is keyed by the exact token string, so the twin is a
    # separate entry that went through the full signature check itself; revocation is keyed by jti
    # (never by signature bytes), so revoking the token revokes its twin too, cached or not.
    token = mint_access_token(key)
    twin = malleated(token)
    assert twin != token
    assert verifier.verify(twin) == verifier.verify(token)
    revocations.jtis.add(verifier.verify(token).jti)
    rejects(verifier, token, TokenRevoked, "TOKEN_REVOKED")
    rejects(verifier, twin, TokenRevoked, "TOKEN_REVOKED")


@pytest.mark.parametrize("twin_seen_before", [True, False], ids=["twin-cached", "twin-first-seen-after"])
@pytest.mark.parametrize(
    ("revoke", "code"),
    [("jti", "TOKEN_REVOKED"), ("sid", "SESSION_REVOKED"), ("sub", "USER_REVOKED")],
)
def test_a_malleated_twin_of_a_revoked_token_is_refused_cached_or_not(
    keys: StaticKeys,
    revocations: SetRevocations,
    key: SigningKey,
    revoke: str,
    code: str,
    twin_seen_before: bool,
) -> None:
    # Issue 10.12. The original is verified (and cached) before the revocation; its twin either was
    # too (a hit on its own cache entry after the revocation) or is first seen after it (the full
    # path). Both reach the same claims, and revocation is decided from those claims alone.
    verifier = make_verifier(keys, revocations=revocations, cache_size=8)
    token = mint_access_token(key, sid="session-m", sub="user-m")
    twin = malleated(token)
    claims = verifier.verify(token)
    if twin_seen_before:
        assert verifier.verify(twin) == claims
    {"jti": revocations.jtis, "sid": revocations.sids, "sub": revocations.subs}[revoke].add(
        getattr(claims, revoke)
    )
    checks = revocations.checks
    for candidate in (token, twin, token, twin):
        rejects(verifier, candidate, TokenRevoked, code)
    assert revocations.checks == checks + 4


# --- encodings of the token itself ---------------------------------------------------------------


def payload_segment_with_unused_bits(payload: dict[str, Any]) -> str:
    """The payload's segment, padded with JSON whitespace until its length leaves unused bits."""
    text = json.dumps(payload, separators=(",", ":"))
    while len(b64url_encode(text.encode())) % 4 != 2:
        text += " "
    return b64url_encode(text.encode())


@pytest.mark.parametrize(
    "variant",
    ["header-padding", "payload-padding", "payload-plus", "payload-slash", "payload-trailing-bits"],
)
def test_non_canonical_base64url_is_refused_even_when_signed(
    variant: str, verifier: TokenVerifier, key: SigningKey
) -> None:
    header = json_segment(access_header(KID))
    payload = payload_segment_with_unused_bits(claims_payload())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    if variant == "header-padding":
        header += "=" * (-len(header) % 4 or 4)
    elif variant == "payload-padding":
        payload += "=="
    elif variant == "payload-plus":
        payload = payload.replace("-", "+") if "-" in payload else "+" + payload[1:]
    elif variant == "payload-slash":
        payload = payload.replace("_", "/") if "_" in payload else "/" + payload[1:]
    else:
        payload = payload[:-1] + alphabet[alphabet.index(payload[-1]) | 1]
    # Signed over the altered bytes: only the canonical-encoding rule can catch it.
    rejects(verifier, sign_segments(header, payload, key), MalformedToken, "MALFORMED_TOKEN")


def test_a_padded_signature_segment_is_refused(verifier: TokenVerifier, key: SigningKey) -> None:
    rejects(verifier, mint_access_token(key) + "==", MalformedToken, "MALFORMED_TOKEN")


def test_duplicate_header_keys_are_refused(verifier: TokenVerifier, key: SigningKey) -> None:
    header = b'{"alg":"ES256","kid":"test-key-1","typ":"JWT","typ":"at+jwt"}'
    token = sign_bytes(header, json.dumps(claims_payload()).encode(), key)
    rejects(verifier, token, MalformedToken, "MALFORMED_TOKEN")


@pytest.mark.parametrize("claim", ["sub", "aud", "exp", "scope"])
def test_duplicate_payload_keys_are_refused(claim: str, verifier: TokenVerifier, key: SigningKey) -> None:
    payload = json.dumps(claims_payload())[:-1] + f',"{claim}":"admin"}}'
    token = sign_bytes(json.dumps(access_header(KID)).encode(), payload.encode(), key)
    rejects(verifier, token, MalformedToken, "MALFORMED_TOKEN")


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda t: " " + t, id="leading-space"),
        pytest.param(lambda t: t + " ", id="trailing-space"),
        pytest.param(lambda t: t + "\n", id="trailing-newline"),
        pytest.param(lambda t: t.replace(".", ". ", 1), id="space-after-dot"),
        pytest.param(lambda t: t[:20] + "\t" + t[20:], id="tab-inside"),
        pytest.param(lambda t: "Bearer " + t, id="scheme-left-in"),
        pytest.param(lambda t: t[:20] + "é" + t[21:], id="non-ascii"),
        pytest.param(lambda t: t[:20] + "\uff21" + t[21:], id="fullwidth-letter"),
        pytest.param(lambda t: t + ".", id="extra-dot"),
        pytest.param(lambda t: t.replace(".", "..", 1), id="double-dot"),
    ],
)
def test_whitespace_and_non_ascii_anywhere_are_refused(
    mangle: Any, verifier: TokenVerifier, key: SigningKey
) -> None:
    rejects(verifier, mangle(mint_access_token(key)), MalformedToken, "MALFORMED_TOKEN")


def test_a_token_one_byte_over_the_cap_is_refused_before_decoding(
    verifier: TokenVerifier, keys: StaticKeys
) -> None:
    oversized = "." * (MAX_TOKEN_BYTES + 1)
    rejects(verifier, oversized, TokenTooLarge, "TOKEN_TOO_LARGE")
    rejects(verifier, "é" * (MAX_TOKEN_BYTES + 1), TokenTooLarge, "TOKEN_TOO_LARGE")
    assert keys.lookups == []


def test_a_signed_token_exactly_at_the_cap_is_verified(
    keys: StaticKeys, key: SigningKey, clock: FrozenClock
) -> None:
    token = mint_access_token(key)
    at_cap = TokenVerifier(
        keys, NoRevocations(), VerifierPolicy(ISSUER, AUDIENCE, max_token_bytes=len(token)), clock
    )
    assert at_cap.verify(token).sub == "user-1"
    below = TokenVerifier(
        keys, NoRevocations(), VerifierPolicy(ISSUER, AUDIENCE, max_token_bytes=len(token) - 1), clock
    )
    rejects(below, token, TokenTooLarge, "TOKEN_TOO_LARGE")


# --- claims --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "claim", ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "sid", "scope", "client_id"]
)
def test_each_missing_claim_is_refused_by_name(claim: str, verifier: TokenVerifier, key: SigningKey) -> None:
    missing: dict[str, Any] = {claim: OMIT}
    error = rejects(verifier, mint_access_token(key, **missing), InvalidClaim, "INVALID_CLAIM")
    assert isinstance(error, InvalidClaim)
    assert error.claim == claim


@pytest.mark.parametrize(
    "claim", ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "sid", "scope", "client_id"]
)
@pytest.mark.parametrize("value", [None, True, 1.5, {"a": 1}], ids=["null", "bool", "float", "object"])
def test_each_mistyped_claim_is_refused_by_name(
    claim: str, value: Any, verifier: TokenVerifier, key: SigningKey
) -> None:
    error = rejects(verifier, mint_access_token(key, **{claim: value}), InvalidClaim, "INVALID_CLAIM")
    assert isinstance(error, InvalidClaim)
    assert error.claim == claim


@pytest.mark.parametrize(
    "exp",
    [float(NOW + LIFETIME), str(NOW + LIFETIME), True, f"{NOW + LIFETIME}.0", [NOW + LIFETIME]],
    ids=["float", "string", "bool", "decimal-string", "list"],
)
def test_an_expiry_that_is_not_an_integer_is_refused(
    exp: Any, verifier: TokenVerifier, key: SigningKey
) -> None:
    error = rejects(verifier, mint_access_token(key, exp=exp), InvalidClaim, "INVALID_CLAIM")
    assert isinstance(error, InvalidClaim)
    assert error.claim == "exp"


def test_an_expiry_written_as_a_huge_exponent_is_refused(verifier: TokenVerifier, key: SigningKey) -> None:
    # 1e999 parses as an infinite float: never an integer date.
    payload = json.dumps(claims_payload()).replace(f'"exp": {NOW + LIFETIME}', '"exp": 1e999')
    token = sign_bytes(json.dumps(access_header(KID)).encode(), payload.encode(), key)
    rejects(verifier, token, InvalidClaim, "INVALID_CLAIM")


@pytest.mark.parametrize(
    "typ",
    [
        pytest.param("JWT", id="jwt"),
        pytest.param(OMIT, id="missing"),
        pytest.param("at+JWT", id="other-case"),
        pytest.param("secevent+jwt", id="event"),
        pytest.param("", id="empty"),
        pytest.param(["at+jwt"], id="list"),
        pytest.param({"t": "at+jwt"}, id="object"),
        pytest.param(None, id="null"),
    ],
)
def test_any_token_type_but_at_jwt_is_refused(typ: Any, verifier: TokenVerifier, key: SigningKey) -> None:
    rejects(verifier, mint_access_token(key, header={"typ": typ}), WrongTokenType, "WRONG_TOKEN_TYPE")


def test_a_security_event_presented_as_an_access_token_is_refused(
    verifier: TokenVerifier, key: SigningKey
) -> None:
    event = SecurityEvent.new(HeartbeatEvent(seq=1), issuer=ISSUER, now_ms=NOW * 1000)
    rejects(verifier, encode_event(event, key.private_key, KID).decode(), WrongTokenType, "WRONG_TOKEN_TYPE")


@pytest.mark.parametrize(
    "aud", ["other", ["other", "another"], "authmesh-resources-evil", "AUTHMESH-RESOURCES"]
)
def test_a_token_for_another_audience_is_refused(aud: Any, verifier: TokenVerifier, key: SigningKey) -> None:
    rejects(verifier, mint_access_token(key, aud=aud), WrongAudience, "WRONG_AUDIENCE")


@pytest.mark.parametrize("iss", ["evil", "authmesh ", "Authmesh", "https://authmesh"])
def test_a_token_from_another_issuer_is_refused(iss: str, verifier: TokenVerifier, key: SigningKey) -> None:
    rejects(verifier, mint_access_token(key, iss=iss), WrongIssuer, "WRONG_ISSUER")


# --- time ----------------------------------------------------------------------------------------


def test_a_token_is_accepted_up_to_its_expiry_plus_leeway_and_refused_from_then_on(
    key: SigningKey, keys: StaticKeys, clock: FrozenClock
) -> None:
    token = mint_access_token(key)
    clock.now = NOW + LIFETIME + LEEWAY - 0.001
    assert make_verifier(keys, clock=clock, leeway=LEEWAY).verify(token).sub == "user-1"
    clock.now = NOW + LIFETIME + LEEWAY
    rejects(make_verifier(keys, clock=clock, leeway=LEEWAY), token, TokenExpired, "TOKEN_EXPIRED")
    clock.now = NOW + 10 * LIFETIME
    rejects(make_verifier(keys, clock=clock, leeway=LEEWAY), token, TokenExpired, "TOKEN_EXPIRED")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_a_token_from_the_future_is_accepted_inside_the_leeway_only(
    claim: str, key: SigningKey, keys: StaticKeys, clock: FrozenClock
) -> None:
    inside_leeway: dict[str, Any] = {claim: NOW + LEEWAY}
    beyond_leeway: dict[str, Any] = {claim: NOW + LEEWAY + 1}
    inside = mint_access_token(key, **inside_leeway)
    assert make_verifier(keys, clock=clock, leeway=LEEWAY).verify(inside).sub == "user-1"
    beyond = mint_access_token(key, **beyond_leeway)
    rejects(make_verifier(keys, clock=clock, leeway=LEEWAY), beyond, TokenNotYetValid, "TOKEN_NOT_YET_VALID")


def test_with_no_leeway_expiry_is_exact(key: SigningKey, keys: StaticKeys, clock: FrozenClock) -> None:
    token = mint_access_token(key)
    clock.now = NOW + LIFETIME - 0.001
    assert make_verifier(keys, clock=clock, leeway=0).verify(token).sub == "user-1"
    clock.now = NOW + LIFETIME
    rejects(make_verifier(keys, clock=clock, leeway=0), token, TokenExpired, "TOKEN_EXPIRED")


# --- the verified-token cache --------------------------------------------------------------------


def test_a_repeated_token_skips_the_signature_but_not_the_key_or_revocation_check(
    verifier: TokenVerifier, keys: StaticKeys, revocations: SetRevocations, key: SigningKey
) -> None:
    token = mint_access_token(key)
    first = verifier.verify(token)
    assert verifier.verify(token) is first  # the cached claims: nothing was parsed or verified again
    # The key is looked up on every hit, so a key retired or dropped since still stops the token.
    assert keys.lookups == [KID, KID]
    assert revocations.checks == 2


def test_a_cached_token_is_refused_once_it_expires(
    verifier: TokenVerifier, clock: FrozenClock, key: SigningKey
) -> None:
    token = mint_access_token(key)
    verifier.verify(token)
    clock.advance(LIFETIME + LEEWAY)
    rejects(verifier, token, TokenExpired, "TOKEN_EXPIRED")


def test_a_cached_token_is_refused_once_the_clock_goes_back_before_it(
    verifier: TokenVerifier, clock: FrozenClock, key: SigningKey
) -> None:
    token = mint_access_token(key)
    verifier.verify(token)
    clock.advance(-(LEEWAY + 1))
    rejects(verifier, token, TokenNotYetValid, "TOKEN_NOT_YET_VALID")


@pytest.mark.parametrize(
    ("revoke", "code"),
    [("jtis", "TOKEN_REVOKED"), ("sids", "SESSION_REVOKED"), ("subs", "USER_REVOKED")],
)
def test_a_cached_token_is_refused_once_revoked(
    revoke: str, code: str, verifier: TokenVerifier, revocations: SetRevocations, key: SigningKey
) -> None:
    token = mint_access_token(key)
    claims = verifier.verify(token)
    getattr(revocations, revoke).add({"jtis": claims.jti, "sids": claims.sid, "subs": claims.sub}[revoke])
    rejects(verifier, token, TokenRevoked, code)
    # And it stays refused on every later call.
    rejects(verifier, token, TokenRevoked, code)


def test_a_cached_token_is_refused_once_its_key_is_retired(
    verifier: TokenVerifier, revocations: SetRevocations, key: SigningKey
) -> None:
    token = mint_access_token(key)
    verifier.verify(token)
    revocations.kids.add(KID)
    rejects(verifier, token, KeyRevoked, "KEY_REVOKED")


def test_a_revoked_token_replayed_again_and_again_costs_no_further_signature_check(
    verifier: TokenVerifier, keys: StaticKeys, revocations: SetRevocations, key: SigningKey
) -> None:
    token = mint_access_token(key, sid="doomed")
    revocations.sids.add("doomed")
    rejects(verifier, token, TokenRevoked, "SESSION_REVOKED")
    # Were the signature checked again, it would now fail against this other key under the same kid:
    # the validly signed token was remembered, and each replay is refused on the revocation check alone.
    keys.add(SigningKey.generate(KID))
    for _ in range(3):
        rejects(verifier, token, TokenRevoked, "SESSION_REVOKED")
    assert revocations.checks == 4


def test_a_badly_signed_token_is_never_remembered(
    verifier: TokenVerifier, keys: StaticKeys, key: SigningKey, attacker: SigningKey
) -> None:
    forged = mint_access_token(attacker, header={"kid": KID})
    rejects(verifier, forged, BadSignature, "BAD_SIGNATURE")
    keys.add(SigningKey(KID, attacker.private_key))
    assert verifier.verify(forged).kid == KID, "verified afresh against the key now served"


def test_the_cache_is_bounded_and_evicts_the_oldest_first(
    keys: StaticKeys, key: SigningKey, clock: FrozenClock
) -> None:
    verifier = make_verifier(keys, clock=clock, cache_size=3)
    tokens = [mint_access_token(key, sub=f"user-{i}") for i in range(5)]
    verified = [verifier.verify(token) for token in tokens]
    for token, claims in zip(tokens[2:], verified[2:], strict=True):
        assert verifier.verify(token) is claims, "the three newest are cached"
    again = verifier.verify(tokens[0])
    assert again == verified[0]
    assert again is not verified[0], "the oldest was evicted and verified again"


def test_a_cache_size_of_zero_verifies_every_time(
    keys: StaticKeys, key: SigningKey, clock: FrozenClock
) -> None:
    verifier = make_verifier(keys, clock=clock, cache_size=0)
    token = mint_access_token(key)
    for _ in range(3):
        verifier.verify(token)
    assert keys.lookups == [KID] * 3


def test_forget_drops_every_cached_verification(
    verifier: TokenVerifier, keys: StaticKeys, key: SigningKey
) -> None:
    token = mint_access_token(key)
    verifier.verify(token)
    verifier.forget()
    verifier.verify(token)
    assert keys.lookups == [KID, KID]


def test_a_near_copy_of_a_cached_token_is_not_a_cache_hit(
    verifier: TokenVerifier, keys: StaticKeys, key: SigningKey
) -> None:
    token = mint_access_token(key)
    verifier.verify(token)
    rejects(verifier, token + "=", MalformedToken, "MALFORMED_TOKEN")
    rejects(verifier, token + "A", BadSignature, "BAD_SIGNATURE")
    rejects(verifier, token[:-2] + ("AA" if token[-2:] != "AA" else "BA"), BadSignature, "BAD_SIGNATURE")
