"""Fixtures every test can use: one real Redis and one real NATS (JetStream) server per test session.

The servers run on free loopback ports with their files under pytest's temporary directory, never the
machine's own Redis (6379) or NATS (4222). ``redis_url`` and ``nats_url`` hand a test a clean slate on
those shared servers; a test that restarts or kills a server starts its own with ``authmesh.processes``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
import redis.asyncio as redis
from nats.aio.client import Client as NatsClient

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.tls import TlsFiles, client_ssl_context
from authmesh.certs import LOCAL_HOSTS, CertificateAuthority
from authmesh.processes import NatsServer, RedisServer, find_tls_redis_server

# A test session never holds anywhere near this many streams; the bound keeps the cleanup loop finite.
_MAX_STREAM_PAGES = 100
# Fixtures that start a Redis server: their tests are marked ``redis`` (``pytest -m redis``), which is
# how CI runs them a second time against another server (AUTHMESH_REDIS_SERVER).
_REDIS_FIXTURES = frozenset({"redis_server", "redis_url", "own_redis"})


def _no_tls_redis_server() -> str | None:
    """Why no Redis on TLS can run here, or None when one can."""
    try:
        find_tls_redis_server()
    except ConfigurationError as error:
        return str(error)
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a Redis fixture ``redis``; skip ``redis_tls`` tests without such a server.

    The embedded valkey-server has no TLS, so on a machine with no ``redis-server`` the tests of Redis on
    TLS are skipped with the reason; they are ``redis`` tests too, so CI's pass against the machine's own
    ``redis-server`` runs them.
    """
    tls_missing: str | None = None
    looked = False
    for item in items:
        if _REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)
        if item.get_closest_marker("redis_tls") is not None:
            item.add_marker(pytest.mark.redis)
            if not looked:
                tls_missing, looked = _no_tls_redis_server(), True
            if tls_missing is not None:
                item.add_marker(pytest.mark.skip(reason=tls_missing))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def redis_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RedisServer]:
    """A ``redis-server`` (AOF on, ``noeviction``) for the whole session."""
    async with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    """A ``nats-server`` with JetStream for the whole session."""
    async with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session")
async def redis_url(redis_server: RedisServer) -> str:
    """The URL of database 0 on the session's Redis, emptied (FLUSHALL) before the test."""
    client = redis.from_url(redis_server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    return redis_server.url


@pytest_asyncio.fixture(loop_scope="session")
async def raw_redis(redis_url: str) -> AsyncIterator[redis.Redis]:
    """A plain client on the session's (emptied) Redis, to read or write what the services store."""
    client = redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def nats_url(nats_server: NatsServer) -> str:
    """The URL of the session's NATS server, with every JetStream stream deleted before the test."""
    client = await nats.connect(servers=[nats_server.url], connect_timeout=2, max_reconnect_attempts=0)
    await _delete_streams(client)
    return nats_server.url


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def tls_nats_server(
    tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority
) -> AsyncIterator[tuple[NatsServer, TlsFiles]]:
    """A ``nats-server`` on TLS (TLS first, client certificates from ``ca``) for the whole session, and
    a member's certificate to reach it with."""
    base = tmp_path_factory.mktemp("tls-nats")
    server_files = ca.write_issued(base / "server", "nats", LOCAL_HOSTS)
    member = ca.write_issued(base / "member", "member", LOCAL_HOSTS)
    async with NatsServer(base / "nats", tls=server_files) as server:
        yield server, member


@pytest_asyncio.fixture(loop_scope="session")
async def tls_nats_url(tls_nats_server: tuple[NatsServer, TlsFiles]) -> str:
    """The URL of the session's TLS NATS server (what a service with a CA needs), emptied like
    ``nats_url``."""
    server, member = tls_nats_server
    client = await nats.connect(
        servers=[server.url],
        connect_timeout=2,
        max_reconnect_attempts=0,
        tls=client_ssl_context(member),
        tls_handshake_first=True,
    )
    await _delete_streams(client)
    return server.url


async def _delete_streams(client: NatsClient) -> None:
    """Delete every JetStream stream, then close ``client``."""
    try:
        jetstream = client.jetstream(timeout=5)
        for _ in range(_MAX_STREAM_PAGES):
            streams = await jetstream.streams_info()
            if not streams:
                break
            for stream in streams:
                assert stream.config.name is not None
                await jetstream.delete_stream(stream.config.name)
        else:
            pytest.fail("JetStream streams kept appearing while the test's NATS server was being emptied")
    finally:
        await client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis of the test's own, which it may kill, pause and restart (append-only persistence on)."""
    async with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session")
async def own_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A NATS of the test's own, which it may stop and restart."""
    async with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    """A throwaway CA: the fleet's, whose certificates every TLS test's parts trust."""
    return CertificateAuthority.create("test CA")


@pytest.fixture(scope="session")
def other_ca() -> CertificateAuthority:
    """A second CA that no part trusts: its certificates must be refused."""
    return CertificateAuthority.create("stranger CA")
