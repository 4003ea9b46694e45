"""ResourceGuard: one object protects a grpc.aio and a sync grpc.server service against a real auth service.

Every test here runs the real auth service in this process (Redis and NATS of the session), a real gRPC
server protected by the guard, and calls it over a real channel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, cast

import grpc
import pytest
from pydantic import SecretStr

from authmesh import (
    AUTHENTICATED,
    AccessClaims,
    ConfigurationError,
    ResourceGuard,
    ResourceSettings,
    ScopeRequirement,
    current_claims,
)
from authmesh._auth_service.app import AuthApp
from authmesh._resource_service.documents import sample_documents
from authmesh._resource_service.servicer import GET_DOCUMENT, SERVICE_NAME, WHO_AM_I, ResourceServicer
from authmesh._shared.dpop import LOGIN_METHOD, DpopMode, ProofGate, ProofPolicy, ProofSigner, ProofVerifier
from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.jose import decode_compact
from authmesh._shared.verifier import TokenVerifier, VerifierPolicy
from authmesh.auth.v1 import auth_pb2
from authmesh.processes import free_port
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from tests.auth_support import SERVICE, AuthClient, auth_settings, bearer, running_auth
from tests.helpers_tokens import AUDIENCE, ISSUER, NOW, SigningKey, StaticKeys, mint_access_token
from tests.waiting import eventually

AUTH_TTL = 900
CALL_TIMEOUT = 5.0
POLICY = {WHO_AM_I: AUTHENTICATED, GET_DOCUMENT: ScopeRequirement(all_of={"docs:read"})}


def guard_for(auth: AuthApp, nats_url: str, **overrides: Any) -> ResourceGuard:
    arguments: dict[str, Any] = {
        "auth_target": auth.grpc_address,
        "auth_url": f"http://{auth.http_address}",
        "nats_urls": [nats_url],
        "service_account": SERVICE,
        "staleness_bound": 3.0,
    }
    arguments.update(overrides)
    return ResourceGuard(**arguments)


@asynccontextmanager
async def auth_service(redis_url: str, nats_url: str) -> AsyncIterator[tuple[AuthApp, AuthClient]]:
    settings = auth_settings(redis_url, [nats_url], access_token_ttl=AUTH_TTL)
    async with running_auth(settings) as running:
        yield running


async def user_pair(client: AuthClient, scopes: tuple[str, ...]) -> auth_pb2.TokenPair:
    name = f"user-{time.monotonic_ns()}"
    await client.create_user(name, "password-of-a-user-1", scopes)
    return await client.login(name, "password-of-a-user-1")


async def revoke_session(client: AuthClient, pair: auth_pb2.TokenPair) -> None:
    await client.stub.RevokeSession(
        auth_pb2.RevokeSessionRequest(session_id=pair.session_id, reason="test"),
        metadata=bearer(pair.access_token),
        timeout=10,
    )


def reason_of(call: Any) -> str:
    """``OK`` or the reason (else the status name) of a sync call's failure."""
    try:
        call()
    except grpc.RpcError as error:
        return error_reason(error) or cast(grpc.Call, error).code().name
    return "OK"


# --- what cannot be built -----------------------------------------------------------------------------


def test_a_guard_without_a_revocation_source_is_refused_unless_called_unsafe() -> None:
    with pytest.raises(ConfigurationError, match="unsafe_without_revocation"):
        ResourceGuard(auth_target="127.0.0.1:1", auth_url="http://127.0.0.1:1")
    ResourceGuard(auth_target="127.0.0.1:1", auth_url="http://127.0.0.1:1", unsafe_without_revocation=True)


def test_a_guard_without_the_auth_service_metadata_needs_the_rules_given() -> None:
    with pytest.raises(ConfigurationError, match="auth_url"):
        ResourceGuard(auth_target="127.0.0.1:1", nats_urls=["nats://127.0.0.1:1"], issuer="authmesh")


def test_a_policy_naming_a_method_the_service_lacks_is_an_error_when_the_interceptor_is_built() -> None:
    guard = ResourceGuard(
        auth_target="127.0.0.1:1", auth_url="http://127.0.0.1:1", unsafe_without_revocation=True
    )
    misspelt = {f"/{SERVICE_NAME}/GetDocuments": AUTHENTICATED}
    with pytest.raises(ConfigurationError, match="has no method GetDocuments"):
        guard.aio_interceptor(misspelt)
    with pytest.raises(ConfigurationError, match="has no method GetDocuments"):
        guard.sync_interceptor(misspelt)
    with pytest.raises(ConfigurationError, match="no service"):
        guard.aio_interceptor({"/acme.Nope/Get": AUTHENTICATED})


