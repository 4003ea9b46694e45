"""Signed events to JetStream: delivery of outbox entries, and the heartbeat.

An RPC that changes revocation state returns only after Redis has the change and JetStream has
acknowledged its event; when NATS is down the event stays in the outbox, the RPC answers UNAVAILABLE,
and the heartbeat loop keeps retrying the outbox, so a retry of the RPC is safe and nothing is lost.
No heartbeat goes out while the outbox holds an event it could not deliver.
Publishes carry ``Nats-Msg-Id`` = event id, so a resend within the stream's duplicate window is dropped
by JetStream.
"""

from __future__ import annotations

import asyncio

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import Counter

from authmesh._auth_service.keyring import Keyring
from authmesh._auth_service.outbox import from_record
from authmesh._auth_service.store import AuthStore
from authmesh._shared.errors import AuthError, StoreError, StoreUnavailable, Unavailable
from authmesh._shared.events import STREAM_NAME, HeartbeatEvent, SecurityEvent, encode_event
from authmesh._shared.lifecycle import raise_if_cancelled

PUBLISH_TIMEOUT_SECONDS = 2.0
_log = structlog.get_logger(__name__)


def broker_unavailable(operation: str, cause: BaseException | str, *, quiet: bool = False) -> Unavailable:
    """``BROKER_UNAVAILABLE`` for a failed NATS call, logged once with its cause.

    Args:
        operation: What was attempted (``publish auth.events.revoked.token``, …).
        cause: The error NATS raised, or why the call was not made.
        quiet: Log at debug level (a loop that fails every interval during an outage).
    """
    reason = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
    log = _log.debug if quiet else _log.warning
    log("event broker unavailable", operation=operation, cause=reason)
    return Unavailable("event broker unavailable", code="BROKER_UNAVAILABLE")


