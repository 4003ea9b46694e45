"""docker-compose.yml in real containers: ``make compose-e2e`` (marker ``compose``; not in ``make test``).

Needs a Docker engine, the compose v2 plugin and the base images; ``scripts/compose_e2e.sh`` provides all
three (and stand-ins for the base images where no registry answers). One compose project with a name of
its own comes up with ``--wait`` on the secrets directory ``authmesh compose-env`` writes, every hop on
TLS (this process verifies the stack's CA), and then, in order: plaintext clients are refused by the
auth service, the replicas' HTTPS side, the gateway, NATS and Redis; the demo profile passes; a token
passes through the Envoy gateway to the service behind it, which sees the verified subject, and once its
session is revoked the gateway refuses it (401); the demo passes again with one NATS node killed;
revocations acknowledged while Redis is killed and the auth service restarted are all still refused by
every replica (one of them restarted too); a replica cut from the NATS network refuses a token revoked
during the cut within its staleness bound. ``docker compose down -v`` runs at the end whatever happened.
Published ports bind 127.0.0.1 only, on free ports chosen at the start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio

from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.settings import ResourceSettings
from authmesh._shared.tls import TlsFiles, client_ssl_context
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from authmesh.compose_secrets import SECRETS_DIR_VARIABLE, dotenv_lines, write_compose_secrets
from authmesh.processes import free_ports
from tests.auth_support import admin_login
from tests.test_stack import USER_PASSWORD, StackClient, bearer
from tests.waiting import eventually

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
REPLICAS = ("resource-1", "resource-2", "resource-3")
AUTH_GRPC_PORT, RESOURCE_GRPC_PORT = 50051, 50061
AUTH_HTTP_PORT, RESOURCE_HTTP_PORT = 8081, 8091
GATEWAY_PORT = 8080
# The first `up` builds the authmesh image (pip install from the package index).
UP_TIMEOUT_SECONDS = 600
COMMAND_TIMEOUT_SECONDS = 180
DEMO_TIMEOUT_SECONDS = 300
# How long a replica may take to see a revocation over NATS, when nothing is cut.
PROPAGATION_SECONDS = 10.0
# nats-py waits 2 s between reconnects and 2 s for a connect to an address that no longer answers.
FAILOVER_SECONDS = 30.0
HTTP_TIMEOUT_SECONDS = 2.0
# Beyond the staleness bound: one heartbeat interval, one poll, and a call's own round trip.
STALENESS_SLACK_SECONDS = 2.0
# One revocation per this many seconds while Redis and the auth service restart.
REVOKE_PACE_SECONDS = 0.3
TOKENS_TO_REVOKE = 120
# Revoked once the stack is healthy again: acknowledged before, during (where any is) and after.
AFTER_RESTART = 3
# A login hashes a password (argon2): seconds, not milliseconds, on a busy machine.
CALL_TIMEOUT_SECONDS = 30.0

SERVICE_PORTS: dict[str, tuple[int, ...]] = {
    "auth": (AUTH_GRPC_PORT, AUTH_HTTP_PORT),
    **dict.fromkeys(REPLICAS, (RESOURCE_GRPC_PORT, RESOURCE_HTTP_PORT)),
    "gateway": (GATEWAY_PORT,),
}


def override_publishing(host_ports: dict[tuple[str, int], int]) -> str:
    """A compose override that publishes each port on loopback only, at the port ``host_ports`` names.

    Ports chosen here, not by the engine: an engine-chosen port changes when its container restarts.
    The compose file's own (50051, …) may be taken by a stack already running on this machine.
    """
    lines = ["services:"]
    for service, ports in SERVICE_PORTS.items():
        published = ", ".join(f'"127.0.0.1:{host_ports[(service, port)]}:{port}"' for port in ports)
        lines += [f"  {service}:", f"    ports: !override [{published}]"]
    return "\n".join(lines) + "\n"


class ComposeError(AssertionError):
    """A compose command failed; carries its output."""


@dataclass(frozen=True, slots=True)
class ComposeProject:
    """One compose project of docker-compose.yml: its name, its override file and its secrets."""

    name: str
    override: Path
    environment: dict[str, str]

    def command(self, *arguments: str) -> list[str]:
        """``docker compose`` on this project."""
        files = ["--file", str(COMPOSE_FILE), "--file", str(self.override)]
        return [
            "docker",
            "compose",
            "--project-name",
            self.name,
            "--project-directory",
            str(ROOT),
            *files,
            *arguments,
        ]

    async def run(self, *arguments: str, timeout: float = COMMAND_TIMEOUT_SECONDS) -> str:  # noqa: ASYNC109
        """Run a compose command; its standard output, or ComposeError with everything it said."""
        return await docker(*self.command(*arguments)[1:], timeout=timeout, environment=self.environment)

    async def container(self, service: str) -> str:
        """The id of ``service``'s container."""
        return (await self.run("ps", "--quiet", service)).strip()

    async def wait_healthy(self) -> None:
        """Start whatever is stopped and wait until every service is healthy."""
        await self.run("up", "--detach", "--wait", "--no-build", timeout=UP_TIMEOUT_SECONDS)

    def network(self, name: str) -> str:
        """The engine's name of the compose network ``name``."""
        return f"{self.name}_{name}"


