"""The auth service's hot paths on their bad days: the lean Lua-script path and revocations published
straight after their write, against real Redis and NATS servers."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as redis
from cryptography.hazmat.primitives.asymmetric import ec

from authmesh._auth_service.store import OUTBOX, AuthStore, RotationResult
from authmesh._shared.errors import Unavailable
from authmesh._shared.events import EventType, SessionRevokedEvent, TokenRevokedEvent, decode_event
from authmesh._shared.jose import decode_compact
from authmesh._shared.keys import parse_jwks
from authmesh.auth.v1 import auth_pb2
from authmesh.processes import NatsServer, RedisServer
from tests.auth_support import auth_settings, bearer, expect_error, running_auth
from tests.faults import stream_events
from tests.waiting import eventually

DEADLINE_SECONDS = 20.0
SCRIPT_DEADLINE_SECONDS = 0.5


@pytest_asyncio.fixture(loop_scope="session")
async def store(own_redis: RedisServer) -> AsyncIterator[AuthStore]:
    """A store on ``own_redis`` whose calls give up after half a second."""
    client = redis.from_url(own_redis.url, socket_timeout=SCRIPT_DEADLINE_SECONDS, socket_connect_timeout=1)
    try:
        yield AuthStore(client, access_ttl=300, leeway=5)
    finally:
        await client.aclose()


async def rotate_unknown(store: AuthStore) -> RotationResult:
    """A rotation of a refresh token nobody holds: the rotation script answers ``invalid``."""
    return await store.rotate_refresh("0" * 64, "1" * 64, int(time.time() * 1000), 60_000, "reuse-event")


async def test_a_script_flushed_from_redis_is_loaded_again(redis_url: str, nats_url: str) -> None:
    async with running_auth(auth_settings(redis_url, [nats_url])) as (_, client):
        await client.create_user("gina", "gina-password")
        pair = await client.login("gina", "gina-password")
        refreshed = await client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token))
        flusher = redis.from_url(redis_url)
        try:
            await flusher.script_flush()
        finally:
            await flusher.aclose()
        again = await client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=refreshed.refresh_token))
        assert again.session_id == pair.session_id
        # The retried rotation ran once and stored its successor: the chain goes on.
        await client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=again.refresh_token))


async def test_a_killed_redis_is_the_usual_error_and_a_restarted_one_serves_at_once(
    own_redis: RedisServer, store: AuthStore
) -> None:
    assert await rotate_unknown(store) == RotationResult("invalid")
    own_redis.kill()
    with pytest.raises(Unavailable) as down:
        await rotate_unknown(store)
    assert down.value.code == "STORE_UNAVAILABLE"
    await own_redis.restart()
    assert await rotate_unknown(store) == RotationResult("invalid")
    # A connection the restart closed while it sat idle is replaced, not handed out broken.
    own_redis.kill()
    await own_redis.restart()
    assert await rotate_unknown(store) == RotationResult("invalid")


async def test_a_redis_that_stops_answering_times_out_and_its_late_reply_is_never_read(
    own_redis: RedisServer, store: AuthStore
) -> None:
    await store.revoke_token("warm-up", 0, 1, "warm-up-event", "{}", 60_000)
    pid = own_redis.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable) as late:
            await store.revoke_token("paused", 0, 2, "paused-event", "{}", 60_000)
        assert late.value.code == "STORE_UNAVAILABLE"
        assert time.monotonic() - started < SCRIPT_DEADLINE_SECONDS + 1
    finally:
        os.kill(pid, signal.SIGCONT)
    # Redis answers the revocation late; had the connection been reused, that answer would be read here.
    assert await rotate_unknown(store) == RotationResult("invalid")


async def test_a_revocation_made_while_nats_is_down_goes_out_once_when_it_is_back(
    redis_url: str, own_nats: NatsServer
) -> None:
    async with running_auth(auth_settings(redis_url, [own_nats.url])) as (_, client):
        await client.create_user("hank", "hank-password")
        victim = await client.login("hank", "hank-password")
        caller = await client.login("hank", "hank-password")
        request = auth_pb2.RevokeTokenRequest(token=victim.access_token, reason="stolen")
        await own_nats.stop()
        for _ in range(2):
            await expect_error(
                client.stub.RevokeToken(request, metadata=bearer(caller.access_token)),
                grpc.StatusCode.UNAVAILABLE,
                "BROKER_UNAVAILABLE",
            )
        outbox = redis.from_url(redis_url, decode_responses=True)
        try:
            (event_id,) = [str(key) for key in await outbox.hkeys(OUTBOX)]
            await own_nats.start()

            async def delivered() -> bool:
                return await outbox.hlen(OUTBOX) == 0

            await eventually(delivered, within=DEADLINE_SECONDS, what="the heartbeat to deliver the outbox")
        finally:
            await outbox.aclose()
        answer = await client.stub.RevokeToken(request, metadata=bearer(caller.access_token))
        assert answer.event_id == event_id
        published = [e for e in await stream_events([own_nats.url]) if e.msg_id == event_id]
        assert len(published) == 1
        jwks = parse_jwks((await client.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)
        event = decode_event(published[0].data, EventType.TOKEN_REVOKED.subject, _Keys(jwks), "authmesh")
        victim_claims = decode_compact(victim.access_token).unverified_payload
        assert event.body == TokenRevokedEvent(jti=victim_claims["jti"], exp=victim_claims["exp"])


async def test_a_reused_refresh_token_broadcasts_the_event_its_outbox_entry_holds(
    redis_url: str, nats_url: str
) -> None:
    async with running_auth(auth_settings(redis_url, [nats_url])) as (_, client):
        sub = await client.create_user("iris", "iris-password")
        pair = await client.login("iris", "iris-password")
        await client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token))
        await expect_error(
            client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token)),
            grpc.StatusCode.UNAUTHENTICATED,
            "REFRESH_TOKEN_REUSED",
        )
        jwks = parse_jwks((await client.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)
        (stored,) = [
            e for e in await stream_events([nats_url]) if e.subject == EventType.SESSION_REVOKED.subject
        ]
        event = decode_event(stored.data, stored.subject, _Keys(jwks), "authmesh")
        assert event.body == SessionRevokedEvent(sid=pair.session_id, sub=sub)
        assert event.event_id == stored.msg_id
        assert event.origin == ""  # the rotation script writes no origin, and the event in hand matches


class _Keys:
    """A key source over a parsed JWK Set."""

    def __init__(self, jwks: dict[str, ec.EllipticCurvePublicKey]) -> None:
        self._jwks = jwks

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey:
        return self._jwks[kid]
