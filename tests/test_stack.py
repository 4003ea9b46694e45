"""``LocalStack`` and ``authmesh up``: the whole stack as local processes, its NATS users, its faults."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats
import nats.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.js.api import ConsumerConfig
from rich.console import Console

from authmesh._shared.events import LIVE_SUBJECTS, STREAM_NAME, EventType
from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.nats_wiring import inbox_prefix
from authmesh._shared.stream_reader import DIRECT_GET_SUBJECT, StreamReader, live_message
from authmesh._shared.tls import TlsFiles, open_channel
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from authmesh.processes import LOOPBACK
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from authmesh.stack import (
    READER_NATS_USER,
    LocalStack,
    StackSecrets,
    authmesh_command,
    grpc_health_status,
    replica_names,
    stack_nats_cluster,
    stack_nats_config,
)
from authmesh.stack_commands import print_stack
from tests.auth_support import admin_login
from tests.legible import assert_legible
from tests.nats_routes import intruder_joins, route_count
from tests.waiting import eventually

# Cheap password hashing and quick heartbeats and shutdowns: the stack is the subject, not Argon2.
FAST_ENV = {
    "AUTHMESH_ARGON2_TIME_COST": "1",
    "AUTHMESH_ARGON2_MEMORY_KIB": "1024",
    "AUTHMESH_ARGON2_PARALLELISM": "1",
    "AUTHMESH_HEARTBEAT_INTERVAL": "0.2",
    "AUTHMESH_SHUTDOWN_GRACE": "0.5",
}
STALENESS_BOUND = 1.0
USER_PASSWORD = "correct horse battery staple"
_GONE_TIMEOUT_SECONDS = 15.0
_NATS_REQUEST_TIMEOUT_SECONDS = 1.0


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying a bearer token."""
    return (("authorization", f"Bearer {token}"),)


class StackClient:
    """The few calls these tests make on a stack: log in, add a user, revoke a session, ask a replica.

    Args:
        auth_target: The auth service's gRPC address.
        replica_targets: Each replica's gRPC address.
        admin: The bootstrap admin's ``(username, password)``.
        tls: Call over TLS with these files (a CA: verify the servers); plaintext by default.
    """

    def __init__(
        self,
        auth_target: str,
        replica_targets: Iterable[str],
        admin: tuple[str, str],
        tls: TlsFiles | None = None,
    ) -> None:
        self._admin = admin
        files = tls or TlsFiles()
        self._channels = [open_channel(auth_target, files)]
        self.auth: auth_pb2_grpc.AuthServiceAsyncStub = auth_pb2_grpc.AuthServiceStub(self._channels[0])
        self.replicas: list[resource_pb2_grpc.ResourceServiceAsyncStub] = []
        for target in replica_targets:
            channel = open_channel(target, files)
            self._channels.append(channel)
            self.replicas.append(resource_pb2_grpc.ResourceServiceStub(channel))

    async def aclose(self) -> None:
        """Close every channel."""
        for channel in self._channels:
            await channel.close()

    async def login(self, username: str, password: str) -> auth_pb2.TokenPair:
        """Log in."""
        return await self.auth.Login(auth_pb2.LoginRequest(username=username, password=password), timeout=10)

    async def admin_token(self) -> str:
        """An access token of the bootstrap admin."""
        return (await self.auth.Login(admin_login(self._admin), timeout=10)).access_token

    async def create_user(self, username: str, password: str = USER_PASSWORD) -> str:
        """Add a user with scope ``docs:read``; returns its subject."""
        response = await self.auth.CreateUser(
            auth_pb2.CreateUserRequest(username=username, password=password, scopes=["docs:read"]),
            metadata=bearer(await self.admin_token()),
            timeout=10,
        )
        return response.subject

    async def revoke_session(self, session_id: str) -> None:
        """Revoke a session as the admin; returns once the event is acknowledged by JetStream."""
        await self.auth.RevokeSession(
            auth_pb2.RevokeSessionRequest(session_id=session_id, reason="test"),
            metadata=bearer(await self.admin_token()),
            timeout=10,
        )

    async def whoami(self, replica: int, token: str) -> resource_pb2.WhoAmIResponse:
        """``WhoAmI`` on one replica."""
        return await self.replicas[replica].WhoAmI(
            resource_pb2.WhoAmIRequest(), metadata=bearer(token), timeout=5
        )

    async def rejects(self, replica: int, token: str, reason: str) -> bool:
        """Whether the replica refuses the token as UNAUTHENTICATED with ``reason``."""
        try:
            await self.whoami(replica, token)
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED and error_reason(error) == reason
        return False


