"""Fault tests: each one injects a fault into real servers on loopback and checks a stated invariant.

This package also holds what the fault tests share: the outcome of a call as one label, the auth service
as a child process a test may ``kill -9``, resource replicas in this process, the events in
``AUTH_EVENTS`` and the Prometheus metrics a service exposes.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats
import nats.errors
import pytest
import redis.asyncio as redis
from cryptography.hazmat.primitives.asymmetric import ec
from nats.js import JetStreamContext
from nats.js.api import StreamInfo
from nats.js.errors import NotFoundError, ServiceUnavailableError
from prometheus_client.parser import text_string_to_metric_families

from authmesh._auth_service.keyring import KeySealer
from authmesh._auth_service.store import AuthStore
from authmesh._resource_service.app import ResourceApp
from authmesh._shared.events import STREAM_NAME, STREAM_SUBJECTS
from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.jose import decode_compact
from authmesh._shared.settings import ResourceSettings
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from authmesh.processes import LOOPBACK, free_ports
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from authmesh.stack import ServiceProcess
from tests.auth_support import ADMIN, SERVICE, TEST_KEK, admin_login, bearer, service_login
from tests.waiting import eventually

OK = "OK"
CALL_TIMEOUT_SECONDS = 10.0
START_DEADLINE_SECONDS = 30.0
# One wait for the next message of a stream being read (the read as a whole has its own deadline).
_STREAM_NEXT_SECONDS = 1.0
_STREAM_READ_DEADLINE_SECONDS = 60.0
_STREAM_INFO_DEADLINE_SECONDS = 10.0
_STREAM_INFO_RETRY_SECONDS = 0.05
# Cheap password hashing and quick heartbeats: the faults are the subject, not Argon2.
FAST_AUTH_ENV = {
    "AUTHMESH_ARGON2_TIME_COST": "1",
    "AUTHMESH_ARGON2_MEMORY_KIB": "1024",
    "AUTHMESH_ARGON2_PARALLELISM": "1",
    "AUTHMESH_HEARTBEAT_INTERVAL": "0.2",
    "AUTHMESH_SHUTDOWN_GRACE": "0.5",
}


@dataclass
class Answers:
    """Every answer a load saw, with when it came; any label but OK and ``allowed`` is a wrong answer.

    Args:
        allowed: The failure labels the fault may cause (an outage's UNAVAILABLE reasons).
    """

    allowed: frozenset[str]
    seen: list[tuple[str, str, float]] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    def saw(self, call: str, label: str) -> None:
        """Record an answer of ``call``."""
        self.seen.append((call, label, time.monotonic()))
        if label != OK and label not in self.allowed:
            self.wrong.append(f"{call}: {label}")

    def oks_after(self, call: str, instant: float) -> int:
        """How many OK answers of ``call`` came after ``instant`` (monotonic seconds)."""
        return sum(1 for c, label, at in self.seen if c == call and label == OK and at > instant)

    def failures_after(self, instant: float) -> list[str]:
        """The labels of the answers after ``instant`` that were not OK."""
        return [label for _, label, at in self.seen if label != OK and at > instant]


async def revoke_next(
    stub: auth_pb2_grpc.AuthServiceAsyncStub,
    pool: list[auth_pb2.TokenPair],
    admin: tuple[tuple[str, str]],
    answers: Answers,
) -> str | None:
    """``RevokeToken`` the last access token of ``pool``; when acknowledged, take it off the pool.

    Returns:
        The revoked token, or None when the call failed (the token stays for the next try).
    """
    token = pool[-1].access_token
    label, _ = await outcome(
        stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=token), metadata=admin, timeout=CALL_TIMEOUT_SECONDS
        )
    )
    answers.saw("RevokeToken", label)
    if label != OK:
        return None
    pool.pop()
    return token


async def outcome(call: Awaitable[Any]) -> tuple[str, Any]:
    """Await a gRPC call: ``("OK", response)``, or ``(reason, None)`` where the reason is the
    ``ErrorInfo.reason`` when the server sent one, else the status code's name."""
    try:
        return OK, await call
    except grpc.aio.AioRpcError as error:
        return error_reason(error) or error.code().name, None


async def status_of(call: Awaitable[Any]) -> tuple[str, str]:
    """Await a gRPC call: ``(status code name, reason)``; ``("OK", "OK")`` when it succeeded."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code().name, error_reason(error) or ""
    return OK, OK


async def active_signing_key(
    redis_url: str, key_encryption_key: str
) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """The auth service's active signing key, read from its Redis and unsealed: what a test that publishes
    events "as the auth service" signs with, so the replicas trust them."""
    client = redis.from_url(redis_url)
    try:
        store = AuthStore(client, access_ttl=300, leeway=5)
        kid = await store.active_kid()
        assert kid is not None, "the auth service has no active key"
        (record,) = [record for record in await store.key_records() if record.kid == kid]
    finally:
        await client.aclose()
    return kid, KeySealer(key_encryption_key.encode()).unseal(kid, record.sealed)


def jti_of(token: str) -> str:
    """The ``jti`` of an access token (read without verification: the token is our own)."""
    return str(decode_compact(token).unverified_payload["jti"])


def kid_of(token: str) -> str:
    """The ``kid`` of an access token."""
    return decode_compact(token).kid


def clean_environment() -> dict[str, str]:
    """This process's environment without any ``AUTHMESH_*`` setting (a child gets exactly ours)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AUTHMESH_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def auth_process(data_dir: Path, redis_url: str, nats_urls: Sequence[str], **settings: str) -> ServiceProcess:
    """``authmesh auth-server`` as a child process on free ports, with the test accounts.

    Args:
        data_dir: Its working directory and log.
        redis_url: Its Redis.
        nats_urls: Its NATS servers.
        settings: More ``AUTHMESH_*`` variables (``AUTHMESH_`` prefix included).
    """
    grpc_port, http_port = free_ports(2)
    grpc_address, http_address = f"{LOOPBACK}:{grpc_port}", f"{LOOPBACK}:{http_port}"
    env = clean_environment()
    env.update(FAST_AUTH_ENV)
    env.update(
        {
            "AUTHMESH_INSTANCE": "auth-fault",
            "AUTHMESH_REDIS_URL": redis_url,
            "AUTHMESH_NATS_URLS": ",".join(nats_urls),
            "AUTHMESH_GRPC_LISTEN": grpc_address,
            "AUTHMESH_HTTP_LISTEN": http_address,
            "AUTHMESH_KEY_ENCRYPTION_KEY": TEST_KEK,
            "AUTHMESH_BOOTSTRAP_ADMIN": f"{ADMIN[0]}:{ADMIN[1]}",
            "AUTHMESH_SERVICE_ACCOUNT": f"{SERVICE[0]}:{SERVICE[1]}",
            "AUTHMESH_LOG_LEVEL": "warning",
        }
    )
    env.update(settings)
    return ServiceProcess(
        "auth",
        data_dir,
        command="auth-server",
        env=env,
        grpc_address=grpc_address,
        http_address=http_address,
    )


class Auth:
    """A client of the auth service with the calls fault tests make; admin and service tokens on demand.

    Args:
        channel: A channel to the auth service.
        admin: The admin's ``(username, password)``.
        service: The service account's ``(username, password)``.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        admin: tuple[str, str] = ADMIN,
        service: tuple[str, str] = SERVICE,
    ) -> None:
        self.channel = channel
        self.stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._admin = admin
        self._service = service

    async def login(self, username: str, password: str) -> auth_pb2.TokenPair:
        """Log in."""
        return await self.stub.Login(
            auth_pb2.LoginRequest(username=username, password=password), timeout=CALL_TIMEOUT_SECONDS
        )

    async def admin(self) -> tuple[tuple[str, str]]:
        """Call metadata with a fresh admin token (fresh: a retired key must not strand the admin)."""
        reply = await self.stub.Login(admin_login(self._admin), timeout=CALL_TIMEOUT_SECONDS)
        return bearer(reply.access_token)

    async def service(self) -> tuple[tuple[str, str]]:
        """Call metadata with a fresh token of the service account."""
        reply = await self.stub.Login(service_login(self._service), timeout=CALL_TIMEOUT_SECONDS)
        return bearer(reply.access_token)

    async def create_user(self, username: str, password: str) -> str:
        """Create a user with scope ``docs:read``; returns its subject."""
        reply = await self.stub.CreateUser(
            auth_pb2.CreateUserRequest(username=username, password=password, scopes=["docs:read"]),
            metadata=await self.admin(),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return str(reply.subject)

    async def active(self, token: str, service: tuple[tuple[str, str]] | None = None) -> bool:
        """Whether ``Introspect`` calls the token active (raises if it cannot be asked)."""
        reply = await self.stub.Introspect(
            auth_pb2.IntrospectRequest(token=token),
            metadata=service if service is not None else await self.service(),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return bool(reply.active)

    async def jwks_kids(self) -> set[str]:
        """The key ids in the JWK Set."""
        reply = await self.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=CALL_TIMEOUT_SECONDS)
        return {str(key["kid"]) for key in json.loads(reply.jwks_json)["keys"]}


@asynccontextmanager
async def auth_at(
    address: str, *, admin: tuple[str, str] = ADMIN, service: tuple[str, str] = SERVICE
) -> AsyncIterator[Auth]:
    """An :class:`Auth` client of the auth service at ``address``."""
    async with grpc.aio.insecure_channel(address) as channel:
        yield Auth(channel, admin=admin, service=service)


async def wait_serving(auth: Auth, within: float = START_DEADLINE_SECONDS) -> None:
    """Wait until the auth service answers a login (Redis, keys and NATS all usable)."""

    async def serving() -> bool:
        try:
            await auth.admin()
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(serving, within=within, what="the auth service to serve logins")


@dataclass
class Replica:
    """A resource replica running in this process, with a client channel to it."""

    app: ResourceApp
    channel: grpc.aio.Channel

    @property
    def stub(self) -> resource_pb2_grpc.ResourceServiceAsyncStub:
        """Its ``ResourceService``."""
        return resource_pb2_grpc.ResourceServiceStub(self.channel)

    async def outcome(self, token: str) -> str:
        """``OK`` or the reason ``WhoAmI`` with ``token`` is refused right now."""
        label, _ = await outcome(
            self.stub.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=bearer(token), timeout=5)
        )
        return label


def replica_settings(
    name: str, auth_target: str, nats_urls: Sequence[str], **overrides: Any
) -> ResourceSettings:
    """Settings of an in-process replica on free loopback ports."""
    values: dict[str, Any] = {
        "nats_urls": list(nats_urls),
        "auth_target": auth_target,
        "grpc_listen": f"{LOOPBACK}:0",
        "http_listen": f"{LOOPBACK}:0",
        "service_account": f"{SERVICE[0]}:{SERVICE[1]}",
        "staleness_bound": 1.0,
        "instance": name,
        "shutdown_grace": 0.2,
        "log_level": "warning",
    }
    values.update(overrides)
    return ResourceSettings(**values)


@asynccontextmanager
async def in_process_replicas(
    auth_target: str, nats_urls: Sequence[str], count: int, **overrides: Any
) -> AsyncIterator[list[Replica]]:
    """``count`` resource replicas in this process, each ready (caught up with the stream)."""
    async with AsyncExitStack() as stack:
        replicas = []
        for index in range(count):
            settings = replica_settings(f"replica-{index + 1}", auth_target, nats_urls, **overrides)
            app = await stack.enter_async_context(ResourceApp(settings))
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(app.grpc_address))
            replicas.append(Replica(app, channel))

        async def all_ready() -> bool:
            return all(replica.app.ready for replica in replicas)

        await eventually(all_ready, within=START_DEADLINE_SECONDS, what="the replicas to catch up")
        yield replicas


async def everywhere(replicas: Sequence[Replica], token: str, expected: str, within: float = 10.0) -> None:
    """Wait until every replica answers ``token`` with ``expected`` (``OK`` or a reason)."""

    async def agreed() -> bool:
        answers = await asyncio.gather(*(replica.outcome(token) for replica in replicas))
        return all(answer == expected for answer in answers)

    await eventually(agreed, within=within, what=f"every replica to answer {expected}")


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One message of ``AUTH_EVENTS``."""

    sequence: int
    subject: str
    data: bytes
    msg_id: str


async def stream_events(
    nats_urls: Sequence[str], *, user: str | None = None, password: str | None = None
) -> list[StoredEvent]:
    """Every message in ``AUTH_EVENTS``, read with an ordered consumer from the first sequence."""
    options: dict[str, Any] = {}
    if user is not None:
        options.update(user=user, password=password or "")
    client = await nats.connect(
        servers=list(nats_urls), connect_timeout=2, max_reconnect_attempts=3, **options
    )
    try:
        js = client.jetstream(timeout=5)
        info = await stream_info(js)
        last = info.state.last_seq
        events: list[StoredEvent] = []
        if info.state.messages == 0:
            return events
        subscription = await js.subscribe(STREAM_SUBJECTS[0], stream=STREAM_NAME, ordered_consumer=True)
        deadline = time.monotonic() + _STREAM_READ_DEADLINE_SECONDS
        try:
            while True:
                if time.monotonic() >= deadline:
                    pytest.fail(f"could not read AUTH_EVENTS up to sequence {last} in time")
                try:
                    message = await subscription.next_msg(timeout=_STREAM_NEXT_SECONDS)
                except nats.errors.TimeoutError:
                    continue
                sequence = message.metadata.sequence.stream
                headers = message.headers or {}
                events.append(
                    StoredEvent(sequence, message.subject, message.data, headers.get("Nats-Msg-Id", ""))
                )
                if sequence >= last:
                    break
        finally:
            await subscription.unsubscribe()
        return events
    finally:
        await client.close()


async def stream_info(js: JetStreamContext) -> StreamInfo:
    """``AUTH_EVENTS``' info, asked again for a few seconds while a cluster that just lost or regained a node
    answers "stream not found" or "unavailable" (its API settles after the election, the data is there)."""
    deadline = time.monotonic() + _STREAM_INFO_DEADLINE_SECONDS
    while True:
        try:
            return await js.stream_info(STREAM_NAME)
        except (NotFoundError, ServiceUnavailableError, nats.errors.TimeoutError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(_STREAM_INFO_RETRY_SECONDS)


def event_ids(events: Sequence[StoredEvent]) -> set[str]:
    """The SET ``jti`` (event id) of every stored event."""
    return {str(decode_compact(event.data).unverified_payload["jti"]) for event in events}


async def fetch_metrics(http_address: str) -> str:
    """The Prometheus text a service serves at ``/metrics``."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(f"http://{http_address}/metrics") as reply,
    ):
        return await reply.text()


def metric_sum(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The sum of every sample named ``name`` whose labels include ``labels``."""
    wanted = dict(labels or {})
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in wanted.items()):
                total += sample.value
    return total
