"""Hostile requests to every RPC of both services: hand-built bodies, metadata, floods of garbage tokens.

Bodies are sent as raw bytes through a generic ``unary_unary``/``unary_stream`` call, so they can be what no
generated client would send: empty, a 1 MiB field, a 60 KiB field (just under the 64 KiB message cap),
strings that are not UTF-8, bytes that are no message at all. The contract's promise for all of it: an
answer that names the problem, never ``UNKNOWN`` or ``INTERNAL``, no crash, and honest callers still served.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError

from authmesh._auth_service.app import AuthApp
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from authmesh.processes import NatsServer, RedisServer
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from tests.auth_support import auth_settings, running_auth
from tests.faults import OK, Auth, Replica, fetch_metrics, in_process_replicas, metric_sum, status_of

FORBIDDEN = {"UNKNOWN", "INTERNAL"}
USER = ("honest", "honest-password-1")
HUGE = 1024 * 1024
LARGE = 60 * 1024
NOT_UTF8 = b"\xff\xfe\xfd\xc3\x28"
GARBAGE_TOKENS = 2000
# Calls in flight at once; beyond about a thousand on one server grpc itself starts shedding calls
# (CANCELLED, UNAVAILABLE), which is allowed but would make the attack measure grpc instead of authmesh.
FLOOD_CONCURRENCY = 800
# The replica's key cache starts fetches at least this far apart (KeyCache's default).
KEY_FETCH_COOLDOWN = 1.0
# What a server may answer a garbage token: refused, or shed under load; never accepted, never a bug.
FLOOD_ANSWERS = {"UNAUTHENTICATED", "UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED"}
AUTH_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
RESOURCE_SERVICE = resource_pb2.DESCRIPTOR.services_by_name["ResourceService"]
METHODS = [(AUTH_SERVICE.full_name, m) for m in AUTH_SERVICE.methods] + [
    (RESOURCE_SERVICE.full_name, m) for m in RESOURCE_SERVICE.methods
]
BODY_KINDS = ["empty", "huge-field", "large-field", "not-utf8", "not-a-message"]


@dataclass
class Services:
    """Both services running, with clients."""

    auth_app: AuthApp
    auth: Auth
    replica: Replica

    async def admin(self) -> tuple[tuple[str, str]]:
        """Fresh admin metadata (a hostile RotateSigningKey may have rotated the keys)."""
        return await self.auth.admin()

    async def user_token(self) -> str:
        """A fresh token of an ordinary user with ``docs:read``."""
        return str((await self.auth.login(*USER)).access_token)

    async def honest_callers_served(self) -> None:
        """An ordinary login, key fetch and protected call all still work."""
        token = await self.user_token()
        await self.auth.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=5)
        assert await self.replica.outcome(token) == OK


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def services(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Services]:
    """A Redis, a NATS, the auth service and one resource replica of this module's own."""
    base = tmp_path_factory.mktemp("hostile")
    async with AsyncExitStack() as stack:
        redis_server = await stack.enter_async_context(RedisServer(base / "redis"))
        nats_server = await stack.enter_async_context(NatsServer(base / "nats"))
        app, client = await stack.enter_async_context(
            running_auth(auth_settings(redis_server.url, [nats_server.url]))
        )
        auth = Auth(client.channel)
        await auth.create_user(*USER)
        (replica,) = await stack.enter_async_context(
            in_process_replicas(app.grpc_address, [nats_server.url], 1)
        )
        yield Services(app, auth, replica)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(number: int, data: bytes) -> bytes:
    """One length-delimited field (wire type 2) on the wire."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def hostile_body(method: MethodDescriptor, kind: str) -> bytes:
    """A request body for ``method`` of the given kind, built byte by byte."""
    if kind == "empty":
        return b""
    if kind == "huge-field":
        return length_delimited(1, b"a" * HUGE)
    if kind == "large-field":
        return length_delimited(1, b"a" * LARGE)
    if kind == "not-utf8":
        strings = [f.number for f in method.input_type.fields if f.type == FieldDescriptor.TYPE_STRING]
        return b"".join(length_delimited(number, NOT_UTF8) for number in strings or [1])
    return b"\xff\xff\xff\xff\x0f" + os.urandom(32)


def parses(method: MethodDescriptor, body: bytes) -> bool:
    """Whether the generated message class accepts ``body``."""
    module = auth_pb2 if method.containing_service is AUTH_SERVICE else resource_pb2
    try:
        getattr(module, method.input_type.name).FromString(body)
    except DecodeError:
        return False
    return True


async def raw_call(
    channel: grpc.aio.Channel, path: str, method: MethodDescriptor, body: bytes, metadata: Any
) -> tuple[str, str]:
    """Send ``body`` as is; return ``(status code, reason)``."""
    if method.server_streaming:
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            path, request_serializer=None, response_deserializer=None
        )

        async def drain() -> None:
            async for _ in stream(body, metadata=metadata, timeout=10):
                pass

        return await status_of(drain())
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        path, request_serializer=None, response_deserializer=None
    )
    return await status_of(call(body, metadata=metadata, timeout=10))


@pytest.mark.parametrize("kind", BODY_KINDS)
@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{m.name}" for _, m in METHODS])
async def test_a_hostile_request_body_is_answered_without_unknown_or_internal_and_honest_callers_are_served(
    services: Services, service: str, method: MethodDescriptor, kind: str, request: pytest.FixtureRequest
) -> None:
    """Invariant: a hand-built hostile body (empty, a 1 MiB or 60 KiB field, strings that are not UTF-8,
    bytes that are no message) sent with a valid token to any RPC gets a status other than ``UNKNOWN`` and
    ``INTERNAL``, and an honest login, key fetch and protected call work right after."""
    body = hostile_body(method, kind)
    path = f"/{service}/{method.name}"
    if service == AUTH_SERVICE.full_name:
        channel, metadata = services.auth.channel, await services.admin()
    else:
        channel = services.replica.channel
        metadata = (("authorization", f"Bearer {await services.user_token()}"),)
    code, reason = await raw_call(channel, path, method, body, metadata)
    await services.honest_callers_served()
    assert code not in FORBIDDEN, f"{code} {reason}"


def repeated(count: int, token: str) -> list[tuple[str, str]]:
    """``count`` authorization entries."""
    return [("authorization", f"Bearer {token}")] * count


HOSTILE_METADATA: dict[str, Any] = {
    "oversized-token": lambda token: [("authorization", "Bearer " + "a" * 9000)],
    "oversized-headers": lambda token: [("authorization", "Bearer " + "a" * 20000)],
    "repeated-authorization": lambda token: [("authorization", "Bearer x.y.z"), *repeated(300, token)],
    "thousands-of-keys": lambda token: [(f"x-junk-{index}", "v" * 8) for index in range(2000)],
    "binary-header": lambda token: [("authorization-bin", b"\xff\x00\xfe"), ("x-bin", b"\x00" * 64)],
    "wrong-scheme": lambda token: [("authorization", f"Basic {token}")],
    "bare-scheme": lambda token: [("authorization", "Bearer")],
    "spaces": lambda token: [("authorization", "Bearer      ")],
    "garbage-then-valid": lambda token: [
        ("authorization", "Bearer garbage"),
        ("authorization", f"Bearer {token}"),
    ],
    "empty": lambda token: [],
}


@pytest.mark.parametrize("variant", sorted(HOSTILE_METADATA))
async def test_hostile_metadata_is_answered_without_unknown_or_internal_and_honest_callers_are_served(
    services: Services, variant: str
) -> None:
    """Invariant: oversized, repeated, binary or malformed metadata on a protected call of either service
    gets a status other than ``UNKNOWN`` and ``INTERNAL`` (gRPC itself may refuse oversized headers with
    ``RESOURCE_EXHAUSTED``), and honest callers are served right after."""
    token = await services.user_token()
    metadata = HOSTILE_METADATA[variant](token)
    auth_answer = await status_of(
        services.auth.stub.Introspect(auth_pb2.IntrospectRequest(token=token), metadata=metadata, timeout=10)
    )
    resource_answer = await status_of(
        services.replica.stub.WhoAmI(resource_pb2.WhoAmIRequest(), metadata=metadata, timeout=10)
    )
    await services.honest_callers_served()
    assert auth_answer[0] not in FORBIDDEN, auth_answer
    assert resource_answer[0] not in FORBIDDEN, resource_answer


def garbage_token(index: int) -> str:
    """A well-formed compact JWS with a random ``kid`` and a random signature, or plain junk."""
    if index % 10 == 9:
        return secrets.token_urlsafe(40)

    def segment(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    header = segment({"alg": "ES256", "typ": "at+jwt", "kid": secrets.token_hex(8)})
    payload = segment({"sub": secrets.token_hex(4), "exp": int(time.time()) + 300})
    return f"{header}.{payload}.{base64.urlsafe_b64encode(os.urandom(64)).rstrip(b'=').decode()}"


async def jwks_served(services: Services) -> float:
    """``GetJwks`` calls the auth service has handled, from its own ``/metrics``."""
    text = await fetch_metrics(services.auth_app.http_address)
    return metric_sum(text, "grpc_server_handled_total", {"grpc_method": "GetJwks"})


async def test_thousands_of_garbage_tokens_with_random_kids_cost_a_few_key_fetches_and_no_honest_call(
    services: Services,
) -> None:
    """Invariant, for 2,000 garbage bearer tokens (random ``kid`` on a well-formed header, random signature;
    every tenth plain junk) sent at once to the replica and to the auth service:

    - every one is refused as ``UNAUTHENTICATED`` (or shed by grpc under the load: ``UNAVAILABLE``,
      ``CANCELLED``), never accepted, never ``UNKNOWN``/``INTERNAL``;
    - the replica fetches the JWK Set at most once per key-fetch cooldown (plus one), not once per token,
      as the auth service's ``grpc_server_handled_total{grpc_method="GetJwks"}`` shows;
    - an honest caller on its own connection, polling throughout, is always served.
    """
    async with (
        grpc.aio.insecure_channel(services.replica.app.grpc_address) as attacker,
        grpc.aio.insecure_channel(services.auth_app.grpc_address) as attacker_auth,
    ):
        await flood(services, attacker, attacker_auth)


async def flood(services: Services, attacker: grpc.aio.Channel, attacker_auth: grpc.aio.Channel) -> None:
    """Send the garbage over the attacker's channels while an honest caller polls; check the outcome."""
    tokens = [garbage_token(index) for index in range(GARBAGE_TOKENS)]
    honest = await services.user_token()
    fetched_before = await jwks_served(services)
    answers: Counter[str] = Counter()
    honest_answers: Counter[str] = Counter()
    done = asyncio.Event()
    limit = asyncio.Semaphore(FLOOD_CONCURRENCY)

    async def at_replica(token: str) -> None:
        async with limit:
            code, reason = await status_of(
                resource_pb2_grpc.ResourceServiceStub(attacker).WhoAmI(
                    resource_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=30
                )
            )
        answers[f"replica {code} {reason}"] += 1

    async def at_auth(token: str) -> None:
        async with limit:
            code, reason = await status_of(
                auth_pb2_grpc.AuthServiceStub(attacker_auth).CreateUser(
                    auth_pb2.CreateUserRequest(username="intruder", password="intruder-password"),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=30,
                )
            )
        answers[f"auth {code} {reason}"] += 1

    async def honest_caller() -> None:
        while not done.is_set():
            honest_answers[await services.replica.outcome(honest)] += 1

    poller = asyncio.create_task(honest_caller())
    try:
        started = time.monotonic()
        await asyncio.gather(*(at_replica(token) for token in tokens))
        elapsed = time.monotonic() - started
        fetches = await jwks_served(services) - fetched_before
        await asyncio.gather(*(at_auth(token) for token in tokens))
    finally:
        done.set()
        await poller

    codes = {label.split()[1] for label in answers}
    assert codes <= FLOOD_ANSWERS, answers
    assert sum(answers.values()) == 2 * GARBAGE_TOKENS
    assert set(honest_answers) == {OK}, honest_answers
    assert 1 <= fetches <= 2 + elapsed / KEY_FETCH_COOLDOWN, (fetches, elapsed)


async def test_the_services_still_run_after_the_hostile_tests(services: Services) -> None:
    """Invariant: after every hostile request of this module, both services still answer honest callers."""
    await services.honest_callers_served()
