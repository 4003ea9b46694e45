"""The auth service on Redis Sentinel: the primary killed under load; nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest_asyncio
import redis.asyncio as redis

from authmesh._auth_service.redis_client import connect_redis
from authmesh._auth_service.store import (
    ACTIVE_KID,
    KEYS_SET,
    hash_refresh_token,
    refresh_key,
    revoked_jti_key,
)
from authmesh.auth.v1 import auth_pb2
from authmesh.redis_sentinel import SentinelGroup
from tests.auth_support import auth_settings, running_auth
from tests.faults import OK, Answers, Auth, jti_of, outcome, revoke_next
from tests.faults.test_redis_restart import until
from tests.waiting import eventually

PASSWORD = "steady-password-1"
DEADLINE = 30.0
# Sentinel's down-after and failover timeout: the failover is over within a few seconds.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
RECOVERY_DEADLINE = 20.0
BEFORE = 3
CHAINS = 4
ROTATIONS = 4
STORE_DOWN = {"STORE_UNAVAILABLE", "STORE_NOT_REPLICATED"}


@pytest_asyncio.fixture(loop_scope="session")
async def sentinel_group(tmp_path: Path) -> AsyncIterator[SentinelGroup]:
    """A primary, two replicas and three Sentinels of the test's own."""
    async with SentinelGroup(
        tmp_path / "sentinel",
        replicas=2,
        down_after_ms=DOWN_AFTER_MS,
        failover_timeout_ms=FAILOVER_TIMEOUT_MS,
    ) as group:
        yield group


@dataclass
class Load(Answers):
    """Acknowledged effects per kind of call, and every answer seen."""

    revoked_jtis: list[str] = field(default_factory=list)
    refreshed: list[tuple[str, str]] = field(default_factory=list)
    kids: list[str] = field(default_factory=list)


async def test_a_sentinel_failover_under_load_loses_no_acknowledged_revocation_rotation_or_refresh(
    sentinel_group: SentinelGroup, nats_url: str
) -> None:
    """Invariant, with the primary killed (``kill -9``) while tokens are revoked, refresh tokens rotated,
    keys rotated and logins made, with acknowledgement after one replica has the write (``WAIT 1``):

    - every answer is OK or UNAVAILABLE (``STORE_UNAVAILABLE``/``STORE_NOT_REPLICATED``), never a wrong
      one (a valid refresh token refused, a login refused);
    - the service follows the failover by itself: revocations, refreshes and logins succeed again
      within the recovery deadline, with no restart;
    - every acknowledged revocation, refresh rotation and key rotation is on the promoted primary.
    """
    settings = auth_settings(sentinel_group.url, [nats_url], redis_replica_ack_timeout=0.5)
    async with running_auth(settings) as (_, client):
        auth = Auth(client.channel)
        await auth.create_user("steady", PASSWORD)
        admin = await auth.admin()
        pool = [await auth.login("steady", PASSWORD) for _ in range(120)]
        load = Load(frozenset(STORE_DOWN))
        stop = asyncio.Event()

        async def revoke() -> bool:
            if not pool:
                return False
            token = await revoke_next(client.stub, pool, admin, load)
            if token is not None:
                load.revoked_jtis.append(jti_of(token))
            return True

        def refresh_chain() -> Callable[[], Awaitable[bool]]:
            current: list[str] = []

            async def step() -> bool:
                if not current:
                    label, pair = await outcome(
                        client.stub.Login(
                            auth_pb2.LoginRequest(username="steady", password=PASSWORD), timeout=10
                        )
                    )
                    load.saw("Login", label)
                    if label == OK:
                        current.append(pair.refresh_token)
                    return True
                old = current.pop()
                label, pair = await outcome(
                    client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=old), timeout=10)
                )
                load.saw("Refresh", label)
                if label == OK:
                    load.refreshed.append((old, pair.refresh_token))
                    current.append(pair.refresh_token)
                # After an UNAVAILABLE the rotation may or may not have happened: the chain starts anew
                # with a login rather than resend a token that may now be spent.
                return True

            return step

        async def rotate() -> bool:
            if len(load.kids) >= ROTATIONS:
                return False
            label, reply = await outcome(
                client.stub.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=admin, timeout=10)
            )
            load.saw("RotateSigningKey", label)
            if label == OK:
                load.kids.append(reply.kid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)  # a few rotations, spread over the run
            return True

        steps = [revoke, rotate, *(refresh_chain() for _ in range(CHAINS))]
        workers = [asyncio.create_task(until(stop, step)) for step in steps]
        try:

            async def warmed_up() -> bool:
                return all(load.oks_after(call, 0) >= BEFORE for call in ("RevokeToken", "Refresh"))

            await eventually(warmed_up, within=DEADLINE, what="load before the failover")
            killed_at = time.monotonic()
            sentinel_group.servers[0].kill()

            async def recovered() -> bool:
                return all(
                    load.oks_after(call, killed_at) >= BEFORE for call in ("RevokeToken", "Refresh", "Login")
                )

            await eventually(recovered, within=RECOVERY_DEADLINE, what="the service to follow the failover")
            recovery_seconds = time.monotonic() - killed_at
        finally:
            stop.set()
            await asyncio.gather(*workers)

        assert load.wrong == []
        assert load.failures_after(killed_at), "the failover was not seen at all"
        assert load.kids, "no key rotation was acknowledged"

    # Read what the promoted primary holds, found through the Sentinels as any client would.
    connection = connect_redis(sentinel_group.url, timeout=3)
    try:
        primary = connection.client
        assert (await primary.info("replication"))["role"] == "master"
        await _assert_present(primary, load)
    finally:
        await connection.aclose()
    print(
        f"failover: recovered {recovery_seconds:.2f} s after kill -9; acknowledged "
        f"{len(load.revoked_jtis)} revocations, {len(load.refreshed)} refreshes, {len(load.kids)} rotations"
    )


async def _assert_present(primary: redis.Redis, load: Load) -> None:
    missing_revocations = [jti for jti in load.revoked_jtis if not await primary.exists(revoked_jti_key(jti))]
    assert missing_revocations == []
    lost_rotations = []
    for old, new in load.refreshed:
        spent = await primary.hget(refresh_key(hash_refresh_token(old)), "state")
        successor = await primary.exists(refresh_key(hash_refresh_token(new)))
        if spent != b"spent" or not successor:
            lost_rotations.append((spent, successor))
    assert lost_rotations == []
    kids = {
        member.decode() if isinstance(member, bytes) else member
        for member in await primary.smembers(KEYS_SET)
    }
    assert set(load.kids) <= kids
    assert await primary.get(ACTIVE_KID) is not None
