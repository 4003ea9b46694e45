"""The revocation and key events authmesh broadcasts, and their one codec.

Each event travels on ``auth.events.<type>`` in JetStream stream ``AUTH_EVENTS`` as a Security Event
Token (RFC 8417): a compact ES256 JWS with ``typ: secevent+jwt`` whose ``events`` claim holds exactly
one member, ``urn:authmesh:event:<type>`` → the body. ``toe`` (time of event) carries milliseconds as a
fraction, which is what the propagation-lag metric measures against.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric import ec

from shared.claims import new_uuid7
from shared.errors import AuthError, EventRejected, KeyRevoked, UnknownKey
from shared.jose import decode_compact, sign_compact, verify_signature
from shared.verifier import KeySource

STREAM_NAME = "AUTH_EVENTS"
SUBJECT_PREFIX = "auth.events."
STREAM_SUBJECTS = ("auth.events.>",)
SET_TYPE = "secevent+jwt"
EVENT_URI_PREFIX = "urn:authmesh:event:"
MAX_EVENT_BYTES = 64 * 1024


class EventType(StrEnum):
    """The event types; the value is the subject suffix."""

    TOKEN_REVOKED = "revoked.token"
    SESSION_REVOKED = "revoked.session"
    USER_REVOKED = "revoked.user"
    KEY_ROTATED = "keys.rotated"
    KEY_REVOKED = "keys.revoked"
    HEARTBEAT = "heartbeat"

    @property
    def subject(self) -> str:
        """The NATS subject events of this type are published on."""
        return SUBJECT_PREFIX + self.value

    @property
    def uri(self) -> str:
        """The member name inside the SET's ``events`` claim."""
        return EVENT_URI_PREFIX + self.value


@dataclass(frozen=True, slots=True)
class TokenRevokedEvent:
    """One access token revoked (until its expiry)."""

    TYPE: ClassVar[EventType] = EventType.TOKEN_REVOKED
    jti: str
    exp: int


@dataclass(frozen=True, slots=True)
class SessionRevokedEvent:
    """A session and every token issued in it revoked."""

    TYPE: ClassVar[EventType] = EventType.SESSION_REVOKED
    sid: str
    sub: str


@dataclass(frozen=True, slots=True)
class UserRevokedEvent:
    """Every token of a user issued at or before ``not_before_ms`` revoked."""

    TYPE: ClassVar[EventType] = EventType.USER_REVOKED
    sub: str
    not_before_ms: int


@dataclass(frozen=True, slots=True)
class KeyRotatedEvent:
    """A new active signing key; receivers refetch the JWK Set."""

    TYPE: ClassVar[EventType] = EventType.KEY_ROTATED
    kid: str
    previous_kid: str


@dataclass(frozen=True, slots=True)
class KeyRevokedEvent:
    """A signing key retired: every token it signed is rejected at once."""

    TYPE: ClassVar[EventType] = EventType.KEY_REVOKED
    kid: str


@dataclass(frozen=True, slots=True)
class HeartbeatEvent:
    """The auth service is alive and publishing; lets receivers measure staleness."""

    TYPE: ClassVar[EventType] = EventType.HEARTBEAT
    seq: int


EventBody = (
    TokenRevokedEvent
    | SessionRevokedEvent
    | UserRevokedEvent
    | KeyRotatedEvent
    | KeyRevokedEvent
    | HeartbeatEvent
)

_BODY_TYPES: dict[EventType, type[EventBody]] = {
    body.TYPE: body
    for body in (
        TokenRevokedEvent,
        SessionRevokedEvent,
        UserRevokedEvent,
        KeyRotatedEvent,
        KeyRevokedEvent,
        HeartbeatEvent,
    )
}
_FIELD_TYPES: dict[EventType, dict[str, type]] = {
    EventType.TOKEN_REVOKED: {"jti": str, "exp": int},
    EventType.SESSION_REVOKED: {"sid": str, "sub": str},
    EventType.USER_REVOKED: {"sub": str, "not_before_ms": int},
    EventType.KEY_ROTATED: {"kid": str, "previous_kid": str},
    EventType.KEY_REVOKED: {"kid": str},
    EventType.HEARTBEAT: {"seq": int},
}


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """One event with its envelope.

    Attributes:
        event_id: The SET's ``jti`` (also the ``Nats-Msg-Id``).
        issuer: ``iss``.
        issued_at: ``iat``, Unix seconds.
        occurred_at_ms: ``toe`` in Unix milliseconds.
        body: The event itself.
        origin: ``txn``: the auth-service instance that produced it.
    """

    event_id: str
    issuer: str
    issued_at: int
    occurred_at_ms: int
    body: EventBody
    origin: str = ""

    @property
    def type(self) -> EventType:
        """The event's type."""
        return self.body.TYPE

    @classmethod
    def new(cls, body: EventBody, issuer: str, origin: str = "", now_ms: int | None = None) -> SecurityEvent:
        """A fresh event stamped with the current time and a new id."""
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        return cls(
            event_id=new_uuid7(ms),
            issuer=issuer,
            issued_at=ms // 1000,
            occurred_at_ms=ms,
            body=body,
            origin=origin,
        )


