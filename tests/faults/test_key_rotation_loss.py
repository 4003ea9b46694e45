"""Key-rotation events that never reach a replica.

The rotations are made on the auth service's Redis through :class:`~authmesh._auth_service.keyring.Keyring`
itself (the same code ``RotateSigningKey`` runs), choosing which of their events to write to the
outbox: that is
an event lost for good, not merely late. The auth service and the replicas run in this process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
import redis.asyncio as redis

from authmesh._auth_service.keyring import Keyring, KeySealer
from authmesh._auth_service.outbox import to_record
from authmesh._auth_service.store import AuthStore
from authmesh._shared.events import EventType, KeyRotatedEvent, SecurityEvent
from tests.auth_support import TEST_KEK, auth_settings, running_auth
from tests.faults import OK, Auth, in_process_replicas, kid_of, stream_events
from tests.waiting import eventually

PASSWORD = "rotation-password-1"
DEADLINE = 10.0
VERIFY_WINDOW_MS = 305_000


@pytest_asyncio.fixture(loop_scope="session")
async def keyring(redis_url: str) -> AsyncIterator[Keyring]:
    """A keyring on the auth service's Redis, as a second auth-service replica would hold it."""
    client = redis.from_url(redis_url)
    try:
        store = AuthStore(client, access_ttl=300, leeway=5)
        yield Keyring(store, KeySealer(TEST_KEK.encode()), VERIFY_WINDOW_MS)
    finally:
        await client.aclose()


def only_the_rotation(kid: str, previous_kid: str) -> list[tuple[str, str]]:
    """The outbox entries of a retirement that has lost its ``keys.revoked`` event."""
    event = SecurityEvent.new(KeyRotatedEvent(kid=kid, previous_kid=previous_kid), "authmesh", "lossy")
    return [(event.event_id, to_record(event))]


def no_events(kid: str, previous_kid: str) -> list[tuple[str, str]]:
    """The outbox entries of a rotation whose every event is lost."""
    return []


async def test_a_rotation_whose_event_is_lost_is_picked_up_through_the_unknown_kid_path(
    redis_url: str, nats_url: str, keyring: Keyring
) -> None:
    """Invariant: a token signed with a key the replica never heard of (its ``keys.rotated`` event lost) is
    accepted after one key fetch triggered by the unknown ``kid``, and no event announced the key."""
    async with running_auth(auth_settings(redis_url, [nats_url])) as (app, client):
        auth = Auth(client.channel)
        await auth.create_user("rotated", PASSWORD)
        async with in_process_replicas(app.grpc_address, [nats_url], 1) as (replica,):
            fetches = replica.app.keys.fetches
            rotation = await keyring.rotate(retire_previous=False, events_for=no_events)
            token = (await auth.login("rotated", PASSWORD)).access_token
            assert kid_of(token) == rotation.kid
            assert not replica.app.keys.is_known(rotation.kid)

            assert await replica.outcome(token) == OK
            assert replica.app.keys.fetches == fetches + 1
        rotations = [e for e in await stream_events([nats_url]) if e.subject == EventType.KEY_ROTATED.subject]
        assert rotations == []


# Polls of a retired key's token that must all be refused once the replica is up to date.
STEADY_POLLS = 20


async def test_a_replica_started_after_a_retirement_refuses_the_retired_key_even_without_its_event(
    redis_url: str, nats_url: str, keyring: Keyring
) -> None:
    """Invariant, for a key retired (compromise) while its ``keys.revoked`` event is lost: a replica started
    afterwards refuses the key's tokens from its first call (``SnapshotRevocations`` names the retired key;
    the events about it are signed by keys it can no longer check, or are gone), and the auth service calls
    them inactive."""
    async with running_auth(auth_settings(redis_url, [nats_url])) as (app, client):
        auth = Auth(client.channel)
        await auth.create_user("compromised", PASSWORD)
        old = (await auth.login("compromised", PASSWORD)).access_token
        await keyring.rotate(retire_previous=True, events_for=only_the_rotation)
        async with in_process_replicas(app.grpc_address, [nats_url], 1) as (late,):
            assert await late.outcome(old) == "KEY_REVOKED"
        assert not await auth.active(old)


async def test_a_running_replica_keeps_refusing_a_retired_key_whose_revocation_event_was_lost(
    redis_url: str, nats_url: str, keyring: Keyring
) -> None:
    """Invariant: when a key is retired and only its ``keys.rotated`` event arrives, the running replica,
    once it has applied that event and is up to date (not degraded), refuses the retired key's tokens every
    time: the JWK Set it refetched no longer lists the key."""
    async with running_auth(auth_settings(redis_url, [nats_url])) as (app, client):
        auth = Auth(client.channel)
        await auth.create_user("compromised", PASSWORD)
        old = (await auth.login("compromised", PASSWORD)).access_token
        async with in_process_replicas(app.grpc_address, [nats_url], 1) as (replica,):
            assert await replica.outcome(old) == OK
            previous = kid_of(old)
            await keyring.rotate(retire_previous=True, events_for=only_the_rotation)

            async def up_to_date() -> bool:
                keys = replica.app.keys
                return bool(keys.kids) and previous not in keys.kids and not replica.app.staleness.degraded

            await eventually(up_to_date, within=DEADLINE, what="the replica to apply the rotation")
            answers = [await replica.outcome(old) for _ in range(STEADY_POLLS)]
            assert OK not in answers, answers


async def test_a_retirement_whose_events_are_all_lost_takes_effect_at_the_next_key_fetch(
    redis_url: str, nats_url: str, keyring: Keyring
) -> None:
    """Invariant: when a retirement's events are all lost, the next JWK Set fetch a running replica makes for
    any reason (here: a token with a ``kid`` it does not know) drops the retired key for good. Until then
    the replica cannot know; ``docs/security.md`` says so."""
    async with running_auth(auth_settings(redis_url, [nats_url])) as (app, client):
        auth = Auth(client.channel)
        await auth.create_user("silent", PASSWORD)
        old = (await auth.login("silent", PASSWORD)).access_token
        async with in_process_replicas(app.grpc_address, [nats_url], 1) as (replica,):
            assert await replica.outcome(old) == OK
            rotation = await keyring.rotate(retire_previous=True, events_for=no_events)
            fresh = (await auth.login("silent", PASSWORD)).access_token
            assert kid_of(fresh) == rotation.kid
            assert await replica.outcome(fresh) == OK
            assert await replica.outcome(old) == "KEY_REVOKED"  # gone from the JWK Set: refused as revoked
            assert not await auth.active(old)
