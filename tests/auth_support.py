"""Shared test support for the auth service: settings for a test instance and a small gRPC client.

Admin and service tokens are for the auth service's own audience and must be asked for by scope:
:func:`admin_login` and :func:`service_login` are the one place tests build those logins.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
import redis.asyncio as redis

from authmesh._auth_service.app import AuthApp
from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.settings import AuthSettings
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc

ADMIN = ("admin", "admin-password-1")
SERVICE = ("svc-resource", "service-password-1")
TEST_KEK = "test-key-encryption-key-0123456789"
ADMIN_SCOPE = "admin"
SERVICE_SCOPE = "service"


def admin_login(account: tuple[str, str] = ADMIN) -> auth_pb2.LoginRequest:
    """The Login that gets an admin token (auth audience, scope ``admin``), for sync and async stubs."""
    return auth_pb2.LoginRequest(username=account[0], password=account[1], scopes=[ADMIN_SCOPE])


def service_login(account: tuple[str, str] = SERVICE) -> auth_pb2.LoginRequest:
    """The Login that gets a service token (auth audience, scope ``service``)."""
    return auth_pb2.LoginRequest(username=account[0], password=account[1], scopes=[SERVICE_SCOPE])


def auth_settings(redis_url: str, nats_urls: list[str], **overrides: Any) -> AuthSettings:
    """Settings for an auth service on free loopback ports with cheap Argon2 (tests only)."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "nats_urls": nats_urls,
        "grpc_listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "key_encryption_key": TEST_KEK,
        "bootstrap_admin": f"{ADMIN[0]}:{ADMIN[1]}",
        "service_account": f"{SERVICE[0]}:{SERVICE[1]}",
        "argon2_time_cost": 1,
        "argon2_memory_kib": 1024,
        "argon2_parallelism": 1,
        "heartbeat_interval": 0.2,
        "instance": "auth-test",
        "shutdown_grace": 0.5,
        "log_level": "warning",
    }
    values.update(overrides)
    return AuthSettings(**values)


class AuthClient:
    """A thin async client over one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub = auth_pb2_grpc.AuthServiceStub(channel)

    async def login(self, username: str, password: str, scopes: tuple[str, ...] = ()) -> auth_pb2.TokenPair:
        """Log in."""
        return await self.stub.Login(
            auth_pb2.LoginRequest(username=username, password=password, scopes=list(scopes)), timeout=10
        )

    async def admin_token(self) -> str:
        """An admin token (auth audience) of the bootstrap admin."""
        return (await self.stub.Login(admin_login(), timeout=10)).access_token

    async def service_token(self) -> str:
        """A service token (auth audience) of the service account."""
        return (await self.stub.Login(service_login(), timeout=10)).access_token

    async def introspect(self, token: str) -> auth_pb2.IntrospectResponse:
        """``Introspect`` as the service account."""
        return await self.stub.Introspect(
            auth_pb2.IntrospectRequest(token=token), metadata=bearer(await self.service_token()), timeout=10
        )

    async def create_user(
        self, username: str, password: str, scopes: tuple[str, ...] = ("docs:read",)
    ) -> str:
        """Create a user as the admin; returns the subject."""
        response = await self.stub.CreateUser(
            auth_pb2.CreateUserRequest(username=username, password=password, scopes=list(scopes)),
            metadata=bearer(await self.admin_token()),
            timeout=10,
        )
        return response.subject


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying a bearer token."""
    return (("authorization", f"Bearer {token}"),)


@asynccontextmanager
async def auth_client(address: str) -> AsyncIterator[AuthClient]:
    """A client connected to ``address``."""
    async with grpc.aio.insecure_channel(address) as channel:
        yield AuthClient(channel)


@asynccontextmanager
async def running_auth(settings: AuthSettings) -> AsyncIterator[tuple[AuthApp, AuthClient]]:
    """An in-process auth service and a client for it."""
    async with AuthApp(settings) as app, auth_client(app.grpc_address) as client:
        yield app, client


@asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[redis.Redis]:
    """A client of the auth service's Redis, to look at (and break) what it stored."""
    client = redis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def expect_error(call: Any, code: grpc.StatusCode, reason: str | None = None) -> grpc.aio.AioRpcError:
    """Await ``call`` and check it fails with ``code`` (and ``ErrorInfo.reason``)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    if reason is not None:
        assert error_reason(info.value) == reason
    return info.value
