"""What an operator sees of a real auth-service process: JSON lines, the audit trail and health."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from authmesh._auth_service.app import AuthApp
from authmesh._auth_service.audit import username_hash
from authmesh._resource_service.revocation_health import REVOCATION_HEALTH_SERVICE
from authmesh._shared.errors import Unavailable
from authmesh.auth.v1 import auth_pb2
from authmesh.processes import NatsServer, RedisServer, free_port
from authmesh.stack import grpc_health_status
from tests.auth_support import ADMIN, SERVICE, auth_settings, running_auth
from tests.faults import auth_at, auth_process, clean_environment, in_process_replicas, outcome
from tests.waiting import eventually

PASSWORD = "operator-password-1"
WRONG_PASSWORD = "not-the-password-9"
DEADLINE = 20.0
INSTANCE = "auth-fault"


async def readyz(http_address: str) -> tuple[int, dict[str, Any]]:
    """``/readyz``: its status and JSON document (0 and {} when the process does not answer)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(f"http://{http_address}/readyz") as reply,
        ):
            return reply.status, await reply.json()
    except (aiohttp.ClientError, TimeoutError):
        return 0, {}


def json_lines(log: Path) -> list[dict[str, Any]]:
    """Every line the process wrote, parsed as JSON (the launcher's own marker lines left out)."""
    lines = [
        line for line in log.read_text().splitlines() if line.strip() and not line.startswith("--- authmesh:")
    ]
    return [json.loads(line) for line in lines]


async def test_health_follows_redis_and_every_line_is_json_with_an_audit_trail(
    tmp_path: Path, own_redis: RedisServer, nats_url: str
) -> None:
    """With ``AUTHMESH_LOG_FORMAT=json``, a real auth process whose Redis is stopped and started again:

    - gRPC health turns ``NOT_SERVING`` and ``/readyz`` 503 naming Redis's address while Redis is down,
      and both come back by themselves; ``/healthz`` says alive throughout;
    - every line it wrote is one JSON object naming the service and the instance;
    - the audit trail has login success and failure (a hashed username, never the password), user
      created, disabled and enabled, token and session revocations and a key rotation with who asked,
      and refresh-token reuse.
    """
    process = auth_process(
        tmp_path / "auth", own_redis.url, [nats_url], AUTHMESH_LOG_FORMAT="json", AUTHMESH_LOG_LEVEL="info"
    )
    async with AsyncExitStack() as stack:
        stack.push_async_callback(process.stop)
        await process.start()
        auth = await stack.enter_async_context(auth_at(process.grpc_address))
        subject = await auth.create_user("operator", PASSWORD)
        admin = await auth.admin()
        label, _ = await outcome(
            auth.stub.Login(auth_pb2.LoginRequest(username="operator", password=WRONG_PASSWORD))
        )
        assert label == "INVALID_CREDENTIALS"
        pair = await auth.login("operator", PASSWORD)
        await auth.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=pair.access_token), metadata=admin)
        await auth.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token))
        label, _ = await outcome(auth.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=pair.refresh_token)))
        assert label == "REFRESH_TOKEN_REUSED"
        second = await auth.login("operator", PASSWORD)
        await auth.stub.RevokeSession(
            auth_pb2.RevokeSessionRequest(session_id=second.session_id), metadata=admin
        )
        await auth.stub.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=admin)
        await auth.stub.DisableUser(
            auth_pb2.DisableUserRequest(subject=subject, reason="audit"), metadata=admin
        )
        await auth.stub.EnableUser(auth_pb2.EnableUserRequest(subject=subject), metadata=admin)
        assert await readyz(process.http_address) == (200, {"status": "ready"})

        await own_redis.stop()

        async def not_serving() -> bool:
            return await grpc_health_status(process.grpc_address, 2) == "NOT_SERVING"

        await eventually(not_serving, within=DEADLINE, what="health NOT_SERVING while Redis is down")
        status, document = await readyz(process.http_address)
        assert status == 503
        assert f"127.0.0.1:{own_redis.port}" in document["unreachable"]["redis"]
        assert set(document["unreachable"]) == {"redis"}

        await own_redis.start()

        async def serving() -> bool:
            return await grpc_health_status(process.grpc_address, 2) == "SERVING"

        await eventually(serving, within=DEADLINE, what="health SERVING once Redis is back")
        assert (await readyz(process.http_address))[0] == 200
        await process.stop()

    lines = json_lines(process.log_path)
    assert lines
    assert all(line.get("service") == "auth" and line.get("instance") == INSTANCE for line in lines)
    text = process.log_path.read_text()
    for secret in (PASSWORD, WRONG_PASSWORD, ADMIN[1], SERVICE[1], pair.refresh_token, pair.access_token):
        assert secret not in text
    audits = [line for line in lines if line.get("event") == "audit"]
    actions = {line["action"] for line in audits}
    assert {
        "login_succeeded",
        "login_failed",
        "user_created",
        "user_disabled",
        "user_enabled",
        "token_revoked",
        "session_revoked",
        "signing_key_rotated",
        "refresh_token_reused",
    } <= actions
    (failure,) = [line for line in audits if line["action"] == "login_failed"]
    assert failure["user"] == username_hash("operator")
    assert failure["reason"] == "INVALID_CREDENTIALS"
    admin_sub = next(
        line["sub"] for line in audits if line["action"] == "login_succeeded" and "admin" in line["scopes"]
    )
    for action in (
        "token_revoked",
        "session_revoked",
        "signing_key_rotated",
        "user_disabled",
        "user_enabled",
        "user_created",
    ):
        assert any(line["action"] == action and line.get("by") == admin_sub for line in audits), action
    assert any(line.get("dependency") == "redis" and "unreachable" in line["event"] for line in lines)


