"""``ListUsers``: an admin pages through the users in username order, with bounds on every field."""

from __future__ import annotations

from typing import Any

import grpc
import redis.asyncio as redis

from authmesh._auth_service.store import USERS
from authmesh.auth.v1 import auth_pb2
from tests.auth_support import (
    ADMIN,
    SERVICE,
    AuthClient,
    auth_settings,
    bearer,
    expect_error,
    running_auth,
    service_login,
)

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


async def list_users(client: AuthClient, caller: str, **fields: Any) -> auth_pb2.ListUsersResponse:
    response: auth_pb2.ListUsersResponse = await client.stub.ListUsers(
        auth_pb2.ListUsersRequest(**fields), metadata=bearer(caller), timeout=10
    )
    return response


async def every_username(client: AuthClient, caller: str, page_size: int) -> list[str]:
    names: list[str] = []
    token = ""
    for _ in range(100):
        page = await list_users(client, caller, page_size=page_size, page_token=token)
        assert len(page.users) <= page_size
        names.extend(user.username for user in page.users)
        token = page.next_page_token
        if not token:
            return names
    raise AssertionError("ListUsers never reached its last page")


async def test_an_admin_pages_through_every_user_in_username_order(redis_url: str, nats_url: str) -> None:
    async with running_auth(auth_settings(redis_url, [nats_url])) as (_, client):
        for name in ("mallory", "bob", "alice", "carol", "bobby"):
            await client.create_user(name, f"{name}-password-1")
        admin = await client.admin_token()

        names = await every_username(client, admin, page_size=2)
        first = await list_users(client, admin)

    expected = sorted(["mallory", "bob", "alice", "carol", "bobby", ADMIN[0], SERVICE[0]])
    assert names == expected
    assert [user.username for user in first.users] == expected
    assert first.next_page_token == ""
    alice = next(user for user in first.users if user.username == "alice")
    assert alice.subject.startswith("usr_")
    assert list(alice.scopes) == ["docs:read"]
    assert alice.created_at_unix_ms > 0


async def test_a_prefix_narrows_the_listing_and_finds_one_name_first(redis_url: str, nats_url: str) -> None:
    async with running_auth(auth_settings(redis_url, [nats_url])) as (_, client):
        for name in ("bob", "bobby", "bo", "carol"):
            await client.create_user(name, f"{name}-password-1")
        admin = await client.admin_token()

        bobs = await list_users(client, admin, username_prefix="bob")
        one = await list_users(client, admin, username_prefix="bob", page_size=1)
        rest = await list_users(client, admin, username_prefix="bob", page_token=one.next_page_token)

    assert [user.username for user in bobs.users] == ["bob", "bobby"]
    assert [user.username for user in one.users] == ["bob"]
    assert [user.username for user in rest.users] == ["bobby"]
    assert rest.next_page_token == ""


async def test_only_an_admin_may_list_users(redis_url: str, nats_url: str) -> None:
    async with running_auth(auth_settings(redis_url, [nats_url])) as (_, client):
        await client.create_user("alice", "alice-password-1")
        alice = (await client.login("alice", "alice-password-1")).access_token

        service = (await client.stub.Login(service_login(), timeout=10)).access_token

        await expect_error(list_users(client, alice), grpc.StatusCode.UNAUTHENTICATED, "WRONG_AUDIENCE")
        await expect_error(
            list_users(client, service), grpc.StatusCode.PERMISSION_DENIED, "INSUFFICIENT_SCOPE"
        )
        await expect_error(
            client.stub.ListUsers(auth_pb2.ListUsersRequest(), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_MISSING",
        )


async def test_page_sizes_tokens_and_prefixes_out_of_bounds_are_refused(
    redis_url: str, nats_url: str
) -> None:
    async with running_auth(auth_settings(redis_url, [nats_url])) as (_, client):
        admin = await client.admin_token()

        for fields in (
            {"page_size": -1},
            {"page_size": 1001},
            {"page_token": "not base64!"},
            {"page_token": "Ym9"},  # cut short
            {"page_token": "x" * 10_000},
            {"username_prefix": "bad prefix"},
            {"username_prefix": "a" * 129},
        ):
            await expect_error(list_users(client, admin, **fields), INVALID_ARGUMENT)
        await list_users(client, admin, page_size=1000)


async def test_users_stored_before_the_index_are_listed_after_a_restart(
    redis_url: str, nats_url: str
) -> None:
    settings = auth_settings(redis_url, [nats_url])
    async with running_auth(settings) as (_, client):
        await client.create_user("alice", "alice-password-1")
    store = redis.from_url(redis_url)
    try:
        await store.delete(USERS)  # as an older version left it
    finally:
        await store.aclose()

    async with running_auth(settings) as (_, client):
        page = await list_users(client, await client.admin_token())

    assert "alice" in [user.username for user in page.users]
