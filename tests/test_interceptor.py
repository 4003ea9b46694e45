"""The auth interceptor and the gRPC metrics interceptor on a real grpc.aio server over loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest

from authmesh._resource_service.documents import sample_documents
from authmesh._resource_service.servicer import POLICY, SERVICE_NAME, ResourceServicer
from authmesh._shared.denylist import Denylist
from authmesh._shared.errors import TokenMissing
from authmesh._shared.events import EventBody, SessionRevokedEvent, TokenRevokedEvent, UserRevokedEvent
from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.interceptor import Authenticator, AuthInterceptor, current_claims
from authmesh._shared.key_cache import KeyCache
from authmesh._shared.keys import jwks_json
from authmesh._shared.metrics import ServiceMetrics, VerificationMetrics
from authmesh._shared.scopes import AUTHENTICATED, OPEN_SERVICE_PREFIXES, AccessPolicy, ScopeRequirement
from authmesh._shared.staleness import Introspection, IntrospectionFallback, StalenessMonitor
from authmesh._shared.verifier import TokenVerifier, VerifierPolicy
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from tests.helpers_tokens import AUDIENCE, ISSUER, SigningKey, malleated, mint_access_token

DEADLINE = 10.0


class JwksServer:
    """The auth service's JWK Set as the key cache fetches it."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = {key.kid: key for key in keys}
        self.calls = 0
        self.down = False

    async def fetch(self) -> str:
        self.calls += 1
        if self.down:
            raise ConnectionError("auth service down")
        return jwks_json({kid: key.public_key for kid, key in self.keys.items()})


class Introspector:
    """Stands in for the auth service's Introspect answers."""

    def __init__(self) -> None:
        self.inactive: dict[str, str] = {}
        self.down = False
        self.calls = 0

    async def introspect(self, token: str) -> Introspection:
        self.calls += 1
        if self.down:
            raise ConnectionError("auth service down")
        reason = self.inactive.get(token)
        return Introspection(active=reason is None, inactive_reason=reason or "")


class ManualStaleness(StalenessMonitor):
    """A staleness monitor the test switches by hand."""

    def __init__(self) -> None:
        super().__init__(bound=3.0)
        self.stale = False

    @property
    def degraded(self) -> bool:
        return self.stale


