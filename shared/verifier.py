"""Local access-token verification: pure, no I/O, clock injected.

``TokenVerifier.verify`` decodes a compact JWS strictly (:mod:`authmesh._shared.jose`), checks the ES256
signature against a :class:`KeySource`, every RFC 9068 claim against the settings and the clock, and the
:class:`RevocationCheck`. A repeated token skips the signature (a bounded cache keyed by the exact token
string), but every hit still checks expiry and revocation, so a revocation applies to cached tokens too.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from authmesh._shared.claims import ACCESS_TOKEN_TYPE, AccessClaims
from authmesh._shared.errors import (
    DpopKeyMismatch,
    DpopProofMissing,
    InvalidClaim,
    TokenExpired,
    TokenNotYetValid,
    TokenTooLarge,
    WrongAudience,
    WrongIssuer,
    WrongTokenType,
)
from authmesh._shared.jose import MAX_TOKEN_BYTES, decode_compact, verify_signature

Clock = Callable[[], float]
# RFC 9068 §4: a resource server accepts exactly these two spellings of the access-token type.
ACCESS_TOKEN_TYPES = frozenset({ACCESS_TOKEN_TYPE, "application/" + ACCESS_TOKEN_TYPE})


class KeySource(Protocol):
    """Where the verifier finds public keys."""

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey:
        """The public key for ``kid``.

        Raises:
            UnknownKey: No such key is known.
            KeyRevoked: The key has been retired.
        """
        ...


class RevocationCheck(Protocol):
    """What the verifier asks about revocation (the denylist, or nothing)."""

    def check(self, claims: AccessClaims) -> None:
        """Raise if the token, its session, its user or its key is revoked.

        Raises:
            TokenRevoked: Revoked.
            KeyRevoked: Its key was retired.
        """
        ...


class NoRevocations:
    """A :class:`RevocationCheck` that revokes nothing (for callers that check revocation elsewhere)."""

    def check(self, claims: AccessClaims) -> None:
        """Accept every token."""


@dataclass(frozen=True, slots=True)
class VerifierPolicy:
    """What a valid token must say.

    Attributes:
        issuer: Required ``iss``.
        audience: ``aud`` must contain it.
        leeway: Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
        max_token_bytes: Size cap checked before decoding.
        cache_size: How many verified tokens to remember (0 turns the cache off).
        max_lifetime: Longest ``exp - iat`` accepted, seconds (the auth service's access-token lifetime):
            a longer-lived token was not issued by it as configured, and would outlive the denylist's
            memory of a revocation. None accepts any.
    """

    issuer: str
    audience: str
    leeway: float = 5.0
    max_token_bytes: int = MAX_TOKEN_BYTES
    cache_size: int = 65_536
    max_lifetime: float | None = None


class TokenVerifier:
    """Verifies access tokens locally.

    Args:
        keys: Public keys by ``kid``.
        revocations: The revocation state to consult on every call.
        policy: Issuer, audience, leeway and limits.
        clock: Returns the current Unix time in seconds.
    """

    def __init__(
        self,
        keys: KeySource,
        revocations: RevocationCheck,
        policy: VerifierPolicy,
        clock: Clock = time.time,
    ) -> None:
        self._keys = keys
        self._revocations = revocations
        self._policy = policy
        self._clock = clock
        self._cache: OrderedDict[str, AccessClaims] = OrderedDict()
        # The policy is frozen: its fields are copied once so the hot path reads plain attributes.
        self._issuer = policy.issuer
        self._audience = policy.audience
        self._leeway = policy.leeway
        self._max_bytes = policy.max_token_bytes
        self._cache_size = policy.cache_size
        self._max_lifetime = policy.max_lifetime

    @property
    def policy(self) -> VerifierPolicy:
        """The policy this verifier enforces."""
        return self._policy

    def verify(
        self, token: str, *, bound_to: str | None = None, ignore_binding: bool = False
    ) -> AccessClaims:
        """Verify an access token.

        A token bound to a key (``cnf.jkt``, RFC 9449) is accepted only with ``bound_to`` that key, the
        thumbprint of a verified DPoP proof's key; presented as a bearer token (``bound_to`` None) it is
        refused, and so is a bearer token presented with a proof.

        Args:
            token: The compact JWS from the ``authorization`` header.
            bound_to: The ``jkt`` of the call's verified DPoP proof, or None for a bearer call.
            ignore_binding: Check everything but the binding (a token looked at, not used: Introspect's
                or RevokeToken's subject).

        Returns:
            The verified claims.

        Raises:
            TokenRejected: One subclass per reason (see :mod:`authmesh._shared.errors`).
        """
        # The size cap comes first, before the token is even hashed for the cache lookup.
        if len(token) > self._max_bytes:
            raise TokenTooLarge()
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            # A hit skips only the signature and the parsing: time, the key (it may have been retired
            # or dropped since) and revocation are checked anew.
            self._check_times(cached, now)
            if cached.jkt != bound_to and not ignore_binding:
                _refuse_binding(bound_to)
            self._revocations.check(cached)
            self._keys.public_key(cached.kid)
            return cached
        claims = self._verify_uncached(token, now)
        if self._cache_size > 0:
            # Cached before the revocation check: a revoked token replayed again and again (a stolen one,
            # say) is then refused without a signature check each time. Only validly signed tokens get in.
            cache = self._cache
            cache[token] = claims
            if len(cache) > self._cache_size:
                cache.popitem(last=False)
        if claims.jkt != bound_to and not ignore_binding:
            _refuse_binding(bound_to)
        self._revocations.check(claims)
        return claims

    def forget(self) -> None:
        """Drop every cached verification (after a key is retired, for one)."""
        self._cache.clear()

    def _verify_uncached(self, token: str, now: float) -> AccessClaims:
        jws = decode_compact(token, max_bytes=self._max_bytes)
        header = jws.unverified_header
        typ = header.get("typ")
        if type(typ) is not str or typ not in ACCESS_TOKEN_TYPES:
            raise WrongTokenType()
        kid: str = header["kid"]
        verify_signature(self._keys.public_key(kid), jws.signing_input, jws.signature)
        claims = AccessClaims.from_payload(jws.unverified_payload, kid)
        if claims.iss != self._issuer:
            raise WrongIssuer()
        if self._audience not in claims.aud:
            raise WrongAudience()
        if self._max_lifetime is not None and claims.exp - claims.iat > self._max_lifetime:
            raise InvalidClaim("exp", "token lives longer than the auth service issues tokens for")
        self._check_times(claims, now)
        return claims

    def _check_times(self, claims: AccessClaims, now: float) -> None:
        leeway = self._leeway
        if now >= claims.exp + leeway:
            raise TokenExpired()
        if now + leeway < claims.nbf or now + leeway < claims.iat:
            raise TokenNotYetValid()


def _refuse_binding(bound_to: str | None) -> None:
    if bound_to is None:
        raise DpopProofMissing("a key-bound token needs the DPoP scheme and a proof")
    raise DpopKeyMismatch()
