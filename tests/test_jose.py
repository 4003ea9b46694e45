"""The strict ES256 compact-JWS codec: base64url, JSON, header rules, signature shape and checking."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import event, given, settings
from hypothesis import strategies as st

from authmesh._shared.claims import REQUIRED_CLAIMS, AccessClaims
from authmesh._shared.errors import (
    BadSignature,
    MalformedToken,
    TokenRejected,
    TokenTooLarge,
    UnsupportedAlgorithm,
    WrongTokenType,
)
from authmesh._shared.jose import (
    MAX_KID_LENGTH,
    MAX_TOKEN_BYTES,
    P256_ORDER,
    b64url_decode,
    b64url_encode,
    check_signature_shape,
    decode_compact,
    decode_compact_raw,
    encode_header,
    parse_json_object,
    sign_compact,
    sign_with_header,
    verify_signature,
)
from tests.helpers_tokens import (
    AUDIENCE,
    ISSUER,
    LIFETIME,
    NOW,
    SigningKey,
    StaticKeys,
    access_header,
    claims_payload,
    json_segment,
    make_verifier,
    malleated,
    mint_access_token,
    sign_bytes,
    sign_json,
    sign_segments,
    signature_of,
    with_signature,
)
from tests.joserfc_reference import reference_access_token, reference_jws

LEEWAY = 5


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """One signing key for the module."""
    return SigningKey.generate()


# --- base64url -----------------------------------------------------------------------------------


@given(st.binary(min_size=1, max_size=200))
@settings(max_examples=300, deadline=None)
def test_base64url_round_trips_every_byte_string(data: bytes) -> None:
    assert b64url_decode(b64url_encode(data).encode("ascii")) == data


@pytest.mark.parametrize(
    "segment",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"QQ==", id="padding"),
        pytest.param(b"QQ=", id="partial-padding"),
        pytest.param(b"QUJD+w", id="standard-alphabet-plus"),
        pytest.param(b"QUJD/w", id="standard-alphabet-slash"),
        pytest.param(b"QU JD", id="inner-space"),
        pytest.param(b" QUJD", id="leading-space"),
        pytest.param(b"QUJD\n", id="trailing-newline"),
        pytest.param(b"QUJDR", id="impossible-length"),
        pytest.param(b"QR", id="non-zero-trailing-bits-of-two"),
        pytest.param(b"QUF", id="non-zero-trailing-bits-of-three"),
        pytest.param(b"QU\xc3\xa9", id="non-ascii"),
        pytest.param(b"QU.D", id="dot"),
        pytest.param(b"QUJD\x00", id="nul"),
    ],
)
def test_base64url_refuses_every_non_canonical_spelling(segment: bytes) -> None:
    with pytest.raises(MalformedToken) as caught:
        b64url_decode(segment)
    assert caught.value.code == "MALFORMED_TOKEN"


@given(st.binary(min_size=1, max_size=64), st.integers(min_value=1, max_value=15))
@settings(max_examples=300, deadline=None)
def test_base64url_has_exactly_one_spelling_per_byte_string(data: bytes, flip: int) -> None:
    canonical = b64url_encode(data)
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(canonical[-1])
    unused_bits = {0: 0, 2: 4, 3: 2}[len(canonical) % 4]
    if unused_bits == 0:
        return
    altered_value = last ^ (flip & ((1 << unused_bits) - 1))
    if altered_value == last:
        return
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    other = canonical[:-1] + alphabet[altered_value]
    # The standard library accepts the other spelling and decodes it to the same bytes; we do not.
    assert base64.urlsafe_b64decode(other + "=" * (-len(other) % 4)) == data
    with pytest.raises(MalformedToken):
        b64url_decode(other.encode("ascii"))


# --- JSON ----------------------------------------------------------------------------------------


def test_json_objects_parse_with_whitespace_around_and_inside() -> None:
    assert parse_json_object(b' { "a" : 1 ,\n\t"b" : [true, null] } ') == {"a": 1, "b": [True, None]}


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b'{"a":1,"a":2}', id="duplicate-key"),
        pytest.param(b'{"a":{"b":1,"b":1}}', id="nested-duplicate-key"),
        pytest.param(b'{"a":NaN}', id="nan"),
        pytest.param(b'{"a":Infinity}', id="infinity"),
        pytest.param(b'{"a":-Infinity}', id="minus-infinity"),
        pytest.param(b"[1,2]", id="array"),
        pytest.param(b'"text"', id="string"),
        pytest.param(b"1", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"a":1}x', id="trailing-garbage"),
        pytest.param(b'{"a":1}{"a":1}', id="two-objects"),
        pytest.param(b'\xef\xbb\xbf{"a":1}', id="byte-order-mark"),
        pytest.param(b'{"a":"\xff"}', id="invalid-utf8"),
        pytest.param(b'{"a":"\xc0\xaf"}', id="overlong-utf8"),
        pytest.param(b"\x00{\x00}", id="utf16-like"),
        pytest.param(b'{"a":1' + b"0" * 5000 + b"}", id="integer-too-long"),
        pytest.param(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", id="deep-nesting"),
        pytest.param(b"{'a':1}", id="single-quotes"),
        pytest.param(b'{"a":1,}', id="trailing-comma"),
    ],
)
def test_json_refuses_anything_but_one_plain_object(text: bytes) -> None:
    with pytest.raises(MalformedToken):
        parse_json_object(text)


# --- decode_compact: structure -------------------------------------------------------------------


def test_a_minted_token_decodes_to_its_header_payload_and_signature(key: SigningKey) -> None:
    token = mint_access_token(key)
    jws = decode_compact(token)
    assert jws.unverified_header == access_header(key.kid)
    assert jws.unverified_payload["iss"] == "authmesh"
    assert jws.signing_input == token.rsplit(".", 1)[0].encode("ascii")
    assert jws.signature == signature_of(token)
    assert jws.kid == key.kid
    assert decode_compact(token.encode("ascii")) == jws


def test_each_decoded_header_is_a_fresh_copy(key: SigningKey) -> None:
    token = mint_access_token(key)
    first = decode_compact(token)
    first.unverified_header["alg"] = "none"
    first.unverified_header["kid"] = "other"
    assert decode_compact(token).unverified_header == access_header(key.kid)


@pytest.mark.parametrize(
    "shape",
    ["a", "a.b", "a.b.c.d", "a.b.c.d.e", "..", "...", ".b.c", "a..c", "a.b."],
)
def test_anything_but_three_segments_is_malformed(shape: str, key: SigningKey) -> None:
    header, payload, signature = mint_access_token(key).split(".")
    token = shape.replace("a", header).replace("b", payload).replace("c", signature)
    with pytest.raises(MalformedToken):
        decode_compact(token)


def test_the_size_cap_applies_before_any_decoding() -> None:
    garbage = "!" * (MAX_TOKEN_BYTES + 1)
    with pytest.raises(TokenTooLarge) as caught:
        decode_compact(garbage)
    assert caught.value.code == "TOKEN_TOO_LARGE"
    with pytest.raises(TokenTooLarge):
        decode_compact(garbage.encode("ascii"))
    with pytest.raises(TokenTooLarge):
        decode_compact("a.b.c", max_bytes=4)


def test_a_token_exactly_at_the_cap_is_decoded(key: SigningKey) -> None:
    token = mint_access_token(key)
    assert decode_compact(token, max_bytes=len(token)).kid == key.kid


@pytest.mark.parametrize("token", ["é.b.c", "a.b.c\u2028", "\uff41.b.c"])
def test_non_ascii_text_is_malformed(token: str) -> None:
    with pytest.raises(MalformedToken):
        decode_compact(token)


def test_something_neither_text_nor_bytes_is_malformed() -> None:
    with pytest.raises(MalformedToken):
        decode_compact(bytearray(b"a.b.c"))  # type: ignore[arg-type]  # what a careless caller may pass


def test_an_oversized_header_is_refused(key: SigningKey) -> None:
    token = sign_json(access_header(key.kid, pad="x" * 1100), claims_payload(), key)
    with pytest.raises(MalformedToken, match="header too large"):
        decode_compact(token)


def test_a_non_json_payload_is_malformed_but_decodes_raw(key: SigningKey) -> None:
    token = sign_segments(json_segment(access_header(key.kid)), b64url_encode(b"foo"), key)
    with pytest.raises(MalformedToken):
        decode_compact(token)
    raw = decode_compact_raw(token)
    assert raw.unverified_payload == b"foo"
    assert raw.kid == key.kid
    verify_signature(key.public_key, raw.signing_input, raw.signature)


# --- decode_compact: header rules ----------------------------------------------------------------


@pytest.mark.parametrize(
    "alg",
    ["none", "None", "NONE", "nOnE", "HS256", "RS256", "PS256", "ES384", "ES512", "es256", "ES256 ", ""],
)
def test_every_algorithm_but_es256_is_unsupported(alg: str, key: SigningKey) -> None:
    token = sign_json(access_header(key.kid, alg=alg), claims_payload(), key)
    with pytest.raises(UnsupportedAlgorithm) as caught:
        decode_compact(token)
    assert caught.value.code == "UNSUPPORTED_ALGORITHM"


@pytest.mark.parametrize("alg", [None, 256, ["ES256"], {"name": "ES256"}, True])
def test_a_missing_or_non_string_algorithm_is_unsupported(alg: object, key: SigningKey) -> None:
    header = access_header(key.kid)
    if alg is None:
        del header["alg"]
    else:
        header["alg"] = alg
    with pytest.raises(UnsupportedAlgorithm):
        decode_compact(sign_json(header, claims_payload(), key))


@pytest.mark.parametrize(
    "parameter", ["jwk", "jku", "x5u", "x5c", "x5t", "x5t#S256", "crit", "b64", "zip", "enc"]
)
def test_header_parameters_that_choose_keys_or_processing_are_refused(
    parameter: str, key: SigningKey
) -> None:
    token = sign_json(access_header(key.kid, **{parameter: "x"}), claims_payload(), key)
    with pytest.raises(UnsupportedAlgorithm):
        decode_compact(token)


@pytest.mark.parametrize(("parameter", "error"), [("typ", WrongTokenType), ("cty", UnsupportedAlgorithm)])
@pytest.mark.parametrize("value", [None, 1, ["at+jwt"], {"a": "b"}, True], ids=repr)
def test_registered_string_header_parameters_of_another_type_are_refused(
    parameter: str, error: type[TokenRejected], value: Any, key: SigningKey
) -> None:
    # Found by the joserfc differential below: {"cty": null} and {"typ": null} passed the JWS layer
    # here, and joserfc refuses them. typ must be a string; cty is refused in any form (no nested JWT).
    token = sign_json(access_header(key.kid, **{parameter: value}), claims_payload(), key)
    with pytest.raises(error):
        decode_compact_raw(token)


@pytest.mark.parametrize(
    "kid",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("k" * (MAX_KID_LENGTH + 1), id="too-long"),
        pytest.param("key one", id="space"),
        pytest.param("key\n1", id="newline"),
        pytest.param("key\x00", id="nul"),
        pytest.param("clé", id="non-ascii"),
        pytest.param(7, id="number"),
        pytest.param(["k"], id="list"),
        pytest.param({"k": 1}, id="object"),
        pytest.param(True, id="boolean"),
    ],
)
def test_a_kid_must_be_short_printable_ascii_text(kid: object, key: SigningKey) -> None:
    header = access_header(key.kid)
    if kid is None:
        del header["kid"]
    else:
        header["kid"] = kid
    with pytest.raises(MalformedToken, match="kid"):
        decode_compact(sign_json(header, claims_payload(), key))


def test_a_kid_of_the_longest_allowed_length_decodes(key: SigningKey) -> None:
    kid = "k" * MAX_KID_LENGTH
    assert decode_compact(sign_json(access_header(kid), claims_payload(), key)).kid == kid


def test_duplicate_keys_in_the_header_are_malformed(key: SigningKey) -> None:
    header = b'{"alg":"ES256","typ":"at+jwt","kid":"test-key-1","alg":"none"}'
    with pytest.raises(MalformedToken, match="duplicate"):
        decode_compact(sign_bytes(header, json.dumps(claims_payload()).encode(), key))


def test_duplicate_keys_in_the_payload_are_malformed(key: SigningKey) -> None:
    payload = json.dumps(claims_payload())[:-1] + ',"sub":"admin"}'
    with pytest.raises(MalformedToken, match="duplicate"):
        decode_compact(sign_bytes(json.dumps(access_header(key.kid)).encode(), payload.encode(), key))


# --- signatures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 63, 65, 70, 72, 128])
def test_a_signature_of_any_other_length_than_64_is_bad(length: int, key: SigningKey) -> None:
    token = with_signature(mint_access_token(key), b"\x01" * length)
    # An empty segment is not base64url at all; any other length fails the shape check.
    with pytest.raises(MalformedToken if length == 0 else BadSignature):
        decode_compact(token)
    with pytest.raises(BadSignature):
        check_signature_shape(b"\x01" * length)


@pytest.mark.parametrize(
    ("r", "s"),
    [(0, 1), (1, 0), (0, 0), (P256_ORDER, 1), (1, P256_ORDER), (P256_ORDER + 1, 1), (2**256 - 1, 2**256 - 1)],
)
def test_scalars_outside_one_to_n_minus_one_are_bad(r: int, s: int, key: SigningKey) -> None:
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    with pytest.raises(BadSignature, match="out of range"):
        decode_compact(with_signature(mint_access_token(key), signature))
    with pytest.raises(BadSignature):
        verify_signature(key.public_key, b"message", signature)


def test_the_extreme_in_range_scalars_pass_the_shape_check() -> None:
    check_signature_shape((1).to_bytes(32, "big") + (P256_ORDER - 1).to_bytes(32, "big"))


def test_a_valid_signature_verifies_and_any_change_breaks_it(key: SigningKey) -> None:
    jws = decode_compact(mint_access_token(key))
    verify_signature(key.public_key, jws.signing_input, jws.signature)
    with pytest.raises(BadSignature) as caught:
        verify_signature(key.public_key, jws.signing_input + b" ", jws.signature)
    assert caught.value.code == "BAD_SIGNATURE"
    flipped = bytes([jws.signature[0] ^ 1]) + jws.signature[1:]
    with pytest.raises(BadSignature):
        verify_signature(key.public_key, jws.signing_input, flipped)
    with pytest.raises(BadSignature):
        verify_signature(SigningKey.generate().public_key, jws.signing_input, jws.signature)


@given(
    st.integers(min_value=1, max_value=P256_ORDER - 1),
    st.integers(min_value=1, max_value=P256_ORDER - 1),
    st.sampled_from([0, 1, 8, 9, 31]),
)
@settings(max_examples=300, deadline=None)
def test_the_der_form_we_build_is_the_one_cryptography_builds(r: int, s: int, shift: int) -> None:
    # Small scalars (leading zero bytes) and high bits (a zero byte in front) both show up here.
    r >>= shift * 8
    s = max(s >> (shift * 4), 1)
    r = max(r, 1)
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    seen: list[bytes] = []

    class Recorder:
        """Stands in for a public key and keeps the DER it is asked to verify."""

        def verify(self, der: bytes, data: bytes, algorithm: object) -> None:
            seen.append(der)

    verify_signature(Recorder(), b"m", signature)  # type: ignore[arg-type]  # a duck-typed recorder
    assert seen == [encode_dss_signature(r, s)]


def test_sign_compact_always_writes_es256_and_verifies(key: SigningKey) -> None:
    token = sign_compact({"alg": "none", "kid": key.kid, "typ": "at+jwt"}, {"a": 1}, key.private_key)
    jws = decode_compact(token)
    assert jws.unverified_header["alg"] == "ES256"
    assert jws.unverified_payload == {"a": 1}
    verify_signature(key.public_key, jws.signing_input, jws.signature)


def test_a_token_signed_under_a_header_encoded_once_is_the_same_token_shape(key: SigningKey) -> None:
    header = {"typ": "at+jwt", "kid": key.kid}
    encoded = encode_header(header)
    token = sign_with_header(encoded, {"a": 1}, key.private_key)
    assert token.split(".")[0] == sign_compact(header, {"a": 1}, key.private_key).split(".")[0] == encoded
    jws = decode_compact(token)
    assert jws.unverified_header == {**header, "alg": "ES256"}
    verify_signature(key.public_key, jws.signing_input, jws.signature)


# --- differential: every token we accept, joserfc accepts --------------------------------------

_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# Header parameters: registered ones (some refused outright, some typed), and made-up ones.
_HEADER_NAMES = st.sampled_from(
    ["typ", "cty", "kid", "alg", "crit", "b64", "jku", "jwk", "x5t", "x5c", "zip", "enc", "nonce", "ext"]
)
_CLAIM_NAMES = st.sampled_from([*REQUIRED_CLAIMS, "scope", "cnf", "act", "roles"])
_TIMES = st.integers(min_value=NOW - 2 * LIFETIME, max_value=NOW + 2 * LIFETIME)


@st.composite
def _claim_value(draw: st.DrawFn, name: str) -> Any:
    """A value for claim ``name``: often one of its own type and near the verifier's clock."""
    if name in {"exp", "iat", "nbf"}:
        return draw(_TIMES | _JSON_VALUES)
    if name == "aud":
        return draw(st.sampled_from([AUDIENCE, [AUDIENCE], ["other", AUDIENCE], "other", []]) | _JSON_VALUES)
    return draw(st.text(max_size=20) | _JSON_VALUES)