async def docker(
    *arguments: str,
    timeout: float = COMMAND_TIMEOUT_SECONDS,  # noqa: ASYNC109
    environment: dict[str, str] | None = None,
) -> str:
    """Run ``docker ARGUMENTS``; its standard output, or ComposeError with everything it said."""
    process = await asyncio.create_subprocess_exec(
        "docker",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ComposeError(f"docker {' '.join(arguments[:6])} … did not finish in {timeout:.0f} s") from None
    if process.returncode != 0:
        said = (stdout + stderr).decode(errors="replace")[-6000:]
        raise ComposeError(f"docker {' '.join(arguments[:6])} … exited {process.returncode}:\n{said}")
    return stdout.decode()


@dataclass(frozen=True, slots=True)
class Stack:
    """The running project and where its published ports are."""

    project: ComposeProject
    auth_target: str
    replica_targets: list[str]
    replica_http: list[str]
    gateway: str
    admin: tuple[str, str]
    tls: TlsFiles

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[StackClient]:
        """A client of the auth service and the three replicas, closed afterwards."""
        client = StackClient(self.auth_target, self.replica_targets, self.admin, self.tls)
        try:
            yield client
        finally:
            await client.aclose()


def compose_env(secrets_dir: Path) -> dict[str, str]:
    """This process's environment, without AUTHMESH_* settings of its own, naming the secrets directory."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("AUTHMESH_")}
    return environment | {SECRETS_DIR_VARIABLE: str(secrets_dir)}


def ssl_context(stack: Stack) -> ssl.SSLContext:
    """What this process verifies the stack's HTTPS side and gateway with."""
    context = client_ssl_context(stack.tls)
    assert context is not None
    return context


@dataclass(frozen=True, slots=True)
class RunningProject:
    """A project brought up by :func:`running_project`: where its ports are published, its secrets."""

    project: ComposeProject
    host_ports: dict[tuple[str, int], int]
    secrets_dir: Path

    def address(self, service: str, port: int) -> str:
        """``127.0.0.1:PORT`` where the host reaches ``service``'s ``port``."""
        return f"127.0.0.1:{self.host_ports[(service, port)]}"

    @property
    def admin(self) -> tuple[str, str]:
        """The bootstrap admin's credentials, from its secret."""
        username, _, password = (self.secrets_dir / "bootstrap-admin").read_text().partition(":")
        return username, password

    @property
    def tls(self) -> TlsFiles:
        """What the host verifies the stack with: its CA."""
        return TlsFiles(ca_file=self.secrets_dir / "ca.pem")


@contextlib.asynccontextmanager
async def running_project(
    directory: Path, *, sentinel: bool = False, services: tuple[str, ...] = ()
) -> AsyncIterator[RunningProject]:
    """docker-compose.yml up and healthy on a secrets directory of its own (``services`` and what they
    need, or everything); taken down with its volumes afterwards.

    Args:
        directory: Where the override file and the secrets go.
        sentinel: With the ``.env`` of ``compose-env --sentinel`` (the sentinel profile).
        services: Start only these (and their dependencies).
    """
    wanted = [(service, port) for service, ports in SERVICE_PORTS.items() for port in ports]
    host_ports = dict(zip(wanted, free_ports(len(wanted)), strict=True))
    override = directory / "docker-compose.e2e.yml"
    override.write_text(override_publishing(host_ports))
    secrets_dir = directory / "secrets"
    write_compose_secrets(secrets_dir)
    dotenv = (line.split("=", 1) for line in dotenv_lines(secrets_dir, sentinel=sentinel) if line[:1] != "#")
    environment = compose_env(secrets_dir) | dict(dotenv)
    project = ComposeProject(f"authmesh-e2e-{secrets.token_hex(4)}", override, environment)
    try:
        try:
            # --build: an authmesh:local left by an earlier run may hold older code.
            await project.run("up", "--detach", "--wait", "--build", *services, timeout=UP_TIMEOUT_SECONDS)
        except ComposeError as error:
            logs = await project.run("logs", "--no-color", "--tail", "40")
            raise ComposeError(
                f"{error}\n--- health ---\n{await health_report(project)}\n--- logs ---\n{logs}"
            ) from None
        yield RunningProject(project, host_ports, secrets_dir)
    finally:
        await project.run("down", "--volumes", "--remove-orphans", "--timeout", "10")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """The compose file's stack in containers, healthy; taken down with its volumes afterwards."""
    async with running_project(tmp_path_factory.mktemp("compose-e2e")) as running:
        yield Stack(
            running.project,
            running.address("auth", AUTH_GRPC_PORT),
            [running.address(replica, RESOURCE_GRPC_PORT) for replica in REPLICAS],
            [running.address(replica, RESOURCE_HTTP_PORT) for replica in REPLICAS],
            f"https://{running.address('gateway', GATEWAY_PORT)}",
            running.admin,
            running.tls,
        )


async def health_report(project: ComposeProject) -> str:
    """Each container's health state and its last healthcheck's output."""
    lines = []
    for container in (await project.run("ps", "--all", "--quiet")).split():
        name, _, health = (
            await docker("inspect", "--format", "{{.Name}} {{json .State.Health}}", container)
        ).partition(" ")
        state = json.loads(health) or {}
        last = (state.get("Log") or [{}])[-1]
        lines.append(f"{name}: {state.get('Status')}; last check: {str(last.get('Output', '')).strip()!r}")
    return "\n".join(lines)


async def run_demo(stack: Stack) -> str:
    """The demo profile's service, once, against the running stack (it starts nothing else)."""
    return await stack.project.run(
        "--profile", "demo", "run", "--rm", "--no-deps", "demo", timeout=DEMO_TIMEOUT_SECONDS
    )


async def replica_states(stack: Stack) -> list[dict[str, object]]:
    """Each replica's ``/healthz`` answer (an empty dict for one that does not answer)."""
    states: list[dict[str, object]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)) as session:
        for address in stack.replica_http:
            try:
                async with session.get(f"https://{address}/healthz", ssl=ssl_context(stack)) as reply:
                    states.append(await reply.json())
            except (aiohttp.ClientError, TimeoutError):
                states.append({})
    return states


