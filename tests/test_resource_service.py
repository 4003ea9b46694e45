"""A resource-service replica end to end: real NATS, real gRPC and HTTP, a stand-in auth service.

The stand-in answers the four calls a replica makes (``GetJwks``, ``Login``/``Refresh`` for its service
account, ``Introspect``, ``SnapshotRevocations``) from a test signing key; the events on the stream are
signed with the same key. Scenarios with the real auth service live in ``tests/integration``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authmesh._resource_service.app import ResourceApp
from authmesh._shared.claims import new_uuid7
from authmesh._shared.events import (
    EventBody,
    HeartbeatEvent,
    SecurityEvent,
    SessionRevokedEvent,
    TokenRevokedEvent,
    UserRevokedEvent,
    encode_event,
)
from authmesh._shared.grpc_errors import bearer_token, error_reason
from authmesh._shared.keys import jwks_json
from authmesh._shared.nats_wiring import ensure_stream
from authmesh._shared.settings import ResourceSettings
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from tests.helpers_tokens import ISSUER, SigningKey, mint_access_token

DEADLINE = 15.0
SERVICE_ACCOUNT = ("svc-resource", "service-password-1")
Context = grpc.aio.ServicerContext[Any, Any]


class StandInAuth(auth_pb2_grpc.AuthServiceServicer):
    """The parts of the auth service a replica calls, answered from one test key."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key
        self.jwks_gate = asyncio.Event()
        self.jwks_gate.set()
        self.inactive: dict[str, str] = {}
        self.snapshot: auth_pb2.RevocationSnapshotChunk | None = None
        self.introspections = 0
        self.logins = 0

    async def GetJwks(self, request: auth_pb2.GetJwksRequest, context: Context) -> auth_pb2.GetJwksResponse:
        await self.jwks_gate.wait()
        return auth_pb2.GetJwksResponse(jwks_json=jwks_json({self.key.kid: self.key.public_key}))

    async def Login(self, request: auth_pb2.LoginRequest, context: Context) -> auth_pb2.TokenPair:
        if (request.username, request.password) != SERVICE_ACCOUNT:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid username or password")
        self.logins += 1
        return self._pair()

    async def Refresh(self, request: auth_pb2.RefreshRequest, context: Context) -> auth_pb2.TokenPair:
        return self._pair()

    async def Introspect(
        self, request: auth_pb2.IntrospectRequest, context: Context
    ) -> auth_pb2.IntrospectResponse:
        await self._require_service(context)
        self.introspections += 1
        reason = self.inactive.get(request.token)
        if reason is not None:
            return auth_pb2.IntrospectResponse(active=False, inactive_reason=reason)
        return auth_pb2.IntrospectResponse(active=True, subject="user-1")

    async def SnapshotRevocations(
        self, request: auth_pb2.SnapshotRevocationsRequest, context: Context
    ) -> AsyncIterator[auth_pb2.RevocationSnapshotChunk]:
        await self._require_service(context)
        if self.snapshot is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no snapshot")
        assert self.snapshot is not None
        yield self.snapshot

    async def _require_service(self, context: Context) -> None:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bearer token missing")

    def _pair(self) -> auth_pb2.TokenPair:
        return auth_pb2.TokenPair(
            access_token=mint_access_token(self.key, int(time.time()), sub="svc", scope="service"),
            refresh_token=secrets.token_urlsafe(16),
            token_type="Bearer",
            expires_in=300,
        )


class Stack:
    """NATS (the session's), the stand-in auth service, and a way to publish signed events."""

    def __init__(self, nats_url: str, auth: StandInAuth, server: grpc.aio.Server, port: int, js: Any) -> None:
        self.nats_url = nats_url
        self.auth = auth
        self.server = server
        self.auth_address = f"127.0.0.1:{port}"
        self.js = js
        self.key = auth.key

    async def stop_auth(self) -> None:
        await self.server.stop(None)

    def settings(self, **overrides: Any) -> ResourceSettings:
        values: dict[str, Any] = {
            "nats_urls": [self.nats_url],
            "grpc_listen": "127.0.0.1:0",
            "http_listen": "127.0.0.1:0",
            "auth_target": self.auth_address,
            "service_account": ":".join(SERVICE_ACCOUNT),
            "instance": "replica-test",
            "staleness_bound": 3.0,
            "shutdown_grace": 0.2,
        }
        values.update(overrides)
        return ResourceSettings(**values)

    def token(self, **claims: Any) -> str:
        return mint_access_token(self.key, int(time.time()), **claims)

    async def publish(self, body: EventBody) -> int:
        event = SecurityEvent.new(body, ISSUER, origin="test")
        data = encode_event(event, self.key.private_key, self.key.kid)
        ack = await self.js.publish(event.type.subject, data, headers={"Nats-Msg-Id": event.event_id})
        return int(ack.seq)


