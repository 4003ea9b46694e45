"""The renewing sessions against a real auth service, a real resource replica, Redis and NATS.

Time: the session's clock is shifted where a test needs "the token is due" (no waiting); where a server
must find a token expired, the test waits, with a deadline, until the replica refuses it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio

from authmesh import (
    AdminClient,
    SessionEnded,
    SyncTokenSession,
    Tokens,
    TokenSession,
    forward_token,
)
from authmesh._auth_service.app import AuthApp
from authmesh._resource_service.app import ResourceApp
from authmesh._shared.grpc_errors import bearer_token, error_reason
from authmesh.auth.v1 import auth_pb2
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from tests.auth_support import ADMIN, AuthClient, auth_settings, bearer, running_auth
from tests.test_client_cli import running_replica
from tests.waiting import eventually

ALICE = ("alice", "alice-password-1")
# Short enough that a test waits for a token to expire in seconds; long enough that one issued near the
# end of a second (iat is whole seconds) still lives through the calls that follow it.
ACCESS_TTL = 3
AUTH_SERVICE = "authmesh.auth.v1.AuthService"
LOCAL_TCP = grpc.LocalConnectionType.LOCAL_TCP
LOCAL_TCP = LOCAL_TCP


@dataclass
class Stack:
    """The running services."""

    auth: AuthApp
    client: AuthClient
    replica: ResourceApp

    def handled(self, method: str) -> float:
        """How many calls of an AuthService method the auth service has started."""
        labels = {"grpc_type": "unary", "grpc_service": AUTH_SERVICE, "grpc_method": method}
        return self.auth.registry.get_sample_value("grpc_server_started_total", labels) or 0.0

    def refused_refreshes(self) -> float:
        """How many refreshes the auth service has refused (the replica's own ones all succeed)."""
        return sum(
            self.auth.registry.get_sample_value("authmesh_refreshes_total", {"result": result}) or 0.0
            for result in ("invalid", "revoked", "reused")
        )


@pytest_asyncio.fixture(loop_scope="session")
async def stack(redis_url: str, nats_url: str) -> AsyncIterator[Stack]:
    """An auth service issuing short-lived tokens, alice, and a replica without clock leeway."""
    settings = auth_settings(redis_url, [nats_url], access_token_ttl=ACCESS_TTL, leeway=0)
    async with running_auth(settings) as (auth, client):
        await client.create_user(*ALICE)
        async with running_replica(auth, nats_url, "replica-session", leeway=0) as replica:
            yield Stack(auth, client, replica)


class Clock:
    """Unix time shifted by ``skew`` seconds: the session's view of time, moved by the test."""

    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.time() + self.skew


async def whoami(channel: grpc.aio.Channel) -> resource_pb2.WhoAmIResponse:
    response: resource_pb2.WhoAmIResponse = await resource_pb2_grpc.ResourceServiceStub(channel).WhoAmI(
        resource_pb2.WhoAmIRequest(), timeout=10
    )
    return response


async def refused_as_expired(stack: Stack, token: str) -> bool:
    """Whether the replica now refuses ``token`` as expired."""
    async with grpc.aio.insecure_channel(stack.replica.grpc_address) as channel:
        try:
            await resource_pb2_grpc.ResourceServiceStub(channel).WhoAmI(
                resource_pb2.WhoAmIRequest(), metadata=bearer(token), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return error_reason(error) == "TOKEN_EXPIRED"
    return False


def current(session: TokenSession | SyncTokenSession) -> Tokens:
    tokens = session.tokens
    assert tokens is not None
    return tokens


async def test_calls_through_a_session_carry_its_token(stack: Stack) -> None:
    async with (
        TokenSession.login(stack.auth.grpc_address, *ALICE) as session,
        session.channel(stack.replica.grpc_address) as channel,
    ):
        answer = await whoami(channel)

    assert answer.session_id == current(session).session_id
    assert "docs:read" in answer.scopes


async def test_a_token_near_its_end_is_renewed_before_the_call_with_a_rotated_refresh_token(
    stack: Stack,
) -> None:
    clock = Clock()
    renewed: list[Tokens] = []
    async with TokenSession.login(
        stack.auth.grpc_address, *ALICE, renew_margin=1.0, clock=clock, on_renew=renewed.append
    ) as session:
        first = current(session)
        async with session.channel(stack.replica.grpc_address) as channel:
            await whoami(channel)
            assert session.renewals == 1
            clock.skew = first.expires_at - time.time() - 0.5  # within the margin, not yet expired
            answer = await whoami(channel)

    second = current(session)
    assert session.renewals == 2
    assert second.access_token != first.access_token
    assert second.refresh_token != first.refresh_token
    assert second.session_id == first.session_id == answer.session_id
    assert renewed == [first, second]


async def test_a_call_refused_as_expired_renews_and_is_made_again_once(stack: Stack) -> None:
    clock = Clock()
    clock.skew = -3600.0  # the session believes its token young: only the server can say it expired
    async with TokenSession.login(stack.auth.grpc_address, *ALICE, clock=clock) as session:
        first = current(session)
        await eventually(
            lambda: refused_as_expired(stack, first.access_token), within=ACCESS_TTL + 10, what="expiry"
        )
        async with session.channel(stack.replica.grpc_address) as channel:
            answer = await whoami(channel)

    assert session.renewals == 2
    assert current(session).access_token != first.access_token
    assert answer.session_id == first.session_id


async def test_concurrent_calls_that_find_the_token_due_renew_it_once(stack: Stack) -> None:
    clock = Clock()
    async with (
        TokenSession.login(stack.auth.grpc_address, *ALICE, clock=clock) as session,
        session.channel(stack.replica.grpc_address) as channel,
    ):
        await whoami(channel)
        clock.skew = current(session).expires_at - time.time()
        answers = await asyncio.gather(*(whoami(channel) for _ in range(20)))

    assert session.renewals == 2
    assert {answer.token_id for answer in answers} == {answers[0].token_id}


async def test_a_revoked_session_ends_and_is_never_renewed_again(stack: Stack) -> None:
    clock = Clock()
    async with TokenSession.login(stack.auth.grpc_address, *ALICE, clock=clock) as session:
        admin = await stack.client.admin_token()
        await stack.client.stub.RevokeSession(
            _revoke_session(current(session).session_id), metadata=bearer(admin), timeout=10
        )
        clock.skew = current(session).expires_at - time.time()
        refused, logins = stack.refused_refreshes(), stack.handled("Login")
        async with session.channel(stack.replica.grpc_address) as channel:
            for _ in range(3):
                with pytest.raises(SessionEnded) as ended:
                    await whoami(channel)
                assert ended.value.code == "REFRESH_TOKEN_INVALID"

    # One refused Refresh, then nothing: no loop, and no new login behind the revoked session.
    assert stack.refused_refreshes() == refused + 1
    assert stack.handled("Login") == logins


async def test_a_reused_refresh_token_ends_the_session(stack: Stack) -> None:
    async with TokenSession.login(stack.auth.grpc_address, *ALICE) as session:
        stolen = current(session).refresh_token
        await session.renew()
        with pytest.raises(grpc.aio.AioRpcError) as reused:  # a thief's copy: the session is revoked
            await stack.client.stub.Refresh(_refresh(stolen), timeout=10)
        with pytest.raises(SessionEnded) as ended:
            await session.renew()

    assert error_reason(reused.value) == "REFRESH_TOKEN_REUSED"
    assert ended.value.code == "REFRESH_TOKEN_INVALID"


async def test_a_wrong_password_ends_the_session_at_entry(stack: Stack) -> None:
    with pytest.raises(SessionEnded) as ended:
        async with TokenSession.login(stack.auth.grpc_address, ALICE[0], "not-her-password"):
            pass

    assert ended.value.code == "INVALID_CREDENTIALS"


async def relay_call(channel: grpc.aio.Channel) -> bytes:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Relay/Call")
    return await call(b"", timeout=10)


async def test_a_handler_forwards_its_callers_token_downstream(stack: Stack) -> None:
    downstream = grpc.aio.insecure_channel(stack.replica.grpc_address)

    async def relay(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        answer = await resource_pb2_grpc.ResourceServiceStub(downstream).WhoAmI(
            resource_pb2.WhoAmIRequest(), metadata=forward_token(context), timeout=10
        )
        return answer.session_id.encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Relay", {"Call": grpc.unary_unary_rpc_method_handler(relay)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with TokenSession.login(stack.auth.grpc_address, *ALICE) as session:
            async with session.channel(f"127.0.0.1:{port}") as channel:
                relayed = await relay_call(channel)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as anonymous:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await relay_call(anonymous)
    finally:
        await server.stop(None)
        await downstream.close()

    assert relayed == current(session).session_id.encode()
    assert refused.value.code() == grpc.StatusCode.UNKNOWN  # the handler raised TokenMissing


async def test_the_admin_client_creates_lists_disables_enables_and_revokes_users(stack: Stack) -> None:
    carol = ("carol", "carol-password-1")
    admin_session = TokenSession.login(stack.auth.grpc_address, *ADMIN, scopes=("admin",))
    async with admin_session as session, AdminClient(session) as admin:
        subject = await admin.create_user(*carol, ("docs:read",))
        async with TokenSession.login(stack.auth.grpc_address, *carol) as hers:
            status = await admin.introspect(current(hers).access_token)
            await admin.disable_user(subject, reason="test")
            with pytest.raises(SessionEnded) as disabled:
                await hers.renew()
        listed = [user async for user in admin.users()]
        found = await admin.find_user("carol")
        with pytest.raises(SessionEnded) as refused_login:
            async with TokenSession.login(stack.auth.grpc_address, *carol):
                pass
        await admin.enable_user(subject)
        async with TokenSession.login(stack.auth.grpc_address, *carol) as again:
            await admin.revoke_user(subject, reason="test")
            with pytest.raises(SessionEnded) as revoked:
                await again.renew()

    assert [user.username for user in listed] == sorted(user.username for user in listed)
    assert {"alice", "carol", ADMIN[0]} <= {user.username for user in listed}
    assert found is not None
    assert (found.subject, found.scopes, found.disabled) == (subject, ("docs:read",), True)
    assert await _no_user(stack, "nobody")
    assert (status.active, status.subject) == (True, subject)
    assert disabled.value.code in {"REFRESH_TOKEN_INVALID", "USER_DISABLED"}
    assert refused_login.value.code == "USER_DISABLED"
    assert revoked.value.code == "REFRESH_TOKEN_INVALID"


async def test_a_sync_session_renews_before_expiry_and_when_refused_as_expired(stack: Stack) -> None:
    clock = Clock()

    def calls() -> tuple[Tokens, Tokens, Tokens, int]:
        with (
            SyncTokenSession.login(stack.auth.grpc_address, *ALICE, clock=clock) as session,
            session.channel(stack.replica.grpc_address) as channel,
        ):
            stub = resource_pb2_grpc.ResourceServiceStub(channel)
            stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=10)
            first = current(session)
            clock.skew = first.expires_at - time.time()
            stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=10)
            second = current(session)
            clock.skew = -3600.0
            deadline = time.monotonic() + ACCESS_TTL + 10
            while not asyncio.run_coroutine_threadsafe(
                refused_as_expired(stack, second.access_token), loop
            ).result(timeout=15):
                assert time.monotonic() < deadline, "the token never expired"
                threading.Event().wait(0.05)
            stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=10)
            return first, second, current(session), session.renewals

    loop = asyncio.get_running_loop()
    first, second, third, renewals = await asyncio.to_thread(calls)

    assert renewals == 3
    assert len({first.access_token, second.access_token, third.access_token}) == 3
    assert len({first.refresh_token, second.refresh_token, third.refresh_token}) == 3
    assert first.session_id == second.session_id == third.session_id


