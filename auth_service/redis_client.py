"""The auth service's Redis connection: one Redis URL, or Redis Sentinel that follows a failover.

``AUTHMESH_REDIS_URL`` is either ``redis://[user:password@]host:port/db`` (one server) or
``redis+sentinel://[user:password@]host:port,host:port,.../service_name/db`` (the Sentinels that
watch the group ``service_name``). With Sentinel every new connection asks the Sentinels where the
primary is, so after a failover the service reconnects to the promoted replica by itself; while no
primary answers, calls fail with a connection error (UNAVAILABLE), never against a replica.

``rediss://`` and ``rediss+sentinel://`` are the same on TLS: with Sentinel, TLS to the Sentinels and
to the data nodes alike, both verified against the CA, with this service's certificate presented. The
user and password (of the URL, or ``AUTHMESH_REDIS_PASSWORD``) are the data nodes'; the Sentinels are
reached with TLS only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis
from redis.asyncio.sentinel import Sentinel

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.settings import AuthSettings
from authmesh._shared.tls import redis_tls_options

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_TLS_SCHEME = "rediss+sentinel"
# Keyword arguments of the data nodes' connections that the Sentinels' connections do not get.
_DATA_NODE_ONLY = ("username", "password", "db")


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """Where the Sentinels are and which group they watch."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def describe(self) -> str:
        """The target without credentials, for logs and errors."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        scheme = SENTINEL_TLS_SCHEME if self.tls else SENTINEL_SCHEME
        return f"{scheme}://{hosts}/{self.service_name}/{self.db}"


def parse_sentinel_url(url: str) -> SentinelTarget | None:
    """The Sentinel target of a ``redis+sentinel://`` or ``rediss+sentinel://`` URL; None for any other.

    Raises:
        ConfigurationError: A Sentinel URL without hosts, ports or service name, or with a bad db.
    """
    parts = urlsplit(url)
    if parts.scheme not in (SENTINEL_SCHEME, SENTINEL_TLS_SCHEME):
        return None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = tuple(_host_port(item) for item in hosts.split(",") if item.strip())
    path = [segment for segment in parts.path.split("/") if segment]
    if not sentinels or not path or len(path) > 2:
        raise ConfigurationError(
            f"a Sentinel URL is {parts.scheme}://host:port[,host:port...]/service_name[/db]"
        )
    db = path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise ConfigurationError(f"the database of a Sentinel URL must be a number, not {db!r}")
    return SentinelTarget(
        sentinels=sentinels,
        service_name=unquote(path[0]),
        db=int(db),
        username=unquote(username) or None,
        password=unquote(password) or None,
        tls=parts.scheme == SENTINEL_TLS_SCHEME,
    )


def _host_port(item: str) -> tuple[str, int]:
    host, sep, port = item.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigurationError(f"a Sentinel address must be host:port, not {item.strip()!r}")
    return host.strip("[]"), int(port)


def describe_redis_url(url: str) -> str:
    """The store's address without credentials: what logs and connection errors name."""
    sentinel = parse_sentinel_url(url)
    if sentinel is not None:
        return sentinel.describe()
    parts = urlsplit(url)
    host = parts.hostname or parts.path or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path if parts.hostname else ''}"


@dataclass(frozen=True, slots=True)
class StoreConnection:
    """The store's client and, with Sentinel, the clients of the Sentinels it asks."""

    client: redis.Redis
    sentinels: tuple[redis.Redis, ...] = ()
    replicated: bool = False

    async def aclose(self) -> None:
        """Close every connection."""
        await self.client.aclose()
        for sentinel in self.sentinels:
            await sentinel.aclose()


def connect_redis(url: str, *, timeout: float, options: Mapping[str, Any] | None = None) -> StoreConnection:
    """A client for the store (connections are opened on first use).

    Args:
        url: ``redis://…``, ``rediss://…``, ``redis+sentinel://…`` or ``rediss+sentinel://…``.
        timeout: Socket and connect timeout of every connection, s.
        options: More redis-py keyword arguments (TLS files from
            :func:`~authmesh._shared.tls.redis_tls_options`, a password). With Sentinel the TLS ones go
            to the Sentinels and the data nodes, the account only to the data nodes.
    """
    extra = dict(options or {})
    sentinel = parse_sentinel_url(url)
    if sentinel is None:
        return StoreConnection(
            redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, **extra)
        )
    timeouts: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if sentinel.tls:
        timeouts["ssl"] = True
    # The account of the URL, unless the options name one (AUTHMESH_REDIS_PASSWORD wins, as without Sentinel).
    data_nodes: dict[str, Any] = {
        **timeouts,
        "db": sentinel.db,
        "username": sentinel.username,
        "password": sentinel.password,
        **extra,
    }
    watchers = Sentinel(
        list(sentinel.sentinels),
        sentinel_kwargs={
            **timeouts,
            **{name: value for name, value in extra.items() if name not in _DATA_NODE_ONLY},
        },
        **data_nodes,
    )
    client: redis.Redis = watchers.master_for(sentinel.service_name)
    return StoreConnection(client, tuple(watchers.sentinels), replicated=True)


def connect_store(settings: AuthSettings, *, timeout: float) -> StoreConnection:
    """The auth service's store client as its settings describe it: the URL, TLS files and password.

    Args:
        settings: The auth service's settings.
        timeout: Socket and connect timeout of every connection, s.
    """
    redis_url = settings.redis_url.get_secret_value()
    options = redis_tls_options(redis_url, settings.tls)
    if settings.redis_password is not None:
        options["password"] = settings.redis_password.get_secret_value()
    return connect_redis(redis_url, timeout=timeout, options=options)
