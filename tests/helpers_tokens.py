"""Minting access tokens, events and hostile JWS variants with throwaway keys, for tests.

Everything here is deterministic where it can be: the default clock stands still at :data:`NOW`, and
tokens are built from plain dicts (or exact bytes, when a test needs a spelling ``json.dumps`` would
never produce, like duplicate keys).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from authmesh._shared.claims import ACCESS_TOKEN_TYPE, AccessClaims, new_uuid7
from authmesh._shared.errors import KeyRevoked, TokenRevoked, UnknownKey
from authmesh._shared.jose import P256_ORDER, b64url_encode
from authmesh._shared.verifier import KeySource, RevocationCheck, TokenVerifier, VerifierPolicy

ISSUER = "authmesh"
AUDIENCE = "authmesh-resources"
KID = "test-key-1"
# A fixed instant (2025-06-15T15:06:40Z) for clocks that stand still.
NOW = 1_750_000_000
LIFETIME = 300


class Omit(enum.Enum):
    """Marks a claim or header parameter to leave out of a minted token."""

    OMIT = "omit"


OMIT = Omit.OMIT


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A P-256 key pair with its ``kid``.

    Attributes:
        kid: Key id.
        private_key: The private half.
    """

    kid: str
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, kid: str = KID) -> SigningKey:
        """A fresh random key."""
        return cls(kid=kid, private_key=ec.generate_private_key(ec.SECP256R1()))

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half."""
        return self.private_key.public_key()

    def public_bytes_uncompressed(self) -> bytes:
        """The public point as ``04 || x || y`` (what an HS256 confusion attack would key an HMAC with)."""
        numbers = self.public_key.public_numbers()
        return b"\x04" + numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")


class StaticKeys:
    """A :class:`authmesh._shared.verifier.KeySource` over a fixed set of keys; records every lookup.

    Args:
        keys: The keys to serve.
    """

    def __init__(self, *keys: SigningKey) -> None:
        self._keys = {key.kid: key.public_key for key in keys}
        self._retired: set[str] = set()
        self.lookups: list[str] = []

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey:
        """The key for ``kid``.

        Raises:
            UnknownKey: Not one of ours.
            KeyRevoked: Retired with :meth:`retire`.
        """
        self.lookups.append(kid)
        if kid in self._retired:
            raise KeyRevoked()
        try:
            return self._keys[kid]
        except KeyError:
            raise UnknownKey(kid) from None

    def add(self, key: SigningKey) -> None:
        """Serve one more key."""
        self._keys[key.kid] = key.public_key

    def retire(self, kid: str) -> None:
        """Refuse ``kid`` from now on."""
        self._retired.add(kid)


class AnyKidKeys:
    """A key source that answers every ``kid`` with one key.

    For test vectors whose ``kid`` was tampered with: the rejection must then come from the signature,
    not from the lookup.
    """

    def __init__(self, public_key: ec.EllipticCurvePublicKey) -> None:
        self._public_key = public_key

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey:
        """The one key, whatever ``kid`` says."""
        return self._public_key


@dataclass(slots=True)
class FrozenClock:
    """A clock that stands still until told to move.

    Attributes:
        now: The current Unix time in seconds.
    """

    now: float = float(NOW)

    def __call__(self) -> float:
        """The current time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (or back, with a negative number)."""
        self.now += seconds


@dataclass(slots=True)
class SetRevocations:
    """A :class:`authmesh._shared.verifier.RevocationCheck` over plain sets; counts its calls.

    Attributes:
        jtis: Revoked token ids.
        sids: Revoked session ids.
        subs: Subjects all of whose tokens are revoked.
        kids: Retired keys.
        checks: How many times :meth:`check` ran.
    """

    jtis: set[str] = field(default_factory=set)
    sids: set[str] = field(default_factory=set)
    subs: set[str] = field(default_factory=set)
    kids: set[str] = field(default_factory=set)
    checks: int = 0

    def check(self, claims: AccessClaims) -> None:
        """Raise if anything about ``claims`` is revoked.

        Raises:
            TokenRevoked: Its jti, session or subject is revoked.
            KeyRevoked: Its key is retired.
        """
        self.checks += 1
        if claims.kid in self.kids:
            raise KeyRevoked()
        if claims.jti in self.jtis:
            raise TokenRevoked()
        if claims.sid in self.sids:
            raise TokenRevoked(code="SESSION_REVOKED")
        if claims.sub in self.subs:
            raise TokenRevoked(code="USER_REVOKED")


def claims_payload(now: int = NOW, **overrides: Any) -> dict[str, Any]:
    """The payload of a valid access token issued at ``now``; ``OMIT`` as a value drops that claim."""
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "user-1",
        "aud": AUDIENCE,
        "exp": now + LIFETIME,
        "iat": now,
        "nbf": now,
        "jti": new_uuid7(now * 1000),
        "sid": "session-1",
        "scope": "docs:read openid",
        "client_id": "cli",
    }
    payload.update(overrides)
    return {name: value for name, value in payload.items() if value is not OMIT}


def access_header(kid: str = KID, **overrides: Any) -> dict[str, Any]:
    """The protected header of an access token; ``OMIT`` as a value drops that parameter."""
    header: dict[str, Any] = {"alg": "ES256", "typ": ACCESS_TOKEN_TYPE, "kid": kid}
    header.update(overrides)
    return {name: value for name, value in header.items() if value is not OMIT}


def json_segment(value: Any) -> str:
    """The base64url of compact JSON, exactly as the issuer writes it."""
    return b64url_encode(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def raw_signature(key: SigningKey, signing_input: bytes) -> bytes:
    """An ES256 signature as the 64-byte ``r‖s`` JWS uses."""
    r, s = decode_dss_signature(key.private_key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sign_segments(header_segment: str, payload_segment: str, key: SigningKey) -> str:
    """Sign two already-encoded segments (whatever bytes they spell) and join the compact JWS."""
    signing_input = f"{header_segment}.{payload_segment}"
    return signing_input + "." + b64url_encode(raw_signature(key, signing_input.encode("ascii")))


def sign_json(header: dict[str, Any], payload: dict[str, Any], key: SigningKey) -> str:
    """Sign a header and payload as given (no ``alg`` is added: the test decides every parameter)."""
    return sign_segments(json_segment(header), json_segment(payload), key)


def sign_bytes(header: bytes, payload: bytes, key: SigningKey) -> str:
    """Sign exact header and payload bytes (for spellings ``json.dumps`` never makes)."""
    return sign_segments(b64url_encode(header), b64url_encode(payload), key)


def mint_access_token(
    key: SigningKey,
    now: int = NOW,
    *,
    header: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A signed access token; keyword arguments override claims (``OMIT`` drops one).

    Args:
        key: Signs it; its kid goes in the header unless ``header`` says otherwise.
        now: Issue time.
        header: Header parameters to override (``OMIT`` drops one).
        claims: Claim overrides.
    """
    overrides: dict[str, Any] = {"kid": key.kid, **(header or {})}
    return sign_json(access_header(**overrides), claims_payload(now, **claims), key)


