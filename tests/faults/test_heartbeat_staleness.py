"""How a replica judges its own staleness from heartbeats that arrive late, or look late to a skewed clock.

The staleness bound is the whole promise (a revoked token is refused within it), so the age a replica
believes its state has must never be less than the age of the newest heartbeat it has applied. Each test
runs one :class:`~authmesh._shared.consumer.RevocationConsumer`
on a real NATS with heartbeats signed by a test key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import nats
import pytest

from authmesh._shared.consumer import RevocationConsumer
from authmesh._shared.denylist import Denylist
from authmesh._shared.events import HeartbeatEvent, SecurityEvent, encode_event
from authmesh._shared.key_cache import KeyCache
from authmesh._shared.keys import jwks_json
from authmesh._shared.nats_wiring import ensure_stream
from authmesh._shared.settings import ResourceSettings
from authmesh._shared.staleness import StalenessMonitor
from tests.helpers_tokens import ISSUER, SigningKey
from tests.waiting import eventually

BOUND = 3.0
DEADLINE = 15.0
# Small enough that a test reading the monitor right after the heartbeat sees the age it arrived with.
READ_SLACK = 0.5


@dataclass
class Replica:
    """A consumer with its staleness monitor, and a way to publish heartbeats stamped at a chosen time."""

    consumer: RevocationConsumer
    staleness: StalenessMonitor
    key: SigningKey
    publish: Callable[[bytes], Awaitable[object]]


@asynccontextmanager
async def replica(nats_url: str, clock: Callable[[], float] = time.time) -> AsyncIterator[Replica]:
    """A running consumer on an empty ``AUTH_EVENTS`` whose wall clock is ``clock``."""
    settings = ResourceSettings(nats_urls=[nats_url], staleness_bound=BOUND, instance="staleness-test")
    key = SigningKey.generate("heartbeat-key")

    async def fetch() -> str:
        return jwks_json({key.kid: key.public_key})

    keys = KeyCache(fetch, cooldown=0.05)
    staleness = StalenessMonitor(BOUND)
    consumer = RevocationConsumer(
        settings, Denylist(access_token_ttl=300, leeway=5), keys, staleness, clock=clock
    )
    client = await nats.connect(servers=[nats_url], connect_timeout=2)
    js = client.jetstream(timeout=5)
    await ensure_stream(js, settings)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(consumer.wait_ready(), DEADLINE)

        async def publish(data: bytes) -> object:
            return await js.publish("auth.events.heartbeat", data)

        yield Replica(consumer, staleness, key, publish)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await keys.aclose()
        await client.close()


async def heartbeat_stamped(target: Replica, stamped_at: float, seq: int) -> None:
    """Publish a heartbeat whose time of event is ``stamped_at`` and wait until the replica applied it."""
    applied = target.consumer.applied
    event = SecurityEvent.new(HeartbeatEvent(seq=seq), ISSUER, "test", now_ms=int(stamped_at * 1000))
    await target.publish(encode_event(event, target.key.private_key, target.key.kid))

    async def arrived() -> bool:
        return target.consumer.applied > applied

    await eventually(arrived, within=DEADLINE, what="the heartbeat to be applied")


async def test_a_heartbeat_that_arrives_late_leaves_only_the_rest_of_the_bound_of_freshness(
    nats_url: str,
) -> None:
    """Invariant: a heartbeat applied when it is already 80 % of the bound old leaves the replica at most 20 %
    of the bound before it is degraded: the staleness it reports is at least the heartbeat's age."""
    async with replica(nats_url) as target:
        age = 0.8 * BOUND
        await heartbeat_stamped(target, time.time() - age, seq=1)
        assert target.staleness.seconds >= age - READ_SLACK


async def test_a_replica_whose_clock_runs_ahead_by_more_than_the_bound_stays_degraded(nats_url: str) -> None:
    """Invariant: to a replica whose clock runs ahead of the auth service by more than the staleness bound
    every fresh heartbeat looks older than the bound, so it stays degraded (it fails closed: every token
    is confirmed with ``Introspect``) rather than trusting state it cannot date."""
    async with replica(nats_url, clock=lambda: time.time() + BOUND + 2) as target:
        for seq in range(3):
            await heartbeat_stamped(target, time.time(), seq=seq)
            assert target.staleness.degraded


async def test_a_replica_whose_clock_runs_behind_counts_fresh_heartbeats_as_fresh(nats_url: str) -> None:
    """Invariant: to a replica whose clock runs behind the auth service's (by leeway + 5 s) a fresh
    heartbeat is fresh: it is not degraded."""
    async with replica(nats_url, clock=lambda: time.time() - 10) as target:
        await heartbeat_stamped(target, time.time(), seq=1)
        assert not target.staleness.degraded
