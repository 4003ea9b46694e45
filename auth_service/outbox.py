"""Events as they wait in the Redis outbox: JSON records that name the event but are not yet signed.

They are signed only when sent, with the key active then, so a key rotation between the write and the send
cannot strand an event under a retired key.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from authmesh._shared.errors import EventRejected
from authmesh._shared.events import (
    EventBody,
    EventType,
    HeartbeatEvent,
    KeyRevokedEvent,
    KeyRotatedEvent,
    SecurityEvent,
    SessionRevokedEvent,
    TokenRevokedEvent,
    UserRevokedEvent,
)

_BODIES: dict[EventType, type[EventBody]] = {
    EventType.TOKEN_REVOKED: TokenRevokedEvent,
    EventType.SESSION_REVOKED: SessionRevokedEvent,
    EventType.USER_REVOKED: UserRevokedEvent,
    EventType.KEY_ROTATED: KeyRotatedEvent,
    EventType.KEY_REVOKED: KeyRevokedEvent,
    EventType.HEARTBEAT: HeartbeatEvent,
}
_INT_FIELDS = frozenset({"exp", "not_before_ms", "seq"})


def to_record(event: SecurityEvent) -> str:
    """The outbox JSON of an event."""
    return json.dumps(
        {
            "id": event.event_id,
            "ms": str(event.occurred_at_ms),
            "type": event.type.value,
            "body": asdict(event.body),
            "origin": event.origin,
        }
    )


def from_record(record: str, issuer: str) -> SecurityEvent:
    """Rebuild an event from its outbox JSON (also written by the Lua scripts).

    Raises:
        EventRejected: The record is not one we wrote.
    """
    try:
        data = json.loads(record)
        body_type = _BODIES[EventType(data["type"])]
        fields: dict[str, Any] = {k: int(v) if k in _INT_FIELDS else str(v) for k, v in data["body"].items()}
        body = body_type(**fields)
        ms = int(data["ms"])
        return SecurityEvent(
            event_id=str(data["id"]),
            issuer=issuer,
            issued_at=ms // 1000,
            occurred_at_ms=ms,
            body=body,
            origin=str(data.get("origin", "")),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise EventRejected("outbox record malformed") from error