async def test_concurrent_sync_calls_renew_once_and_a_revoked_session_ends(stack: Stack) -> None:
    clock = Clock()
    admin = await stack.client.admin_token()

    async def revoke(session_id: str) -> None:
        await stack.client.stub.RevokeSession(_revoke_session(session_id), metadata=bearer(admin), timeout=10)

    def calls() -> tuple[int, set[str], str]:
        with (
            SyncTokenSession.login(stack.auth.grpc_address, *ALICE, clock=clock) as session,
            session.channel(stack.replica.grpc_address) as channel,
        ):
            stub = resource_pb2_grpc.ResourceServiceStub(channel)
            clock.skew = current(session).expires_at - time.time()
            seen: set[str] = set()
            threads = [
                threading.Thread(
                    target=lambda: seen.add(stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=10).token_id)
                )
                for _ in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            renewals = session.renewals
            asyncio.run_coroutine_threadsafe(revoke(current(session).session_id), loop).result(timeout=15)
            clock.skew = current(session).expires_at - time.time()
            try:
                stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=10)
            except SessionEnded as ended:
                return renewals, seen, ended.code
            return renewals, seen, ""

    loop = asyncio.get_running_loop()
    renewals, seen, ended = await asyncio.to_thread(calls)

    assert renewals == 2
    assert len(seen) == 1
    assert ended == "REFRESH_TOKEN_INVALID"


