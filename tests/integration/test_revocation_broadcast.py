"""Revocations reach every replica: the auth service and several ``authmesh resource-server`` processes.

Each replica is a separate process configured through the environment, on its own NATS connection.
NATS runs per test (the outage scenario stops and restarts it); Redis is the session's.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats
import pytest
from nats.js import JetStreamContext

from authmesh._auth_service.app import AuthApp
from authmesh._auth_service.store import hash_refresh_token, refresh_key, session_key, user_sessions_key
from authmesh._shared.events import STREAM_NAME, EventType
from authmesh._shared.grpc_errors import error_reason
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from authmesh.processes import LOOPBACK, NatsServer, ServerProcess, free_ports
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from tests.auth_support import SERVICE, admin_login, auth_settings, redis_client, service_login
from tests.waiting import eventually

pytestmark = pytest.mark.slow

DEADLINE = 20.0
STALENESS_BOUND = 1.0
USER = ("alice", "alice-password-1")
# A refresh lifetime short enough to outlive in a test.
SHORT_REFRESH_TTL = 3


class ReplicaProcess(ServerProcess):
    """One ``authmesh resource-server`` configured through ``AUTHMESH_*`` environment variables.

    Args:
        name: The replica's instance name.
        data_dir: Where its log goes.
        environment: The ``AUTHMESH_*`` variables.
    """

    def __init__(self, name: str, data_dir: Path, environment: dict[str, str]) -> None:
        super().__init__(name, data_dir)
        self.variables = environment
        grpc_port, http_port = free_ports(2)
        self.grpc_address = f"{LOOPBACK}:{grpc_port}"
        self.http_address = f"{LOOPBACK}:{http_port}"

    def command(self) -> list[str]:
        env = shutil.which("env")
        assert env is not None
        variables = {
            **self.variables,
            "AUTHMESH_INSTANCE": self.name,
            "AUTHMESH_GRPC_LISTEN": self.grpc_address,
            "AUTHMESH_HTTP_LISTEN": self.http_address,
        }
        assignments = [f"{name}={value}" for name, value in sorted(variables.items())]
        return [env, *assignments, sys.executable, "-m", "authmesh.cli", "resource-server"]

    async def is_ready(self, timeout: float) -> bool:  # noqa: ASYNC109  # ServerProcess's signature
        status, _ = await self.healthz(timeout)
        return status == 200

    async def healthz(self, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:  # noqa: ASYNC109
        """The replica's ``/healthz`` status and body (0 when it does not answer)."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.get(f"http://{self.http_address}/healthz") as response,
            ):
                return response.status, await response.json()
        except (aiohttp.ClientError, TimeoutError):
            return 0, {}


@dataclass
class Replica:
    """A running replica and a client for it."""

    process: ReplicaProcess
    channel: grpc.aio.Channel

    @property
    def stub(self) -> resource_pb2_grpc.ResourceServiceAsyncStub:
        return resource_pb2_grpc.ResourceServiceStub(self.channel)

    async def whoami(self, token: str) -> resource_pb2.WhoAmIResponse:
        return await self.stub.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token), timeout=5)

    async def outcome(self, token: str) -> str:
        """``OK`` or the error reason a WhoAmI with ``token`` gets right now."""
        try:
            await self.whoami(token)
        except grpc.aio.AioRpcError as error:
            return error_reason(error) or error.code().name
        return "OK"


