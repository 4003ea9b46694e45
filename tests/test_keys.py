"""P-256 JWKs and JWK Sets: what we publish parses back; everything else is refused or skipped."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from authmesh._shared.errors import MalformedToken
from authmesh._shared.jose import b64url_encode
from authmesh._shared.keys import (
    MAX_JWKS_BYTES,
    P256_FIELD_PRIME,
    InvalidJwk,
    jwks_json,
    parse_jwk,
    parse_jwks,
    public_jwk,
)
from tests.helpers_tokens import SigningKey


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """One key for the module."""
    return SigningKey.generate("k1")


def jwk(key: SigningKey, **overrides: Any) -> dict[str, Any]:
    """The public JWK of ``key`` with ``overrides`` (a value of None removes the member)."""
    document: dict[str, Any] = {**public_jwk(key.public_key, key.kid), **overrides}
    return {name: value for name, value in document.items() if value is not None}


def same_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    """Whether two public keys are the same point."""
    return a.public_numbers() == b.public_numbers()


P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B


def point_with_small_x() -> tuple[int, int]:
    """A P-256 point whose x is tiny (so that x + p still fits in 32 bytes)."""
    p = P256_FIELD_PRIME
    for x in range(1, 1000):
        rhs = (x**3 - 3 * x + P256_B) % p
        y = pow(rhs, (p + 1) // 4, p)  # p = 3 mod 4: the square root, when there is one
        if y * y % p == rhs:
            return x, y
    raise AssertionError("no point with a small x")  # there are many: about half of all x work


def test_a_published_jwk_parses_back_to_the_same_key(key: SigningKey) -> None:
    document = public_jwk(key.public_key, "k1")
    assert document["kty"] == "EC"
    assert document["crv"] == "P-256"
    assert document["alg"] == "ES256"
    assert document["use"] == "sig"
    assert "d" not in document
    kid, parsed = parse_jwk(document)
    assert kid == "k1"
    assert same_key(parsed, key.public_key)


def test_a_published_jwk_set_parses_back_in_full() -> None:
    keys = {f"k{i}": SigningKey.generate(f"k{i}").public_key for i in range(3)}
    text = jwks_json(keys)
    assert [entry["kid"] for entry in json.loads(text)["keys"]] == ["k0", "k1", "k2"]
    parsed = parse_jwks(text)
    assert parsed.keys() == keys.keys()
    assert all(same_key(parsed[kid], keys[kid]) for kid in keys)
    assert parse_jwks(text.encode()).keys() == keys.keys()


def test_coordinates_with_leading_zero_bytes_keep_their_full_length() -> None:
    x, y = point_with_small_x()
    public = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    document = public_jwk(public, "small")
    assert len(document["x"]) == 43
    assert same_key(parse_jwk(document)[1], public)


def test_optional_members_may_be_absent_or_say_verify(key: SigningKey) -> None:
    assert parse_jwk(jwk(key, alg=None, use=None))[0] == "k1"
    assert parse_jwk(jwk(key, key_ops=["verify"]))[0] == "k1"


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"kty": "RSA"}, id="wrong-kty"),
        pytest.param({"kty": None}, id="no-kty"),
        pytest.param({"crv": "P-384"}, id="wrong-curve"),
        pytest.param({"crv": "secp256k1"}, id="koblitz-curve"),
        pytest.param({"crv": None}, id="no-curve"),
        pytest.param({"alg": "ES384"}, id="wrong-alg"),
        pytest.param({"alg": "HS256"}, id="hmac-alg"),
        pytest.param({"alg": "none"}, id="none-alg"),
        pytest.param({"use": "enc"}, id="encryption-use"),
        pytest.param({"key_ops": ["sign"]}, id="sign-only"),
        pytest.param({"key_ops": "verify"}, id="key-ops-not-a-list"),
        pytest.param({"d": "AAAA"}, id="private-key"),
        pytest.param({"kid": None}, id="no-kid"),
        pytest.param({"kid": ""}, id="empty-kid"),
        pytest.param({"kid": "k" * 129}, id="long-kid"),
        pytest.param({"kid": "a kid"}, id="kid-with-space"),
        pytest.param({"kid": 1}, id="numeric-kid"),
        pytest.param({"x": None}, id="no-x"),
        pytest.param({"y": 7}, id="numeric-y"),
        pytest.param({"x": "AAAA"}, id="short-x"),
        pytest.param({"x": b64url_encode(bytes(33))}, id="long-x"),
        pytest.param({"x": b64url_encode(bytes(32)) + "="}, id="padded-x"),
        pytest.param({"y": "é" * 43}, id="non-ascii-y"),
        pytest.param({"y": b64url_encode(bytes(32))}, id="point-off-the-curve"),
    ],
)
def test_a_jwk_that_is_not_a_public_p256_verification_key_is_invalid(
    overrides: dict[str, Any], key: SigningKey
) -> None:
    with pytest.raises(InvalidJwk) as caught:
        parse_jwk(jwk(key, **overrides))
    assert caught.value.code == "JWK_INVALID"
    assert isinstance(caught.value, MalformedToken)


def test_an_unreduced_x_is_invalid_even_though_it_names_a_curve_point() -> None:
    x, y = point_with_small_x()
    ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    # cryptography accepts x + p as the same point; we keep one spelling per key.
    document = {
        "kty": "EC",
        "crv": "P-256",
        "kid": "small",
        "x": b64url_encode((x + P256_FIELD_PRIME).to_bytes(32, "big")),
        "y": b64url_encode(y.to_bytes(32, "big")),
    }
    assert parse_jwk({**document, "x": b64url_encode(x.to_bytes(32, "big"))})[0] == "small"
    with pytest.raises(InvalidJwk, match="reduced"):
        parse_jwk(document)


def test_an_unreduced_y_is_invalid(key: SigningKey) -> None:
    with pytest.raises(InvalidJwk, match="reduced"):
        parse_jwk(jwk(key, y=b64url_encode((P256_FIELD_PRIME + 1).to_bytes(32, "big"))))


@pytest.mark.parametrize("document", [None, [], "jwk", 1])
def test_a_jwk_that_is_not_an_object_is_invalid(document: Any) -> None:
    with pytest.raises(InvalidJwk):
        parse_jwk(document)


def test_keys_of_other_types_and_curves_in_a_set_are_skipped(key: SigningKey) -> None:
    text = json.dumps(
        {
            "keys": [
                {"kty": "oct", "k": "AAAA", "kid": "hmac"},
                {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rsa"},
                {**jwk(key), "crv": "P-384", "kid": "p384"},
                {"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "ed"},
                jwk(key),
            ]
        }
    )
    assert list(parse_jwks(text)) == ["k1"]


def test_an_invalid_p256_key_in_a_set_invalidates_the_set(key: SigningKey) -> None:
    with pytest.raises(InvalidJwk):
        parse_jwks(json.dumps({"keys": [jwk(key), jwk(key, kid="k2", use="enc")]}))


def test_a_set_carrying_a_private_key_is_invalid(key: SigningKey) -> None:
    with pytest.raises(InvalidJwk, match="private"):
        parse_jwks(json.dumps({"keys": [jwk(key, d="AAAA")]}))


def test_duplicate_kids_in_a_set_are_invalid(key: SigningKey) -> None:
    other = SigningKey.generate("k1")
    with pytest.raises(InvalidJwk, match="duplicate"):
        parse_jwks(json.dumps({"keys": [jwk(key), jwk(other)]}))


def test_an_empty_set_is_valid_and_empty() -> None:
    assert parse_jwks('{"keys":[]}') == {}


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("not json", id="not-json"),
        pytest.param("[]", id="array"),
        pytest.param("{}", id="no-keys"),
        pytest.param('{"keys":{}}', id="keys-not-a-list"),
        pytest.param('{"keys":[1]}', id="entry-not-an-object"),
        pytest.param('{"keys":[],"keys":[]}', id="duplicate-member"),
        pytest.param('{"keys":[],"x":NaN}', id="nan"),
        pytest.param('{"keys":' + "[" * 10_000 + "]" * 10_000 + "}", id="deep-nesting"),
        pytest.param('{"keys":[],"pad":"' + "x" * MAX_JWKS_BYTES + '"}', id="too-large"),
        pytest.param('{"keys":[],"s":"\ud800"}', id="lone-surrogate"),
    ],
)
def test_anything_but_a_strict_json_key_set_is_invalid(text: str) -> None:
    with pytest.raises(InvalidJwk):
        parse_jwks(text)


def test_invalid_utf8_bytes_are_an_invalid_set() -> None:
    with pytest.raises(InvalidJwk):
        parse_jwks(b'{"keys":[],"x":"\xff"}')