def _revoke_session(session_id: str) -> auth_pb2.RevokeSessionRequest:
    return auth_pb2.RevokeSessionRequest(session_id=session_id, reason="test")


def _refresh(refresh_token: str) -> auth_pb2.RefreshRequest:
    return auth_pb2.RefreshRequest(refresh_token=refresh_token)


async def _no_user(stack: Stack, username: str) -> bool:
    admin_session = TokenSession.login(stack.auth.grpc_address, *ADMIN, scopes=("admin",))
    async with admin_session as session, AdminClient(session) as admin:
        return await admin.find_user(username) is None


async def test_sync_call_credentials_carry_the_token_on_a_secure_channel(stack: Stack) -> None:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return (bearer_token(context.invocation_metadata()) or "").encode()

    def calls() -> tuple[bytes, str]:
        server = grpc.server(ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)}
                )
            ]
        )
        port = server.add_secure_port("127.0.0.1:0", grpc.local_server_credentials(LOCAL_TCP))
        server.start()
        try:
            with SyncTokenSession.login(stack.auth.grpc_address, *ALICE) as session:
                credentials = grpc.composite_channel_credentials(
                    grpc.local_channel_credentials(LOCAL_TCP),
                    session.call_credentials(),
                )
                with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
                    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Echo/Call")
                    echoed = call(b"", timeout=10)
                return echoed, current(session).access_token
        finally:
            server.stop(None)

    echoed, token = await asyncio.to_thread(calls)

    assert echoed == token.encode()