@asynccontextmanager
async def stack_on(nats_url: str) -> AsyncIterator[Stack]:
    auth = StandInAuth(SigningKey.generate("k1"))  # type: ignore[abstract]  # answers what replicas call
    server = grpc.aio.server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(auth, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = await nats.connect(servers=[nats_url], connect_timeout=2)
    try:
        js = client.jetstream(timeout=5)
        stack = Stack(nats_url, auth, server, port, js)
        await ensure_stream(js, stack.settings())
        yield stack
    finally:
        await client.close()
        await server.stop(None)


@asynccontextmanager
async def replica(stack: Stack, **overrides: Any) -> AsyncIterator[tuple[ResourceApp, Client]]:
    async with (
        ResourceApp(stack.settings(**overrides)) as app,
        grpc.aio.insecure_channel(app.grpc_address) as channel,
    ):
        yield app, Client(channel, app.http_address)


class Client:
    """Calls a replica the way its users do."""

    def __init__(self, channel: grpc.aio.Channel, http_address: str) -> None:
        self.resource = resource_pb2_grpc.ResourceServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.http_address = http_address

    async def whoami(self, token: str) -> resource_pb2.WhoAmIResponse:
        return await self.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token), timeout=5)

    async def health_status(self) -> int:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)

    async def serving(self) -> None:
        await poll_async(lambda: self._is_serving())

    async def _is_serving(self) -> bool:
        return bool(await self.health_status() == health_pb2.HealthCheckResponse.SERVING)

    async def http(self, path: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://{self.http_address}{path}") as response,
        ):
            return response.status, await response.text()


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def refused(call: Any, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert error_reason(caught.value) == reason


async def poll_async(condition: Callable[[], Awaitable[bool]], within: float = DEADLINE) -> None:
    """Wait until the awaitable ``condition()`` is true, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)


async def poll(condition: Callable[[], bool], within: float = DEADLINE) -> None:
    """Wait until ``condition()`` is true, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def heartbeats(stack: Stack, every: float = 0.2) -> AsyncIterator[None]:
    """Publish heartbeats like the auth service while the block runs."""

    async def beat() -> None:
        for seq in range(100_000):
            await stack.publish(HeartbeatEvent(seq=seq))
            await asyncio.sleep(every)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_replica_serves_nothing_until_it_has_caught_up(nats_url: str) -> None:
    async with stack_on(nats_url) as stack:
        stack.auth.jwks_gate.clear()  # keys cannot be had yet: the replica cannot catch up
        async with replica(stack) as (app, client):
            assert await client.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
            await refused(client.whoami(stack.token()), grpc.StatusCode.UNAVAILABLE, "REVOCATION_STATE_STALE")
            status, _ = await client.http("/healthz")
            assert status == 503
            stack.auth.jwks_gate.set()
            await client.serving()
            assert app.ready
            assert (await client.whoami(stack.token())).subject == "user-1"


async def test_who_am_i_names_the_caller_and_the_replica(nats_url: str) -> None:
    async with stack_on(nats_url) as stack, replica(stack, instance="replica-7") as (_, client):
        await client.serving()
        reply = await client.whoami(stack.token(sub="alice", sid="s-9"))
        assert (reply.subject, reply.session_id, reply.instance) == ("alice", "s-9", "replica-7")
        assert list(reply.scopes) == ["docs:read", "openid"]


async def test_get_document_needs_docs_read_and_a_known_id(nats_url: str) -> None:
    async with stack_on(nats_url) as stack, replica(stack) as (_, client):
        await client.serving()
        document = await client.resource.GetDocument(
            resource_pb2.GetDocumentRequest(id="welcome"), metadata=bearer(stack.token())
        )
        assert (document.id, document.owner) == ("welcome", "authmesh")
        await refused(
            client.resource.GetDocument(
                resource_pb2.GetDocumentRequest(id="missing"), metadata=bearer(stack.token())
            ),
            grpc.StatusCode.NOT_FOUND,
            "DOCUMENT_NOT_FOUND",
        )
        await refused(
            client.resource.GetDocument(
                resource_pb2.GetDocumentRequest(id="welcome"), metadata=bearer(stack.token(scope="openid"))
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "INSUFFICIENT_SCOPE",
        )
        await refused(
            client.resource.GetDocument(
                resource_pb2.GetDocumentRequest(id=""), metadata=bearer(stack.token())
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "FIELD_INVALID",
        )


async def test_revocations_on_the_stream_are_refused_at_once(nats_url: str) -> None:
    async with stack_on(nats_url) as stack, replica(stack) as (_, client), heartbeats(stack):
        await client.serving()
        token, in_session, of_user = stack.token(), stack.token(sid="s-2"), stack.token(sub="u-3")
        reply = await client.whoami(token)
        for accepted in (in_session, of_user):
            await client.whoami(accepted)
        await stack.publish(TokenRevokedEvent(jti=reply.token_id, exp=int(time.time()) + 300))
        await stack.publish(SessionRevokedEvent(sid="s-2", sub="user-1"))
        await stack.publish(UserRevokedEvent(sub="u-3", not_before_ms=int(time.time() * 1000)))
        for revoked, reason in (
            (token, "TOKEN_REVOKED"),
            (in_session, "SESSION_REVOKED"),
            (of_user, "USER_REVOKED"),
        ):
            await poll_async(refusal_of(client, revoked))
            await refused(client.whoami(revoked), grpc.StatusCode.UNAUTHENTICATED, reason)
        await client.whoami(stack.token())


async def test_a_replica_started_after_revocations_refuses_them_from_its_first_call(nats_url: str) -> None:
    async with stack_on(nats_url) as stack:
        replayed, from_snapshot = stack.token(), stack.token(sid="s-snap")
        replayed_jti = _jti(replayed)
        sequence = await stack.publish(TokenRevokedEvent(jti=replayed_jti, exp=int(time.time()) + 300))
        # Without a snapshot the replica replays the stream.
        async with replica(stack, service_account=None) as (_, client):
            await client.serving()
            await refused(client.whoami(replayed), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
        # With one it loads the snapshot and consumes only what follows.
        stack.auth.snapshot = auth_pb2.RevocationSnapshotChunk(
            tokens=[auth_pb2.RevokedToken(jti=replayed_jti, exp=int(time.time()) + 300)],
            sessions=[auth_pb2.RevokedSession(sid="s-snap", sub="user-1")],
            stream_sequence=sequence,
        )
        async with replica(stack) as (app, client):
            await client.serving()
            await refused(client.whoami(replayed), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
            await refused(client.whoami(from_snapshot), grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
            assert app.consumer.applied == 0  # nothing before the snapshot's sequence was read again
            assert stack.auth.logins == 1


async def test_without_heartbeats_a_replica_is_degraded_and_asks_introspect(nats_url: str) -> None:
    async with stack_on(nats_url) as stack, replica(stack, staleness_bound=0.5) as (app, client):
        await client.serving()
        async with heartbeats(stack, every=0.1):
            await poll(lambda: not app.staleness.degraded)
            await client.whoami(stack.token())
            assert stack.auth.introspections == 0
        await poll(lambda: app.staleness.degraded)
        token = stack.token()
        await client.whoami(token)
        assert stack.auth.introspections == 1
        stack.auth.inactive[token] = "TOKEN_REVOKED"
        await poll_async(refusal_of(client, token))  # once the cached answer has aged out
        status, body = await client.http("/healthz")
        assert status == 200
        assert '"degraded": true' in body


async def test_a_degraded_replica_whose_auth_service_is_unreachable_refuses_every_call(nats_url: str) -> None:
    async with stack_on(nats_url) as stack, replica(stack, staleness_bound=0.3) as (app, client):
        await client.serving()
        await poll(lambda: app.staleness.degraded)
        await client.whoami(stack.token())  # Introspect still answers
        await stack.stop_auth()
        await refused(client.whoami(stack.token()), grpc.StatusCode.UNAVAILABLE, "REVOCATION_STATE_STALE")


async def test_metrics_and_healthz_describe_the_replica(nats_url: str) -> None:
    async with stack_on(nats_url) as stack, replica(stack) as (app, client), heartbeats(stack, every=0.1):
        await client.serving()
        reply = await client.whoami(stack.token())
        await stack.publish(TokenRevokedEvent(jti=reply.token_id, exp=int(time.time()) + 300))
        await poll(lambda: len(app.denylist) == 1)
        await stack.js.publish("auth.events.revoked.token", b"forged", headers={"Nats-Msg-Id": new_uuid7()})
        await poll(lambda: app.consumer.rejected == 1)
        status, text = await client.http("/metrics")
        assert status == 200
        for line in (
            'authmesh_token_verifications_total{reason="LOCAL",result="accepted"}',
            'authmesh_denylist_entries{kind="tokens"} 1.0',
            "authmesh_revocation_propagation_lag_seconds_count",
            "authmesh_revocation_staleness_seconds",
            "authmesh_revocation_degraded",
            'authmesh_revocation_events_rejected_total{reason="malformed_token"} 1.0',
            'grpc_server_handled_total{grpc_code="OK",grpc_method="WhoAmI"',
            'authmesh_service_info{instance="replica-test",service="resource"} 1.0',
        ):
            assert line in text, line
        status, body = await client.http("/healthz")
        assert status == 200
        assert '"ready": true' in body


async def test_the_replica_listens_where_it_says_and_stops_serving_on_close(nats_url: str) -> None:
    async with stack_on(nats_url) as stack:
        app = ResourceApp(stack.settings())
        async with app:
            assert not app.grpc_address.endswith(":0")
            assert not app.http_address.endswith(":0")
            async with grpc.aio.insecure_channel(app.grpc_address) as channel:
                client = Client(channel, app.http_address)
                await client.serving()
        async with grpc.aio.insecure_channel(app.grpc_address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await Client(channel, app.http_address).health_status()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def refusal_of(client: Client, token: str) -> Callable[[], Awaitable[bool]]:
    """A condition: the replica now refuses ``token`` as unauthenticated."""

    async def refused_now() -> bool:
        try:
            await client.whoami(token)
        except grpc.aio.AioRpcError as error:
            return bool(error.code() == grpc.StatusCode.UNAUTHENTICATED)
        return False

    return refused_now


def _jti(token: str) -> str:
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(decoded["jti"])