class Mesh:
    """NATS, the auth service (in process) and resource replicas (as processes)."""

    def __init__(self, tmp_path: Path, redis_url: str, **auth_overrides: Any) -> None:
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.auth_overrides = auth_overrides
        self.nats = NatsServer(tmp_path / "nats")
        auth_port = free_ports(1)[0]
        self.auth_target = f"{LOOPBACK}:{auth_port}"
        self.auth_app: AuthApp | None = None
        self.replicas: list[Replica] = []
        self._stack = AsyncExitStack()
        self._channel: grpc.aio.Channel | None = None

    @property
    def auth(self) -> auth_pb2_grpc.AuthServiceAsyncStub:
        assert self._channel is not None
        return auth_pb2_grpc.AuthServiceStub(self._channel)

    async def __aenter__(self) -> Mesh:
        await self._stack.enter_async_context(self.nats)
        await self.start_auth()
        self._stack.push_async_callback(self.stop_auth)
        self._channel = await self._stack.enter_async_context(grpc.aio.insecure_channel(self.auth_target))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for replica in self.replicas:
            await replica.channel.close()
            await replica.process.stop()
        await self._stack.aclose()

    async def start_auth(self) -> None:
        settings = auth_settings(
            self.redis_url,
            [self.nats.url],
            **{"grpc_listen": self.auth_target, "heartbeat_interval": 0.2, **self.auth_overrides},
        )
        self.auth_app = AuthApp(settings)
        await self.auth_app.__aenter__()

    async def stop_auth(self) -> None:
        app, self.auth_app = self.auth_app, None
        if app is not None:
            await app.aclose()

    async def add_replica(self) -> Replica:
        name = f"replica-{len(self.replicas) + 1}"
        process = ReplicaProcess(
            name,
            self.tmp_path / name,
            {
                "AUTHMESH_NATS_URLS": self.nats.url,
                "AUTHMESH_AUTH_TARGET": self.auth_target,
                "AUTHMESH_SERVICE_ACCOUNT": f"{SERVICE[0]}:{SERVICE[1]}",
                "AUTHMESH_STALENESS_BOUND": str(STALENESS_BOUND),
                "AUTHMESH_SHUTDOWN_GRACE": "0.5",
            },
        )
        await process.start(timeout=DEADLINE)
        replica = Replica(process, grpc.aio.insecure_channel(process.grpc_address))
        self.replicas.append(replica)
        return replica

    async def login(self, username: str, password: str) -> auth_pb2.TokenPair:
        return await self.auth.Login(auth_pb2.LoginRequest(username=username, password=password), timeout=10)

    async def admin(self) -> tuple[tuple[str, str]]:
        return bearer((await self.auth.Login(admin_login(), timeout=10)).access_token)

    async def create_user(self, username: str, password: str) -> str:
        reply = await self.auth.CreateUser(
            auth_pb2.CreateUserRequest(username=username, password=password, scopes=["docs:read"]),
            metadata=await self.admin(),
            timeout=10,
        )
        return reply.subject


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def everywhere(replicas: Sequence[Replica], token: str, expected: str) -> None:
    """Wait until every replica answers ``token`` with ``expected`` (``OK`` or an error reason)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        outcomes = await asyncio.gather(*(replica.outcome(token) for replica in replicas))
        if all(outcome == expected for outcome in outcomes):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"expected {expected} everywhere, got {outcomes}")
        await asyncio.sleep(0.02)


async def poll(condition: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def mesh_with_replicas(
    tmp_path: Path, redis_url: str, count: int, **auth_overrides: Any
) -> AsyncIterator[Mesh]:
    async with Mesh(tmp_path, redis_url, **auth_overrides) as mesh:
        await asyncio.gather(*(mesh.add_replica() for _ in range(count)))
        yield mesh


async def test_every_kind_of_revocation_reaches_every_replica_without_restarts(
    tmp_path: Path, redis_url: str
) -> None:
    async with mesh_with_replicas(tmp_path, redis_url, 3) as mesh:
        subject = await mesh.create_user(*USER)
        replicas = mesh.replicas
        refused: list[tuple[str, str]] = []

        # One access token.
        pair = await mesh.login(*USER)
        await everywhere(replicas, pair.access_token, "OK")
        await mesh.auth.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=pair.access_token, reason="test"),
            metadata=bearer(pair.access_token),
            timeout=10,
        )
        await everywhere(replicas, pair.access_token, "TOKEN_REVOKED")
        refused.append((pair.access_token, "TOKEN_REVOKED"))

        # One session.
        pair = await mesh.login(*USER)
        await everywhere(replicas, pair.access_token, "OK")
        await mesh.auth.RevokeSession(
            auth_pb2.RevokeSessionRequest(session_id=pair.session_id, reason="test"),
            metadata=bearer(pair.access_token),
            timeout=10,
        )
        await everywhere(replicas, pair.access_token, "SESSION_REVOKED")
        refused.append((pair.access_token, "SESSION_REVOKED"))

        # A refresh token presented twice: the whole session goes.
        pair = await mesh.login(*USER)
        refresh = auth_pb2.RefreshRequest(refresh_token=pair.refresh_token)
        rotated = await mesh.auth.Refresh(refresh, timeout=10)
        await everywhere(replicas, rotated.access_token, "OK")
        with pytest.raises(grpc.aio.AioRpcError):
            await mesh.auth.Refresh(refresh, timeout=10)
        await everywhere(replicas, rotated.access_token, "SESSION_REVOKED")
        refused.append((rotated.access_token, "SESSION_REVOKED"))

        # The user: every token issued up to now, while a login right after works.
        pair = await mesh.login(*USER)
        await everywhere(replicas, pair.access_token, "OK")
        await mesh.auth.RevokeUser(
            auth_pb2.RevokeUserRequest(subject=subject, reason="test"),
            metadata=await mesh.admin(),
            timeout=10,
        )
        await everywhere(replicas, pair.access_token, "USER_REVOKED")
        refused.append((pair.access_token, "USER_REVOKED"))
        after = await mesh.login(*USER)
        await everywhere(replicas, after.access_token, "OK")

        # A replica started after all this refuses every one of them from its first served call.
        late = await mesh.add_replica()
        for token, reason in refused:
            assert await late.outcome(token) == reason
        assert await late.outcome(after.access_token) == "OK"

        # A compromised signing key: every token it signed, at once, on every replica.
        admin = await mesh.admin()
        await mesh.auth.RotateSigningKey(
            auth_pb2.RotateSigningKeyRequest(retire_previous=True), metadata=admin, timeout=10
        )
        await everywhere(mesh.replicas, after.access_token, "KEY_REVOKED")
        fresh = await mesh.login(*USER)
        await everywhere(mesh.replicas, fresh.access_token, "OK")


async def test_replicas_degrade_without_nats_fall_back_to_introspect_and_recover(
    tmp_path: Path, redis_url: str
) -> None:
    async with mesh_with_replicas(tmp_path, redis_url, 2) as mesh:
        await mesh.create_user(*USER)
        replicas = mesh.replicas
        pair = await mesh.login(*USER)
        await everywhere(replicas, pair.access_token, "OK")

        await mesh.nats.stop()
        await poll(lambda: all_degraded(replicas, True))
        await everywhere(replicas, pair.access_token, "OK")  # confirmed with Introspect
        await everywhere(replicas, (await mesh.login(*USER)).access_token, "OK")

        await mesh.stop_auth()
        await everywhere(replicas, pair.access_token, "REVOCATION_STATE_STALE")

        await mesh.nats.start()
        await mesh.start_auth()
        await poll(lambda: all_degraded(replicas, False))
        await everywhere(replicas, pair.access_token, "OK")
        await mesh.auth.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=pair.access_token, reason="test"),
            metadata=bearer(pair.access_token),
            timeout=10,
        )
        await everywhere(replicas, pair.access_token, "TOKEN_REVOKED")


async def refresh_outcome(mesh: Mesh, replica: Replica, refresh_token: str) -> str:
    """The error reason a Refresh gets, or, when it succeeds, what a replica says of its new token."""
    try:
        renewed = await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=refresh_token), timeout=10)
    except grpc.aio.AioRpcError as error:
        return error_reason(error) or error.code().name
    return f"refreshed; the new token at a replica: {await replica.outcome(renewed.access_token)}"


@asynccontextmanager
async def jetstream_admin(url: str) -> AsyncIterator[JetStreamContext]:
    """JetStream on the test's NATS, as its operator."""
    client = await nats.connect(servers=[url], connect_timeout=2, max_reconnect_attempts=0)
    try:
        yield client.jetstream(timeout=5)
    finally:
        await client.close()


