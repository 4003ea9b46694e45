"""The key cache: lookups, single-flight refetch, cooldown, negative cache and retirement."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from authmesh._shared.errors import KeyRevoked, Unavailable, UnknownKey
from authmesh._shared.key_cache import KEYS_UNAVAILABLE, KeyCache
from authmesh._shared.keys import jwks_json

DEADLINE = 10.0


class FakeClock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class JwksServer:
    """Stands in for the auth service's GetJwks: a set of public keys, with a call counter."""

    def __init__(self, *kids: str) -> None:
        self.keys = {kid: ec.generate_private_key(ec.SECP256R1()).public_key() for kid in kids}
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.failure: Exception | None = None
        self.body: str | None = None

    def add(self, kid: str) -> None:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1()).public_key()

    async def fetch(self) -> str:
        self.calls += 1
        snapshot = jwks_json(dict(self.keys))
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return self.body if self.body is not None else snapshot


async def test_a_known_key_is_returned_without_a_fetch() -> None:
    server = JwksServer("k1")
    cache = KeyCache(server.fetch)
    await cache.refresh()
    assert cache.public_key("k1").public_numbers() == server.keys["k1"].public_numbers()
    assert await cache.refresh_for("k1") is True
    assert server.calls == 1


async def test_an_unknown_key_raises_unknown_key() -> None:
    cache = KeyCache(JwksServer("k1").fetch)
    await cache.refresh()
    with pytest.raises(UnknownKey):
        cache.public_key("nope")


async def test_a_key_the_auth_service_added_is_fetched_on_demand() -> None:
    server = JwksServer("k1")
    cache = KeyCache(server.fetch, cooldown=0.0)
    await cache.refresh()
    server.add("k2")
    assert await cache.refresh_for("k2") is True
    cache.public_key("k2")


async def test_a_flood_of_made_up_kids_costs_one_fetch() -> None:
    server = JwksServer("k1")
    cache = KeyCache(server.fetch, cooldown=60.0)
    results = await asyncio.wait_for(
        asyncio.gather(*(cache.refresh_for(f"garbage-{n}") for n in range(1000))), DEADLINE
    )
    assert not any(results)
    assert server.calls == 1


async def test_a_kid_found_missing_is_answered_from_the_negative_cache() -> None:
    server = JwksServer("k1")
    clock = FakeClock()
    cache = KeyCache(server.fetch, cooldown=1.0, negative_ttl=10.0, clock=clock)
    assert await cache.refresh_for("garbage") is False
    clock.now += 5.0
    for _ in range(100):
        assert await cache.refresh_for("garbage") is False
    assert server.calls == 1
    clock.now += 6.0  # negative entry and cooldown both over
    assert await cache.refresh_for("garbage") is False
    assert server.calls == 2


async def test_fetches_start_at_least_one_cooldown_apart() -> None:
    server = JwksServer("k1")
    cache = KeyCache(server.fetch, cooldown=0.2, negative_ttl=60.0)
    await cache.refresh_for("first")
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(cache.refresh_for(f"second-{n}") for n in range(50))), DEADLINE)
    assert server.calls == 2
    assert time.monotonic() - started >= 0.2 * 0.9


async def test_a_caller_arriving_during_a_fetch_gets_a_fetch_that_starts_after_it() -> None:
    server = JwksServer("k1")
    cache = KeyCache(server.fetch, cooldown=0.0)
    server.gate = asyncio.Event()
    first = asyncio.create_task(cache.refresh_for("k1"))
    await poll(lambda: server.calls == 1)
    server.add("k2")  # appears after the first fetch read the key set
    second = asyncio.create_task(cache.refresh_for("k2"))
    server.gate.set()
    assert await asyncio.wait_for(first, DEADLINE) is True
    assert await asyncio.wait_for(second, DEADLINE) is True
    assert server.calls == 2


async def test_a_failed_fetch_makes_the_keys_unavailable_not_unknown() -> None:
    server = JwksServer("k1")
    server.failure = ConnectionError("auth service down")
    cache = KeyCache(server.fetch, cooldown=0.0)
    with pytest.raises(Unavailable) as caught:
        await cache.refresh_for("k1")
    assert caught.value.code == KEYS_UNAVAILABLE
    assert cache.failures == 1


async def test_a_fetch_that_hangs_fails_at_its_deadline() -> None:
    server = JwksServer("k1")
    server.gate = asyncio.Event()  # never set
    cache = KeyCache(server.fetch, fetch_timeout=0.05)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(cache.refresh(), DEADLINE)


async def test_a_jwks_that_does_not_parse_makes_the_keys_unavailable() -> None:
    server = JwksServer("k1")
    server.body = '{"keys": "not a list"}'
    cache = KeyCache(server.fetch)
    with pytest.raises(Unavailable):
        await cache.refresh()


async def test_a_retired_key_is_evicted_at_once_and_never_comes_back() -> None:
    server = JwksServer("k1", "k2")
    cache = KeyCache(server.fetch, cooldown=0.0)
    await cache.refresh()
    cache.retire("k1")
    with pytest.raises(KeyRevoked):
        cache.public_key("k1")
    await cache.refresh()  # the auth service still lists it
    with pytest.raises(KeyRevoked):
        cache.public_key("k1")
    calls = server.calls
    assert await cache.refresh_for("k1") is False
    assert server.calls == calls
    cache.public_key("k2")


async def test_a_refresh_drops_keys_the_auth_service_no_longer_lists() -> None:
    server = JwksServer("k1", "k2")
    cache = KeyCache(server.fetch, cooldown=0.0)
    await cache.refresh()
    del server.keys["k1"]
    await cache.refresh()
    assert cache.kids == frozenset({"k2"})


async def test_cancelling_one_waiter_does_not_cancel_the_fetch_the_others_wait_for() -> None:
    server = JwksServer("k1")
    server.gate = asyncio.Event()
    cache = KeyCache(server.fetch, cooldown=0.0)
    impatient = asyncio.create_task(cache.refresh_for("k1"))
    patient = asyncio.create_task(cache.refresh_for("k1"))
    await poll(lambda: server.calls == 1)
    impatient.cancel()
    server.gate.set()
    assert await asyncio.wait_for(patient, DEADLINE) is True
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_closing_the_cache_cancels_a_waiting_fetch() -> None:
    server = JwksServer("k1")
    server.gate = asyncio.Event()
    cache = KeyCache(server.fetch)
    waiter = asyncio.create_task(cache.refresh())
    await poll(lambda: server.calls == 1)
    await asyncio.wait_for(cache.aclose(), DEADLINE)
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def poll(condition: Callable[[], bool], within: float = DEADLINE) -> None:
    """Wait until ``condition()`` holds, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)
