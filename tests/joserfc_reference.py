"""joserfc set up with the strict decoder's checks: the reference the differential tests compare with.

The property is one-way: every token authmesh accepts, joserfc accepts too, with the same header,
payload and claims. joserfc is more lenient in places (duplicate JSON keys, non-canonical base64url,
floats as dates, tokens without ``exp``), so the other direction is not expected.

The same checks means: ES256 only; every claim authmesh requires present (``scope`` may be blank),
``iss`` and ``aud`` as configured, ``exp``, ``nbf`` and ``iat`` against the same clock and leeway, and
``typ`` one of the two RFC 9068 spellings. Two joserfc defaults are policy rather than checks of the
token and are set to authmesh's: header parameters it has no registry entry for are allowed (RFC 7515
§4: a recipient ignores parameters it does not understand, unless they are ``crit``, which authmesh
refuses), and its size limits are raised to authmesh's own cap.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws, jwt
from joserfc.jwk import ECKey
from joserfc.jws import JWSRegistry
from joserfc.jwt import JWTClaimsRegistry

from authmesh._shared.claims import REQUIRED_CLAIMS
from authmesh._shared.jose import ALGORITHM, MAX_TOKEN_BYTES
from authmesh._shared.verifier import ACCESS_TOKEN_TYPES


def registry() -> JWSRegistry:
    """A JWS registry that allows ES256 only, unknown header parameters, and authmesh's size cap."""
    chosen = JWSRegistry(algorithms=[ALGORITHM], strict_check_header=False)
    chosen.max_header_length = chosen.max_payload_length = chosen.max_signature_length = MAX_TOKEN_BYTES
    return chosen


def reference_jws(token: str | bytes, public_key: ec.EllipticCurvePublicKey) -> tuple[dict[str, Any], bytes]:
    """The protected header and payload bytes of a compact ES256 JWS, as joserfc verifies it.

    Raises:
        JoseError: joserfc refuses it.
    """
    verified = jws.deserialize_compact(token, ECKey.import_key(public_key), [ALGORITHM], registry())
    assert verified.payload is not None
    return verified.headers(), verified.payload


def reference_access_token(
    token: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    issuer: str,
    audience: str,
    now: int,
    leeway: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of an access token, as joserfc verifies and validates it.

    Raises:
        JoseError: joserfc refuses it (an ``AssertionError`` for a ``typ`` it would not check).
    """
    decoded = jwt.decode(token, ECKey.import_key(public_key), [ALGORITHM], registry())
    assert decoded.header.get("typ") in ACCESS_TOKEN_TYPES, decoded.header
    options: dict[str, Any] = {name: {"essential": True} for name in REQUIRED_CLAIMS}
    options["iss"] = {"essential": True, "value": issuer}
    options["aud"] = {"essential": True, "value": audience}
    options["scope"] = {"essential": True, "allow_blank": True}
    JWTClaimsRegistry(now=now, leeway=leeway, **options).validate(decoded.claims)
    return decoded.header, decoded.claims
