"""The auth service on its bad days: restarts, Redis down, NATS down; and its events on the wire."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import grpc
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authmesh._auth_service.app import AuthApp
from authmesh._shared.errors import ConfigurationError
from authmesh._shared.events import (
    STREAM_NAME,
    EventType,
    HeartbeatEvent,
    SecurityEvent,
    SessionRevokedEvent,
    TokenRevokedEvent,
    UserRevokedEvent,
    decode_event,
)
from authmesh._shared.jose import decode_compact
from authmesh._shared.keys import parse_jwks
from authmesh.auth.v1 import auth_pb2
from authmesh.processes import NatsServer, RedisServer, free_port
from tests.auth_support import (
    AuthClient,
    auth_client,
    auth_settings,
    bearer,
    expect_error,
    running_auth,
)
from tests.waiting import eventually

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_SECONDS = 20.0


async def test_a_restart_keeps_users_sessions_and_keys(redis_url: str, nats_url: str) -> None:
    settings = auth_settings(redis_url, [nats_url])
    async with running_auth(settings) as (_, client):
        await client.create_user("alice", "alice-password")
        pair = await client.login("alice", "alice-password")
    async with running_auth(settings) as (_, client):
        assert (await client.introspect(pair.access_token)).active
        refreshed = await client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token))
        assert decode_compact(refreshed.access_token).kid == decode_compact(pair.access_token).kid
        await client.login("alice", "alice-password")


async def test_a_wrong_key_encryption_key_stops_the_start_with_a_clear_error(
    redis_url: str, nats_url: str
) -> None:
    async with running_auth(auth_settings(redis_url, [nats_url])):
        pass
    with pytest.raises(ConfigurationError, match="AUTHMESH_KEY_ENCRYPTION_KEY"):
        async with AuthApp(
            auth_settings(redis_url, [nats_url], key_encryption_key="another-secret-0123456789")
        ):
            pass


async def test_redis_down_answers_unavailable_and_nothing_is_half_written(
    own_redis: RedisServer, nats_url: str
) -> None:
    async with running_auth(auth_settings(own_redis.url, [nats_url])) as (_, client):
        await client.create_user("bob", "bob-password")
        pair = await client.login("bob", "bob-password")
        admin = await client.admin_token()
        own_redis.kill()
        await expect_error(client.login("bob", "bob-password"), UNAVAILABLE, "STORE_UNAVAILABLE")
        await expect_error(
            client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token)),
            UNAVAILABLE,
            "STORE_UNAVAILABLE",
        )
        await expect_error(
            client.stub.RevokeSession(
                auth_pb2.RevokeSessionRequest(session_id=pair.session_id), metadata=bearer(admin)
            ),
            UNAVAILABLE,
            "STORE_UNAVAILABLE",
        )
        await own_redis.restart()

        async def serving() -> bool:
            try:
                await client.login("bob", "bob-password")
            except grpc.aio.AioRpcError:
                return False
            return True

        await eventually(serving, within=DEADLINE_SECONDS, what="the auth service to use the restarted Redis")
        # The refresh attempted during the outage did not spend the token: it works exactly once now.
        await client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token))
        await expect_error(
            client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token)),
            grpc.StatusCode.UNAUTHENTICATED,
            "REFRESH_TOKEN_REUSED",
        )


async def _stream_events(nats_url: str, subject: str) -> list[bytes]:
    """The payloads of every message in AUTH_EVENTS on ``subject``, read one by one by sequence."""
    client = await nats.connect(servers=[nats_url], connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = client.jetstream()
        info = await js.stream_info(STREAM_NAME)
        payloads: list[bytes] = []
        for sequence in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg(STREAM_NAME, sequence)
            if message.subject == subject and message.data is not None:
                payloads.append(message.data)
        return payloads
    finally:
        await client.close()


async def test_nats_down_fails_the_revocation_and_a_retry_broadcasts_it_once(
    redis_url: str, own_nats: NatsServer
) -> None:
    async with running_auth(auth_settings(redis_url, [own_nats.url])) as (_, client):
        await client.create_user("carol", "carol-password")
        pair = await client.login("carol", "carol-password")
        admin = await client.admin_token()
        request = auth_pb2.RevokeSessionRequest(session_id=pair.session_id, reason="stolen")
        await own_nats.stop()
        await expect_error(
            client.stub.RevokeSession(request, metadata=bearer(admin)), UNAVAILABLE, "BROKER_UNAVAILABLE"
        )
        await own_nats.start()

        async def revoked() -> bool:
            try:
                await client.stub.RevokeSession(request, metadata=bearer(admin))
            except grpc.aio.AioRpcError as error:
                if error.code() != UNAVAILABLE:
                    raise
                return False
            return True

        await eventually(revoked, within=DEADLINE_SECONDS, what="the retried revocation to succeed")
        payloads = await _stream_events(own_nats.url, EventType.SESSION_REVOKED.subject)
        sids = [decode_compact(p).unverified_payload["events"] for p in payloads]
        matching = [e for e in sids if pair.session_id in str(e)]
        assert len(matching) == 1


async def _decoded_events(nats_url: str, client: AuthClient) -> list[SecurityEvent]:
    """Every event in the stream, each verified against the JWK Set the auth service serves now."""
    jwks = parse_jwks((await client.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)

    class Keys:
        def public_key(self, kid: str) -> ec.EllipticCurvePublicKey:
            return jwks[kid]

    decoded = []
    for event_type in EventType:
        for payload in await _stream_events(nats_url, event_type.subject):
            decoded.append(decode_event(payload, event_type.subject, Keys(), "authmesh"))
    return decoded


async def test_every_event_is_a_set_that_verifies_against_the_jwk_set(redis_url: str, nats_url: str) -> None:
    async with running_auth(auth_settings(redis_url, [nats_url])) as (_, client):
        sub = await client.create_user("dave", "dave-password")
        one = await client.login("dave", "dave-password")
        two = await client.login("dave", "dave-password")
        await client.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=one.access_token), metadata=bearer(two.access_token)
        )
        await client.stub.RevokeSession(
            auth_pb2.RevokeSessionRequest(session_id=two.session_id), metadata=bearer(two.access_token)
        )
        admin = await client.admin_token()
        await client.stub.RevokeUser(auth_pb2.RevokeUserRequest(subject=sub), metadata=bearer(admin))

        async def heartbeat_seen() -> bool:
            return bool(await _stream_events(nats_url, EventType.HEARTBEAT.subject))

        await eventually(heartbeat_seen, within=DEADLINE_SECONDS, what="a heartbeat")
        bodies = [event.body for event in await _decoded_events(nats_url, client)]
        one_jti = decode_compact(one.access_token).unverified_payload["jti"]
        assert (
            TokenRevokedEvent(
                jti=one_jti, exp=int(decode_compact(one.access_token).unverified_payload["exp"])
            )
            in bodies
        )
        assert SessionRevokedEvent(sid=two.session_id, sub=sub) in bodies
        assert any(isinstance(b, UserRevokedEvent) and b.sub == sub for b in bodies)
        assert any(isinstance(b, HeartbeatEvent) for b in bodies)

        rotation = await client.stub.RotateSigningKey(
            auth_pb2.RotateSigningKeyRequest(retire_previous=True), metadata=bearer(admin)
        )
        # Key events are signed with the new key; everything signed with the retired one no longer
        # verifies against the JWK Set, which is why a starting replica loads SnapshotRevocations.
        jwks = parse_jwks((await client.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)
        key_events = []
        for event_type in (EventType.KEY_ROTATED, EventType.KEY_REVOKED):
            for payload in await _stream_events(nats_url, event_type.subject):
                assert decode_compact(payload).kid == rotation.kid
                key_events.append(payload)
        assert len(key_events) == 2
        assert rotation.previous_kid not in jwks


async def test_replicas_on_one_redis_share_keys_and_the_login_rate_limit(
    redis_url: str, nats_url: str
) -> None:
    first = auth_settings(redis_url, [nats_url], login_max_failures=4, instance="auth-a")
    second = auth_settings(redis_url, [nats_url], login_max_failures=4, instance="auth-b")
    async with running_auth(first) as (_, a), running_auth(second) as (_, b):
        await a.create_user("erin", "erin-password")
        admin = await a.admin_token()
        rotation = await a.stub.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=bearer(admin))
        token = (await b.login("erin", "erin-password")).access_token
        assert decode_compact(token).kid == rotation.kid
        assert (await b.introspect(token)).active
        for client in (a, b, a, b):
            await expect_error(client.login("erin", "wrong-pass"), grpc.StatusCode.UNAUTHENTICATED)
        await expect_error(
            b.login("erin", "erin-password"), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"
        )


async def test_sigterm_turns_health_not_serving_and_exits_cleanly(redis_url: str, nats_url: str) -> None:
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "AUTHMESH_REDIS_URL": redis_url,
        "AUTHMESH_NATS_URLS": nats_url,
        "AUTHMESH_GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
        "AUTHMESH_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        "AUTHMESH_KEY_ENCRYPTION_KEY": "sigterm-test-kek-0123456789",
        "AUTHMESH_SHUTDOWN_GRACE": "1",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authmesh.cli", "auth-server", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with auth_client(f"127.0.0.1:{grpc_port}") as client:
            health = health_pb2_grpc.HealthStub(client.channel)

            async def serving() -> bool:
                try:
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.aio.AioRpcError:
                    if process.returncode is not None:
                        pytest.fail(f"the auth service exited with {process.returncode}")
                    return False
                return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

            await eventually(serving, within=DEADLINE_SECONDS, what="the auth service to serve")
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), DEADLINE_SECONDS) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await asyncio.wait_for(process.wait(), DEADLINE_SECONDS)
