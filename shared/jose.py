"""Strict ES256 compact JWS: the only encoder and decoder of signed tokens and events in authmesh.

Decoding is deliberately narrow (RFC 8725): compact serialisation only, a size cap checked before any
decoding, canonical unpadded base64url, JSON objects without duplicate keys, ``alg`` exactly ES256,
no key-carrying or critical header parameters, and a raw 64-byte ``r‖s`` signature with
``0 < r, s < n``. Anything decoded before the signature is checked is ``Unverified…``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from shared.errors import BadSignature, MalformedToken, TokenTooLarge, UnsupportedAlgorithm

MAX_TOKEN_BYTES = 8192
MAX_HEADER_BYTES = 1024
MAX_KID_LENGTH = 128
ALGORITHM = "ES256"
# Order of the P-256 group: r and s must lie in [1, n-1].
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_SIGNATURE_BYTES = 64
_SEGMENT = re.compile(rb"[A-Za-z0-9_-]+")
_KID = re.compile(rf"[\x21-\x7e]{{1,{MAX_KID_LENGTH}}}")
# Header parameters that would let a token choose its own key or change how it is processed.
_FORBIDDEN_HEADERS = frozenset({"jwk", "jku", "x5u", "x5c", "x5t", "x5t#S256", "crit", "b64", "zip", "enc"})
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True, slots=True)
class UnverifiedJws:
    """A decoded compact JWS whose signature has not been checked yet.

    Attributes:
        unverified_header: The protected header.
        unverified_payload: The payload, a JSON object.
        signing_input: ``BASE64URL(header) || '.' || BASE64URL(payload)`` as bytes.
        signature: The raw 64-byte ``r‖s`` signature.
    """

    unverified_header: dict[str, Any]
    unverified_payload: dict[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def kid(self) -> str:
        """The header's key id (validated by :func:`decode_compact`)."""
        kid: str = self.unverified_header["kid"]
        return kid


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: bytes) -> bytes:
    """Decode canonical unpadded base64url, refusing anything else.

    Raises:
        MalformedToken: Padding, characters outside the alphabet, an impossible length, or
            non-zero trailing bits (a second spelling of the same bytes).
    """
    if not _SEGMENT.fullmatch(segment) or len(segment) % 4 == 1:
        raise MalformedToken("token is not canonical base64url")
    try:
        decoded = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as error:
        raise MalformedToken("token is not canonical base64url") from error
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != segment:
        raise MalformedToken("token is not canonical base64url")
    return decoded


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MalformedToken("token has duplicate JSON keys")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise MalformedToken(f"token JSON has non-standard constant {name}")


def parse_json_object(data: bytes) -> dict[str, Any]:
    """Parse strict UTF-8 JSON that must be an object without duplicate keys.

    Raises:
        MalformedToken: Anything else.
    """
    try:
        text = data.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except MalformedToken:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise MalformedToken("token is not valid JSON") from error
    if not isinstance(value, dict):
        raise MalformedToken("token JSON is not an object")
    return value


def decode_compact(token: str | bytes, *, max_bytes: int = MAX_TOKEN_BYTES) -> UnverifiedJws:
    """Split and decode a compact ES256 JWS without checking its signature.

    Args:
        token: The compact serialisation.
        max_bytes: Size cap, checked before anything is decoded.

    Returns:
        The decoded parts.

    Raises:
        TokenTooLarge: Over ``max_bytes``.
        MalformedToken: Not three canonical base64url segments of JSON objects.
        UnsupportedAlgorithm: ``alg`` other than ES256, or a forbidden header parameter.
        BadSignature: A signature that is not 64 bytes of ``r‖s`` with ``0 < r, s < n``.
    """
    if isinstance(token, str):
        if len(token) > max_bytes:
            raise TokenTooLarge()
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError as error:
            raise MalformedToken("token is not ASCII") from error
    else:
        raw = token
    if len(raw) > max_bytes:
        raise TokenTooLarge()
    parts = raw.split(b".")
    if len(parts) != 3:
        raise MalformedToken("token is not a compact JWS")
    header_segment, payload_segment, signature_segment = parts
    if len(header_segment) > MAX_HEADER_BYTES * 4 // 3 + 4:
        raise MalformedToken("token header too large")
    header = parse_json_object(b64url_decode(header_segment))
    alg = header.get("alg")
    if alg != ALGORITHM:
        raise UnsupportedAlgorithm(f"token algorithm {alg!r} not accepted" if isinstance(alg, str) else None)
    if not _FORBIDDEN_HEADERS.isdisjoint(header):
        raise UnsupportedAlgorithm("token header carries a parameter that is not accepted")
    kid = header.get("kid")
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise MalformedToken("token kid missing or invalid")
    payload = parse_json_object(b64url_decode(payload_segment))
    signature = b64url_decode(signature_segment)
    check_signature_shape(signature)
    return UnverifiedJws(
        unverified_header=header,
        unverified_payload=payload,
        signing_input=header_segment + b"." + payload_segment,
        signature=signature,
    )


def check_signature_shape(signature: bytes) -> None:
    """Refuse anything but a raw P-256 ``r‖s`` with both halves in ``[1, n-1]``.

    Raises:
        BadSignature: Wrong length (DER, for one) or a scalar out of range.
    """
    if len(signature) != _SIGNATURE_BYTES:
        raise BadSignature("signature is not a 64-byte ES256 signature")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if not (0 < r < P256_ORDER and 0 < s < P256_ORDER):
        raise BadSignature("signature scalar out of range")


def verify_signature(public_key: ec.EllipticCurvePublicKey, signing_input: bytes, signature: bytes) -> None:
    """Check a raw ES256 signature.

    Raises:
        BadSignature: It does not verify (or is not of the right shape).
    """
    check_signature_shape(signature)
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public_key.verify(der, signing_input, _ECDSA_SHA256)
    except InvalidSignature as error:
        raise BadSignature() from error


def _json_bytes(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=False, ensure_ascii=True).encode("ascii")


def sign_compact(
    header: dict[str, Any], payload: dict[str, Any], private_key: ec.EllipticCurvePrivateKey
) -> str:
    """Sign a JSON payload as a compact ES256 JWS.

    Args:
        header: Protected header; ``alg`` is set to ES256.
        payload: A JSON object.
        private_key: A P-256 private key.

    Returns:
        ``header.payload.signature``.
    """
    signing_input = (
        b64url_encode(_json_bytes({**header, "alg": ALGORITHM})) + "." + b64url_encode(_json_bytes(payload))
    )
    der = private_key.sign(signing_input.encode("ascii"), _ECDSA_SHA256)
    r, s = decode_dss_signature(der)
    return signing_input + "." + b64url_encode(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