async def replicas_current(stack: Stack, since: float) -> bool:
    """Whether every replica is connected, not degraded, and had a heartbeat after ``since`` (monotonic)."""
    elapsed = time.monotonic() - since

    def current(state: dict[str, object]) -> bool:
        staleness = state.get("staleness_seconds")
        connected = state.get("nats_connected") is True and state.get("degraded") is False
        return connected and isinstance(staleness, int | float) and staleness < elapsed

    return all(current(state) for state in await replica_states(stack))


async def admin_token(stack: Stack, client: StackClient) -> str:
    """An access token of the bootstrap admin (valid for minutes, across restarts of the auth service)."""
    reply = await client.auth.Login(admin_login(stack.admin), timeout=CALL_TIMEOUT_SECONDS)
    return reply.access_token


async def new_user_session(client: StackClient, admin: str, username: str) -> auth_pb2.TokenPair:
    """Add ``username`` (scope ``docs:read``) and log it in."""
    await client.auth.CreateUser(
        auth_pb2.CreateUserRequest(username=username, password=USER_PASSWORD, scopes=["docs:read"]),
        metadata=bearer(admin),
        timeout=CALL_TIMEOUT_SECONDS,
    )
    return await client.auth.Login(
        auth_pb2.LoginRequest(username=username, password=USER_PASSWORD), timeout=CALL_TIMEOUT_SECONDS
    )


