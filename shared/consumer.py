"""Follows ``AUTH_EVENTS`` and keeps a denylist and a key cache up to date.

How a replica gets and stays in step:

1. **Keys first**: fetch the JWK Set (events are signed with the same keys as tokens).
2. **Snapshot or replay**: load ``SnapshotRevocations`` when the auth service answers and consume the
   stream from the sequence after the one it reflects; otherwise replay the stream from one access-token
   lifetime (plus leeway) ago, which covers every revocation still in force.
3. **Ready** once it has applied everything up to the stream's tip: until then the service must serve
   nothing (health ``NOT_SERVING``).
4. **Follow** the live copy the stream republishes (core NATS, each message with its stream sequence),
   and read history with batched direct gets (:mod:`~authmesh._shared.stream_reader`) over a second
   connection, so that replies never wait behind a burst of live messages: the replica's NATS user
   needs no consumer, so it can change nothing another replica receives. Each message is a
   SET, verified (an unknown ``kid`` triggers one key refetch and a second try) and applied
   idempotently, in stream order; anything that does not verify is dropped and counted. A jump in the
   live sequence is filled from the stream. Events gone from the stream are never passed over
   silently: the state is reloaded from a snapshot when one is available, and otherwise the replica
   stays degraded until every token they could have revoked has expired. A read that fails keeps the
   live subscription and is tried again a moment later (live messages that need it wait, so the state
   turns stale rather than skip anything). A reconnect catches up from the last sequence applied; a
   stream that went backwards (recreated) starts over.
5. **Heartbeats** tell the :class:`~authmesh._shared.staleness.StalenessMonitor` how fresh the state is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from authmesh._shared.backoff import backoff
from authmesh._shared.connecting import address_of
from authmesh._shared.denylist import Denylist, SnapshotChunk
from authmesh._shared.errors import AuthError, EventRejected, Unavailable, UnknownKey
from authmesh._shared.events import (
    LIVE_SUBJECTS,
    EventType,
    HeartbeatEvent,
    KeyRevokedEvent,
    KeyRotatedEvent,
    SecurityEvent,
    decode_event,
)
from authmesh._shared.key_cache import KeyCache
from authmesh._shared.lifecycle import raise_if_cancelled
from authmesh._shared.nats_wiring import Callback, connect_nats
from authmesh._shared.settings import CommonSettings
from authmesh._shared.staleness import StalenessMonitor
from authmesh._shared.stream_reader import StreamMessage, StreamReader, live_message

# Retries of the stream are quicker than the library's default: every second of them is staleness.
_retrying = functools.partial(backoff, initial=0.25, maximum=5.0)
_NATS_ERRORS = (nats.errors.Error, OSError, TimeoutError)
_POLL_SECONDS = 0.25
# Heartbeats arrive every second: this long without any message is worth a look at the stream.
_IDLE_CHECK_SECONDS = 2.5
# A failed read of the stream (to fill a gap in the live sequence) is tried again after this long.
_READ_RETRY_SECONDS = 1.0
_FLUSH_TIMEOUT_SECONDS = 2
_READ_FAILURES = (*_NATS_ERRORS, AuthError)
# Live messages wait here while history is read; beyond it nats-py drops them (a gap, filled later).
_LIVE_PENDING_MESSAGES = 262_144
_log = structlog.get_logger(__name__)


class SnapshotSource(Protocol):
    """Where a starting replica gets the revocations in force (the auth service)."""

    def snapshot(self) -> AsyncIterator[SnapshotChunk]:
        """The snapshot in chunks.

        Raises:
            Unavailable: It could not be had.
        """
        ...


class ConsumerObserver(Protocol):
    """What the consumer reports (metrics)."""

    def event_applied(self, event_type: str, lag_seconds: float | None) -> None:
        """An event was verified and applied; the lag is given for live revocations."""

    def event_rejected(self, reason: str) -> None:
        """An event was dropped."""

    def gap_detected(self) -> None:
        """Events were missed."""

    def resynchronised(self, source: str) -> None:
        """The state was loaded from ``snapshot`` or ``replay``."""


class _Quiet:
    def event_applied(self, event_type: str, lag_seconds: float | None) -> None:
        pass

    def event_rejected(self, reason: str) -> None:
        pass

    def gap_detected(self) -> None:
        pass

    def resynchronised(self, source: str) -> None:
        pass


class _Resubscribe(Exception):  # control flow, not an error
    """Leave the current subscription and make a new one."""


class RevocationConsumer:
    """Keeps a :class:`Denylist` and a :class:`KeyCache`
    in step with ``AUTH_EVENTS``.

    Args:
        settings: NATS location, issuer, token lifetime, leeway and staleness bound.
        denylist: The revocation state to apply events to.
        keys: The key cache events are verified with (and that key events update).
        staleness: Told about every live heartbeat.
        snapshot: The auth service's snapshot, or None to rebuild from the stream alone.
        observer: Metrics hooks.
        name: NATS connection name.
        clock: Unix time in seconds (event times are compared with it).
    """

    def __init__(
        self,
        settings: CommonSettings,
        denylist: Denylist,
        keys: KeyCache,
        staleness: StalenessMonitor,
        *,
        snapshot: SnapshotSource | None = None,
        observer: ConsumerObserver | None = None,
        name: str = "authmesh-consumer",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._denylist = denylist
        self._keys = keys
        self._staleness = staleness
        self._snapshot = snapshot
        self._observer: ConsumerObserver = observer or _Quiet()
        self._name = name
        self._clock = clock
        self._replay_window = settings.access_token_ttl + settings.leeway
        self._ready = asyncio.Event()
        self._reconnected = asyncio.Event()
        self._last_sequence: int | None = None
        self._synchronised = False
        # The gap (by the sequence after it) a snapshot was last reloaded for, so that a snapshot older
        # than the gap does not make the replica reload it again and again; and the last sequence known
        # lost and not covered by a snapshot since.
        self._resynchronised_for: int | None = None
        self._unfilled_through: int | None = None
        self._applying = asyncio.Lock()
        self._read_again_at = 0.0
        self._connected = False
        self._applied = 0
        self._rejected = 0
        self._last_message_at = time.monotonic()

    @property
    def ready(self) -> bool:
        """Whether the state has caught up with the stream at least once (traffic may be served)."""
        return self._ready.is_set()

    @property
    def waiting_for(self) -> str:
        """What stands between this consumer and :attr:`ready`, in words (empty once ready)."""
        if self.ready:
            return ""
        if not self._connected:
            return "a connection to NATS at " + ",".join(address_of(url) for url in self._settings.nats_urls)
        if not self._synchronised:
            return "the signing keys and the revocation snapshot from the auth service"
        return f"the revocation stream to catch up (applied up to sequence {self._last_sequence or 0})"

    async def wait_ready(self) -> None:
        """Wait until :attr:`ready` (callers bound the wait with their own deadline)."""
        await self._ready.wait()

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up."""
        return self._connected

    @property
    def last_sequence(self) -> int | None:
        """The last stream sequence applied (or skipped as unverifiable)."""
        return self._last_sequence

    @property
    def applied(self) -> int:
        """Events applied so far (heartbeats included)."""
        return self._applied

    @property
    def rejected(self) -> int:
        """Events dropped as unverifiable so far."""
        return self._rejected

    async def run(self) -> None:
        """Connect, catch up and follow the stream until cancelled; every failure is retried."""
        async with contextlib.AsyncExitStack() as connections:
            live = await self._connect(
                connections,
                name=self._name,
                disconnected=self._on_disconnected,
                reconnected=self._on_reconnected,
            )
            # Reads go over a connection of their own: on the live one their replies would wait behind a
            # burst of live messages (which has no flow control).
            reads = await self._connect(connections, name=f"{self._name} reads")
            self._connected = True
            try:
                await self._follow_forever(live, StreamReader(reads))
            finally:
                self._connected = False

    async def _connect(
        self,
        connections: contextlib.AsyncExitStack,
        *,
        name: str,
        disconnected: Callback | None = None,
        reconnected: Callback | None = None,
    ) -> NatsClient:
        """A connection, retried until it is made; closed when ``connections`` closes."""
        # Unavailable: no server answered within the connect timeout (connect_nats logs each attempt).
        async for attempt in _retrying((*_NATS_ERRORS, Unavailable), what="nats connect"):
            with attempt:
                raise_if_cancelled()
                client = await connect_nats(
                    self._settings, name=name, disconnected=disconnected, reconnected=reconnected
                )
        connections.push_async_callback(_close, client)
        return client

    async def _follow_forever(self, client: NatsClient, reader: StreamReader) -> None:
        while True:
            raise_if_cancelled()
            # A resubscription starts afresh, without a wait; a failure waits (less once NATS is back).
            with contextlib.suppress(_Resubscribe):
                retrying = _retrying(
                    Exception,
                    what="revocation stream",
                    unless=(_Resubscribe,),
                    sleep=self._pause,
                )
                async for attempt in retrying:
                    with attempt:
                        raise_if_cancelled()
                        await self._follow_logged(client, reader)

    async def _follow_logged(self, client: NatsClient, reader: StreamReader) -> None:
        try:
            await self._follow(client, reader)
        except (*_READ_FAILURES, _Resubscribe):
            raise
        except Exception:
            # A bug must not silently end revocation updates; the state turns stale meanwhile.
            _log.exception("revocation consumer failed")
            raise

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, ending early when the connection comes back."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._reconnected.wait()

    async def _follow(self, client: NatsClient, reader: StreamReader) -> None:
        """One subscription's life: (re)synchronise if needed, subscribe, catch up, apply until it ends."""
        self._reconnected.clear()
        if not self._synchronised:
            await self._synchronise()
        # Live messages go through the same lock as the catch-up: they wait in the subscription's queue
        # while history is read, and whatever both delivered is applied once, in stream order. What the
        # callback cannot handle (a bug, a stream that cannot be read) ends this subscription.
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_message(message: Msg) -> None:
            if outcome.done():
                return  # leaving: the next subscription catches up from the last sequence applied
            try:
                async with self._applying:
                    await self._on_live(reader, live_message(message))
            except _READ_FAILURES as error:
                self._read_failed(error)  # the subscription stays; the message is read again later
            except Exception as error:  # _follow_forever decides what it means, as for any other failure
                outcome.set_exception(error)

        subscription = await client.subscribe(
            LIVE_SUBJECTS[0], cb=on_message, pending_msgs_limit=_LIVE_PENDING_MESSAGES
        )
        try:
            # The subscription in place before the catch-up reads the stream's end; should the flush time
            # out, a message missed in between shows as a gap at the next live one and is read then.
            with contextlib.suppress(nats.errors.TimeoutError):
                await client.flush(timeout=_FLUSH_TIMEOUT_SECONDS)
            self._last_message_at = time.monotonic()
            async with self._applying:
                await self._catch_up(reader)
            await self._watch(reader, outcome)
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
            if not outcome.done():
                outcome.cancel()
            elif not outcome.cancelled():
                outcome.exception()  # retrieved, so asyncio does not log it as never retrieved

    async def _watch(self, reader: StreamReader, outcome: asyncio.Future[None]) -> None:
        """Until the subscription must end: a reconnect, a quiet spell that finds it stuck, or ``outcome``."""
        while True:
            raise_if_cancelled()
            if self._reconnected.is_set():
                raise _Resubscribe()
            done, _ = await asyncio.wait({outcome}, timeout=_POLL_SECONDS)
            if done:
                outcome.result()  # raises what ended the subscription
                return
            if time.monotonic() - self._last_message_at >= _IDLE_CHECK_SECONDS:
                try:
                    async with self._applying:
                        await self._catch_up(reader)
                except _READ_FAILURES as error:
                    self._read_failed(error)
                self._last_message_at = time.monotonic()

    async def _catch_up(self, reader: StreamReader) -> None:
        """Apply everything the stream holds after the last sequence applied; ready once at its end.

        Raises:
            _Resubscribe: The stream went backwards (it was recreated), or a gap calls for a snapshot.
        """
        bounds = await reader.bounds()
        applied = self._last_sequence
        if applied is not None and bounds.last < applied:
            _log.warning("event stream went backwards; starting over", last=bounds.last, applied=applied)
            self._synchronised = False
            self._last_sequence = None
            raise _Resubscribe()
        async for message in reader.read(after=applied, since=self._since()):
            await self._on_stored(message)
        self._mark_ready()

    async def _on_live(self, reader: StreamReader, message: StreamMessage) -> None:
        """Apply one live message; a jump in sequence is filled from the stream first."""
        last = self._last_sequence
        if last is not None and message.sequence <= last:
            return  # already applied (or a stream that went backwards: the quiet check finds it)
        if last is not None and message.sequence > last + 1:
            if time.monotonic() < self._read_again_at:
                return  # a read just failed: this one waits for the next try (heartbeats too, so the
                # state turns stale rather than skip what is missing)
            await self._catch_up(reader)
            if self._last_sequence is not None and self._last_sequence >= message.sequence:
                return
            if self._last_sequence != message.sequence - 1:
                # The server that answered does not hold them yet (a lagging stream replica): read again.
                raise Unavailable("events missing from the live path are not readable yet")
        await self._apply(message, live=True)

    async def _on_stored(self, message: StreamMessage) -> None:
        """Apply one message read from the stream, in order; a jump in sequence is a gap."""
        last = self._last_sequence
        if last is not None and message.sequence <= last:
            return
        if last is not None and message.sequence > last + 1:
            self._missed(last + 1, message)
        await self._apply(message, live=self._ready.is_set() or message.pending == 0)

    def _read_failed(self, error: Exception) -> None:
        """A read of the stream failed: try again after a pause, keeping the live subscription."""
        self._read_again_at = time.monotonic() + _READ_RETRY_SECONDS
        _log.warning("revocation stream read failed", error=type(error).__name__, detail=str(error))

    def _missed(self, expected: int, message: StreamMessage) -> None:
        """Events ``expected`` … before ``message`` are gone from the stream: never let that pass silently.

        With a snapshot the state is reloaded (once per gap). Otherwise the replica stays degraded (it
        confirms tokens with ``Introspect``, or refuses them) until any token those events could have
        revoked has expired: they were stored no later than ``message``.

        Raises:
            _Resubscribe: To reload from the snapshot.
        """
        self._observer.gap_detected()
        _log.warning("event stream gap", expected=expected, got=message.sequence)
        if self._snapshot is not None and self._resynchronised_for != message.sequence:
            self._resynchronised_for = message.sequence
            self._unfilled_through = max(self._unfilled_through or 0, message.sequence - 1)
            self._synchronised = False
            raise _Resubscribe()
        held = message.stored_at + self._replay_window - self._clock()
        if held > 0:
            _log.warning("revocations lost; degraded until their tokens have expired", seconds=round(held, 3))
            self._staleness.hold(held)
            self._unfilled_through = max(self._unfilled_through or 0, message.sequence - 1)

    async def _synchronise(self) -> None:
        """Fetch keys and load the snapshot, side by side (or settle for a replay of the stream).

        Both are needed before the first event is read, neither needs the other (a key the snapshot
        retires stays refused whatever the fetch brings), and a starting replica serves nothing until
        both are done.
        """
        fetched, loaded = await asyncio.gather(
            self._keys.refresh(), self._try_snapshot(), return_exceptions=True
        )
        if isinstance(fetched, BaseException):
            raise fetched
        if isinstance(loaded, BaseException):
            raise loaded
        sequence = loaded
        if sequence is None:
            self._observer.resynchronised("replay")
        else:
            self._observer.resynchronised("snapshot")
            self._last_sequence = sequence
            if self._unfilled_through is not None and sequence >= self._unfilled_through:
                # The snapshot holds what the lost events said.
                self._unfilled_through = None
                self._staleness.release()
        self._synchronised = True

    async def _try_snapshot(self) -> int | None:
        """The snapshot's stream sequence once loaded; None without a snapshot or when it failed."""
        if self._snapshot is None:
            return None
        try:
            return await self._load_snapshot(self._snapshot)
        except (Unavailable, OSError, TimeoutError) as error:
            _log.warning("revocation snapshot unavailable; replaying the stream", error=str(error))
            return None

    async def _load_snapshot(self, source: SnapshotSource) -> int:
        sequence = 0
        chunks = 0
        async for chunk in source.snapshot():
            self._denylist.load(chunk)
            self._keys.retire_all(chunk.retired_key_ids)
            sequence = max(sequence, chunk.stream_sequence)
            chunks += 1
        if chunks == 0:
            raise Unavailable("empty revocation snapshot")
        _log.info("revocation snapshot loaded", stream_sequence=sequence, chunks=chunks)
        return sequence

    def _since(self) -> float:
        return self._clock() - self._replay_window

    async def _apply(self, message: StreamMessage, *, live: bool) -> None:
        """Apply one message in stream order and move the last sequence past it."""
        self._last_message_at = time.monotonic()
        await self._handle(message, live=live)
        self._last_sequence = message.sequence
        # Let nats-py read the socket between messages: the live copy has no flow control, and a
        # replica working through a burst without reading would be cut off by the server as a slow
        # consumer (and its replies would wait behind the burst).
        await asyncio.sleep(0)

    async def _handle(self, message: StreamMessage, *, live: bool) -> None:
        event = await self._verify(message)
        if event is None:
            return
        body = event.body
        if isinstance(body, HeartbeatEvent):
            if live:
                # The state is current as of when the heartbeat was sent, not when it arrived: a late
                # heartbeat must not reset staleness to zero (that would double the bound). This relies
                # on clocks in sync (NTP); the skew shows as authmesh_revocation_staleness_seconds.
                self._staleness.heartbeat(self._clock() - event.occurred_at_ms / 1000)
        elif isinstance(body, KeyRotatedEvent):
            # A replayed rotation is older than the keys fetched at start: nothing to fetch for it. A live
            # one was signed with the new key, so verifying it usually fetched that key already; a second
            # unconditional fetch would wait out the cooldown while every event behind it waits too.
            if live:
                try:
                    await self._keys.refresh_for(body.kid)
                except Unavailable:
                    _log.warning("key refresh after rotation failed; keys will be fetched on demand")
        else:
            self._denylist.apply(event)
            if isinstance(body, KeyRevokedEvent):
                self._keys.retire(body.kid)
        self._count(event, live=live)

    def _count(self, event: SecurityEvent, *, live: bool) -> None:
        self._applied += 1
        lag = None
        # Only events that arrive while serving measure propagation; replayed ones measure the past.
        if live and self._ready.is_set() and event.type not in (EventType.HEARTBEAT, EventType.KEY_ROTATED):
            lag = self._clock() - event.occurred_at_ms / 1000
        self._observer.event_applied(event.type.value, lag)

    async def _verify(self, message: StreamMessage) -> SecurityEvent | None:
        """The verified event, or None (counted) when it cannot be trusted."""
        issuer = self._settings.issuer
        try:
            try:
                return decode_event(message.data, message.subject, self._keys, issuer)
            except UnknownKey as unknown:
                await self._refresh_keys_for(unknown.kid)
                return decode_event(message.data, message.subject, self._keys, issuer)
        except UnknownKey:
            self._reject("unknown_key")
        except EventRejected as error:
            self._reject(_rejection_reason(error))
        except AuthError as error:  # whatever else the key source raised on the second pass
            self._reject(error.code.lower())
        return None

    async def _refresh_keys_for(self, kid: str) -> None:
        """Refetch keys for an event's ``kid``, retrying while the auth service cannot be reached.

        An event may be genuine and signed with a key we have not fetched yet: dropping it because the
        auth service is briefly unreachable would lose a revocation, so the consumer waits instead (and
        the state turns stale meanwhile, which makes the service fall back to Introspect).
        """
        async for attempt in _retrying(
            Unavailable,
            what="key refetch for an event",
        ):
            with attempt:
                raise_if_cancelled()
                await self._keys.refresh_for(kid)

    def _reject(self, reason: str) -> None:
        self._rejected += 1
        self._observer.event_rejected(reason)
        _log.warning("event rejected", reason=reason)

    def _mark_ready(self) -> None:
        if not self._ready.is_set():
            _log.info("revocation state caught up", stream_sequence=self._last_sequence)
            self._ready.set()

    async def _on_disconnected(self) -> None:
        self._connected = False

    async def _on_reconnected(self) -> None:
        self._connected = True
        self._reconnected.set()


async def _close(client: NatsClient) -> None:
    with contextlib.suppress(Exception):
        await client.close()


def _rejection_reason(error: EventRejected) -> str:
    """A stable metric label for why an event was dropped (``wrong_subject``, ``bad_signature``, …)."""
    return error.code.lower().removeprefix("event_")
