"""P-256 public keys as JWKs (RFC 7517/7518) and strict JWK Set parsing."""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from shared.errors import MalformedToken
from shared.jose import b64url_decode, b64url_encode

MAX_JWKS_BYTES = 256 * 1024
_COORDINATE_BYTES = 32


class InvalidJwk(MalformedToken):
    """A JWK or JWK Set that is not a valid P-256 signing key set."""

    code = "JWK_INVALID"
    default_message = "invalid JWK"


def public_jwk(public_key: ec.EllipticCurvePublicKey, kid: str) -> dict[str, str]:
    """The public JWK of a P-256 key, for signing with ES256."""
    numbers = public_key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url_encode(numbers.x.to_bytes(_COORDINATE_BYTES, "big")),
        "y": b64url_encode(numbers.y.to_bytes(_COORDINATE_BYTES, "big")),
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
        InvalidJwk: Wrong type, curve, use or algorithm, private material present, bad coordinates,
            or a point not on the curve.
    """
    if not isinstance(jwk, dict):
        raise InvalidJwk("JWK is not an object")
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise InvalidJwk("JWK is not a P-256 EC key")
    if "d" in jwk:
        raise InvalidJwk("JWK carries private key material")
    if jwk.get("alg", "ES256") != "ES256" or jwk.get("use", "sig") != "sig":
        raise InvalidJwk("JWK is not for ES256 signatures")
    kid, x, y = jwk.get("kid"), jwk.get("x"), jwk.get("y")
    if not isinstance(kid, str) or not kid or len(kid) > 128:
        raise InvalidJwk("JWK kid missing")
    if not isinstance(x, str) or not isinstance(y, str):
        raise InvalidJwk("JWK coordinates missing")
    try:
        x_bytes, y_bytes = b64url_decode(x.encode("ascii")), b64url_decode(y.encode("ascii"))
    except (MalformedToken, UnicodeEncodeError) as error:
        raise InvalidJwk("JWK coordinates are not base64url") from error
    if len(x_bytes) != _COORDINATE_BYTES or len(y_bytes) != _COORDINATE_BYTES:
        raise InvalidJwk("JWK coordinates have the wrong length")
    try:
        key = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x_bytes, "big"), int.from_bytes(y_bytes, "big"), ec.SECP256R1()
        ).public_key()
    except ValueError as error:
        raise InvalidJwk("JWK point is not on P-256") from error
    return kid, key


def parse_jwks(text: str | bytes) -> dict[str, ec.EllipticCurvePublicKey]:
    """Parse a JWK Set; keys that are not P-256 signing keys are skipped, a duplicate kid is an error.

    Raises:
        InvalidJwk: Not a JWK Set, too large, or with duplicate kids.
    """
    if len(text) > MAX_JWKS_BYTES:
        raise InvalidJwk("JWK Set too large")
    try:
        document = json.loads(text)
    except ValueError as error:
        raise InvalidJwk("JWK Set is not JSON") from error
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise InvalidJwk("JWK Set has no keys array")
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for entry in document["keys"]:
        if isinstance(entry, dict) and (entry.get("kty"), entry.get("crv")) != ("EC", "P-256"):
            continue  # another kind of key: not ours to use, not an error (RFC 7517 §5)
        kid, key = parse_jwk(entry)
        if kid in keys:
            raise InvalidJwk("JWK Set has duplicate kids")
        keys[kid] = key
    return keys
