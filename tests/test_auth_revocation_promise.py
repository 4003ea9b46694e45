"""Regressions for the holes found in the revocation promise, each against a real Redis and NATS.

Each test reproduces what was seen (a login racing RevokeUser, a user half-created, a reuse answered
before its event was broadcast, a password hash never upgraded, an account that could not be disabled)
and checks what must hold instead.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import pytest_asyncio
import redis.asyncio as redis

from authmesh._auth_service.app import AuthApp
from authmesh._auth_service.store import sub_key, user_key
from authmesh._shared.claims import AccessClaims
from authmesh._shared.events import STREAM_NAME
from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.jose import decode_compact
from authmesh.auth.v1 import auth_pb2
from authmesh.processes import NatsServer, RedisServer
from tests.auth_support import AuthClient, auth_settings, bearer, expect_error, redis_client, running_auth
from tests.waiting import eventually

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
# Logins racing one RevokeUser per round: enough that some land on each side of the cut.
RACING_LOGINS = 24
RACE_ROUNDS = 8
RECONNECT_DEADLINE = 20.0


@pytest_asyncio.fixture(loop_scope="session")
async def auth(redis_url: str, nats_url: str) -> AsyncIterator[tuple[AuthApp, AuthClient]]:
    """A fresh auth service on clean Redis and NATS."""
    # Concurrent logins count against the per-username limit until they succeed.
    async with running_auth(auth_settings(redis_url, [nats_url], login_max_failures=1000)) as pair:
        yield pair


@pytest_asyncio.fixture(loop_scope="session")
async def store(redis_url: str) -> AsyncIterator[redis.Redis]:
    """A client of the auth service's Redis."""
    async with redis_client(redis_url) as client:
        yield client


async def stored_user(store: redis.Redis, username: str) -> dict[str, Any]:
    """A user's record as the auth service stored it."""
    raw = await store.get(user_key(username))
    assert raw is not None
    record: dict[str, Any] = json.loads(raw)
    return record


def issued_at_ms(token: str) -> int:
    """The issue instant a replica reads from a token (UUIDv7 jti within iat's second)."""
    return AccessClaims.from_payload(decode_compact(token).unverified_payload, "kid").issued_at_ms


async def test_logins_racing_revoke_user_are_judged_alike_by_introspect_and_by_the_cut(
    auth: tuple[AuthApp, AuthClient],
) -> None:
    # A replica knows only the cut (not_before_ms): it refuses a token issued at or before it. Introspect
    # reads the session in Redis. The login used to write the session, then read the clock again to
    # mint: a RevokeUser in between revoked the session in Redis, yet the token was dated after the cut.
    _, client = auth
    sub = await client.create_user("racer", "racer-password")
    admin = bearer(await client.admin_token())
    disagreements: list[tuple[bool, bool]] = []
    for _ in range(RACE_ROUNDS):
        logins = [asyncio.create_task(client.login("racer", "racer-password")) for _ in range(RACING_LOGINS)]
        cut = await client.stub.RevokeUser(auth_pb2.RevokeUserRequest(subject=sub), metadata=admin)
        for pair in await asyncio.gather(*logins):
            active = (await client.introspect(pair.access_token)).active
            accepted_by_replicas = issued_at_ms(pair.access_token) > cut.revoked_at_unix_ms
            if active != accepted_by_replicas:
                disagreements.append((active, accepted_by_replicas))
    assert disagreements == []


async def test_a_user_left_without_its_subject_index_is_repaired_by_a_retried_create_user(
    auth: tuple[AuthApp, AuthClient], store: redis.Redis
) -> None:
    # CreateUser wrote the user, then its subject index, in two steps: a failure between them left a
    # user who could log in but whom RevokeUser could not find, and a retry answered USER_EXISTS without
    # repairing it. Now both are one step, and a retry restores an index an older write lost.
    _, client = auth
    sub = await client.create_user("halfmade", "halfmade-password")
    assert (await stored_user(store, "halfmade"))["sub"] == sub
    await store.delete(sub_key(sub))  # what the failure between the two writes left behind

    await expect_error(
        client.create_user("halfmade", "halfmade-password"), grpc.StatusCode.ALREADY_EXISTS, "USER_EXISTS"
    )

    before = await client.login("halfmade", "halfmade-password")
    await client.stub.RevokeUser(
        auth_pb2.RevokeUserRequest(subject=sub), metadata=bearer(await client.admin_token())
    )
    assert (await client.introspect(before.access_token)).inactive_reason == "USER_REVOKED"