class EventPublisher:
    """Publishes events with the active signing key.

    Args:
        nats_client: The NATS connection.
        js: Its JetStream context.
        store: Where the outbox lives.
        keyring: Signs events.
        issuer: ``iss`` of every event.
        origin: This instance's name (``txn`` of every event).
        published: Counts acknowledged events by type.
    """

    def __init__(
        self,
        nats_client: NatsClient,
        js: JetStreamContext,
        store: AuthStore,
        keyring: Keyring,
        *,
        issuer: str,
        origin: str,
        published: Counter,
    ) -> None:
        self._nc = nats_client
        self._js = js
        self._store = store
        self._keyring = keyring
        self._issuer = issuer
        self._origin = origin
        self._heartbeat_seq = 0
        self._published = published
        # Events this instance tried to publish and could not (yet): while any is left, no heartbeat.
        self._undelivered: set[str] = set()

    async def publish(
        self, event: SecurityEvent, *, use_cached_key: bool = False, active_kid: str | None = None
    ) -> int:
        """Sign and publish one event; return its stream sequence.

        Args:
            event: The event.
            use_cached_key: Sign with the key last loaded, without asking Redis (heartbeats).
            active_kid: The active kid, when the caller has just read it from Redis; otherwise it is
                read here.

        Raises:
            Unavailable: NATS is down or JetStream did not acknowledge in time.
        """
        if use_cached_key:
            key = self._keyring.cached_signing_key()
        else:
            key = await self._keyring.signing_key(active_kid)
        payload = encode_event(event, key.private_key, key.kid)
        # Heartbeats fail every interval while NATS is down; their loop says so once per failure.
        quiet = use_cached_key
        if not self._nc.is_connected:
            raise broker_unavailable(f"publish {event.type.subject}", "not connected to NATS", quiet=quiet)
        try:
            ack = await self._js.publish(
                event.type.subject,
                payload,
                headers={"Nats-Msg-Id": event.event_id},
                timeout=PUBLISH_TIMEOUT_SECONDS,
            )
        except (nats.errors.Error, TimeoutError) as error:
            raise broker_unavailable(f"publish {event.type.subject}", error, quiet=quiet) from error
        self._published.labels(event.type.value).inc()
        return int(ack.seq)

    async def deliver(self, event_id: str, active_kid: str | None = None) -> None:
        """Publish an outbox entry and remove it once acknowledged (no-op if already delivered).

        Args:
            event_id: The entry.
            active_kid: The active kid, when the caller has just read it from Redis.

        Raises:
            Unavailable: NATS is down; the entry stays in the outbox.
        """
        record = await self._store.outbox_entry(event_id)
        if record is None:
            return
        await self.deliver_written(from_record(record, self._issuer), active_kid)

    async def deliver_written(self, event: SecurityEvent, active_kid: str | None = None) -> None:
        """Publish an event that is in the outbox, and remove it once acknowledged.

        :meth:`deliver` without reading the entry back: for the caller's own, just written event (should
        the heartbeat have delivered it meanwhile, JetStream drops the second copy by its
        ``Nats-Msg-Id``) and for entries already read.

        Args:
            event: The event, exactly as written (its outbox record rebuilds the same event).
            active_kid: The active kid, when the caller has just read it from Redis.

        Raises:
            Unavailable: NATS is down; the entry stays in the outbox.
        """
        try:
            await self.publish(event, active_kid=active_kid)
        except Unavailable:
            self._undelivered.add(event.event_id)
            raise
        self._undelivered.discard(event.event_id)
        await self._store.outbox_done(event.event_id)

    async def flush_outbox(self) -> int:
        """Deliver every pending outbox entry, oldest first; return how many went out."""
        known_before = set(self._undelivered)
        entries = await self._store.outbox_entries()
        # Gone from the outbox: another auth replica delivered them.
        self._undelivered -= known_before - entries.keys()
        delivered = 0
        # Event ids are UUIDv7, so sorting them orders the events by time.
        for event_id in sorted(entries):
            await self.deliver_written(from_record(entries[event_id], self._issuer))
            delivered += 1
        return delivered

    async def stream_sequence(self) -> int:
        """The last sequence in ``AUTH_EVENTS``.

        Raises:
            Unavailable: JetStream does not answer.
        """
        try:
            info = await self._js.stream_info(STREAM_NAME)
        except (nats.errors.Error, TimeoutError) as error:
            raise broker_unavailable(f"stream info {STREAM_NAME}", error) from error
        return int(info.state.last_seq)

    async def run_heartbeat(self, interval: float) -> None:
        """Every ``interval``: deliver what the outbox holds, then a heartbeat. Runs until cancelled.

        A heartbeat tells replicas "you have heard every revocation up to now", so none goes out while an
        event is known to be undelivered: replicas then go stale within their bound and check tokens with
        ``Introspect`` instead of trusting a history with a gap in it. See :meth:`_history_complete`.
        """
        while True:
            raise_if_cancelled()
            if await self._history_complete():
                await self._beat()
            raise_if_cancelled()
            await asyncio.sleep(interval)

    async def _history_complete(self) -> bool:
        """Deliver the outbox; whether every event written so far is known to be on the stream.

        No, when an event could not be delivered (JetStream refused it, NATS is down, its record is
        malformed). When the outbox cannot be read (Redis is down), nothing can be revoked meanwhile (every
        revocation is written to Redis first), so the history is complete unless this instance failed to
        deliver an event of its own.
        """
        try:
            await self.flush_outbox()
        except (StoreUnavailable, StoreError) as error:
            if self._undelivered:
                _log.warning(
                    "outbox unreadable with events undelivered: heartbeat withheld", error=repr(error)
                )
                return False
            return True
        except AuthError as error:
            _log.warning("outbox not delivered: heartbeat withheld", error=repr(error))
            return False
        return True

    async def _beat(self) -> None:
        self._heartbeat_seq += 1
        event = SecurityEvent.new(HeartbeatEvent(seq=self._heartbeat_seq), self._issuer, self._origin)
        try:
            await self.publish(event, use_cached_key=True)
        except Unavailable as error:
            _log.debug("heartbeat not published", reason=error.code)
