"""The client examples under examples/ run as their docs say, against a real auth service and replica.

Each example runs as its own process with nothing but the variables its docstring names. The auth
service issues three-second tokens, so the example must renew its token to keep working; then the
test revokes the example's session and the example must be refused and stop.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authmesh._auth_service.app import AuthApp
from authmesh._resource_service.app import ResourceApp
from authmesh.auth.v1 import auth_pb2
from tests.auth_support import AuthClient, auth_settings, bearer, running_auth
from tests.faults import clean_environment
from tests.test_client_cli import running_replica

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ACCOUNT = ("worker", "worker-password-1")
ACCESS_TTL = 3
LINE_DEADLINE = 20.0
RENEWED_DEADLINE = ACCESS_TTL * 5 + 10.0
EXIT_DEADLINE = 20.0


@pytest_asyncio.fixture(loop_scope="session")
async def services(redis_url: str, nats_url: str) -> AsyncIterator[tuple[AuthApp, AuthClient, ResourceApp]]:
    """An auth service issuing short-lived tokens, the example's account, and a replica."""
    async with running_auth(auth_settings(redis_url, [nats_url], access_token_ttl=ACCESS_TTL)) as (
        auth,
        client,
    ):
        await client.create_user(*ACCOUNT)
        async with running_replica(auth, nats_url, "replica-examples") as replica:
            yield auth, client, replica


async def read_line(process: asyncio.subprocess.Process, log: list[str]) -> str:
    assert process.stdout is not None
    try:
        async with asyncio.timeout(LINE_DEADLINE):
            line = (await process.stdout.readline()).decode()
    except TimeoutError:
        pytest.fail(f"the example printed nothing for {LINE_DEADLINE:.0f} s; so far: {log}")
    if not line:
        pytest.fail(f"the example exited early: {log}")
    log.append(line.strip())
    return line.strip()


@pytest.mark.parametrize("script", ["client_async.py", "client_sync.py"])
async def test_a_client_example_renews_its_token_and_stops_once_its_session_is_revoked(
    services: tuple[AuthApp, AuthClient, ResourceApp], script: str
) -> None:
    auth, client, replica = services
    env = {
        **clean_environment(),
        "AUTHMESH_AUTH_TARGET": auth.grpc_address,
        "AUTHMESH_CLIENT_ACCOUNT": f"{ACCOUNT[0]}:{ACCOUNT[1]}",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / script), replica.grpc_address, "--every", "0.2",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    log: list[str] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RENEWED_DEADLINE
        while True:  # until the example has renewed its token at least once and kept working
            line = await read_line(process, log)
            assert line.startswith("ok: "), log
            if int(line.rsplit(" ", 1)[1]) >= 2:
                break
            assert loop.time() < deadline, f"the example never renewed its token: {log}"
        session_id = line.split(" session ", 1)[1].split()[0]
        admin = await client.admin_token()
        await client.stub.RevokeSession(
            auth_pb2.RevokeSessionRequest(session_id=session_id, reason="example"), metadata=bearer(admin)
        )
        for _ in range(int(EXIT_DEADLINE / 0.2) + 10):
            line = await read_line(process, log)
            if not line.startswith("ok: "):
                break
        async with asyncio.timeout(EXIT_DEADLINE):
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert code == 1, log
    assert line in {"refused: SESSION_REVOKED", "session ended: REFRESH_TOKEN_INVALID"}, log
