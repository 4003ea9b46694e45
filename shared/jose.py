"""Strict ES256 compact JWS: the only encoder and decoder of signed tokens and events in authmesh.

Decoding is deliberately narrow (RFC 8725): compact serialisation only, a size cap checked before any
decoding, canonical unpadded base64url, JSON objects without duplicate keys, ``alg`` exactly ES256,
no key-carrying, critical or nesting (``cty``) header parameters, ``typ`` a string where present, and
a raw 64-byte ``r‖s`` signature with ``0 < r, s < n``. It is never more lenient than joserfc: every
token it accepts, joserfc accepts with the same header and payload (``tests/test_jose.py``, the
differential). Anything decoded before the signature is checked is ``Unverified…``.

Verification is on every request's path, so the checks are written to cost little: base64url goes
through ``binascii`` in strict mode (with the alphabet and trailing bits checked separately), JSON
through one prebuilt decoder, and a header segment that passed every check is remembered (the header
is a pure function of its bytes, and every token a key signs carries the same one).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import json.scanner
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from authmesh._shared.errors import (
    BadSignature,
    MalformedToken,
    TokenTooLarge,
    UnsupportedAlgorithm,
    WrongTokenType,
)

MAX_TOKEN_BYTES = 8192
MAX_HEADER_BYTES = 1024
MAX_KID_LENGTH = 128
ALGORITHM = "ES256"
# Order of the P-256 group: r and s must lie in [1, n-1].
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_SIGNATURE_BYTES = 64
_SCALAR_BYTES = 32
_ZERO_SCALAR = bytes(_SCALAR_BYTES)
_ORDER_BYTES = P256_ORDER.to_bytes(_SCALAR_BYTES, "big")
# DER tag-and-length prefixes, by content length (all under 128: one-byte lengths).
_DER_SEQUENCE = tuple(bytes((0x30, n)) for n in range(2 * (_SCALAR_BYTES + 3) + 1))
_DER_INTEGER = tuple(bytes((0x02, n)) for n in range(_SCALAR_BYTES + 2))
_MAX_HEADER_SEGMENT = MAX_HEADER_BYTES * 4 // 3 + 4
_HEADER_CACHE_SIZE = 64
# Header parameters that would let a token choose its own key or change how it is processed; ``cty``
# announces a nested JWT (RFC 7519 §5.2), whose inner token a careless consumer would trust by the
# outer signature: authmesh never nests, so a token that says it does is refused.
_FORBIDDEN_HEADERS = frozenset(
    {"jwk", "jku", "x5u", "x5c", "x5t", "x5t#S256", "crit", "b64", "zip", "enc", "cty"}
)
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
# json.dumps with options builds an encoder per call; tokens are signed on hot paths.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)

_URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# base64url -> standard base64 for binascii; '+', '/' and '=' become '*', which strict mode refuses,
# so the two alphabets (and padding) can never be mixed into one accepted spelling.
_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/***")
# The last character of a segment whose length is 2 (or 3) mod 4 carries 4 (or 2) unused bits that
# must be zero: otherwise several spellings decode to the same bytes.
_CLEAN_LAST = {
    2: frozenset(c for i, c in enumerate(_URL_ALPHABET) if i & 0x0F == 0),
    3: frozenset(c for i, c in enumerate(_URL_ALPHABET) if i & 0x03 == 0),
}
_PADDING = {2: b"==", 3: b"="}
# What a ``kid`` may be: 1 to 128 printable ASCII characters without spaces (it lands in logs and
# metric labels, and it is looked up, never interpreted).
KID_PATTERN = re.compile(rf"[\x21-\x7e]{{1,{MAX_KID_LENGTH}}}")
_NOT_CANONICAL = "token is not canonical base64url"


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


@dataclass(frozen=True, slots=True)
class UnverifiedRawJws:
    """A decoded compact JWS whose payload is left as bytes (RFC 7515 payloads need not be JSON).

    Attributes:
        unverified_header: The protected header, checked exactly as :func:`decode_compact` checks it.
        unverified_payload: The payload bytes.
        signing_input: ``BASE64URL(header) || '.' || BASE64URL(payload)`` as bytes.
        signature: The raw 64-byte ``r‖s`` signature.
    """

    unverified_header: dict[str, Any]
    unverified_payload: bytes
    signing_input: bytes
    signature: bytes

    @property
    def kid(self) -> str:
        """The header's key id (validated by :func:`decode_compact_raw`)."""
        kid: str = self.unverified_header["kid"]
        return kid


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: bytes) -> bytes:
    """Decode canonical unpadded base64url, refusing anything else.

    Raises:
        MalformedToken: Empty, padding, characters outside the alphabet, an impossible length, or
            non-zero trailing bits (a second spelling of the same bytes).
    """
    remainder = len(segment) & 3
    standard = segment.translate(_TO_STANDARD)
    if remainder:
        if remainder == 1 or segment[-1] not in _CLEAN_LAST[remainder]:
            raise MalformedToken(_NOT_CANONICAL)
        standard += _PADDING[remainder]
    elif not segment:
        raise MalformedToken(_NOT_CANONICAL)
    try:
        return binascii.a2b_base64(standard, strict_mode=True)
    except (binascii.Error, ValueError) as error:
        raise MalformedToken(_NOT_CANONICAL) from error


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedToken("token has duplicate JSON keys")
    return result