def process_is_gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (absent, or a zombie waiting for whoever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in {"Z", "X"}


async def all_gone(pids: Iterable[int]) -> bool:
    """Whether every process in ``pids`` is gone, waiting for them up to a deadline."""
    deadline = time.monotonic() + _GONE_TIMEOUT_SECONDS
    while not all(process_is_gone(pid) for pid in pids):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def replica_health(stack: LocalStack, index: int) -> dict[str, Any]:
    """The replica's ``/healthz`` document."""
    url = f"http://{stack.replicas[index].http}/healthz"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, timeout=aiohttp.ClientTimeout(2)) as reply,
    ):
        document = await reply.json()
    assert isinstance(document, dict)
    return document


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    """One stack with two replicas for the tests that do not stop it (they may cut and restore the first)."""
    async with LocalStack(
        replicas=2,
        base_dir=tmp_path_factory.mktemp("stack"),
        env=FAST_ENV,
        staleness_bound=STALENESS_BOUND,
    ) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def client(stack: LocalStack) -> AsyncIterator[StackClient]:
    """A client of the module's stack."""
    client = StackClient(
        stack.auth_grpc, [replica.grpc for replica in stack.replicas], stack.admin_credentials
    )
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def resource_nats(stack: LocalStack) -> AsyncIterator[tuple[NatsClient, list[Exception]]]:
    """A NATS connection with the first replica's credentials, and the errors the server sent it."""
    assert stack.secrets is not None
    errors: list[Exception] = []

    async def collect(error: Exception) -> None:
        errors.append(error)

    credentials = stack.secrets.nats_replica(stack.replicas[0].name)
    connection = await nats.connect(
        servers=stack.nats_urls,
        user=credentials.username,
        password=credentials.password,
        inbox_prefix=inbox_prefix(credentials.username),
        error_cb=collect,
        connect_timeout=2,
        max_reconnect_attempts=0,
    )
    try:
        yield connection, errors
    finally:
        await connection.close()


def refused(errors: list[Exception], subject: str, operation: str = "publish to") -> bool:
    """Whether the server reported a permissions violation for ``operation`` ``subject``.

    ``operation`` is ``publish to`` or ``subscription to``.
    """
    # nats-py lower-cases the server's message.
    expected = f'permissions violation for {operation} "{subject}"'.lower()
    return any(expected in str(error).lower() for error in errors)


async def test_a_local_stack_serves_a_login_on_every_replica_and_leaves_no_process_after_stop(
    tmp_path: Path,
) -> None:
    async with LocalStack(replicas=2, base_dir=tmp_path / "stack", env=FAST_ENV) as stack:
        pids = stack.pids()
        assert set(pids) == {"authmesh-nats", "redis", "auth", "resource-1", "resource-2"}
        targets = [stack.auth_grpc, *(replica.grpc for replica in stack.replicas)]
        assert [await grpc_health_status(target, 2) for target in targets] == ["SERVING"] * 3
        client = StackClient(
            stack.auth_grpc, [replica.grpc for replica in stack.replicas], stack.admin_credentials
        )
        try:
            subject = await client.create_user("alice")
            token = (await client.login("alice", USER_PASSWORD)).access_token

            answers = [await client.whoami(index, token) for index in range(2)]
        finally:
            await client.aclose()
        description = json.loads(json.dumps(stack.describe()))

    assert [answer.instance for answer in answers] == ["resource-1", "resource-2"]
    assert {answer.subject for answer in answers} == {subject}
    assert description["auth"]["grpc"] == targets[0]
    assert [replica["name"] for replica in description["replicas"]] == ["resource-1", "resource-2"]
    assert await all_gone(pids.values())
    assert stack.pids() == {}


