"""Follows ``AUTH_EVENTS`` and keeps a denylist and a key cache up to date.

How a replica gets and stays in step:

1. **Keys first**: fetch the JWK Set (events are signed with the same keys as tokens).
2. **Snapshot or replay**: load ``SnapshotRevocations`` when the auth service answers and consume the
   stream from the sequence after the one it reflects; otherwise replay the stream from one access-token
   lifetime (plus leeway) ago, which covers every revocation still in force.
3. **Ready** once it has applied everything up to the stream's tip: until then the service must serve
   nothing (health ``NOT_SERVING``).
4. **Follow** with an ordered consumer: each message is a SET, verified (an unknown ``kid`` triggers one
   key refetch and a second try) and applied idempotently; anything that does not verify is dropped and
   counted. A jump in stream sequence means events were missed: the state is reloaded from a snapshot
   when one is available. A reconnect resubscribes from the last sequence applied; a stream that went
   backwards (recreated) starts over.
5. **Heartbeats** tell the :class:`~authmesh._shared.staleness.StalenessMonitor` how fresh the state is.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from authmesh._shared.denylist import Denylist, SnapshotChunk
from authmesh._shared.errors import AuthError, EventRejected, Unavailable, UnknownKey
from authmesh._shared.events import (
    MAX_EVENT_BYTES,
    STREAM_NAME,
    STREAM_SUBJECTS,
    EventType,
    HeartbeatEvent,
    KeyRevokedEvent,
    KeyRotatedEvent,
    SecurityEvent,
    decode_event,
)
from authmesh._shared.jose import decode_compact
from authmesh._shared.key_cache import KeyCache
from authmesh._shared.lifecycle import raise_if_cancelled
from authmesh._shared.nats_wiring import connect_nats, describe_nats_urls
from authmesh._shared.settings import CommonSettings
from authmesh._shared.staleness import StalenessMonitor

_RETRY_INITIAL_SECONDS = 0.25
_RETRY_MAX_SECONDS = 5.0
_POLL_SECONDS = 0.25
# Heartbeats arrive every second: this long without any message is worth a look at the stream.
_IDLE_CHECK_SECONDS = 2.5
_JETSTREAM_TIMEOUT_SECONDS = 2.0
# The ordered consumer's idle heartbeat: nats-py recreates the consumer after two missed ones.
_CONSUMER_IDLE_HEARTBEAT_SECONDS = 2.0
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
        self._gap_tolerated = False
        self._connected = False
        self._applied = 0
        self._rejected = 0
        self._last_message_at = time.monotonic()

    @property
    def ready(self) -> bool:
        """Whether the state has caught up with the stream at least once (traffic may be served)."""
        return self._ready.is_set()

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
        delay = _RETRY_INITIAL_SECONDS
        while True:
            raise_if_cancelled()
            try:
                client = await connect_nats(
                    self._settings,
                    name=self._name,
                    disconnected=self._on_disconnected,
                    reconnected=self._on_reconnected,
                )
            except (nats.errors.Error, OSError, TimeoutError) as error:
                _log.warning(
                    "nats connect failed",
                    error=type(error).__name__,
                    target=describe_nats_urls(self._settings.nats_urls),
                )
                delay = await _backoff(delay)
                continue
            self._connected = True
            try:
                await self._follow_forever(client)
            finally:
                self._connected = False
                with contextlib.suppress(Exception):
                    await client.close()

    async def _follow_forever(self, client: NatsClient) -> None:
        js = client.jetstream(timeout=_JETSTREAM_TIMEOUT_SECONDS)
        delay = _RETRY_INITIAL_SECONDS
        while True:
            raise_if_cancelled()
            try:
                await self._follow(js)
            except _Resubscribe:
                delay = _RETRY_INITIAL_SECONDS
            except (nats.errors.Error, OSError, TimeoutError, AuthError) as error:
                _log.warning("revocation stream interrupted", error=type(error).__name__, detail=str(error))
                delay = await self._pause(delay)
            except Exception:
                # A bug must not silently end revocation updates; the state turns stale meanwhile.
                _log.exception("revocation consumer failed")
                delay = await self._pause(delay)

    async def _pause(self, delay: float) -> float:
        """Back off ``delay`` seconds (with jitter), ending early when the connection comes back."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay * random.uniform(0.5, 1.0)):  # noqa: S311  # jitter
                await self._reconnected.wait()
        return min(delay * 2, _RETRY_MAX_SECONDS)

    async def _follow(self, js: JetStreamContext) -> None:
        """One subscription's life: (re)synchronise if needed, subscribe, apply until told to stop."""
        self._reconnected.clear()
        fresh = not self._synchronised
        if fresh:
            await self._synchronise()
        info = await js.stream_info(STREAM_NAME)
        first, last = info.state.first_seq, info.state.last_seq
        after = self._last_sequence
        if after is not None and last < after:
            _log.warning("event stream went backwards; starting over", last=last, applied=after)
            self._synchronised = False
            self._last_sequence = None
            raise _Resubscribe()
        if after is not None and after + 1 < first:
            # Events we never read have already left the stream.
            self._observer.gap_detected()
            if self._snapshot is not None and not fresh:
                self._synchronised = False
                raise _Resubscribe()
            _log.warning("events expired before they were read", first=first, expected=after + 1)
            after = self._last_sequence = first - 1
        if after is not None and after >= last:
            self._mark_ready()  # nothing newer than what we hold
        # A callback subscription: nats-py hands each message straight to it, in order, where next_msg()
        # would cost two tasks and a timer per message. What the callback cannot handle (a gap, a bug)
        # ends this subscription through ``outcome``.
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_message(message: Msg) -> None:
            if outcome.done():
                return  # leaving: the next subscription starts after the last sequence applied
            try:
                await self._on_message(message)
            except Exception as error:  # _follow_forever decides what it means, as for any other failure
                outcome.set_exception(error)

        self._last_message_at = time.monotonic()
        subscription = await js.subscribe(
            STREAM_SUBJECTS[0],
            stream=STREAM_NAME,
            cb=on_message,
            ordered_consumer=True,
            idle_heartbeat=_CONSUMER_IDLE_HEARTBEAT_SECONDS,
            config=_consumer_config(after, self._since()),
        )
        try:
            if not self._ready.is_set():
                consumer = await subscription.consumer_info()
                delivered = consumer.delivered.consumer_seq if consumer.delivered else 0
                if not consumer.num_pending and not delivered:
                    self._mark_ready()  # nothing at all to replay
            await self._watch(js, outcome)
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
            if not outcome.done():
                outcome.cancel()
            elif not outcome.cancelled():
                outcome.exception()  # retrieved, so asyncio does not log it as never retrieved

    async def _watch(self, js: JetStreamContext, outcome: asyncio.Future[None]) -> None:
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
                await self._check_subscription(js)
                self._last_message_at = time.monotonic()

    async def _on_message(self, message: Msg) -> None:
        """Apply one message in stream order; a jump in sequence ends the subscription."""
        self._last_message_at = time.monotonic()
        metadata = message.metadata
        sequence = metadata.sequence.stream
        last = self._last_sequence
        if last is not None and sequence <= last:
            return  # already applied
        if last is not None and sequence > last + 1:
            self._observer.gap_detected()
            _log.warning("event stream gap", expected=last + 1, got=sequence)
            if self._snapshot is not None and not self._gap_tolerated:
                self._synchronised = False
                raise _Resubscribe()
        self._gap_tolerated = False
        await self._handle(message, live=self._ready.is_set() or metadata.num_pending == 0)
        self._last_sequence = sequence
        if metadata.num_pending == 0:
            self._mark_ready()

    async def _check_subscription(self, js: JetStreamContext) -> None:
        """After a quiet spell, make sure the subscription is not stuck on a stream that moved on.

        The auth service publishes every second, so silence means it is down, or the subscription no
        longer matches the stream (recreated, or a consumer lost in a way nats-py did not notice).
        """
        info = await js.stream_info(STREAM_NAME)
        last = info.state.last_seq
        applied = self._last_sequence
        if applied is not None and last < applied:
            _log.warning("event stream went backwards; starting over", last=last, applied=applied)
            self._synchronised = False
            self._last_sequence = None
            raise _Resubscribe()
        if applied is not None and last > applied:
            _log.warning("subscription idle behind the stream; resubscribing", last=last, applied=applied)
            raise _Resubscribe()

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
            # Without a snapshot a gap cannot be filled: the next one is accepted, not chased again.
            self._gap_tolerated = True
            self._observer.resynchronised("replay")
        else:
            self._observer.resynchronised("snapshot")
            self._last_sequence = sequence
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

    async def _handle(self, message: Msg, *, live: bool) -> None:
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

    async def _verify(self, message: Msg) -> SecurityEvent | None:
        """The verified event, or None (counted) when it cannot be trusted."""
        issuer = self._settings.issuer
        try:
            try:
                return decode_event(message.data, message.subject, self._keys, issuer)
            except UnknownKey:
                kid = decode_compact(message.data, max_bytes=MAX_EVENT_BYTES).kid
                await self._refresh_keys_for(kid)
                return decode_event(message.data, message.subject, self._keys, issuer)
        except UnknownKey:
            self._reject("unknown_key")
        except EventRejected as error:
            self._reject(_rejection_reason(error))
        except AuthError as error:  # decode_compact on the second pass
            self._reject(error.code.lower())
        return None

    async def _refresh_keys_for(self, kid: str) -> None:
        """Refetch keys for an event's ``kid``, retrying while the auth service cannot be reached.

        An event may be genuine and signed with a key we have not fetched yet: dropping it because the
        auth service is briefly unreachable would lose a revocation, so the consumer waits instead (and
        the state turns stale meanwhile, which makes the service fall back to Introspect).
        """
        delay = _RETRY_INITIAL_SECONDS
        while True:
            raise_if_cancelled()
            try:
                await self._keys.refresh_for(kid)
                return
            except Unavailable:
                delay = await _backoff(delay)

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


def _consumer_config(after_sequence: int | None, since: float) -> ConsumerConfig:
    """Start after a known sequence, or (when none is known) from a point in time."""
    if after_sequence is not None:
        return ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_sequence + 1
        )
    return ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=datetime.datetime.fromtimestamp(since, tz=datetime.UTC),
    )


def _rejection_reason(error: EventRejected) -> str:
    """A stable metric label for why an event was dropped (``wrong_subject``, ``bad_signature``, …)."""
    return error.code.lower().removeprefix("event_")


async def _backoff(delay: float) -> float:
    """Sleep ``delay`` with jitter; return the next, doubled, delay."""
    await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311  # jitter, not a secret
    return min(delay * 2, _RETRY_MAX_SECONDS)
