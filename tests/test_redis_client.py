"""The store's URL: one Redis or Redis Sentinel, parsed in one place; what logs may show of it."""

from __future__ import annotations

import pytest

from authmesh._auth_service.redis_client import describe_redis_url, parse_sentinel_url
from authmesh._shared.errors import ConfigurationError


def test_a_sentinel_url_names_every_sentinel_the_group_and_the_database() -> None:
    target = parse_sentinel_url("redis+sentinel://user:s3cret@10.0.0.1:26379,[::1]:26380/authmesh/2")
    assert target is not None
    assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert (target.service_name, target.db, target.username, target.password) == (
        "authmesh",
        2,
        "user",
        "s3cret",
    )


def test_a_sentinel_url_without_a_database_uses_zero_and_a_plain_url_is_not_a_sentinel_url() -> None:
    target = parse_sentinel_url("redis+sentinel://127.0.0.1:26379/mymaster")
    assert target is not None
    assert target.db == 0
    assert parse_sentinel_url("redis://127.0.0.1:6379/0") is None


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel:///authmesh/0",
        "redis+sentinel://127.0.0.1:26379/",
        "redis+sentinel://127.0.0.1/authmesh/0",
        "redis+sentinel://127.0.0.1:26379/authmesh/zero",
        "redis+sentinel://127.0.0.1:26379/authmesh/0/extra",
    ],
)
def test_a_malformed_sentinel_url_is_a_clear_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="Sentinel"):
        parse_sentinel_url(url)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@127.0.0.1:6380/1", "redis://127.0.0.1:6380/1"),
        ("rediss://user:pw@cache.internal:6379/0", "rediss://cache.internal:6379/0"),
        (
            "redis+sentinel://u:pw@127.0.0.1:1,127.0.0.1:2/authmesh/0",
            "redis+sentinel://127.0.0.1:1,127.0.0.1:2/authmesh/0",
        ),
    ],
)
def test_the_store_address_shown_in_logs_and_errors_carries_no_credentials(url: str, shown: str) -> None:
    assert describe_redis_url(url) == shown


def test_a_rediss_sentinel_url_is_the_same_group_on_tls() -> None:
    target = parse_sentinel_url("rediss+sentinel://auth:secret@10.0.0.1:26379,10.0.0.2:26379/authmesh/1")

    assert target is not None
    assert target.tls
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    assert (target.username, target.password, target.db) == ("auth", "secret", 1)
    assert target.describe() == "rediss+sentinel://10.0.0.1:26379,10.0.0.2:26379/authmesh/1"
    assert not parse_sentinel_url("redis+sentinel://10.0.0.1:26379/authmesh").tls  # type: ignore[union-attr]