async def test_a_stack_on_redis_sentinel_runs_three_data_nodes_and_three_sentinels_and_serves_logins(
    tmp_path: Path,
) -> None:
    async with LocalStack(replicas=0, base_dir=tmp_path, env=FAST_ENV, redis_sentinel=True) as stack:
        pids = stack.pids()
        assert {"redis-0", "redis-1", "redis-2", "sentinel-0", "sentinel-1", "sentinel-2"} <= set(pids)
        assert stack.redis_url.startswith("redis+sentinel://")
        client = StackClient(stack.auth_grpc, [], stack.admin_credentials)
        try:
            await client.create_user("alice")
            assert (await client.login("alice", USER_PASSWORD)).access_token
        finally:
            await client.aclose()
    assert await all_gone(pids.values())


async def test_a_stack_restarted_on_its_data_directory_keeps_its_admin(tmp_path: Path) -> None:
    async with LocalStack(replicas=0, base_dir=tmp_path, env=FAST_ENV) as stack:
        first_admin = stack.admin_credentials
    assert (tmp_path / "stack-secrets.json").stat().st_mode & 0o077 == 0

    async with LocalStack(replicas=0, base_dir=tmp_path, env=FAST_ENV) as stack:
        client = StackClient(stack.auth_grpc, [], stack.admin_credentials)
        try:
            assert (await client.login(*first_admin)).access_token
        finally:
            await client.aclose()
        assert stack.admin_credentials == first_admin


async def test_a_service_that_does_not_come_up_is_named_with_the_tail_of_its_log(tmp_path: Path) -> None:
    stack = LocalStack(replicas=1, base_dir=tmp_path, env={"AUTHMESH_KEY_ENCRYPTION_KEY": "too-short"})

    with pytest.raises(Exception, match=r"auth \(gRPC 127\.0\.0\.1:\d+\) did not become healthy") as raised:
        async with stack:
            pass

    # The service's console may wrap its message; the words are what matters.
    assert "AUTHMESH_KEY_ENCRYPTION_KEY must be at least 16 characters" in " ".join(str(raised.value).split())
    assert stack.pids() == {}


async def test_the_resource_nats_user_cannot_publish_an_event(
    stack: LocalStack, resource_nats: tuple[NatsClient, list[Exception]]
) -> None:
    connection, errors = resource_nats
    subject = EventType.TOKEN_REVOKED.subject
    jetstream = connection.jetstream(timeout=_NATS_REQUEST_TIMEOUT_SECONDS)

    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await jetstream.publish(subject, b"forged")

    async def reported() -> bool:
        return refused(errors, subject)

    await eventually(reported, within=5, what="the server to refuse the publish")
    forged_live = EventType.TOKEN_REVOKED.live_subject  # nor a forged live copy
    await connection.publish(forged_live, b"forged")

    async def reported_live() -> bool:
        return refused(errors, forged_live)

    await eventually(reported_live, within=5, what="the server to refuse the live publish")
    last = await connection.request(
        DIRECT_GET_SUBJECT, json.dumps({"last_by_subj": subject}).encode(), timeout=2
    )
    assert (last.headers or {}).get("Status") == "404"