async def access_tokens(client: StackClient, admin: str, username: str, count: int) -> list[str]:
    """``count`` access tokens of one new user's session, to revoke one by one.

    Refreshing is cheap (no password hash): one login, then a refresh per token.
    """
    pair = await new_user_session(client, admin, username)
    tokens = [pair.access_token]
    for _ in range(count - 1):
        pair = await client.auth.Refresh(
            auth_pb2.RefreshRequest(refresh_token=pair.refresh_token), timeout=CALL_TIMEOUT_SECONDS
        )
        tokens.append(pair.access_token)
    return tokens


async def revoke_token(client: StackClient, admin: str, token: str) -> None:
    """Revoke one access token as the admin; returns once JetStream acknowledged the event."""
    await client.auth.RevokeToken(
        auth_pb2.RevokeTokenRequest(token=token, reason="test"), metadata=bearer(admin), timeout=10
    )


async def refusal(client: StackClient, replica: int, token: str) -> str | None:
    """``None`` when the replica accepts ``token``; else the status code and reason it refused with."""
    try:
        await client.whoami(replica, token)
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name} {error_reason(error)}"
    return None


async def refuses_everywhere(client: StackClient, token: str, reason: str) -> bool:
    """Whether every replica refuses ``token`` as UNAUTHENTICATED with ``reason``."""
    return all([await client.rejects(index, token, reason) for index in range(len(REPLICAS))])


def staleness_bound() -> float:
    """The replicas' staleness bound: the compose file leaves the contract's default."""
    default = ResourceSettings.model_fields["staleness_bound"].default
    assert isinstance(default, int | float)
    return float(default)


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """Seconds spent in the block, in the one-element list it yields."""
    elapsed = [0.0]
    started = time.monotonic()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.monotonic() - started


async def test_the_stack_is_healthy_on_its_own_networks_and_publishes_on_loopback_only(stack: Stack) -> None:
    lines = (await stack.project.run("ps", "--format", "json")).splitlines()
    services = {entry["Service"]: entry for entry in map(json.loads, filter(None, lines))}
    # Redis runs in the network namespace of redis-host, which holds its name and address.
    redis_id = await stack.project.container("redis-host")
    redis_networks = json.loads(
        await docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", redis_id)
    )
    internal = {
        name: (
            await docker("network", "inspect", "--format", "{{.Internal}}", stack.project.network(name))
        ).strip()
        for name in ("nats", "redis", "upstream")
    }

    assert set(services) == {
        *("nats-1", "nats-2", "nats-3", "redis-host", "redis", "auth", *REPLICAS, "gateway", "upstream")
    }
    assert {entry["Health"] for entry in services.values()} == {"healthy"}
    published = [
        port for entry in services.values() for port in entry.get("Publishers") or [] if port["PublishedPort"]
    ]
    assert {port["URL"] for port in published} == {"127.0.0.1"}
    assert set(redis_networks) == {stack.project.network("redis")}
    assert internal == {"nats": "true", "redis": "true", "upstream": "true"}


# Run inside the auth container (NATS and Redis are not published): a plaintext client of each.
_PLAINTEXT_PROBE = """
import asyncio, json
import nats, redis.asyncio as redis
from redis.exceptions import ConnectionError, TimeoutError

async def nats_answers():
    try:
        connection = await nats.connect("nats://nats-1:4222", connect_timeout=2, allow_reconnect=False,
                                        max_reconnect_attempts=0)
    except Exception:
        return False
    await connection.close()
    return True

async def redis_answers():
    client = redis.Redis(host="redis", port=6379, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.ping()
    except (ConnectionError, TimeoutError, OSError):
        return False
    except Exception:
        return True  # it answered (NOAUTH, say): plaintext got through
    finally:
        await client.aclose()
    return True

async def main():
    print(json.dumps({"nats": await nats_answers(), "redis": await redis_answers()}))

asyncio.run(main())
"""