def test_library_lines_and_python_warnings_come_out_as_json_naming_the_service() -> None:
    """Lines of grpc, nats-py and aiohttp (standard-library loggers) and ``warnings`` share our format."""
    script = (
        "import logging, warnings, structlog\n"
        "from authmesh._shared.logs import configure_logging\n"
        "configure_logging('info', 'json', service='resource', instance='r-1')\n"
        "structlog.get_logger('ours').info('our line', key=1)\n"
        "logging.getLogger('nats.aio.client').warning('nats says %s', 'hello')\n"
        "logging.getLogger('grpc._cython.cygrpc').error('grpc says')\n"
        "logging.getLogger('aiohttp.server').warning('aiohttp says')\n"
        "warnings.warn('deprecated thing', DeprecationWarning, stacklevel=1)\n"
    )
    result = subprocess.run(  # a fresh interpreter: logging is configured once per process
        [sys.executable, "-W", "always", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=clean_environment(),
    )
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [line["event"] for line in lines[:4]] == [
        "our line",
        "nats says hello",
        "grpc says",
        "aiohttp says",
    ]
    assert "deprecated thing" in lines[4]["event"]
    assert all((line["service"], line["instance"]) == ("resource", "r-1") for line in lines)
    assert all("timestamp" in line and "level" in line for line in lines)


async def test_health_of_the_auth_service_and_the_replicas_revocation_state_follows_nats(
    redis_url: str, own_nats: NatsServer
) -> None:
    """With NATS stopped and started again: the auth service's health turns ``NOT_SERVING`` (and
    ``/readyz`` names NATS), a replica's ``authmesh.revocation`` health turns ``NOT_SERVING`` once its
    state is stale, while the replica itself stays ``SERVING`` (it falls back to ``Introspect``); all
    come back by themselves."""
    async with (
        running_auth(auth_settings(redis_url, [own_nats.url])) as (app, _),
        in_process_replicas(app.grpc_address, [own_nats.url], 1) as (replica,),
    ):
        target = replica.app.grpc_address

        def health_is(address: str, expected: str, service: str = "") -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return await grpc_health_status(address, 2, service) == expected

            return check

        await eventually(
            health_is(target, "SERVING", REVOCATION_HEALTH_SERVICE), within=DEADLINE, what="current"
        )
        await own_nats.stop()
        await eventually(health_is(app.grpc_address, "NOT_SERVING"), within=DEADLINE, what="auth NOT_SERVING")
        await eventually(
            health_is(target, "NOT_SERVING", REVOCATION_HEALTH_SERVICE), within=DEADLINE, what="degraded"
        )
        assert await grpc_health_status(target, 2) == "SERVING"
        status, document = await readyz(app.http_address)
        assert status == 503
        assert f"127.0.0.1:{own_nats.port}" in document["unreachable"]["nats"]

        await own_nats.start()
        await eventually(health_is(app.grpc_address, "SERVING"), within=DEADLINE, what="auth SERVING again")
        await eventually(
            health_is(target, "SERVING", REVOCATION_HEALTH_SERVICE), within=DEADLINE, what="current again"
        )


async def test_a_store_that_does_not_answer_at_start_is_named_without_its_credentials(nats_url: str) -> None:
    closed = free_port()
    settings = auth_settings(f"redis://:hunter2-secret@127.0.0.1:{closed}/0", [nats_url], connect_timeout=0.5)
    with pytest.raises(Unavailable, match=f"cannot reach Redis at redis://127.0.0.1:{closed}/0 ") as caught:
        async with AuthApp(settings):
            pass
    assert "hunter2" not in str(caught.value)