async def all_degraded(replicas: Sequence[Replica], degraded: bool) -> bool:
    answers = await asyncio.gather(*(replica.process.healthz() for replica in replicas))
    return all(body.get("degraded") is degraded for _, body in answers)


async def test_a_replica_stops_gracefully_on_sigterm(tmp_path: Path, redis_url: str) -> None:
    async with mesh_with_replicas(tmp_path, redis_url, 1) as mesh:
        process = mesh.replicas[0].process
        assert process.pid is not None
        os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + DEADLINE
        while process.running:
            assert time.monotonic() < deadline, "the replica did not stop on SIGTERM"
            await asyncio.sleep(0.05)
        log = process.log_path.read_text()
        assert "Traceback" not in log
        assert "resource service started" in log


async def test_replicas_refuse_admin_and_service_tokens_yet_serve_with_their_service_account(
    tmp_path: Path, redis_url: str
) -> None:
    async with mesh_with_replicas(tmp_path, redis_url, 1) as mesh:
        await mesh.create_user(*USER)
        (replica,) = mesh.replicas
        admin = await mesh.auth.Login(admin_login(), timeout=10)
        service = await mesh.auth.Login(service_login(), timeout=10)
        assert await replica.outcome(admin.access_token) == "WRONG_AUDIENCE"
        assert await replica.outcome(service.access_token) == "WRONG_AUDIENCE"
        # The replica loaded its snapshot with its own service login (it would not be serving otherwise),
        # and an ordinary user's resource token works.
        assert await replica.outcome((await mesh.login(*USER)).access_token) == "OK"