async def plaintext_http_answers(url: str) -> bool:
    """Whether ``url`` answers a plaintext HTTP request at all."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)) as session,
            session.get(url) as reply,
        ):
            await reply.read()
    except (aiohttp.ClientError, TimeoutError):
        return False
    return True


async def test_plaintext_clients_are_refused_everywhere(stack: Stack) -> None:
    channel = grpc.aio.insecure_channel(stack.auth_target)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await auth_pb2_grpc.AuthServiceStub(channel).GetJwks(auth_pb2.GetJwksRequest(), timeout=5)
    finally:
        await channel.close()
    http_side = await plaintext_http_answers(f"http://{stack.replica_http[0]}/healthz")
    gateway = await plaintext_http_answers(stack.gateway.replace("https://", "http://") + "/docs/1")
    inside = json.loads(
        await stack.project.run("exec", "-T", "auth", "python", "-c", _PLAINTEXT_PROBE, timeout=60)
    )

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not http_side
    assert not gateway
    assert inside == {"nats": False, "redis": False}


async def test_the_demo_profile_passes(stack: Stack) -> None:
    output = await run_demo(stack)

    assert "resource-1" in output
    # The gateway act ran against the compose file's Envoy (the profile passes --target-gateway).
    assert "no Envoy gateway" not in output
    assert "through Envoy to the echo service (no authmesh code): HTTP 200" in output


async def through_the_gateway(stack: Stack, token: str) -> tuple[int, dict[str, object]]:
    """The gateway's status for ``GET /docs/1`` with ``token``, and the JSON body it answered."""
    headers = {"authorization": f"Bearer {token}", "x-authmesh-subject": "forged-by-the-client"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)) as session,
        session.get(f"{stack.gateway}/docs/1", headers=headers, ssl=ssl_context(stack)) as reply,
    ):
        text = await reply.text()
        return reply.status, (json.loads(text) if text.startswith("{") else {})


async def test_the_gateway_passes_a_token_to_the_upstream_and_refuses_it_once_its_session_is_revoked(
    stack: Stack,
) -> None:
    async with stack.client() as client:
        subject = await client.create_user("grace")
        pair = await client.login("grace", USER_PASSWORD)
        status, passed = await through_the_gateway(stack, pair.access_token)

        await client.revoke_session(pair.session_id)
        with timer() as elapsed:

            async def refused_at_the_gateway() -> bool:
                return (await through_the_gateway(stack, pair.access_token))[0] == 401

            await eventually(
                refused_at_the_gateway, within=PROPAGATION_SECONDS, what="the gateway to refuse the session"
            )
        _, refusal_body = await through_the_gateway(stack, pair.access_token)

    print(f"the gateway refused the revoked session {elapsed[0] * 1000:.0f} ms after RevokeSession returned")
    assert status == 200
    headers = passed["headers"]
    assert isinstance(headers, dict)
    assert headers["x-authmesh-subject"] == [subject]
    assert refusal_body.get("reason") == "SESSION_REVOKED"


async def test_the_demo_passes_with_one_nats_node_killed(stack: Stack) -> None:
    killed = time.monotonic()
    await stack.project.run("kill", "--signal", "SIGKILL", "nats-2")
    try:
        states = await stack.project.run("ps", "--all", "--format", "{{.Service}} {{.State}}", "nats-2")
        # Clients of the killed node reconnect to another; until the auth service's heartbeats flow
        # again the replicas are degraded (they ask Introspect), which the demo's 1 s calls do not wait
        # for. Current again: a heartbeat sent after the kill reached every replica.
        await eventually(
            lambda: replicas_current(stack, killed), within=FAILOVER_SECONDS, what="the replicas to fail over"
        )
        failover = time.monotonic() - killed
        output = await run_demo(stack)
    finally:
        await stack.project.wait_healthy()

    print(f"replicas current again {failover:.1f} s after nats-2 was killed")
    assert states.split() == ["nats-2", "exited"]
    assert "resource-1" in output


