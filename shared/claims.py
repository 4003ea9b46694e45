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
import uuid
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidClaim

ACCESS_TOKEN_TYPE = "at+jwt"
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "nbf", "jti", "sid", "scope", "client_id")
MAX_STRING_CLAIM = 256
MAX_SCOPES = 64
_UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def new_uuid7(now_ms: int | None = None) -> str:
    """A UUIDv7 string whose timestamp is ``now_ms`` (default: the current time)."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


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

        Raises:
            InvalidClaim: A claim is missing or mistyped.
        """
        aud = payload.get("aud")
        if isinstance(aud, str) and aud:
            audiences: tuple[str, ...] = (aud,)
        elif isinstance(aud, list) and aud and all(isinstance(a, str) and a for a in aud) and len(aud) <= 16:
            audiences = tuple(aud)
        else:
            raise InvalidClaim("aud")
        scope = _string(payload, "scope", allow_empty=True, limit=4096)
        scopes = tuple(scope.split())
        if len(scopes) > MAX_SCOPES or " ".join(scopes) != scope:
            raise InvalidClaim("scope")
        return cls(
            iss=_string(payload, "iss"),
            sub=_string(payload, "sub"),
            aud=audiences,
            exp=_numeric_date(payload, "exp"),
            iat=_numeric_date(payload, "iat"),
            nbf=_numeric_date(payload, "nbf"),
            jti=_string(payload, "jti"),
            sid=_string(payload, "sid"),
            scopes=scopes,
            client_id=_string(payload, "client_id"),
            kid=kid,
        )

    def to_payload(self) -> dict[str, Any]:
        """The JSON payload of the token (``aud`` a string when there is one audience)."""
        return {
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


def _string(
    payload: dict[str, Any], name: str, *, allow_empty: bool = False, limit: int = MAX_STRING_CLAIM
) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or (not value and not allow_empty) or len(value) > limit:
        raise InvalidClaim(name)
    return value


def _numeric_date(payload: dict[str, Any], name: str) -> int:
    value = payload.get(name)
    # bool is an int in Python; JSON true is not a date.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**41:
        raise InvalidClaim(name)
    return value