class Stack:
    """A resource service's verification stack in front of the real servicer, health and reflection."""

    def __init__(
        self,
        *,
        fallback: bool = True,
        open_prefixes: tuple[str, ...] = OPEN_SERVICE_PREFIXES,
        cooldown: float = 0.05,
        policy: Mapping[str, ScopeRequirement] = POLICY,
    ) -> None:
        self.policy = policy
        self.key = SigningKey.generate("k1")
        self.jwks = JwksServer(self.key)
        self.keys = KeyCache(self.jwks.fetch, cooldown=cooldown, negative_ttl=60.0)
        self.denylist = Denylist(access_token_ttl=300, leeway=5)
        self.staleness = ManualStaleness()
        self.introspector = Introspector()
        self.fallback = IntrospectionFallback(self.introspector, max_age=3.0) if fallback else None
        self.is_ready = True
        self.metrics = ServiceMetrics("resource", "test")
        self.authenticator = Authenticator(
            TokenVerifier(self.keys, self.denylist, VerifierPolicy(issuer=ISSUER, audience=AUDIENCE)),
            self.keys,
            staleness=self.staleness,
            fallback=self.fallback,
            ready=lambda: self.is_ready,
            metrics=VerificationMetrics(self.metrics.registry),
        )
        self.open_prefixes = open_prefixes
        self.channel: grpc.aio.Channel | None = None

    def token(self, **claims: Any) -> str:
        return mint_access_token(self.key, int(time.time()), **claims)

    @property
    def resource(self) -> resource_pb2_grpc.ResourceServiceAsyncStub:
        assert self.channel is not None
        return resource_pb2_grpc.ResourceServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthAsyncStub:
        assert self.channel is not None
        return health_pb2_grpc.HealthStub(self.channel)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Stack]:
        server = grpc.aio.server(
            interceptors=[
                self.metrics.grpc_interceptor(),
                AuthInterceptor(
                    self.authenticator, AccessPolicy(self.policy, open_prefixes=self.open_prefixes)
                ),
            ]
        )
        resource_pb2_grpc.add_ResourceServiceServicer_to_server(
            ResourceServicer("replica-a", sample_documents()), server
        )
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                self.channel = channel
                yield self
        finally:
            await server.stop(None)
            await self.keys.aclose()


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[Stack]:
    stack = Stack(**options)
    await stack.keys.refresh()
    async with stack.serving() as running:
        yield running


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def refused(call: Any, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code
    assert error_reason(caught.value) == reason


async def test_a_call_without_a_token_is_unauthenticated() -> None:
    async with serving() as stack:
        await refused(
            stack.resource.WhoAmI(resource_pb2.WhoAmIRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_MISSING",
        )


async def test_a_valid_token_reaches_the_handler_with_its_claims() -> None:
    async with serving() as stack:
        reply = await stack.resource.WhoAmI(
            resource_pb2.WhoAmIRequest(), metadata=bearer(stack.token(sub="alice"))
        )
        assert reply.subject == "alice"
        assert reply.instance == "replica-a"
        assert list(reply.scopes) == ["docs:read", "openid"]


async def test_concurrent_calls_each_see_their_own_claims() -> None:
    async with serving() as stack:
        subjects = [f"user-{n}" for n in range(40)]
        replies = await asyncio.gather(
            *(
                stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(stack.token(sub=s)))
                for s in subjects
            )
        )
        assert [reply.subject for reply in replies] == subjects


def test_claims_are_not_available_outside_an_authenticated_call() -> None:
    with pytest.raises(TokenMissing):
        current_claims()


async def test_a_revoked_token_is_refused() -> None:
    async with serving() as stack:
        token = stack.token()
        reply = await stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token))
        # The verifier has cached this token by now: the revocation must apply to the cached entry too.
        stack.denylist.revoke_token(reply.token_id, int(time.time()) + 300)
        await refused(
            stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token)),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_REVOKED",
        )


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("token", "TOKEN_REVOKED"), ("session", "SESSION_REVOKED"), ("user", "USER_REVOKED")],
)
async def test_a_malleated_copy_of_a_revoked_token_is_refused_cached_or_not(kind: str, reason: str) -> None:
    # Issue 10.12: (r, n - s) is a second valid signature, so a thief can present a copy of a revoked
    # token that is a different string. Both copies of one token, and the original of another (whose
    # copy is first seen after the revocation), pass before it; after it, every one is refused, from
    # the verified-token cache (keyed by the exact string) or through the full path alike.
    async with serving() as stack:
        both = stack.token(sub="mallory", sid="session-m")
        only_original = stack.token(sub="mallory", sid="session-m")
        seen = [both, malleated(both), only_original]
        who_am_i = stack.resource.WhoAmI
        replies = [await who_am_i(resource_pb2.WhoAmIRequest(), metadata=bearer(token)) for token in seen]
        assert replies[0].token_id == replies[1].token_id
        now = time.time()
        bodies: dict[str, list[EventBody]] = {
            "token": [TokenRevokedEvent(jti=reply.token_id, exp=int(now) + 300) for reply in replies],
            "session": [SessionRevokedEvent(sid="session-m", sub="mallory")],
            "user": [UserRevokedEvent(sub="mallory", not_before_ms=int(now * 1000))],
        }
        for body in bodies[kind]:
            stack.denylist.apply_body(body, occurred_at=now)
        for token in [*seen, malleated(only_original)]:
            await refused(
                stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token)),
                grpc.StatusCode.UNAUTHENTICATED,
                reason,
            )


async def test_while_degraded_a_malleated_copy_gets_its_originals_introspection_answer() -> None:
    # The introspection answers are keyed by the verified jti, not the token string: the copy of a
    # token Introspect called inactive is refused with the same answer, without asking again.
    async with serving() as stack:
        token = stack.token()
        stack.introspector.inactive[token] = "TOKEN_REVOKED"
        stack.staleness.stale = True
        for presented in (token, malleated(token)):
            await refused(
                stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(presented)),
                grpc.StatusCode.UNAUTHENTICATED,
                "TOKEN_REVOKED",
            )
        assert stack.introspector.calls == 1