async def test_refresh_reuse_answers_only_once_its_revocation_is_broadcast(
    redis_url: str, own_nats: NatsServer, tmp_path: Path
) -> None:
    # Reuse revokes the session like any revocation, so it answers like one: only once JetStream has the
    # event. It used to answer REFRESH_TOKEN_REUSED with NATS down, the event stuck in the outbox.
    async with running_auth(auth_settings(redis_url, [own_nats.url])) as (_, client):
        await client.create_user("reuser", "reuser-password")
        first = await client.login("reuser", "reuser-password")
        spent = auth_pb2.RefreshRequest(refresh_token=first.refresh_token)
        await client.stub.Refresh(spent)
        await own_nats.stop()

        await expect_error(client.stub.Refresh(spent), UNAVAILABLE, "BROKER_UNAVAILABLE")

        await own_nats.start()

        async def retry_refused() -> bool:
            # The retry finds the session revoked and answers only once its event is delivered; until the
            # auth service has reconnected to NATS it keeps answering UNAVAILABLE.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.stub.Refresh(spent, timeout=10)
            return error_reason(refused.value) == "REFRESH_TOKEN_INVALID"

        await eventually(retry_refused, within=RECONNECT_DEADLINE, what="the retried reuse to be refused")
        assert (await client.introspect(first.access_token)).inactive_reason == "SESSION_REVOKED"


async def test_a_login_rehashes_a_password_hashed_with_older_argon2_parameters(
    redis_url: str, nats_url: str, store: redis.Redis
) -> None:
    cheap = auth_settings(redis_url, [nats_url], argon2_memory_kib=1024, argon2_time_cost=1)
    async with running_auth(cheap) as (_, client):
        await client.create_user("upgrader", "upgrader-password")
    old_hash = (await stored_user(store, "upgrader"))["password_hash"]
    assert "m=1024,t=1," in old_hash

    stronger = auth_settings(redis_url, [nats_url], argon2_memory_kib=2048, argon2_time_cost=2)
    async with running_auth(stronger) as (_, client):
        await client.login("upgrader", "upgrader-password")
        new_hash = (await stored_user(store, "upgrader"))["password_hash"]
        assert "m=2048,t=2," in new_hash
        # The new hash is the same password: it still logs in, and a wrong one still does not.
        await client.login("upgrader", "upgrader-password")
        await expect_error(client.login("upgrader", "wrong-password"), UNAUTHENTICATED, "INVALID_CREDENTIALS")


async def test_a_disabled_account_cannot_log_in_or_refresh_and_its_sessions_are_revoked(
    auth: tuple[AuthApp, AuthClient],
) -> None:
    _, client = auth
    sub = await client.create_user("leaver", "leaver-password")
    pair = await client.login("leaver", "leaver-password")
    admin = bearer(await client.admin_token())

    disabled = await client.stub.DisableUser(
        auth_pb2.DisableUserRequest(subject=sub, reason="left the company"), metadata=admin
    )

    assert disabled.event_id  # broadcast as a user revocation
    assert (await client.introspect(pair.access_token)).inactive_reason == "USER_REVOKED"
    await expect_error(client.login("leaver", "leaver-password"), UNAUTHENTICATED, "USER_DISABLED")
    refresh = auth_pb2.RefreshRequest(refresh_token=pair.refresh_token)
    await expect_error(client.stub.Refresh(refresh), UNAUTHENTICATED, "REFRESH_TOKEN_INVALID")
    # A wrong password says nothing about the account's state.
    await expect_error(client.login("leaver", "wrong-password"), UNAUTHENTICATED, "INVALID_CREDENTIALS")
    # Only an admin of the auth audience may disable or enable.
    await expect_error(
        client.stub.EnableUser(auth_pb2.EnableUserRequest(subject=sub), metadata=bearer(pair.access_token)),
        UNAUTHENTICATED,
    )

    await client.stub.EnableUser(auth_pb2.EnableUserRequest(subject=sub), metadata=admin)

    again = await client.login("leaver", "leaver-password")
    assert (await client.introspect(again.access_token)).active
    # What was revoked stays revoked.
    await expect_error(client.stub.Refresh(refresh), UNAUTHENTICATED, "REFRESH_TOKEN_INVALID")
    await expect_error(
        client.stub.DisableUser(auth_pb2.DisableUserRequest(subject="usr_nobody"), metadata=admin),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )


async def test_heartbeats_go_on_while_redis_is_down_and_no_event_is_undelivered(
    own_redis: RedisServer, nats_url: str
) -> None:
    # Heartbeats are withheld while an event is known to be undelivered, not while the outbox merely
    # cannot be read: with Redis down nothing can be revoked, and replicas keep serving from their state.
    async with running_auth(auth_settings(own_redis.url, [nats_url])):
        client = await nats.connect(servers=[nats_url], connect_timeout=2, max_reconnect_attempts=0)
        try:
            js = client.jetstream(timeout=5)
            own_redis.kill()
            killed_at = (await js.stream_info(STREAM_NAME)).state.last_seq

            async def heartbeats_flow() -> bool:
                return (await js.stream_info(STREAM_NAME)).state.last_seq >= killed_at + 3

            await eventually(heartbeats_flow, within=RECONNECT_DEADLINE, what="heartbeats with Redis down")
        finally:
            await client.close()
            await own_redis.restart()
