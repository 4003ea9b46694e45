"""The examples under examples/ run as their docs say, against a stack from ``authmesh up --env-file``.

One ``authmesh up`` (the real command, as a child process) runs for the module. Each example is started
as its own process with nothing but the variables the env file holds; a user is created, its token is
accepted where its scope allows, refused where it does not, and refused everywhere once its session is
revoked. The same stack shows that a second ``authmesh up`` cannot take its data directory.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import grpc
import pytest
import pytest_asyncio

from authmesh._shared.grpc_errors import error_reason
from authmesh.auth.v1 import auth_pb2
from authmesh.processes import LOOPBACK, free_ports
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from authmesh.stack import authmesh_command
from tests.auth_support import AuthClient, admin_login, auth_client, bearer
from tests.faults import FAST_AUTH_ENV, clean_environment
from tests.waiting import eventually

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
UP_DEADLINE = 90.0
EXAMPLE_DEADLINE = 30.0
STOP_DEADLINE = 20.0
PASSWORD = "password-of-a-user-1"


@dataclass
class Stack:
    """A running ``authmesh up``: its env file's variables and its admin."""

    env: dict[str, str]
    admin: tuple[str, str]
    data_dir: Path


def open_log(path: Path) -> IO[bytes]:
    """A child's log file (the child keeps its own descriptor once started)."""
    return path.open("wb")


def log_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def read_env_file(path: Path) -> dict[str, str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return dict(pairs)


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(STOP_DEADLINE):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    directory = tmp_path_factory.mktemp("examples")
    data_dir, env_file, log = directory / "data", directory / "authmesh.env", directory / "up.log"
    env = {**clean_environment(), **FAST_AUTH_ENV}
    command = authmesh_command("up", "--replicas", "0", "--json", "--data-dir", str(data_dir))
    with open_log(log) as output:
        process = await asyncio.create_subprocess_exec(
            *command, "--env-file", str(env_file), env=env, stdout=asyncio.subprocess.PIPE, stderr=output
        )
    try:
        assert process.stdout is not None
        try:
            async with asyncio.timeout(UP_DEADLINE):
                first_line = await process.stdout.readline()
        except TimeoutError:
            pytest.fail(f"authmesh up did not come up in {UP_DEADLINE:.0f} s; its log: {log_text(log)}")
        if not first_line:
            pytest.fail(f"authmesh up exited: {log_text(log)}")
        described = json.loads(first_line)
        admin = described["admin"]
        yield Stack(read_env_file(env_file), (admin["username"], admin["password"]), data_dir)
    finally:
        await stop(process)


@asynccontextmanager
async def running_example(
    script: str, listen: str, env: dict[str, str], ready: Callable[[], Awaitable[bool]]
) -> AsyncIterator[None]:
    log_path = Path(env["EXAMPLE_LOG"])
    with open_log(log_path) as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLES / script), listen, env=env, stdout=log, stderr=log
        )
    try:

        async def up() -> bool:
            if process.returncode is not None:
                pytest.fail(f"{script} exited: {log_text(log_path)}")
            return await ready()

        await eventually(up, within=EXAMPLE_DEADLINE, what=f"{script} to serve")
        yield
    finally:
        await stop(process)


def example_env(stack: Stack, log: Path) -> dict[str, str]:
    """No AUTHMESH_* variable but what the env file says."""
    return {**clean_environment(), **stack.env, "EXAMPLE_LOG": str(log)}


async def new_user(client: AuthClient, admin: tuple[str, str], scopes: tuple[str, ...]) -> auth_pb2.TokenPair:
    name = f"example-{time.monotonic_ns()}"
    token = (await client.stub.Login(admin_login(admin), timeout=10)).access_token
    await client.stub.CreateUser(
        auth_pb2.CreateUserRequest(username=name, password=PASSWORD, scopes=list(scopes)),
        metadata=bearer(token),
        timeout=10,
    )
    return await client.login(name, PASSWORD)


async def revoke(client: AuthClient, pair: auth_pb2.TokenPair) -> None:
    await client.stub.RevokeSession(
        auth_pb2.RevokeSessionRequest(session_id=pair.session_id, reason="example"),
        metadata=bearer(pair.access_token),
        timeout=10,
    )


