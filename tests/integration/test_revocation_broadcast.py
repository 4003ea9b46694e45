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
import pytest

from authmesh._auth_service.app import AuthApp
from authmesh._shared.grpc_errors import error_reason
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from authmesh.processes import LOOPBACK, NatsServer, ServerProcess, free_ports
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from tests.auth_support import SERVICE, admin_login, auth_settings, service_login

pytestmark = pytest.mark.slow

DEADLINE = 20.0
STALENESS_BOUND = 1.0
USER = ("alice", "alice-password-1")


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

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        self.tmp_path = tmp_path
        self.redis_url = redis_url
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
            self.redis_url, [self.nats.url], grpc_listen=self.auth_target, heartbeat_interval=0.2
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
async def mesh_with_replicas(tmp_path: Path, redis_url: str, count: int) -> AsyncIterator[Mesh]:
    async with Mesh(tmp_path, redis_url) as mesh:
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