def test_any_of_and_all_of_requirements() -> None:
    def claims(scope: str) -> AccessClaims:
        key = SigningKey.generate("k1")
        verifier = TokenVerifier(
            StaticKeys(key), _Nothing(), VerifierPolicy(issuer=ISSUER, audience=AUDIENCE)
        )
        return verifier.verify(mint_access_token(key, int(time.time()), scope=scope))

    either = ScopeRequirement(any_of={"docs:read", "docs:admin"})
    both = ScopeRequirement(all_of={"docs:read", "docs:write"})
    either.check(claims("docs:admin"))
    both.check(claims("docs:write docs:read"))
    with pytest.raises(Exception, match="docs:admin or docs:read"):
        either.check(claims("other"))
    with pytest.raises(Exception, match="docs:write"):
        both.check(claims("docs:read"))


def test_a_token_that_claims_to_live_longer_than_the_auth_service_issues_is_refused() -> None:
    key = SigningKey.generate("k1")
    policy = VerifierPolicy(issuer=ISSUER, audience=AUDIENCE, max_lifetime=300)
    verifier = TokenVerifier(StaticKeys(key), _Nothing(), policy, clock=lambda: NOW + 1)
    verifier.verify(mint_access_token(key, NOW, exp=NOW + 300))
    with pytest.raises(Exception, match="lives longer") as caught:
        verifier.verify(mint_access_token(key, NOW, exp=NOW + 301))
    assert getattr(caught.value, "code", None) == "INVALID_CLAIM"


class _Nothing:
    def check(self, claims: AccessClaims) -> None:
        pass


# --- the rules come from the auth service -------------------------------------------------------------


async def test_issuer_audience_and_lifetime_are_read_from_the_auth_service(
    redis_url: str, nats_url: str
) -> None:
    async with auth_service(redis_url, nats_url) as (auth, _):
        settings = ResourceSettings(
            auth_target=auth.grpc_address,
            auth_url=f"http://{auth.http_address}",
            nats_urls=[nats_url],
            service_account=SecretStr(":".join(SERVICE)),
        )
        async with ResourceGuard.from_env(settings) as guard:
            assert (guard.rules.issuer, guard.rules.access_token_ttl) == (auth.settings.issuer, AUTH_TTL)
            assert guard.denylist is not None
            assert guard.denylist.retention >= AUTH_TTL


async def test_a_lifetime_set_here_that_differs_from_the_auth_service_stops_the_start(
    redis_url: str, nats_url: str
) -> None:
    async with auth_service(redis_url, nats_url) as (auth, _):
        with pytest.raises(ConfigurationError, match="access_token_ttl is 300"):
            async with guard_for(auth, nats_url, access_token_ttl=300):
                pass
        with pytest.raises(ConfigurationError, match="audience"):
            async with guard_for(auth, nats_url, audience="someone-else"):
                pass


# --- grpc.aio -----------------------------------------------------------------------------------------


@asynccontextmanager
async def aio_server(
    interceptor: grpc.aio.ServerInterceptor,
) -> AsyncIterator[resource_pb2_grpc.ResourceServiceAsyncStub]:
    server = grpc.aio.server(interceptors=[interceptor])
    resource_pb2_grpc.add_ResourceServiceServicer_to_server(
        ResourceServicer("aio", sample_documents()), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield resource_pb2_grpc.ResourceServiceStub(channel)
    finally:
        await server.stop(None)


async def aio_reason(call: Any) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error_reason(error) or error.code().name
    return "OK"


async def test_an_aio_service_is_protected_per_method_and_hears_a_revocation(
    redis_url: str, nats_url: str
) -> None:
    async with auth_service(redis_url, nats_url) as (auth, client), guard_for(auth, nats_url) as guard:
        reader, other = await user_pair(client, ("docs:read",)), await user_pair(client, ())
        only_whoami = {WHO_AM_I: AUTHENTICATED}
        async with (
            aio_server(guard.aio_interceptor(POLICY)) as stub,
            aio_server(guard.aio_interceptor(only_whoami)) as narrow,
        ):
            me = await stub.WhoAmI(
                resource_pb2.WhoAmIRequest(), metadata=bearer(reader.access_token), timeout=5
            )
            assert me.session_id == reader.session_id
            document = resource_pb2.GetDocumentRequest(id="doc-1")
            assert await aio_reason(
                stub.GetDocument(document, metadata=bearer(other.access_token), timeout=5)
            ) == ("INSUFFICIENT_SCOPE")
            assert await aio_reason(stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=5)) == "TOKEN_MISSING"
            not_listed = narrow.GetDocument(document, metadata=bearer(reader.access_token), timeout=5)
            assert await aio_reason(not_listed) == "METHOD_NOT_IN_POLICY"

            await revoke_session(client, reader)

            async def refused() -> bool:
                call = stub.WhoAmI(
                    resource_pb2.WhoAmIRequest(), metadata=bearer(reader.access_token), timeout=5
                )
                return await aio_reason(call) == "SESSION_REVOKED"

            await eventually(refused, within=10, what="the revocation to reach the aio service")