async def test_refusals_for_different_reasons_on_one_method_each_keep_their_own_status() -> None:
    # Refusal handlers are built once per method and reason and then reused: a reused one must never
    # answer with another reason's status, nor stop a valid token from getting through.
    async with serving() as stack:
        valid = stack.token(sub="alice")
        revoked = stack.token(sub="mallory")
        reply = await stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(revoked))
        stack.denylist.revoke_token(reply.token_id, int(time.time()) + 300)
        expired = mint_access_token(stack.key, int(time.time()) - 3600)
        expected = [
            (revoked, "TOKEN_REVOKED"),
            (expired, "TOKEN_EXPIRED"),
            (None, "TOKEN_MISSING"),
            (valid, None),
        ]
        for _ in range(3):
            for token, reason in expected:
                call = stack.resource.WhoAmI(
                    resource_pb2.WhoAmIRequest(), metadata=bearer(token) if token else ()
                )
                if reason is None:
                    assert (await call).subject == "alice"
                else:
                    await refused(call, grpc.StatusCode.UNAUTHENTICATED, reason)
        counted = {
            reason: stack.metric("authmesh_token_verifications_total", result="rejected", reason=reason)
            for reason in ("TOKEN_REVOKED", "TOKEN_EXPIRED", "TOKEN_MISSING")
        }
        assert counted == {"TOKEN_REVOKED": 3, "TOKEN_EXPIRED": 3, "TOKEN_MISSING": 3}


async def test_an_expired_token_is_refused() -> None:
    async with serving() as stack:
        old = mint_access_token(stack.key, int(time.time()) - 3600)
        await refused(
            stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(old)),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_EXPIRED",
        )


async def test_a_method_needing_a_scope_refuses_a_token_without_it() -> None:
    async with serving() as stack:
        token = stack.token(scope="openid")
        await stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token))
        await refused(
            stack.resource.GetDocument(resource_pb2.GetDocumentRequest(id="welcome"), metadata=bearer(token)),
            grpc.StatusCode.PERMISSION_DENIED,
            "INSUFFICIENT_SCOPE",
        )
        document = await stack.resource.GetDocument(
            resource_pb2.GetDocumentRequest(id="welcome"), metadata=bearer(stack.token())
        )
        assert document.id == "welcome"


async def test_health_and_reflection_need_no_token() -> None:
    async with serving() as stack:
        reply = await stack.health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflect(stack)
        names = [
            service.name
            async for response in responses
            for service in response.list_services_response.service
        ]
        assert SERVICE_NAME in names


async def test_streaming_methods_that_are_not_open_are_refused_like_unary_ones() -> None:
    watch_too = {**POLICY, "/grpc.health.v1.Health/Watch": AUTHENTICATED}
    async with serving(open_prefixes=(), policy=watch_too) as stack:
        await refused(
            stack.health.Check(health_pb2.HealthCheckRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_MISSING",
        )
        watch = stack.health.Watch(health_pb2.HealthCheckRequest())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in watch:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        responses = reflect(stack)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in responses:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        first = await asyncio.wait_for(
            anext(aiter(stack.health.Watch(health_pb2.HealthCheckRequest(), metadata=bearer(stack.token())))),
            DEADLINE,
        )
        assert first.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_token_from_a_newly_published_key_is_accepted_after_one_refetch() -> None:
    async with serving() as stack:
        rotated = SigningKey.generate("k2")
        stack.jwks.keys["k2"] = rotated
        calls = stack.jwks.calls
        token = mint_access_token(rotated, int(time.time()))
        reply = await stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token))
        assert reply.subject == "user-1"
        assert stack.jwks.calls == calls + 1


async def test_a_flood_of_tokens_with_made_up_kids_costs_one_key_fetch() -> None:
    # A cooldown longer than the flood takes to arrive, however slow the machine: one round serves it.
    async with serving(cooldown=2.0) as stack:
        calls = stack.jwks.calls
        forged = [mint_access_token(SigningKey.generate(f"made-up-{n}"), int(time.time())) for n in range(50)]
        results = await asyncio.gather(
            *(stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(t)) for t in forged),
            return_exceptions=True,
        )
        assert all(isinstance(r, grpc.aio.AioRpcError) and error_reason(r) == "KEY_UNKNOWN" for r in results)
        assert stack.jwks.calls - calls <= 2  # one, or two if the flood straddles a cooldown
        await refused(
            stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(forged[0])),
            grpc.StatusCode.UNAUTHENTICATED,
            "KEY_UNKNOWN",
        )


async def test_an_unknown_key_while_the_key_source_is_down_is_unavailable_not_unauthenticated() -> None:
    async with serving() as stack:
        stack.jwks.down = True
        token = mint_access_token(SigningKey.generate("k-new"), int(time.time()))
        await refused(
            stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token)),
            grpc.StatusCode.UNAVAILABLE,
            "KEYS_UNAVAILABLE",
        )


async def test_nothing_is_served_until_the_revocation_state_has_caught_up() -> None:
    async with serving() as stack:
        stack.is_ready = False
        await refused(
            stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(stack.token())),
            grpc.StatusCode.UNAVAILABLE,
            "REVOCATION_STATE_STALE",
        )
        stack.is_ready = True
        await stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(stack.token()))


