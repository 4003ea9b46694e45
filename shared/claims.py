"""Access-token claims (RFC 9068) as a frozen value object, and the ids we mint.

``jti`` is a UUIDv7 (RFC 9562): its first 48 bits are the Unix time in milliseconds at which the token
was issued. ``iat`` has only second granularity, and a user revocation must cut exactly between the
tokens issued before it and a ``Login`` a millisecond after it, so receivers read the issue instant
from ``jti`` when it agrees with ``iat`` (see :attr:`AccessClaims.issued_at_ms`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, fields
from typing import Any

from authmesh._shared.errors import InvalidClaim

ACCESS_TOKEN_TYPE = "at+jwt"
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "nbf", "jti", "sid", "scope", "client_id")
MAX_STRING_CLAIM = 256
MAX_SCOPES = 64
MAX_SCOPE_LENGTH = 4096
MAX_AUDIENCES = 16
# NumericDate upper bound (year ~71700): far beyond any real token, small enough for any store.
MAX_NUMERIC_DATE = 2**41
_MS_MASK = (1 << 48) - 1
# A hex digit's low two bits under the RFC 9562 variant (10xx): 8, 9, a or b.
_VARIANT_DIGIT = {digit: "89ab"[int(digit, 16) & 0b11] for digit in "0123456789abcdef"}
_UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def new_uuid7(now_ms: int | None = None) -> str:
    """A UUIDv7 string whose timestamp is ``now_ms`` (default: the current time)."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    stamp = f"{ms & _MS_MASK:012x}"
    # 80 random bits in hex: 12 of rand_a, then 2 + 60 of rand_b (the variant takes the top 2 of one
    # digit). Formatted as text directly: this runs for every token and event, and going through
    # uuid.UUID costs about twice as much.
    rand = os.urandom(10).hex()
    return f"{stamp[:8]}-{stamp[8:]}-7{rand[:3]}-{_VARIANT_DIGIT[rand[3]]}{rand[4:7]}-{rand[7:19]}"


