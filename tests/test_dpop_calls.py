"""A proof on every call (RFC 9449 §7): a real auth service and real resource replicas, over gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authmesh._auth_service.app import AuthApp
from authmesh._resource_service.app import ResourceApp
from authmesh._shared.dpop import LOGIN_METHOD, REFRESH_METHOD, ProofSigner
from authmesh._shared.errors import ConfigurationError
from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.settings import ResourceSettings
from authmesh._shared.sync_token_session import SyncTokenSession
from authmesh._shared.token_session import TokenSession
from authmesh.auth.v1 import auth_pb2
from authmesh.processes import free_port
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from tests.auth_support import SERVICE, AuthClient, auth_settings, bearer, expect_error, running_auth
from tests.test_dpop_binding import claims_of
from tests.waiting import eventually

USER = ("erin", "erin-password-1")
WHOAMI = "/authmesh.resource.v1.ResourceService/WhoAmI"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


class Stack:
    """The auth service and a way to start resource replicas against it."""

    def __init__(self, auth: AuthApp, client: AuthClient, auth_origin: str, nats_url: str) -> None:
        self.auth = auth
        self.client = client
        self.auth_origin = auth_origin
        self.nats_url = nats_url

    async def login(self, signer: ProofSigner | None) -> auth_pb2.TokenPair:
        metadata = () if signer is None else (("dpop", signer.proof(self.auth_origin, LOGIN_METHOD)),)
        request = auth_pb2.LoginRequest(username=USER[0], password=USER[1])
        return await self.client.stub.Login(request, metadata=metadata, timeout=10)

    @asynccontextmanager
    async def replica(self, name: str, **overrides: Any) -> AsyncIterator[Replica]:
        listen = f"127.0.0.1:{free_port()}"
        values: dict[str, Any] = {
            "nats_urls": [self.nats_url],
            "grpc_listen": listen,
            "http_listen": "127.0.0.1:0",
            "auth_target": self.auth.grpc_address,
            "service_account": ":".join(SERVICE),
            "instance": name,
            "shutdown_grace": 0.2,
            "log_level": "warning",
        }
        values.update(overrides)
        async with (
            ResourceApp(ResourceSettings(**values)) as app,
            grpc.aio.insecure_channel(app.grpc_address) as channel,
        ):
            replica = Replica(channel, f"http://{listen}")
            await eventually(replica.serving, within=20, what=f"{name} serving")
            yield replica


class Replica:
    def __init__(self, channel: grpc.aio.Channel, origin: str) -> None:
        self.origin = origin
        self.stub = resource_pb2_grpc.ResourceServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    async def serving(self) -> bool:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def whoami(
        self, token: str, *, scheme: str = "DPoP", proof: str | None = None
    ) -> grpc.aio.UnaryUnaryCall[resource_pb2.WhoAmIRequest, resource_pb2.WhoAmIResponse]:
        metadata = [("authorization", f"{scheme} {token}")]
        if proof is not None:
            metadata.append(("dpop", proof))
        return self.stub.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=metadata, timeout=5)


@pytest_asyncio.fixture(loop_scope="session")
async def stack(redis_url: str, nats_url: str) -> AsyncIterator[Stack]:
    listen = f"127.0.0.1:{free_port()}"
    async with running_auth(auth_settings(redis_url, [nats_url], grpc_listen=listen)) as (app, client):
        await client.create_user(*USER)
        yield Stack(app, client, f"http://{listen}", nats_url)


async def test_a_bound_token_with_a_proof_is_accepted_and_without_one_refused(stack: Stack) -> None:
    signer = ProofSigner()
    token = (await stack.login(signer)).access_token
    async with stack.replica("replica-a") as replica:
        answer = await replica.whoami(token, proof=signer.proof(replica.origin, WHOAMI, access_token=token))
        assert answer.subject
        await expect_error(replica.whoami(token, scheme="Bearer"), UNAUTHENTICATED, "DPOP_PROOF_MISSING")
        await expect_error(replica.whoami(token), UNAUTHENTICATED, "DPOP_PROOF_MISSING")
        # Stolen token, attacker's own key: the proof is valid, the binding is not.
        thief = ProofSigner()
        await expect_error(
            replica.whoami(token, proof=thief.proof(replica.origin, WHOAMI, access_token=token)),
            UNAUTHENTICATED,
            "DPOP_KEY_MISMATCH",
        )
        # A proof made for another method, or for another token, does not count.
        for wrong in (
            signer.proof(
                replica.origin, "/authmesh.resource.v1.ResourceService/GetDocument", access_token=token
            ),
            signer.proof(replica.origin, WHOAMI, access_token=token + "x"),
            signer.proof(replica.origin, WHOAMI),
        ):
            await expect_error(replica.whoami(token, proof=wrong), UNAUTHENTICATED, "DPOP_PROOF_INVALID")


async def test_a_proof_is_accepted_once_per_replica(stack: Stack) -> None:
    signer = ProofSigner()
    token = (await stack.login(signer)).access_token
    # Both replicas answer to the same name, as behind one load balancer.
    async with (
        stack.replica("replica-b") as first,
        stack.replica("replica-c", dpop_origins=first.origin) as second,
    ):
        proof = signer.proof(first.origin, WHOAMI, access_token=token)
        await first.whoami(token, proof=proof)
        await expect_error(first.whoami(token, proof=proof), UNAUTHENTICATED, "DPOP_PROOF_REPLAYED")
        # The documented bound: once per replica within the window (nonces make it once in all).
        await second.whoami(token, proof=proof)
        await expect_error(second.whoami(token, proof=proof), UNAUTHENTICATED, "DPOP_PROOF_REPLAYED")


async def test_bearer_tokens_are_accepted_unless_the_service_requires_dpop(stack: Stack) -> None:
    signer = ProofSigner()
    bearer_token = (await stack.login(None)).access_token
    bound_token = (await stack.login(signer)).access_token
    async with AsyncExitStack() as stack_of_replicas:
        accepting = await stack_of_replicas.enter_async_context(stack.replica("accepting"))
        requiring = await stack_of_replicas.enter_async_context(stack.replica("requiring", dpop="require"))
        bearer_only = await stack_of_replicas.enter_async_context(stack.replica("bearer-only", dpop="off"))
        assert (await accepting.whoami(bearer_token, scheme="Bearer")).subject
        assert (await bearer_only.whoami(bearer_token, scheme="Bearer")).subject
        await expect_error(
            requiring.whoami(bearer_token, scheme="Bearer"), UNAUTHENTICATED, "DPOP_PROOF_MISSING"
        )
        # A bearer token under the DPoP scheme, even with a valid proof, is not bound to that key.
        await expect_error(
            accepting.whoami(
                bearer_token, proof=signer.proof(accepting.origin, WHOAMI, access_token=bearer_token)
            ),
            UNAUTHENTICATED,
            "DPOP_KEY_MISMATCH",
        )
        proof = signer.proof(requiring.origin, WHOAMI, access_token=bound_token)
        assert (await requiring.whoami(bound_token, proof=proof)).subject
        # Where DPoP is off, a bound token cannot be used at all.
        await expect_error(
            bearer_only.whoami(bound_token, scheme="Bearer"), UNAUTHENTICATED, "DPOP_PROOF_MISSING"
        )
        proof = signer.proof(bearer_only.origin, WHOAMI, access_token=bound_token)
        await expect_error(
            bearer_only.whoami(bound_token, proof=proof), UNAUTHENTICATED, "DPOP_PROOF_INVALID"
        )


async def test_a_service_that_wants_nonces_hands_one_out_in_the_trailers(stack: Stack) -> None:
    signer = ProofSigner()
    token = (await stack.login(signer)).access_token
    secret = "n" * 32
    async with (
        stack.replica("nonce-a", dpop_nonce_secret=secret) as first,
        stack.replica("nonce-b", dpop_nonce_secret=secret, dpop_origins=first.origin) as second,
    ):
        error = await expect_error(
            first.whoami(token, proof=signer.proof(first.origin, WHOAMI, access_token=token)),
            UNAUTHENTICATED,
            "DPOP_NONCE_REQUIRED",
        )
        nonce = dict(error.trailing_metadata() or ())["dpop-nonce"]
        assert isinstance(nonce, str)
        # Another replica of the same service takes it: no state is shared, only the secret.
        proof = signer.proof(first.origin, WHOAMI, access_token=token, nonce=nonce)
        assert (await second.whoami(token, proof=proof)).subject


async def test_a_revoked_key_binding_is_refused_everywhere_and_cannot_refresh_or_log_in(stack: Stack) -> None:
    lost, kept = ProofSigner(), ProofSigner()
    pair = await stack.login(lost)
    other = (await stack.login(kept)).access_token
    admin = bearer(await stack.client.admin_token())
    async with stack.replica("binding-a") as replica:
        token = pair.access_token
        assert (
            await replica.whoami(token, proof=lost.proof(replica.origin, WHOAMI, access_token=token))
        ).subject
        await expect_error(
            stack.client.stub.RevokeKeyBinding(
                auth_pb2.RevokeKeyBindingRequest(jkt="not-a-thumbprint"), metadata=admin
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "FIELD_INVALID",
        )
        await expect_error(
            stack.client.stub.RevokeKeyBinding(
                auth_pb2.RevokeKeyBindingRequest(jkt=lost.jkt),
                metadata=bearer(await stack.client.service_token()),
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        revoked = await stack.client.stub.RevokeKeyBinding(
            auth_pb2.RevokeKeyBindingRequest(jkt=lost.jkt, reason="lost laptop"), metadata=admin, timeout=10
        )
        assert revoked.event_id

        async def refused() -> bool:
            try:
                await replica.whoami(token, proof=lost.proof(replica.origin, WHOAMI, access_token=token))
            except grpc.aio.AioRpcError as error:
                return error_reason(error) == "TOKEN_REVOKED"
            return False

        await eventually(refused, within=10, what="the revoked binding refused")
        assert (
            await replica.whoami(other, proof=kept.proof(replica.origin, WHOAMI, access_token=other))
        ).subject
    # A replica that starts afterwards learns it from the snapshot.
    async with stack.replica("binding-b") as late:
        await expect_error(
            late.whoami(token, proof=lost.proof(late.origin, WHOAMI, access_token=token)),
            UNAUTHENTICATED,
            "TOKEN_REVOKED",
        )
    await expect_error(
        stack.client.stub.Refresh(
            auth_pb2.RefreshRequest(refresh_token=pair.refresh_token),
            metadata=(("dpop", lost.proof(stack.auth_origin, REFRESH_METHOD)),),
        ),
        UNAUTHENTICATED,
        "REFRESH_TOKEN_INVALID",
    )
    await expect_error(stack.login(lost), UNAUTHENTICATED, "TOKEN_REVOKED")
    assert (await stack.client.introspect(token)).inactive_reason == "TOKEN_REVOKED"


async def test_the_renewing_session_makes_a_proof_for_every_call_and_takes_nonces(stack: Stack) -> None:
    signer = ProofSigner()
    secret = "m" * 32
    async with (
        stack.replica("session-a", dpop="require") as plain,
        stack.replica("session-b", dpop="require", dpop_nonce_secret=secret) as with_nonces,
        TokenSession.login(
            stack.auth.grpc_address, *USER, dpop_key=signer, auth_origin=stack.auth_origin, renew_margin=0
        ) as session,
    ):
        assert claims_of(await session.access_token()).jkt == signer.jkt
        for replica in (plain, with_nonces):
            target = replica.origin.removeprefix("http://")
            async with session.channel(target) as channel:
                stub = resource_pb2_grpc.ResourceServiceStub(channel)
                for _ in range(3):  # a fresh proof each time: no replay refusals
                    assert (await stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=5)).subject
        # Refresh carries a proof of the session's key.
        renewed = await session.renew()
        assert claims_of(renewed.access_token).jkt == signer.jkt
        token = renewed.access_token
        # The token alone, as a bearer token, is refused.
        await expect_error(plain.whoami(token, scheme="Bearer"), UNAUTHENTICATED, "DPOP_PROOF_MISSING")


async def test_the_sync_session_makes_proofs_too(stack: Stack) -> None:
    signer = ProofSigner()

    def calls(target: str) -> list[str]:
        # The servers run on this test's event loop: the blocking client runs in a thread.
        with (
            SyncTokenSession.login(
                stack.auth.grpc_address, *USER, dpop_key=signer, auth_origin=stack.auth_origin
            ) as session,
            session.channel(target) as channel,
        ):
            stub = resource_pb2_grpc.ResourceServiceStub(channel)
            subjects = [stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=5).subject for _ in range(2)]
            session.renew()
            subjects.append(stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=5).subject)
            with pytest.raises(ConfigurationError):
                session.call_credentials()
            return subjects

    async with stack.replica("sync-a", dpop="require", dpop_nonce_secret="s" * 32) as replica:
        subjects = await asyncio.to_thread(calls, replica.origin.removeprefix("http://"))
    assert len(subjects) == 3
    assert all(subjects)