@pytest.mark.parametrize("operation", ["DELETE", "PURGE"])
async def test_the_resource_nats_user_cannot_delete_or_purge_the_event_stream(
    stack: LocalStack, resource_nats: tuple[NatsClient, list[Exception]], operation: str
) -> None:
    connection, errors = resource_nats
    jetstream = connection.jetstream(timeout=_NATS_REQUEST_TIMEOUT_SECONDS)
    before = await jetstream.stream_info(STREAM_NAME)
    attempt = jetstream.delete_stream if operation == "DELETE" else jetstream.purge_stream

    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await attempt(STREAM_NAME)

    async def reported() -> bool:
        return refused(errors, f"$JS.API.STREAM.{operation}.{STREAM_NAME}")

    await eventually(reported, within=5, what=f"the server to refuse the {operation.lower()}")
    after = await jetstream.stream_info(STREAM_NAME)
    assert after.state.first_seq == before.state.first_seq
    assert after.state.last_seq >= before.state.last_seq


async def test_the_resource_nats_user_can_read_the_live_events_and_the_stream_history(
    stack: LocalStack, resource_nats: tuple[NatsClient, list[Exception]]
) -> None:
    connection, errors = resource_nats
    live = await connection.subscribe(LIVE_SUBJECTS[0])
    try:
        message = live_message(await live.next_msg(timeout=5))
    finally:
        await live.unsubscribe()

    history = [stored async for stored in StreamReader(connection).read(after=message.sequence - 1, since=0)]

    assert message.subject == EventType.HEARTBEAT.subject
    assert history[0] == dataclasses.replace(message, pending=history[0].pending)
    assert errors == []


async def test_a_replicas_nats_user_can_neither_steer_nor_read_another_replica(
    stack: LocalStack, client: StackClient, resource_nats: tuple[NatsClient, list[Exception]]
) -> None:
    """One replica's credentials cannot change what another receives, nor read another's replies."""
    connection, errors = resource_nats
    jetstream = connection.jetstream(timeout=_NATS_REQUEST_TIMEOUT_SECONDS)
    other = stack.replicas[1].name
    # Consumers of every kind: ephemeral, named (which would also update another's), durable.
    attempts = {
        f"$JS.API.CONSUMER.CREATE.{STREAM_NAME}": ConsumerConfig(deliver_subject=f"_INBOX.{other}.stolen"),
        f"$JS.API.CONSUMER.CREATE.{STREAM_NAME}.mine": ConsumerConfig(name="mine"),
        f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM_NAME}.kept": ConsumerConfig(durable_name="kept"),
    }
    for subject, config in attempts.items():
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await jetstream.add_consumer(STREAM_NAME, config)

        async def reported(subject: str = subject) -> bool:
            return refused(errors, subject)

        await eventually(reported, within=5, what=f"the server to refuse {subject}")
    for inboxes in ("_INBOX.>", f"_INBOX.{other}.>", ">"):
        await connection.subscribe(inboxes)

        async def refused_subscription(inboxes: str = inboxes) -> bool:
            return refused(errors, inboxes, "subscription to")

        await eventually(
            refused_subscription, within=5, what=f"the server to refuse a subscription to {inboxes}"
        )
    reader = await _stream_reader_info(stack)
    assert reader["consumer_count"] == 0

    # The other replica still receives every event: a revocation made now reaches it, and it stays fresh.
    subject = await client.create_user("carol")
    pair = await client.login("carol", USER_PASSWORD)
    assert (await client.whoami(1, pair.access_token)).subject == subject
    session_id = (await client.whoami(1, pair.access_token)).session_id
    await client.revoke_session(session_id)

    async def rejected() -> bool:
        return await client.rejects(1, pair.access_token, "SESSION_REVOKED")

    await eventually(rejected, within=5, what="the other replica to refuse the revoked session")
    assert (await replica_health(stack, 1))["degraded"] is False


async def _stream_reader_info(stack: LocalStack) -> dict[str, Any]:
    """``AUTH_EVENTS``'s state as the ``reader`` user sees it."""
    assert stack.secrets is not None
    credentials = stack.secrets.nats_replica(READER_NATS_USER)
    connection = await nats.connect(
        servers=stack.nats_urls,
        user=credentials.username,
        password=credentials.password,
        inbox_prefix=inbox_prefix(credentials.username),
        connect_timeout=2,
        max_reconnect_attempts=0,
    )
    try:
        reply = await connection.request(f"$JS.API.STREAM.INFO.{STREAM_NAME}", b"", timeout=2)
    finally:
        await connection.close()
    state = json.loads(reply.data)["state"]
    assert isinstance(state, dict)
    return state