def uuid7_ms(value: str) -> int | None:
    """The millisecond timestamp inside a canonical lower-case UUIDv7, or None for anything else."""
    if len(value) != 36 or not _UUID7.fullmatch(value):
        return None
    return int(value[:8] + value[9:13], 16)


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """The verified claims of an access token.

    Attributes:
        iss: Issuer.
        sub: Subject (the user's stable id).
        aud: Audiences.
        exp: Expiry, Unix seconds.
        iat: Issued at, Unix seconds.
        nbf: Not before, Unix seconds.
        jti: Token id (a UUIDv7 for tokens authmesh issues).
        sid: Session id.
        scopes: Granted scopes.
        client_id: The client the token was issued to.
        kid: The key that signed it.
        jkt: The RFC 7638 thumbprint of the client key the token is bound to (``cnf.jkt``, RFC 9449),
            or None for a bearer token.
    """

    iss: str
    sub: str
    aud: tuple[str, ...]
    exp: int
    iat: int
    nbf: int
    jti: str
    sid: str
    scopes: tuple[str, ...]
    client_id: str
    kid: str
    jkt: str | None = None

    @property
    def scope(self) -> str:
        """Scopes as the space-separated ``scope`` claim."""
        return " ".join(self.scopes)

    @property
    def issued_at_ms(self) -> int:
        """When the token was issued, in Unix milliseconds.

        The UUIDv7 ``jti`` gives milliseconds when it falls inside ``iat``'s second; otherwise the
        start of that second, which makes a user revocation in that second cover the token (fail closed).
        """
        ms = uuid7_ms(self.jti)
        base = self.iat * 1000
        if ms is not None and base <= ms < base + 1000:
            return ms
        return base

    def has_scope(self, scope: str) -> bool:
        """Whether ``scope`` was granted."""
        return scope in self.scopes

    @classmethod
    def from_payload(cls, payload: dict[str, Any], kid: str) -> AccessClaims:
        """Build claims from a decoded payload, checking every required claim's presence and type.

        Strings must be non-empty (``scope`` may be empty) and at most :data:`MAX_STRING_CLAIM`
        characters; dates are JSON integers in ``[0, 2**41)`` (never floats, strings or booleans).

        Raises:
            InvalidClaim: A claim is missing or mistyped.
        """
        # Written out claim by claim: this runs once per verified token, and ``type(x) is int`` is
        # both the cheapest test and the one that keeps JSON booleans (a Python int) out.
        get = payload.get
        aud = get("aud")
        if type(aud) is str and aud and len(aud) <= MAX_STRING_CLAIM:
            audiences: tuple[str, ...] = (aud,)
        elif (
            type(aud) is list
            and 0 < len(aud) <= MAX_AUDIENCES
            and all(type(a) is str and a and len(a) <= MAX_STRING_CLAIM for a in aud)
        ):
            audiences = tuple(aud)
        else:
            raise InvalidClaim("aud")
        scope = get("scope")
        if type(scope) is not str or len(scope) > MAX_SCOPE_LENGTH:
            raise InvalidClaim("scope")
        scopes = tuple(scope.split())
        if len(scopes) > MAX_SCOPES or " ".join(scopes) != scope:
            raise InvalidClaim("scope")
        iss = get("iss")
        if type(iss) is not str or not 0 < len(iss) <= MAX_STRING_CLAIM:
            raise InvalidClaim("iss")
        sub = get("sub")
        if type(sub) is not str or not 0 < len(sub) <= MAX_STRING_CLAIM:
            raise InvalidClaim("sub")
        exp = get("exp")
        if type(exp) is not int or not 0 <= exp < MAX_NUMERIC_DATE:
            raise InvalidClaim("exp")
        iat = get("iat")
        if type(iat) is not int or not 0 <= iat < MAX_NUMERIC_DATE:
            raise InvalidClaim("iat")
        nbf = get("nbf")
        if type(nbf) is not int or not 0 <= nbf < MAX_NUMERIC_DATE:
            raise InvalidClaim("nbf")
        jti = get("jti")
        if type(jti) is not str or not 0 < len(jti) <= MAX_STRING_CLAIM:
            raise InvalidClaim("jti")
        sid = get("sid")
        if type(sid) is not str or not 0 < len(sid) <= MAX_STRING_CLAIM:
            raise InvalidClaim("sid")
        client_id = get("client_id")
        if type(client_id) is not str or not 0 < len(client_id) <= MAX_STRING_CLAIM:
            raise InvalidClaim("client_id")
        cnf = get("cnf")
        if cnf is None:
            jkt = None
        elif (
            type(cnf) is dict and len(cnf) == 1 and type(cnf.get("jkt")) is str and 0 < len(cnf["jkt"]) <= 64
        ):
            jkt = cnf["jkt"]
        else:
            raise InvalidClaim("cnf")
        if cls is not AccessClaims:
            return cls(iss, sub, audiences, exp, iat, nbf, jti, sid, scopes, client_id, kid, jkt)
        return _build(iss, sub, audiences, exp, iat, nbf, jti, sid, scopes, client_id, kid, jkt)

    def to_payload(self) -> dict[str, Any]:
        """The JSON payload of the token (``aud`` a string when there is one audience)."""
        payload: dict[str, Any] = {
            "iss": self.iss,
            "sub": self.sub,
            "aud": self.aud[0] if len(self.aud) == 1 else list(self.aud),
            "exp": self.exp,
            "iat": self.iat,
            "nbf": self.nbf,
            "jti": self.jti,
            "sid": self.sid,
            "scope": self.scope,
            "client_id": self.client_id,
        }
        if self.jkt is not None:
            payload["cnf"] = {"jkt": self.jkt}
        return payload


# A frozen dataclass's generated __init__ sets each field through object.__setattr__; writing the slots
# through their descriptors builds the same object in half the time, and this runs for every verified
# token. The unpacking fails at import if a field is added without updating _build.
(
    _SET_ISS,
    _SET_SUB,
    _SET_AUD,
    _SET_EXP,
    _SET_IAT,
    _SET_NBF,
    _SET_JTI,
    _SET_SID,
    _SET_SCOPES,
    _SET_CLIENT_ID,
    _SET_KID,
    _SET_JKT,
) = (getattr(AccessClaims, field.name).__set__ for field in fields(AccessClaims))


def _build(
    iss: str,
    sub: str,
    aud: tuple[str, ...],
    exp: int,
    iat: int,
    nbf: int,
    jti: str,
    sid: str,
    scopes: tuple[str, ...],
    client_id: str,
    kid: str,
    jkt: str | None,
) -> AccessClaims:
    claims = object.__new__(AccessClaims)
    _SET_ISS(claims, iss)
    _SET_SUB(claims, sub)
    _SET_AUD(claims, aud)
    _SET_EXP(claims, exp)
    _SET_IAT(claims, iat)
    _SET_NBF(claims, nbf)
    _SET_JTI(claims, jti)
    _SET_SID(claims, sid)
    _SET_SCOPES(claims, scopes)
    _SET_CLIENT_ID(claims, client_id)
    _SET_KID(claims, kid)
    _SET_JKT(claims, jkt)
    return claims