# --- sync grpc.server ---------------------------------------------------------------------------------


class SyncResourceServicer(resource_pb2_grpc.ResourceServiceServicer):
    """A sync handler reads the verified claims the same way an async one does."""

    def WhoAmI(
        self, request: resource_pb2.WhoAmIRequest, context: grpc.ServicerContext
    ) -> resource_pb2.WhoAmIResponse:
        claims = current_claims()
        return resource_pb2.WhoAmIResponse(subject=claims.sub, session_id=claims.sid, instance="sync")

    def GetDocument(
        self, request: resource_pb2.GetDocumentRequest, context: grpc.ServicerContext
    ) -> resource_pb2.Document:
        return resource_pb2.Document(id=request.id, owner=current_claims().sub, body="sync")


@contextmanager
def sync_server(interceptor: grpc.ServerInterceptor) -> Iterator[resource_pb2_grpc.ResourceServiceStub]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    server = grpc.server(pool, interceptors=[interceptor])
    resource_pb2_grpc.add_ResourceServiceServicer_to_server(SyncResourceServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield resource_pb2_grpc.ResourceServiceStub(channel)
    finally:
        server.stop(None).wait(5)
        pool.shutdown(wait=False)


async def test_a_sync_service_is_protected_and_hears_a_revocation(redis_url: str, nats_url: str) -> None:
    async with auth_service(redis_url, nats_url) as (auth, client):
        reader, other = await user_pair(client, ("docs:read",)), await user_pair(client, ())
        admin = await client.admin_token()
        guard = guard_for(auth, nats_url)

        def scenario() -> None:
            with guard, sync_server(guard.sync_interceptor(POLICY)) as stub:
                me = stub.WhoAmI(
                    resource_pb2.WhoAmIRequest(), metadata=bearer(reader.access_token), timeout=5
                )
                assert (me.subject, me.session_id) == (reader_subject(reader), reader.session_id)
                document = resource_pb2.GetDocumentRequest(id="doc-1")
                call = stub.GetDocument
                assert reason_of(lambda: call(document, metadata=bearer(other.access_token), timeout=5)) == (
                    "INSUFFICIENT_SCOPE"
                )
                assert (
                    reason_of(lambda: stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=5)) == "TOKEN_MISSING"
                )
                # A key the guard has not seen yet: the worker hands the refetch to the guard's loop.
                rotated = asyncio.run_coroutine_threadsafe(rotate_key(client, admin), main_loop).result(15)
                fresh = asyncio.run_coroutine_threadsafe(user_pair(client, ("docs:read",)), main_loop).result(
                    15
                )
                assert rotated
                assert stub.GetDocument(document, metadata=bearer(fresh.access_token), timeout=5).owner
                asyncio.run_coroutine_threadsafe(revoke_session(client, reader), main_loop).result(15)
                deadline = time.monotonic() + 10
                while True:
                    outcome = reason_of(
                        lambda: stub.WhoAmI(
                            resource_pb2.WhoAmIRequest(), metadata=bearer(reader.access_token), timeout=5
                        )
                    )
                    if outcome == "SESSION_REVOKED":
                        break
                    assert time.monotonic() < deadline, f"still {outcome} after 10 s"
                    time.sleep(0.02)  # a bounded poll in a worker thread: this thread has no event loop

        main_loop = asyncio.get_running_loop()
        await asyncio.to_thread(scenario)