async def grpc_outcome(call: Awaitable[Any]) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error_reason(error) or error.code().name
    return "OK"


def test_the_env_file_holds_what_a_new_service_needs(stack: Stack) -> None:
    assert set(stack.env) == {
        "AUTHMESH_AUTH_TARGET",
        "AUTHMESH_AUTH_URL",
        "AUTHMESH_NATS_URLS",
        "AUTHMESH_NATS_USER",
        "AUTHMESH_NATS_PASSWORD",
        "AUTHMESH_SERVICE_ACCOUNT",
        "AUTHMESH_ISSUER",
        "AUTHMESH_AUDIENCE",
    }
    env_file = stack.data_dir.parent / "authmesh.env"
    assert env_file.stat().st_mode & 0o777 == 0o600


async def test_a_second_stack_cannot_take_a_running_stacks_data_directory(stack: Stack) -> None:
    command = authmesh_command("up", "--replicas", "0", "--data-dir", str(stack.data_dir))
    process = await asyncio.create_subprocess_exec(
        *command, env=clean_environment(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(STOP_DEADLINE):
        _, stderr = await process.communicate()
    assert process.returncode != 0
    assert "held by another running stack" in " ".join(stderr.decode().split())


@pytest.mark.parametrize("script", ["aio_service.py", "sync_service.py"])
async def test_a_grpc_example_is_protected_and_hears_a_revocation(
    stack: Stack, script: str, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    listen = f"{LOOPBACK}:{port}"
    async with (
        auth_client(stack.env["AUTHMESH_AUTH_TARGET"]) as client,
        grpc.aio.insecure_channel(listen) as channel,
    ):
        stub = resource_pb2_grpc.ResourceServiceStub(channel)
        reader = await new_user(client, stack.admin, ("docs:read",))
        other = await new_user(client, stack.admin, ())

        def who(token: str) -> Awaitable[Any]:
            return stub.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token), timeout=5)

        async def serving() -> bool:
            return await grpc_outcome(who(reader.access_token)) == "OK"

        async with running_example(script, listen, example_env(stack, tmp_path / "example.log"), serving):
            document = resource_pb2.GetDocumentRequest(id="doc-1")
            assert (
                await grpc_outcome(stub.GetDocument(document, metadata=bearer(reader.access_token))) == "OK"
            )
            denied = stub.GetDocument(document, metadata=bearer(other.access_token), timeout=5)
            assert await grpc_outcome(denied) == "INSUFFICIENT_SCOPE"
            assert await grpc_outcome(stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=5)) == "TOKEN_MISSING"

            await revoke(client, reader)

            async def refused() -> bool:
                return await grpc_outcome(who(reader.access_token)) == "SESSION_REVOKED"

            await eventually(refused, within=10, what=f"the revocation to reach {script}")


async def test_the_fastapi_example_is_protected_and_hears_a_revocation(stack: Stack, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    base = f"http://{LOOPBACK}:{port}"

    async with auth_client(stack.env["AUTHMESH_AUTH_TARGET"]) as client, aiohttp.ClientSession() as http:
        reader = await new_user(client, stack.admin, ("docs:read",))
        other = await new_user(client, stack.admin, ())

        async def status(path: str, token: str | None) -> tuple[int, str]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                async with http.get(base + path, headers=headers) as response:
                    return response.status, response.headers.get("WWW-Authenticate", "")
            except aiohttp.ClientConnectionError:
                return 0, ""

        async def serving() -> bool:
            return (await status("/whoami", reader.access_token))[0] == 200

        env = example_env(stack, tmp_path / "example.log")
        async with running_example("fastapi_app.py", f"{LOOPBACK}:{port}", env, serving):
            assert (await status("/documents/doc-1", reader.access_token))[0] == 200
            code, challenge = await status("/documents/doc-1", other.access_token)
            assert (code, 'error="insufficient_scope"' in challenge) == (403, True)
            code, challenge = await status("/whoami", "not.a.token")
            assert (code, challenge.startswith('Bearer error="invalid_token"')) == (401, True)

            await revoke(client, reader)

            async def refused() -> bool:
                return (await status("/whoami", reader.access_token))[0] == 401

            await eventually(refused, within=10, what="the revocation to reach the FastAPI example")