async def test_a_nats_server_without_the_route_password_cannot_join_the_stacks_cluster(
    tmp_path: Path,
) -> None:
    """``authmesh up --nats-cluster 3``'s cluster takes no route without its password."""
    secrets = StackSecrets.generate()
    cluster = stack_nats_cluster(
        tmp_path / "nats", secrets, stack_nats_config(secrets, replica_names(1)), size=3
    )
    async with cluster:
        before = [await route_count(node.monitor_url) for node in cluster.nodes]
        first = cluster.nodes[0]
        assert first.cluster is not None

        joined = await intruder_joins(tmp_path / "intruder", f"nats://{LOOPBACK}:{first.cluster.port}")

        assert not joined
        assert [await route_count(node.monitor_url) for node in cluster.nodes] == before
        for node in cluster.nodes:  # monitoring and routes listen on loopback only
            varz = await node_varz(node.monitor_url)
            assert (varz["http_host"], varz["cluster"]["addr"]) == (LOOPBACK, LOOPBACK)


async def node_varz(monitor_url: str) -> dict[str, Any]:
    """A NATS server's ``/varz``."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{monitor_url}/varz", timeout=aiohttp.ClientTimeout(2)) as reply,
    ):
        document = await reply.json()
    assert isinstance(document, dict)
    return document


async def test_a_revoked_session_is_rejected_by_the_replica(client: StackClient) -> None:
    await client.create_user("bob")
    pair = await client.login("bob", USER_PASSWORD)
    assert (await client.whoami(0, pair.access_token)).instance == "resource-1"

    await client.revoke_session(pair.session_id)

    async def rejected() -> bool:
        return await client.rejects(0, pair.access_token, "SESSION_REVOKED")

    await eventually(rejected, within=5, what="the replica to reject the revoked session")


async def test_a_replica_cut_off_from_nats_sees_the_disconnect_and_recovers_when_restored(
    stack: LocalStack,
) -> None:
    async def connected(expected: bool) -> bool:
        return (await replica_health(stack, 0))["nats_connected"] is expected

    await stack.cut_nats(0)
    try:
        assert [link.state for link in stack.links[0]] == ["cut"]
        await eventually(lambda: connected(False), within=10, what="the replica to see NATS gone")
    finally:
        await stack.restore_nats(0)

    await eventually(lambda: connected(True), within=10, what="the replica to reconnect")


async def test_a_silently_partitioned_replica_turns_degraded_and_recovers_when_restored(
    stack: LocalStack,
) -> None:
    async def degraded(expected: bool) -> bool:
        return (await replica_health(stack, 0))["degraded"] is expected

    await stack.cut_nats(0, silent=True)
    try:
        assert stack.links[0][0].state == "silent"
        await eventually(lambda: degraded(True), within=10, what="the replica to turn degraded")
    finally:
        await stack.restore_nats(0)

    await eventually(lambda: degraded(False), within=10, what="heartbeats to reach the replica again")


async def test_a_stopped_replica_starts_again_on_the_same_address(
    stack: LocalStack, client: StackClient
) -> None:
    first_pid = stack.replica_processes[0].pid
    assert first_pid is not None

    await stack.stop_replica(0)
    assert await grpc_health_status(stack.replicas[0].grpc, 1) is None
    await stack.start_replica(0)

    assert await all_gone([first_pid])
    token = (await client.login(*stack.admin_credentials)).access_token
    assert (await client.whoami(0, token)).instance == "resource-1"


async def test_a_replica_that_dies_on_its_own_is_reported_and_starts_again(
    stack: LocalStack, client: StackClient
) -> None:
    pid = stack.replica_processes[0].pid
    assert pid is not None

    os.kill(pid, signal.SIGKILL)

    async def reported() -> bool:
        return "resource-1" in stack.exited()

    await eventually(reported, within=10, what="the stack to notice the replica is gone")
    assert stack.exited()["resource-1"] == stack.replica_processes[0].log_path
    await stack.start_replica(0)
    assert stack.exited() == {}
    token = (await client.login(*stack.admin_credentials)).access_token
    assert (await client.whoami(0, token)).instance == "resource-1"


async def test_authmesh_up_prints_the_stack_as_json_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        *authmesh_command("up", "--replicas", "1", "--json", "--data-dir", str(tmp_path)),
        # The stack hands its environment's AUTHMESH_* settings down to the services.
        env={**os.environ, **FAST_ENV},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            line = await process.stdout.readline()
        assert line, "authmesh up exited before printing the stack"
        description = json.loads(line)
        assert await grpc_health_status(description["auth"]["grpc"], 2) == "SERVING"
        assert await grpc_health_status(description["replicas"][0]["grpc"], 2) == "SERVING"

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            status = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert status == 0
    assert description["admin"]["username"] == "admin"
    assert description["client_env"] == {
        "AUTHMESH_AUTH_TARGET": description["auth"]["grpc"],
        "AUTHMESH_AUTH_URL": f"http://{description['auth']['http']}",
    }
    assert await all_gone(description["pids"].values())


# --- what `authmesh up` prints, at any width -----------------------------------------------------


def stack_strings(description: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What the printed stack must show: notes with whole words, and addresses, credentials and the
    data directory each whole on one line."""
    nats, auth = description["nats"], description["auth"]
    addresses = [*nats["urls"], *(url.removeprefix("http://") for url in nats["monitor"])]
    addresses += [description["redis"]["url"], auth["grpc"], auth["http"]]
    for replica in description["replicas"]:
        addresses += [replica["name"], replica["grpc"], replica["http"]]
    addresses += [description["admin"]["password"], description["data_dir"]]
    addresses += [f"{name}={value}" for name, value in description["client_env"].items()]
    notes = ["JetStream, /healthz", "append-only, noeviction", "/.well-known/jwks.json", "/healthz, /metrics"]
    return notes, addresses