def _reject_constant(name: str) -> Any:
    raise MalformedToken(f"token JSON has non-standard constant {name}")


_JSON = json.JSONDecoder(object_pairs_hook=_unique_pairs, parse_constant=_reject_constant)
_SCAN = json.scanner.make_scanner(_JSON)  # type: ignore[arg-type]  # typeshed wants a scanner; any decoder works


def parse_json_object(data: bytes) -> dict[str, Any]:
    """Parse strict UTF-8 JSON that must be an object without duplicate keys.

    Raises:
        MalformedToken: Anything else.
    """
    try:
        text = data.decode("utf-8")
        try:
            # The usual text has no whitespace around the value: one pass of the C scanner.
            value, end = _SCAN(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):
            # Whitespace around the value, or an error: the full decoder decides which.
            value = _JSON.decode(text)
    except MalformedToken:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise MalformedToken("token is not valid JSON") from error
    if type(value) is not dict:
        raise MalformedToken("token JSON is not an object")
    return value


@functools.lru_cache(maxsize=_HEADER_CACHE_SIZE)
def _checked_header(segment: bytes) -> dict[str, Any]:
    # Pure function of the segment: only headers that pass every check are remembered (lru_cache does
    # not keep exceptions), and callers get a copy, so the cached object is never shared.
    if len(segment) > _MAX_HEADER_SEGMENT:
        raise MalformedToken("token header too large")
    header = parse_json_object(b64url_decode(segment))
    alg = header.get("alg")
    if alg != ALGORITHM:
        raise UnsupportedAlgorithm(f"token algorithm {alg!r} not accepted" if isinstance(alg, str) else None)
    if not _FORBIDDEN_HEADERS.isdisjoint(header):
        raise UnsupportedAlgorithm("token header carries a parameter that is not accepted")
    kid = header.get("kid")
    if type(kid) is not str or not KID_PATTERN.fullmatch(kid):
        raise MalformedToken("token kid missing or invalid")
    # typ is a string where present (RFC 7515 §4.1.9): other JOSE libraries refuse any other type, and
    # this decoder must never be the lenient one.
    if "typ" in header and type(header["typ"]) is not str:
        raise WrongTokenType()
    return header


def _decode_parts(token: str | bytes, max_bytes: int) -> tuple[dict[str, Any], bytes, bytes, bytes, bytes]:
    if isinstance(token, str):
        if len(token) > max_bytes:
            raise TokenTooLarge()
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError as error:
            raise MalformedToken("token is not ASCII") from error
    elif isinstance(token, bytes):
        if len(token) > max_bytes:
            raise TokenTooLarge()
        raw = token
    else:
        raise MalformedToken("token is neither text nor bytes")
    parts = raw.split(b".")
    if len(parts) != 3:
        raise MalformedToken("token is not a compact JWS")
    header_segment, payload_segment, signature_segment = parts
    header = dict(_checked_header(header_segment))
    payload = b64url_decode(payload_segment)
    signature = b64url_decode(signature_segment)
    check_signature_shape(signature)
    return header, payload, header_segment, payload_segment, signature


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
    header, payload, header_segment, payload_segment, signature = _decode_parts(token, max_bytes)
    return UnverifiedJws(
        header, parse_json_object(payload), header_segment + b"." + payload_segment, signature
    )