async def test_a_sync_service_checks_dpop_proofs_through_the_guard(redis_url: str, nats_url: str) -> None:
    listen = f"127.0.0.1:{free_port()}"
    settings = auth_settings(redis_url, [nats_url], access_token_ttl=AUTH_TTL, grpc_listen=listen)
    async with running_auth(settings) as (auth, client):
        await client.create_user("dpop-user", "password-of-a-user-1", ())
        signer = ProofSigner()
        pair = await client.stub.Login(
            auth_pb2.LoginRequest(username="dpop-user", password="password-of-a-user-1"),
            metadata=(("dpop", signer.proof(f"http://{listen}", LOGIN_METHOD)),),
            timeout=10,
        )
        token, origin = pair.access_token, "http://resource.test"
        gate = ProofGate(DpopMode.ACCEPT, ProofVerifier(ProofPolicy(origins=(origin,))))
        guard = guard_for(auth, nats_url, dpop=gate)

        def scenario() -> None:
            with guard, sync_server(guard.sync_interceptor(POLICY)) as stub:

                def whoami(proof: str | None, scheme: str = "DPoP") -> str:
                    metadata: tuple[tuple[str, str | bytes], ...] = (("authorization", f"{scheme} {token}"),)
                    if proof is not None:
                        metadata += (("dpop", proof),)
                    return reason_of(
                        lambda: stub.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=metadata, timeout=5)
                    )

                proof = signer.proof(origin, WHO_AM_I, access_token=token)
                assert whoami(proof) == "OK"
                assert whoami(proof) == "DPOP_PROOF_REPLAYED"
                assert whoami(None, scheme="Bearer") == "DPOP_PROOF_MISSING"
                assert (
                    whoami(ProofSigner().proof(origin, WHO_AM_I, access_token=token)) == "DPOP_KEY_MISMATCH"
                )
                assert whoami(signer.proof(origin, GET_DOCUMENT, access_token=token)) == "DPOP_PROOF_INVALID"

        await asyncio.to_thread(scenario)


def reader_subject(pair: auth_pb2.TokenPair) -> str:
    return str(decode_compact(pair.access_token).unverified_payload["sub"])


async def rotate_key(client: AuthClient, admin: str) -> str:
    response = await client.stub.RotateSigningKey(
        auth_pb2.RotateSigningKeyRequest(), metadata=bearer(admin), timeout=10
    )
    return response.kid


def test_the_aio_interceptor_on_a_sync_server_fails_each_call_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = ResourceGuard(
        auth_target="127.0.0.1:1", auth_url="http://127.0.0.1:1", unsafe_without_revocation=True
    )
    with caplog.at_level(logging.ERROR), sync_server(guard.aio_interceptor()) as stub:  # type: ignore[arg-type]
        started = time.monotonic()
        outcome = reason_of(lambda: stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=10))
        assert outcome == "UNKNOWN"
        assert time.monotonic() - started < 5
    assert "AuthInterceptor is for grpc.aio servers" in caplog.text


def test_the_sync_interceptor_refuses_calls_while_the_guard_is_not_running() -> None:
    guard = ResourceGuard(
        auth_target="127.0.0.1:1", auth_url="http://127.0.0.1:1", unsafe_without_revocation=True
    )
    with sync_server(guard.sync_interceptor()) as stub:
        assert reason_of(lambda: stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=5)) == "GUARD_NOT_STARTED"


def test_a_sync_call_that_needs_an_unanswering_auth_service_is_refused_within_the_call_timeout() -> None:
    # A listening socket that never speaks: the guard's key refetch would wait for its own deadline.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        guard = ResourceGuard(
            auth_target=f"127.0.0.1:{silent.getsockname()[1]}",
            issuer=ISSUER,
            audience=AUDIENCE,
            access_token_ttl=300,
            call_timeout=0.3,
            unsafe_without_revocation=True,
        )
        token = mint_access_token(SigningKey.generate("k-unknown"), int(time.time()))
        with guard, sync_server(guard.sync_interceptor()) as stub:
            started = time.monotonic()
            call = stub.WhoAmI
            outcome = reason_of(
                lambda: call(resource_pb2.WhoAmIRequest(), metadata=bearer(token), timeout=10)
            )
            # Refused as undecidable (the fetch gave up, or the worker stopped waiting for it), never hung.
            assert outcome in ("KEYS_UNAVAILABLE", "REVOCATION_STATE_STALE")
            assert time.monotonic() - started < 3
