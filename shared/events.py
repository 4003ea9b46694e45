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

from authmesh._shared.claims import new_uuid7
from authmesh._shared.errors import EventRejected, KeyRevoked, TokenRejected, UnknownKey
from authmesh._shared.jose import decode_compact, sign_compact, verify_signature
from authmesh._shared.verifier import KeySource

STREAM_NAME = "AUTH_EVENTS"
SUBJECT_PREFIX = "auth.events."
STREAM_SUBJECTS = ("auth.events.>",)
# The stream republishes every event it stores here, with its stream sequence in headers: replicas
# follow this live copy over core NATS (no consumer), see nats_wiring.stream_config.
LIVE_SUBJECT_PREFIX = "auth.live."
LIVE_SUBJECTS = (LIVE_SUBJECT_PREFIX + ">",)
SET_TYPE = "secevent+jwt"
EVENT_URI_PREFIX = "urn:authmesh:event:"
MAX_EVENT_BYTES = 64 * 1024
MAX_EVENT_STRING = 256
# Integers in event bodies (expiry, milliseconds, sequence numbers) fit a signed 64-bit store value.
_MAX_INTEGER = 2**63
_MAX_SECONDS = 2**41
# ``previous_kid`` is empty for the very first signing key.
_MAY_BE_EMPTY = frozenset({"previous_kid"})


class EventType(StrEnum):
    """The event types; the value is the subject suffix."""

    TOKEN_REVOKED = "revoked.token"
    SESSION_REVOKED = "revoked.session"
    USER_REVOKED = "revoked.user"
    KEY_BINDING_REVOKED = "revoked.jkt"
    KEY_ROTATED = "keys.rotated"
    KEY_REVOKED = "keys.revoked"
    HEARTBEAT = "heartbeat"

    @property
    def subject(self) -> str:
        """The NATS subject events of this type are published on."""
        return SUBJECT_PREFIX + self.value

    @property
    def live_subject(self) -> str:
        """Where the stream republishes events of this type (see ``LIVE_SUBJECTS``)."""
        return LIVE_SUBJECT_PREFIX + self.value

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
class KeyBindingRevokedEvent:
    """A DPoP key binding revoked (a lost device): every token bound to ``jkt`` is refused."""

    TYPE: ClassVar[EventType] = EventType.KEY_BINDING_REVOKED
    jkt: str


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
    | KeyBindingRevokedEvent
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
        KeyBindingRevokedEvent,
        KeyRotatedEvent,
        KeyRevokedEvent,
        HeartbeatEvent,
    )
}
_FIELD_TYPES: dict[EventType, dict[str, type]] = {
    EventType.TOKEN_REVOKED: {"jti": str, "exp": int},
    EventType.SESSION_REVOKED: {"sid": str, "sub": str},
    EventType.USER_REVOKED: {"sub": str, "not_before_ms": int},
    EventType.KEY_BINDING_REVOKED: {"jkt": str},
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
        AuthError: Whatever else the key source raises (``Unavailable``, say) passes through: an
            event that could not be judged must be retried, not dropped as untrustworthy.
    """
    try:
        jws = decode_compact(data, max_bytes=MAX_EVENT_BYTES)
        if jws.unverified_header.get("typ") != SET_TYPE:
            raise EventRejected("event is not a secevent+jwt", code="EVENT_WRONG_TYPE")
        verify_signature(keys.public_key(jws.kid), jws.signing_input, jws.signature)
    except (UnknownKey, EventRejected):
        raise
    except KeyRevoked as error:
        raise EventRejected("event signed with a retired key", code="EVENT_KEY_REVOKED") from error
    except TokenRejected as error:
        raise EventRejected(f"event rejected: {error.message}", code=f"EVENT_{error.code}") from error
    return _parse_payload(jws.unverified_payload, subject, issuer)


def _parse_payload(payload: dict[str, Any], subject: str, issuer: str) -> SecurityEvent:
    if payload.get("iss") != issuer:
        raise EventRejected("event from a foreign issuer", code="EVENT_FOREIGN_ISSUER")
    events = payload.get("events")
    if type(events) is not dict or len(events) != 1:
        raise EventRejected("event must carry exactly one event", code="EVENT_MALFORMED")
    ((uri, raw_body),) = events.items()
    if not uri.startswith(EVENT_URI_PREFIX):
        raise EventRejected("unknown event type", code="EVENT_UNKNOWN_TYPE")
    try:
        event_type = EventType(uri.removeprefix(EVENT_URI_PREFIX))
    except ValueError as error:
        raise EventRejected("unknown event type", code="EVENT_UNKNOWN_TYPE") from error
    if subject != event_type.subject:
        raise EventRejected("event published on the wrong subject", code="EVENT_WRONG_SUBJECT")
    if type(raw_body) is not dict:
        raise EventRejected("event body malformed", code="EVENT_MALFORMED")
    fields = _FIELD_TYPES[event_type]
    # Members a newer publisher may add are ignored (as unknown JWT claims are): failing on them would
    # make every older receiver drop revocations during a rolling upgrade.
    for name, kind in fields.items():
        value = raw_body.get(name)
        if kind is int:
            valid = type(value) is int and 0 <= value < _MAX_INTEGER
        else:
            valid = (
                type(value) is str
                and len(value) <= MAX_EVENT_STRING
                and (bool(value) or name in _MAY_BE_EMPTY)
            )
        if not valid:
            raise EventRejected(f"event body member {name!r} missing or invalid", code="EVENT_MALFORMED")
    body = _BODY_TYPES[event_type](**{name: raw_body[name] for name in fields})
    event_id, issued_at, toe = payload.get("jti"), payload.get("iat"), payload.get("toe")
    if type(event_id) is not str or not 0 < len(event_id) <= MAX_EVENT_STRING:
        raise EventRejected("event id missing or invalid", code="EVENT_MALFORMED")
    if type(issued_at) is not int or not 0 <= issued_at < _MAX_SECONDS:
        raise EventRejected("event iat missing or invalid", code="EVENT_MALFORMED")
    # JSON has no infinity, but 1e999 parses as one: only finite, plausible times.
    if isinstance(toe, bool) or not isinstance(toe, int | float) or not 0 <= toe < _MAX_SECONDS:
        raise EventRejected("event toe missing or invalid", code="EVENT_MALFORMED")
    origin = payload.get("txn", "")
    return SecurityEvent(
        event_id=event_id,
        issuer=issuer,
        issued_at=issued_at,
        occurred_at_ms=round(toe * 1000),
        body=body,
        origin=origin if type(origin) is str and len(origin) <= MAX_EVENT_STRING else "",
    )