def test_the_stack_reads_whole_at_80_columns(stack: LocalStack) -> None:
    # Issue 15.7: addresses are copied from this output; at 80 columns none may be cut or folded.
    description = stack.describe()
    output = io.StringIO()
    print_stack(Console(file=output, width=80, force_terminal=False), description)
    notes, whole = stack_strings(description)
    assert_legible(output.getvalue(), texts=notes, whole_lines=whole, width=80)


def test_the_stack_reads_whole_in_a_log_file(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    description = stack.describe()
    log = tmp_path / "up.log"
    with log.open("w") as file:
        print_stack(Console(file=file), description)  # not a terminal: rich lays out for 80 columns
    notes, whole = stack_strings(description)
    assert_legible(log.read_text(), texts=notes, whole_lines=whole, width=80)


def test_the_stack_is_a_table_where_the_terminal_is_wide_enough(stack: LocalStack) -> None:
    description = stack.describe()
    output = io.StringIO()
    print_stack(Console(file=output, width=160, force_terminal=False), description)
    assert "┃ part" in output.getvalue()
    notes, whole = stack_strings(description)
    assert_legible(output.getvalue(), texts=notes, whole_lines=whole, width=160)


def test_a_long_data_directory_and_password_stay_whole_on_a_narrow_terminal(stack: LocalStack) -> None:
    description = {
        **stack.describe(),
        "data_dir": "/var/lib/" + "/".join(["a-rather-long-directory-name"] * 4),
        "admin": {"username": "admin", "password": "p" * 90},
    }
    output = io.StringIO()
    print_stack(Console(file=output, width=60, force_terminal=False), description)
    notes, whole = stack_strings(description)
    assert_legible(output.getvalue(), texts=notes, whole_lines=whole, width=60)