def hs256_token(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """A compact JWS with an HMAC-SHA256 "signature" (what an algorithm-confusion attacker sends)."""
    signing_input = f"{json_segment(header)}.{json_segment(payload)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url_encode(mac)


def unsigned_token(header: dict[str, Any], payload: dict[str, Any]) -> str:
    """A compact JWS with an empty signature (``alg: none`` style)."""
    return f"{json_segment(header)}.{json_segment(payload)}."


def with_signature(token: str, signature: bytes) -> str:
    """The same header and payload with another signature."""
    header_segment, payload_segment, _ = token.split(".")
    return f"{header_segment}.{payload_segment}.{b64url_encode(signature)}"


def signature_of(token: str) -> bytes:
    """The raw signature bytes of a compact JWS."""
    segment = token.split(".")[2]
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def malleated(token: str) -> str:
    """The same token with ``s`` replaced by ``n - s``: a second valid ECDSA signature."""
    signature = signature_of(token)
    s = int.from_bytes(signature[32:], "big")
    return with_signature(token, signature[:32] + (P256_ORDER - s).to_bytes(32, "big"))


def der_signed(token: str) -> str:
    """The same token with its signature in DER instead of ``r‖s``."""
    signature = signature_of(token)
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    return with_signature(token, der)


def make_verifier(
    keys: KeySource,
    *,
    revocations: RevocationCheck | None = None,
    clock: FrozenClock | None = None,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    leeway: float = 5.0,
    cache_size: int = 1024,
) -> TokenVerifier:
    """A verifier for tokens minted here, on a frozen clock at :data:`NOW` unless given one."""
    return TokenVerifier(
        keys,
        revocations if revocations is not None else SetRevocations(),
        VerifierPolicy(issuer=issuer, audience=audience, leeway=leeway, cache_size=cache_size),
        clock if clock is not None else FrozenClock(),
    )


def distinct_tokens(key: SigningKey, count: int, now: int = NOW) -> Iterable[str]:
    """``count`` valid access tokens that differ in subject and jti."""
    for index in range(count):
        yield mint_access_token(key, now, sub=f"user-{index}", sid=f"session-{index}")