async def test_while_degraded_tokens_are_confirmed_with_introspect_and_the_answer_is_cached() -> None:
    async with serving() as stack:
        stack.staleness.stale = True
        token = stack.token()
        for _ in range(3):
            await stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token))
        assert stack.introspector.calls == 1
        assert (
            stack.metric("authmesh_token_verifications_total", result="accepted", reason="INTROSPECTED") == 3
        )


async def test_while_degraded_a_token_introspect_calls_inactive_is_refused() -> None:
    async with serving() as stack:
        token = stack.token()
        await stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token))
        stack.introspector.inactive[token] = "SESSION_REVOKED"
        stack.staleness.stale = True
        await refused(
            stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token)),
            grpc.StatusCode.UNAUTHENTICATED,
            "SESSION_REVOKED",
        )


async def test_while_degraded_and_introspect_fails_every_call_is_unavailable() -> None:
    async with serving() as stack:
        stack.staleness.stale = True
        stack.introspector.down = True
        await refused(
            stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(stack.token())),
            grpc.StatusCode.UNAVAILABLE,
            "REVOCATION_STATE_STALE",
        )
        stack.staleness.stale = False  # fresh again: local verification alone decides
        await stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(stack.token()))


async def test_while_degraded_without_a_fallback_every_call_is_unavailable() -> None:
    async with serving(fallback=False) as stack:
        stack.staleness.stale = True
        await refused(
            stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(stack.token())),
            grpc.StatusCode.UNAVAILABLE,
            "REVOCATION_STATE_STALE",
        )


async def test_the_metrics_interceptor_counts_calls_by_method_and_code() -> None:
    async with serving() as stack:
        await stack.resource.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(stack.token()))
        with pytest.raises(grpc.aio.AioRpcError):
            await stack.resource.WhoAmI(resource_pb2.WhoAmIRequest())
        with pytest.raises(grpc.aio.AioRpcError):
            await stack.resource.GetDocument(
                resource_pb2.GetDocumentRequest(id="nope"), metadata=bearer(stack.token())
            )
        labels = {"grpc_type": "unary", "grpc_service": SERVICE_NAME}
        assert stack.metric("grpc_server_started_total", grpc_method="WhoAmI", **labels) == 2
        assert stack.metric("grpc_server_handled_total", grpc_method="WhoAmI", grpc_code="OK", **labels) == 1
        assert (
            stack.metric(
                "grpc_server_handled_total", grpc_method="WhoAmI", grpc_code="UNAUTHENTICATED", **labels
            )
            == 1
        )
        assert (
            stack.metric(
                "grpc_server_handled_total", grpc_method="GetDocument", grpc_code="NOT_FOUND", **labels
            )
            == 1
        )
        assert stack.metric("grpc_server_handling_seconds_count", grpc_method="WhoAmI", **labels) == 2
        assert (
            stack.metric("authmesh_token_verifications_total", result="rejected", reason="TOKEN_MISSING") == 1
        )
        text = generate_latest(stack.metrics.registry).decode()
        assert 'authmesh_service_info{instance="test",service="resource"} 1.0' in text


async def test_the_metrics_interceptor_counts_streamed_messages() -> None:
    async with serving() as stack:
        replies = [reply async for reply in reflect(stack)]
        assert len(replies) == 1
        labels = {
            "grpc_type": "bidi_stream",
            "grpc_service": "grpc.reflection.v1alpha.ServerReflection",
            "grpc_method": "ServerReflectionInfo",
        }
        await _poll(lambda: stack.metric("grpc_server_handled_total", grpc_code="OK", **labels) == 1)
        assert stack.metric("grpc_server_msg_received_total", **labels) == 1
        assert stack.metric("grpc_server_msg_sent_total", **labels) == 1


async def test_the_metrics_interceptor_records_a_cancelled_stream() -> None:
    async with serving() as stack:
        watch = stack.health.Watch(health_pb2.HealthCheckRequest())
        first = await asyncio.wait_for(anext(aiter(watch)), DEADLINE)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        labels = {
            "grpc_type": "server_stream",
            "grpc_service": "grpc.health.v1.Health",
            "grpc_method": "Watch",
        }
        await _poll(lambda: stack.metric("grpc_server_handled_total", grpc_code="CANCELLED", **labels) == 1)


def reflect(stack: Stack, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    """A reflection call listing the services."""
    assert stack.channel is not None
    reflector = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    return reflector.ServerReflectionInfo(iter([request]), metadata=metadata)


async def _poll(condition: Callable[[], bool], within: float = DEADLINE) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)