async def test_no_acknowledged_revocation_is_lost_when_redis_is_killed_and_the_auth_service_restarts(
    stack: Stack,
) -> None:
    async with stack.client() as client:
        admin = await admin_token(stack, client)
        tokens = await access_tokens(client, admin, "dora", TOKENS_TO_REVOKE)
        # One revocation acknowledged before anything restarts, so the check below is never empty.
        await revoke_token(client, admin, tokens[0])
        acknowledged = [tokens[0]]
        failed: collections.Counter[str] = collections.Counter()
        restarted = asyncio.Event()

        async def revoke_until_restarted() -> None:
            for token in tokens[1:-AFTER_RESTART]:
                try:
                    await revoke_token(client, admin, token)
                except grpc.aio.AioRpcError as error:
                    failed[f"{error.code().name} {error_reason(error)}"] += 1
                else:
                    acknowledged.append(token)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(restarted.wait(), REVOKE_PACE_SECONDS)
                if restarted.is_set():
                    return

        revoking = asyncio.create_task(revoke_until_restarted())
        try:
            await stack.project.run("kill", "--signal", "SIGKILL", "redis")
            await stack.project.run("start", "redis")
            await stack.project.run("restart", "auth")
            await stack.project.wait_healthy()
        finally:
            restarted.set()
            await revoking
        for token in tokens[-AFTER_RESTART:]:
            await revoke_token(client, admin, token)
            acknowledged.append(token)
        # A replica that starts now learns the revocations from the auth service's snapshot (Redis)
        # and the stream alone.
        await stack.project.run("restart", "resource-3")
        await stack.project.wait_healthy()

        async def all_refused() -> bool:
            return all([await refuses_everywhere(client, token, "TOKEN_REVOKED") for token in acknowledged])

        await eventually(
            all_refused, within=PROPAGATION_SECONDS, what="every acknowledged revocation refused"
        )

    print(f"revocations acknowledged: {len(acknowledged)}; refused during the restarts: {dict(failed)}")


async def test_a_replica_cut_from_nats_refuses_a_token_revoked_during_the_cut_within_its_staleness_bound(
    stack: Stack,
) -> None:
    cut, cut_index = "resource-2", REPLICAS.index("resource-2")
    container = await stack.project.container(cut)
    network = stack.project.network("nats")
    bound = staleness_bound()
    async with stack.client() as client:
        admin = await admin_token(stack, client)
        stolen = await new_user_session(client, admin, "eve")
        assert await refusal(client, cut_index, stolen.access_token) is None

        await docker("network", "disconnect", network, container)
        try:
            await revoke_token(client, admin, stolen.access_token)
            with timer() as elapsed:

                async def refused_by_the_cut_replica() -> bool:
                    return await refusal(client, cut_index, stolen.access_token) is not None

                await eventually(
                    refused_by_the_cut_replica,
                    within=bound + STALENESS_SLACK_SECONDS,
                    what=f"{cut}, cut from NATS, to refuse a token revoked during the cut",
                )
            answer = await refusal(client, cut_index, stolen.access_token)
            others = [
                await refusal(client, index, stolen.access_token)
                for index in range(len(REPLICAS))
                if index != cut_index
            ]
        finally:
            await docker("network", "connect", network, container)

        async def caught_up() -> bool:
            return await client.rejects(cut_index, stolen.access_token, "TOKEN_REVOKED")

        await eventually(
            caught_up, within=PROPAGATION_SECONDS * 3, what=f"{cut} to catch up once reconnected"
        )
        fresh = await client.auth.Refresh(
            auth_pb2.RefreshRequest(refresh_token=stolen.refresh_token), timeout=CALL_TIMEOUT_SECONDS
        )
        after = await refusal(client, cut_index, fresh.access_token)

    print(f"{cut} refused the token revoked during the cut after {elapsed[0]:.2f} s (bound {bound:.0f} s)")
    assert answer is not None
    assert others == ["UNAUTHENTICATED TOKEN_REVOKED"] * (len(REPLICAS) - 1)
    assert after is None
