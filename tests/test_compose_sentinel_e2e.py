"""docker-compose.yml's ``sentinel`` profile in real containers (marker ``compose``; ``make compose-e2e``).

The project comes up with the ``.env`` of ``authmesh compose-env --sentinel``: Redis, its replica and three
Sentinels, all on TLS, and the auth service on ``rediss+sentinel://`` with every write acknowledged by the
replica. Under a steady stream of revocations the Redis primary's container is killed: the Sentinels
promote the replica and the auth service follows by itself (nothing restarts it). While the failover
lasts a revocation is refused with UNAVAILABLE, never with another answer; once the old primary is back
(as the new primary's replica) revocations are acknowledged again, and every one acknowledged, before,
during or after, is refused by the replica. ``docker compose down -v`` runs at the end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio

from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.tls import TlsFiles
from authmesh.compose_secrets import SENTINEL_SERVICE
from tests.auth_support import admin_login
from tests.test_compose_e2e import (
    AUTH_GRPC_PORT,
    CALL_TIMEOUT_SECONDS,
    PROPAGATION_SECONDS,
    RESOURCE_GRPC_PORT,
    ComposeProject,
    access_tokens,
    revoke_token,
    running_project,
)
from tests.test_stack import StackClient
from tests.waiting import eventually

pytestmark = [pytest.mark.compose, pytest.mark.timeout(600)]

# What this module starts: the auth service with the Sentinels, NATS and Redis, and one replica.
STARTED = ("resource-1",)
TOKENS_TO_REVOKE = 150
REVOKE_PACE_SECONDS = 0.2
# down-after-milliseconds (2 s), the Sentinels' election and the auth service's next try.
FAILOVER_SECONDS = 40.0
SENTINEL_CLI = (
    "redis-cli -p 26379 --tls --cacert /run/secrets/ca.pem --cert /run/secrets/tls.pem "
    "--key /run/secrets/tls-key.pem"
)


@dataclass(frozen=True, slots=True)
class SentinelStack:
    """The running project, where the host reaches it, and the admin's credentials."""

    project: ComposeProject
    auth_target: str
    replica_target: str
    admin: tuple[str, str]
    tls: TlsFiles

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[StackClient]:
        """A client of the auth service and the replica, closed afterwards."""
        client = StackClient(self.auth_target, [self.replica_target], self.admin, self.tls)
        try:
            yield client
        finally:
            await client.aclose()

    async def primary(self) -> str:
        """The name Sentinel gives the primary (``redis`` or ``redis-replica``)."""
        command = f"{SENTINEL_CLI} SENTINEL get-master-addr-by-name {SENTINEL_SERVICE}"
        output = await self.project.run("exec", "-T", "sentinel-1", "sh", "-c", command, timeout=30)
        return output.split()[0] if output.split() else ""


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SentinelStack]:
    """The sentinel profile's stack, healthy; taken down with its volumes afterwards."""
    directory = tmp_path_factory.mktemp("compose-sentinel-e2e")
    async with running_project(directory, sentinel=True, services=STARTED) as running:
        yield SentinelStack(
            running.project,
            running.address("auth", AUTH_GRPC_PORT),
            running.address("resource-1", RESOURCE_GRPC_PORT),
            running.admin,
            running.tls,
        )


async def test_the_profile_runs_redis_its_replica_and_three_sentinels_on_tls(stack: SentinelStack) -> None:
    running = (await stack.project.run("ps", "--format", "{{.Service}} {{.Health}}")).split("\n")
    states = dict(line.split(" ", 1) for line in running if line)

    assert {
        name: states.get(name) for name in ("redis", "redis-replica", *(f"sentinel-{n}" for n in (1, 2, 3)))
    } == (dict.fromkeys(("redis", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"), "healthy"))
    assert await stack.primary() == "redis"


async def test_the_auth_service_follows_a_failover_and_loses_no_acknowledged_revocation(
    stack: SentinelStack,
) -> None:
    async with stack.client() as client:
        admin = (await client.auth.Login(admin_login(stack.admin), timeout=CALL_TIMEOUT_SECONDS)).access_token
        tokens = await access_tokens(client, admin, "frank", TOKENS_TO_REVOKE)
        await revoke_token(client, admin, tokens[0])
        acknowledged = [tokens[0]]
        refused: collections.Counter[str] = collections.Counter()
        acknowledged_after: list[float] = []
        killed_at: list[float] = []
        attempted = [tokens[0]]
        done = asyncio.Event()

        async def revoke_until_done() -> None:
            for token in tokens[1:]:
                if done.is_set():
                    return
                attempted.append(token)
                try:
                    await revoke_token(client, admin, token)
                except grpc.aio.AioRpcError as error:
                    refused[f"{error.code().name} {error_reason(error)}"] += 1
                else:
                    acknowledged.append(token)
                    if killed_at:
                        acknowledged_after.append(time.monotonic() - killed_at[0])
                await asyncio.sleep(REVOKE_PACE_SECONDS)

        revoking = asyncio.create_task(revoke_until_done())
        try:
            await asyncio.sleep(REVOKE_PACE_SECONDS * 10)
            killed_at.append(time.monotonic())
            await stack.project.run("kill", "--signal", "SIGKILL", "redis")

            async def promoted() -> bool:
                return await stack.primary() == "redis-replica"

            await eventually(promoted, within=FAILOVER_SECONDS, what="the Sentinels to promote redis-replica")
            promoted_after = time.monotonic() - killed_at[0]
            # Back as the new primary's replica: writes are acknowledged by a replica again.
            await stack.project.run("start", "redis")

            async def acknowledged_again() -> bool:
                return bool(acknowledged_after) and acknowledged_after[-1] > promoted_after

            await eventually(
                acknowledged_again,
                within=FAILOVER_SECONDS,
                what="a revocation acknowledged after the failover",
            )
        finally:
            done.set()
            await revoking

        async def all_refused() -> bool:
            return all([await client.rejects(0, token, "TOKEN_REVOKED") for token in acknowledged])

        await eventually(
            all_refused, within=PROPAGATION_SECONDS, what="every acknowledged revocation refused"
        )

    print(
        f"primary killed; redis-replica promoted after {promoted_after:.1f} s; revocations acknowledged: "
        f"{len(acknowledged)} of {len(attempted)}; refused while failing over: {dict(refused)}"
    )
    assert {answer.split()[0] for answer in refused} <= {"UNAVAILABLE"}
    assert len(acknowledged) + sum(refused.values()) == len(attempted)
