"""P-256 public keys as JWKs (RFC 7517/7518) and strict JWK Set parsing."""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from authmesh._shared.errors import MalformedToken
from authmesh._shared.jose import ALGORITHM, KID_PATTERN, b64url_decode, b64url_encode, parse_json_object

MAX_JWKS_BYTES = 256 * 1024
# The prime of the P-256 base field: coordinates lie in [0, p-1].
P256_FIELD_PRIME = 2**256 - 2**224 + 2**192 + 2**96 - 1
_COORDINATE_BYTES = 32


class InvalidJwk(MalformedToken):
    """A JWK or JWK Set that is not a valid P-256 signing key set."""

    code = "JWK_INVALID"
    default_message = "invalid JWK"


def ec_public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The key members alone (``kty``, ``crv``, ``x``, ``y``) of a P-256 public key's JWK."""
    numbers = public_key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url_encode(numbers.x.to_bytes(_COORDINATE_BYTES, "big")),
        "y": b64url_encode(numbers.y.to_bytes(_COORDINATE_BYTES, "big")),
    }


def public_jwk(public_key: ec.EllipticCurvePublicKey, kid: str) -> dict[str, str]:
    """The public JWK of a P-256 key, for signing with ES256."""
    return {
        **ec_public_jwk(public_key),
        "kid": kid,
        "use": "sig",
        "alg": "ES256",
    }


def jwks_json(keys: dict[str, ec.EllipticCurvePublicKey]) -> str:
    """An RFC 7517 JWK Set with the given keys, in kid order."""
    return json.dumps({"keys": [public_jwk(key, kid) for kid, key in sorted(keys.items())]})


def parse_jwk(jwk: Any) -> tuple[str, ec.EllipticCurvePublicKey]:
    """Parse one public P-256 signing JWK.

    Raises:
        InvalidJwk: Wrong type, curve, use, operations or algorithm, private material present, a kid
            no token could name, non-canonical coordinates, or a point not on the curve.
    """
    if type(jwk) is not dict:
        raise InvalidJwk("JWK is not an object")
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise InvalidJwk("JWK is not a P-256 EC key")
    if "d" in jwk:
        raise InvalidJwk("JWK carries private key material")
    if jwk.get("alg", ALGORITHM) != ALGORITHM or jwk.get("use", "sig") != "sig":
        raise InvalidJwk("JWK is not for ES256 signatures")
    key_ops = jwk.get("key_ops", ["verify"])
    if type(key_ops) is not list or "verify" not in key_ops:
        raise InvalidJwk("JWK is not for verifying signatures")
    kid, x, y = jwk.get("kid"), jwk.get("x"), jwk.get("y")
    # The same rule a token's kid header must satisfy: a key no token can name is a mistake.
    if type(kid) is not str or not KID_PATTERN.fullmatch(kid):
        raise InvalidJwk("JWK kid missing or invalid")
    if type(x) is not str or type(y) is not str:
        raise InvalidJwk("JWK coordinates missing")
    try:
        x_bytes, y_bytes = b64url_decode(x.encode("ascii")), b64url_decode(y.encode("ascii"))
    except (MalformedToken, UnicodeEncodeError) as error:
        raise InvalidJwk("JWK coordinates are not base64url") from error
    if len(x_bytes) != _COORDINATE_BYTES or len(y_bytes) != _COORDINATE_BYTES:
        raise InvalidJwk("JWK coordinates have the wrong length")
    x_value, y_value = int.from_bytes(x_bytes, "big"), int.from_bytes(y_bytes, "big")
    # cryptography reduces coordinates modulo p: x + p would name the same point. Only one spelling.
    if x_value >= P256_FIELD_PRIME or y_value >= P256_FIELD_PRIME:
        raise InvalidJwk("JWK coordinates are not reduced")
    try:
        key = ec.EllipticCurvePublicNumbers(x_value, y_value, ec.SECP256R1()).public_key()
    except ValueError as error:
        raise InvalidJwk("JWK point is not on P-256") from error
    return kid, key


def parse_jwks(text: str | bytes) -> dict[str, ec.EllipticCurvePublicKey]:
    """Parse a JWK Set; keys that are not P-256 keys are skipped, a duplicate kid is an error.

    Raises:
        InvalidJwk: Not a JWK Set (strict JSON: no duplicate members), too large, with an invalid
            P-256 key, or with duplicate kids.
    """
    if len(text) > MAX_JWKS_BYTES:
        raise InvalidJwk("JWK Set too large")
    try:
        document = parse_json_object(text.encode("utf-8") if isinstance(text, str) else text)
    except (MalformedToken, UnicodeEncodeError) as error:
        raise InvalidJwk("JWK Set is not a JSON object") from error
    entries = document.get("keys")
    if type(entries) is not list:
        raise InvalidJwk("JWK Set has no keys array")
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for entry in entries:
        if type(entry) is dict and (entry.get("kty"), entry.get("crv")) != ("EC", "P-256"):
            continue  # another kind of key: not ours to use, not an error (RFC 7517 §5)
        kid, key = parse_jwk(entry)
        if kid in keys:
            raise InvalidJwk("JWK Set has duplicate kids")
        keys[kid] = key
    return keys