def decode_compact_raw(token: str | bytes, *, max_bytes: int = MAX_TOKEN_BYTES) -> UnverifiedRawJws:
    """Like :func:`decode_compact`, with every header and signature check, but any payload bytes.

    Access tokens and events are JSON and go through :func:`decode_compact`; this is the JWS layer
    alone (RFC 7515), for payloads that are not JSON objects.

    Raises:
        TokenTooLarge: Over ``max_bytes``.
        MalformedToken: Not three canonical base64url segments with a valid JSON header.
        UnsupportedAlgorithm: ``alg`` other than ES256, or a forbidden header parameter.
        BadSignature: A signature that is not 64 bytes of ``r‖s`` with ``0 < r, s < n``.
    """
    header, payload, header_segment, payload_segment, signature = _decode_parts(token, max_bytes)
    return UnverifiedRawJws(
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
    # Equal-length big-endian byte strings compare as the numbers they spell.
    r = signature[:_SCALAR_BYTES]
    s = signature[_SCALAR_BYTES:]
    if not (_ZERO_SCALAR < r < _ORDER_BYTES and _ZERO_SCALAR < s < _ORDER_BYTES):
        raise BadSignature("signature scalar out of range")


def verify_signature(public_key: ec.EllipticCurvePublicKey, signing_input: bytes, signature: bytes) -> None:
    """Check a raw ES256 signature.

    Raises:
        BadSignature: It does not verify (or is not of the right shape).
    """
    check_signature_shape(signature)
    # DER by hand (twice as fast as going through integers): each INTEGER is the scalar without
    # leading zero bytes, plus one zero byte where the high bit is set. r, s >= 1, so neither is empty,
    # and the whole is at most 72 bytes: one-byte lengths everywhere.
    r = signature[:_SCALAR_BYTES].lstrip(b"\x00")
    if r[0] & 0x80:
        r = b"\x00" + r
    s = signature[_SCALAR_BYTES:].lstrip(b"\x00")
    if s[0] & 0x80:
        s = b"\x00" + s
    der = b"".join((_DER_SEQUENCE[len(r) + len(s) + 4], _DER_INTEGER[len(r)], r, _DER_INTEGER[len(s)], s))
    try:
        public_key.verify(der, signing_input, _ECDSA_SHA256)
    except InvalidSignature as error:
        raise BadSignature() from error


def _json_bytes(value: dict[str, Any]) -> bytes:
    return _JSON_ENCODER.encode(value).encode("ascii")


def encode_header(header: dict[str, Any]) -> str:
    """The first segment of a compact ES256 JWS: ``header`` with ``alg`` set to ES256, in base64url.

    A signer that puts the same header on many tokens encodes it once and signs with
    :func:`sign_with_header`.
    """
    return b64url_encode(_json_bytes({**header, "alg": ALGORITHM}))


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
    return sign_with_header(encode_header(header), payload, private_key)


def sign_with_header(
    encoded_header: str, payload: dict[str, Any], private_key: ec.EllipticCurvePrivateKey
) -> str:
    """Sign a JSON payload as a compact ES256 JWS under a header :func:`encode_header` made.

    Args:
        encoded_header: The header segment, from :func:`encode_header`.
        payload: A JSON object.
        private_key: A P-256 private key.

    Returns:
        ``header.payload.signature``.
    """
    signing_input = encoded_header + "." + b64url_encode(_json_bytes(payload))
    der = private_key.sign(signing_input.encode("ascii"), _ECDSA_SHA256)
    r, s = decode_dss_signature(der)
    return signing_input + "." + b64url_encode(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