async def test_revoke_user_stops_a_session_kept_alive_by_refresh_past_its_first_lifetime(
    tmp_path: Path, redis_url: str
) -> None:
    # The per-user session set lived one refresh lifetime from the Login and the refresh script never
    # looked at the user's cut: a client that kept refreshing outlived the set, RevokeUser answered OK,
    # and its refresh token went on minting tokens that every replica and Introspect accepted.
    async with (
        mesh_with_replicas(tmp_path, redis_url, 1, refresh_token_ttl=SHORT_REFRESH_TTL) as mesh,
        redis_client(redis_url) as store,
    ):
        subject = await mesh.create_user(*USER)
        (replica,) = mesh.replicas
        first = await mesh.login(*USER)
        session = session_key(first.session_id)

        async def late_in_first_lifetime() -> bool:
            return 0 < int(await store.pttl(session)) < SHORT_REFRESH_TTL * 1000 // 3

        await eventually(
            late_in_first_lifetime, within=DEADLINE, what="the session's first lifetime to near its end"
        )
        kept = await mesh.auth.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token), timeout=10)

        async def first_lifetime_over() -> bool:
            return not await store.exists(refresh_key(hash_refresh_token(first.refresh_token)))

        await eventually(first_lifetime_over, within=DEADLINE, what="the login's refresh token to expire")
        # The promise does not rest on that bookkeeping: without the per-user set at all, the cut holds.
        await store.delete(user_sessions_key(subject))
        await mesh.auth.RevokeUser(
            auth_pb2.RevokeUserRequest(subject=subject, reason="test"),
            metadata=await mesh.admin(),
            timeout=10,
        )

        assert await refresh_outcome(mesh, replica, kept.refresh_token) == "REFRESH_TOKEN_INVALID"
        await everywhere(mesh.replicas, kept.access_token, "USER_REVOKED")


async def test_an_event_jetstream_refuses_stops_the_heartbeat_so_replicas_go_stale(
    tmp_path: Path, redis_url: str
) -> None:
    # A heartbeat vouches that a replica has heard every revocation. It used to go out after a failed
    # outbox flush, so replicas stayed fresh, and trusted their state, while a revocation was stuck.
    async with mesh_with_replicas(tmp_path, redis_url, 1) as mesh:
        await mesh.create_user(*USER)
        replicas = mesh.replicas
        pair = await mesh.login(*USER)
        await poll(lambda: all_degraded(replicas, False))
        async with jetstream_admin(mesh.nats.url) as js:
            config = (await js.stream_info(STREAM_NAME)).config
            # JetStream takes every event but session revocations, whose publish now fails.
            everything = config.subjects
            config.subjects = [kind.subject for kind in EventType if kind is not EventType.SESSION_REVOKED]
            await js.update_stream(config)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await mesh.auth.RevokeSession(
                    auth_pb2.RevokeSessionRequest(session_id=pair.session_id, reason="test"),
                    metadata=bearer(pair.access_token),
                    timeout=10,
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            await poll(lambda: all_degraded(replicas, True))
            # Stale, the replica asks Introspect, which reads the revocation in Redis.
            await everywhere(replicas, pair.access_token, "SESSION_REVOKED")

            config.subjects = everything
            await js.update_stream(config)
        await poll(lambda: all_degraded(replicas, False))
        await everywhere(replicas, pair.access_token, "SESSION_REVOKED")