@st.composite
def near_valid_access_tokens(draw: st.DrawFn, key: SigningKey) -> str:
    """Signed access tokens, each a valid one with a few changes: to header, claims, JSON spelling or
    signature. Most changes are refused; those that are not are what the differential is about."""
    header: dict[str, Any] = access_header(key.kid)
    payload = claims_payload(NOW)
    spacing = (",", ":")
    ensure_ascii = True
    signature_change = "none"
    changes = draw(st.lists(st.sampled_from(_CHANGES), max_size=3))
    for change in changes:
        if change == "typ":
            header["typ"] = draw(st.sampled_from(["at+jwt", "application/at+jwt", "JWT"]) | _JSON_VALUES)
        elif change == "header-parameter":
            header[draw(_HEADER_NAMES)] = draw(_JSON_VALUES | st.text(max_size=12))
        elif change == "drop-claim":
            payload.pop(draw(_CLAIM_NAMES), None)
        elif change == "set-claim":
            name = draw(_CLAIM_NAMES)
            payload[name] = draw(_claim_value(name))
        elif change == "spelling":
            spacing = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :\t")]))
            ensure_ascii = draw(st.booleans())
        else:
            signature_change = draw(st.sampled_from(["malleated", "flipped", "zero"]))
    header_bytes = json.dumps(header, separators=spacing, ensure_ascii=ensure_ascii).encode()
    payload_bytes = json.dumps(payload, separators=spacing, ensure_ascii=ensure_ascii).encode()
    token = sign_bytes(header_bytes, payload_bytes, key)
    signature = signature_of(token)
    if signature_change == "malleated":
        s = int.from_bytes(signature[32:], "big")
        token = with_signature(token, signature[:32] + (P256_ORDER - s).to_bytes(32, "big"))
    elif signature_change == "flipped":
        token = with_signature(token, signature[:-1] + bytes([signature[-1] ^ 1]))
    elif signature_change == "zero":
        token = with_signature(token, bytes(64))
    return token