def encode_event(event: SecurityEvent, private_key: ec.EllipticCurvePrivateKey, kid: str) -> bytes:
    """Sign an event as a SET (the NATS message payload)."""
    payload: dict[str, Any] = {
        "iss": event.issuer,
        "iat": event.issued_at,
        "jti": event.event_id,
        "toe": event.occurred_at_ms / 1000,
        "events": {event.type.uri: asdict(event.body)},
    }
    if event.origin:
        payload["txn"] = event.origin
    return sign_compact({"typ": SET_TYPE, "kid": kid}, payload, private_key).encode("ascii")


def decode_event(data: bytes, subject: str, keys: KeySource, issuer: str) -> SecurityEvent:
    """Verify and decode a SET received on ``subject``.

    Raises:
        UnknownKey: Signed with a key not (yet) known: refetch the JWK Set and try once more.
        EventRejected: Anything else that makes it untrustworthy (bad signature, wrong issuer, a
            subject that does not match the event, malformed body).
    """
    try:
        jws = decode_compact(data, max_bytes=MAX_EVENT_BYTES)
        if jws.unverified_header.get("typ") != SET_TYPE:
            raise EventRejected("event is not a secevent+jwt")
        verify_signature(keys.public_key(jws.kid), jws.signing_input, jws.signature)
    except (UnknownKey, EventRejected):
        raise
    except KeyRevoked as error:
        raise EventRejected("event signed with a retired key") from error
    except AuthError as error:
        raise EventRejected(f"event rejected: {error.message}") from error
    return _parse_payload(jws.unverified_payload, subject, issuer)


def _parse_payload(payload: dict[str, Any], subject: str, issuer: str) -> SecurityEvent:
    if payload.get("iss") != issuer:
        raise EventRejected("event from a foreign issuer")
    events = payload.get("events")
    if not isinstance(events, dict) or len(events) != 1:
        raise EventRejected("event must carry exactly one event")
    ((uri, raw_body),) = events.items()
    if not isinstance(uri, str) or not uri.startswith(EVENT_URI_PREFIX):
        raise EventRejected("unknown event type")
    try:
        event_type = EventType(uri.removeprefix(EVENT_URI_PREFIX))
    except ValueError as error:
        raise EventRejected("unknown event type") from error
    if subject != event_type.subject:
        raise EventRejected("event published on the wrong subject")
    fields = _FIELD_TYPES[event_type]
    if not isinstance(raw_body, dict) or not all(
        isinstance(raw_body.get(name), kind) and not isinstance(raw_body.get(name), bool)
        for name, kind in fields.items()
    ):
        raise EventRejected("event body malformed")
    body = _BODY_TYPES[event_type](**{name: raw_body[name] for name in fields})
    event_id, issued_at, toe = payload.get("jti"), payload.get("iat"), payload.get("toe")
    if not isinstance(event_id, str) or not event_id or len(event_id) > 128:
        raise EventRejected("event id missing")
    if isinstance(issued_at, bool) or not isinstance(issued_at, int):
        raise EventRejected("event iat missing")
    if isinstance(toe, bool) or not isinstance(toe, int | float):
        raise EventRejected("event toe missing")
    origin = payload.get("txn", "")
    return SecurityEvent(
        event_id=event_id,
        issuer=issuer,
        issued_at=issued_at,
        occurred_at_ms=round(toe * 1000),
        body=body,
        origin=origin if isinstance(origin, str) else "",
    )