_CHANGES = ["typ", "header-parameter", "drop-claim", "set-claim", "spelling", "signature"]
_DIFFERENTIAL_KEY = SigningKey.generate("differential-key")


def _ours(token: str, key: SigningKey) -> AccessClaims | None:
    try:
        return make_verifier(StaticKeys(key), leeway=LEEWAY).verify(token)
    except TokenRejected:
        return None


@given(near_valid_access_tokens(_DIFFERENTIAL_KEY))
@settings(max_examples=400, deadline=None)
def test_every_access_token_the_strict_verifier_accepts_joserfc_accepts_with_the_same_claims(
    token: str,
) -> None:
    # Issue 10.13: a token one decoder accepts and another refuses, or reads differently, is where
    # parser-differential attacks live; ours must never be the lenient one.
    key = _DIFFERENTIAL_KEY
    ours = _ours(token, key)
    event("accepted" if ours is not None else "refused")
    if ours is None:
        return
    header, claims = reference_access_token(
        token, key.public_key, issuer=ISSUER, audience=AUDIENCE, now=NOW, leeway=LEEWAY
    )
    assert header == decode_compact(token).unverified_header
    assert AccessClaims.from_payload(claims, key.kid) == ours


@given(
    st.dictionaries(_HEADER_NAMES, _JSON_VALUES | st.text(max_size=12), max_size=3),
    st.binary(max_size=64),
)
@settings(max_examples=300, deadline=None)
def test_every_jws_the_strict_decoder_accepts_joserfc_accepts_with_the_same_header_and_payload(
    extra: dict[str, Any], payload: bytes
) -> None:
    # The JWS layer alone (any payload bytes), as decode_compact_raw serves it.
    key = _DIFFERENTIAL_KEY
    header = {"alg": "ES256", "kid": key.kid, **extra}
    token = sign_bytes(json.dumps(header).encode(), payload, key)
    try:
        ours = decode_compact_raw(token)
        verify_signature(key.public_key, ours.signing_input, ours.signature)
    except TokenRejected:
        event("refused")
        return
    event("accepted")
    assert reference_jws(token, key.public_key) == (ours.unverified_header, ours.unverified_payload)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda key: mint_access_token(key), id="as-issued"),
        pytest.param(lambda key: malleated(mint_access_token(key)), id="malleated"),
        pytest.param(lambda key: mint_access_token(key, header={"typ": "application/at+jwt"}), id="typ-long"),
        pytest.param(lambda key: mint_access_token(key, header={"nonce": [1]}), id="unknown-parameter"),
        pytest.param(lambda key: mint_access_token(key, aud=["x", AUDIENCE], scope=""), id="aud-list"),
        pytest.param(lambda key: mint_access_token(key, sub="ü\u2028"), id="non-ascii"),
    ],
)
def test_the_reference_accepts_what_the_verifier_accepts_by_design(token: Any) -> None:
    # Guards the differential against a reference so strict that it would fail on everything.
    key = _DIFFERENTIAL_KEY
    minted = token(key)
    ours = _ours(minted, key)
    assert ours is not None
    _, claims = reference_access_token(
        minted, key.public_key, issuer=ISSUER, audience=AUDIENCE, now=NOW, leeway=LEEWAY
    )
    assert AccessClaims.from_payload(claims, key.kid) == ours
