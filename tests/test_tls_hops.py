"""NATS and Redis on TLS: only clients with a certificate from the fleet's CA get in."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import nats
import pytest
import redis.asyncio as redis
from nats.aio.client import Client as NatsClient
from nats.errors import NoServersError

from authmesh._auth_service.redis_scripts import ScriptRunner
from authmesh._shared.nats_wiring import abandon
from authmesh._shared.tls import TlsFiles, client_ssl_context, redis_tls_options
from authmesh.certs import LOCAL_HOSTS, CertificateAuthority
from authmesh.processes import NatsCluster, NatsServer, RedisServer
from tests.test_script_batching import BUSY_SCRIPT, ECHO_SCRIPT

REDIS_USER = ("auth", "redis-password-1")


async def nats_connects(url: str, context: ssl.SSLContext | None) -> bool:
    """Whether a client gets a working connection (a round trip) to ``url``."""
    # As the services connect: TLS first (the servers are configured with handshake_first).
    options: dict[str, Any] = {"tls": context, "tls_handshake_first": True} if context else {}
    client = NatsClient()
    try:
        await client.connect(
            servers=[url], connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0, **options
        )
    except (NoServersError, OSError, nats.errors.Error):
        abandon(client)
        return False
    try:
        await client.flush(timeout=2)
        return True
    except (OSError, nats.errors.Error):
        return False
    finally:
        await client.close()


async def test_nats_on_tls_admits_only_clients_with_a_certificate_from_its_ca(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    server_files = ca.write_issued(tmp_path / "server", "nats", LOCAL_HOSTS)
    member = ca.write_issued(tmp_path / "member", "auth", LOCAL_HOSTS)
    stranger = other_ca.write_issued(tmp_path / "stranger", "intruder", LOCAL_HOSTS)
    async with NatsServer(tmp_path / "nats", tls=server_files) as server:
        assert server.url.startswith("tls://")
        assert await nats_connects(server.url, client_ssl_context(member))
        plaintext = f"nats://127.0.0.1:{server.port}"
        assert not await nats_connects(plaintext, None), "a plaintext client got in"
        no_certificate = TlsFiles(ca_file=member.ca_file)
        assert not await nats_connects(server.url, client_ssl_context(no_certificate))
        foreign = TlsFiles(ca_file=member.ca_file, cert_file=stranger.cert_file, key_file=stranger.key_file)
        assert not await nats_connects(server.url, client_ssl_context(foreign))


async def test_a_nats_server_from_another_ca_is_refused_by_the_client(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    impostor = other_ca.write_issued(tmp_path / "impostor", "nats", LOCAL_HOSTS)
    member = ca.write_issued(tmp_path / "member", "auth", LOCAL_HOSTS)
    # It would accept our client certificates: only the client's check of the server stands in the way.
    accepting = TlsFiles(ca_file=member.ca_file, cert_file=impostor.cert_file, key_file=impostor.key_file)
    async with NatsServer(tmp_path / "nats", tls=accepting) as server:
        assert not await nats_connects(server.url, client_ssl_context(member))


async def test_a_nats_cluster_forms_over_tls_routes(tmp_path: Path, ca: CertificateAuthority) -> None:
    node_files = ca.write_issued(tmp_path / "tls", "nats", LOCAL_HOSTS)
    member = ca.write_issued(tmp_path / "member", "auth", LOCAL_HOSTS)
    cluster = NatsCluster(tmp_path / "cluster", size=3, tls=node_files)
    async with cluster:
        # Healthy means every node knows the JetStream meta leader: the routes are up, on TLS.
        assert await nats_connects(cluster.urls[0], client_ssl_context(member))
        verifying = [
            line for line in cluster.nodes[0].config_path.read_text().splitlines() if "verify" in line
        ]
        assert verifying == ["  verify: true", "    verify: true"]  # clients, then the cluster's routes


async def redis_answers(url: str, files: TlsFiles) -> bool:
    """Whether PING works at ``url`` with ``files`` as the client's TLS material."""
    client = redis.Redis.from_url(
        url, socket_timeout=2, socket_connect_timeout=2, **redis_tls_options(url, files)
    )
    try:
        return bool(await client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        await client.aclose()


@pytest.mark.redis_tls
async def test_redis_on_tls_admits_only_its_user_with_a_certificate_from_its_ca(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    server_files = ca.write_issued(tmp_path / "server", "redis", LOCAL_HOSTS)
    member = ca.write_issued(tmp_path / "member", "auth", LOCAL_HOSTS)
    stranger = other_ca.write_issued(tmp_path / "stranger", "intruder", LOCAL_HOSTS)
    async with RedisServer(tmp_path / "redis", tls=server_files, user=REDIS_USER) as server:
        assert server.url.startswith("rediss://")
        assert await redis_answers(server.url, member)
        plaintext = server.url.replace("rediss://", "redis://")
        assert not await redis_answers(plaintext, member), "a plaintext client got in"
        foreign = TlsFiles(ca_file=member.ca_file, cert_file=stranger.cert_file, key_file=stranger.key_file)
        assert not await redis_answers(server.url, foreign)
        assert not await redis_answers(server.url, TlsFiles(ca_file=member.ca_file))
        wrong_password = server.url.replace(REDIS_USER[1], "not-the-password")
        assert not await redis_answers(wrong_password, member)
        assert REDIS_USER[1] not in server.log_path.read_text()


@pytest.mark.redis_tls
async def test_a_redis_server_from_another_ca_is_refused_by_the_client(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    impostor = other_ca.write_issued(tmp_path / "impostor", "redis", LOCAL_HOSTS)
    member = ca.write_issued(tmp_path / "member", "auth", LOCAL_HOSTS)
    async with RedisServer(tmp_path / "redis", tls=impostor, user=REDIS_USER) as server:
        assert not await redis_answers(server.url, member)


@pytest.mark.redis_tls
async def test_a_batch_of_script_calls_on_tls_reaches_redis_in_one_read_not_one_per_call(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    # Redis reads one TLS record per turn of its event loop and fsyncs the AOF after each turn, so a
    # batch sent as one record per call would cost an fsync per call.
    server_files = ca.write_issued(tmp_path / "server", "redis", LOCAL_HOSTS)
    member = ca.write_issued(tmp_path / "member", "auth", LOCAL_HOSTS)
    calls = 40
    async with RedisServer(tmp_path / "redis", tls=server_files, user=REDIS_USER) as server:
        client = redis.Redis.from_url(
            server.url, socket_timeout=5, socket_connect_timeout=2, **redis_tls_options(server.url, member)
        )
        try:
            runner = ScriptRunner(client.connection_pool)
            await runner.run(BUSY_SCRIPT, [], ["1"])  # the script is loaded and a connection is kept
            busy = asyncio.ensure_future(runner.run(BUSY_SCRIPT, [], ["20000000"]))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            reads_before = (await client.info("stats"))["total_reads_processed"]
            answers = await asyncio.gather(
                *(runner.run(ECHO_SCRIPT, [], [f"echo-{index}"]) for index in range(calls))
            )
            assert await busy == b"done"
            assert answers == [f"echo-{index}".encode() for index in range(calls)]
            reads = (await client.info("stats"))["total_reads_processed"] - reads_before
            # The INFO call itself, the batch's write (in a record or a few), the busy call's tail.
            assert reads < 8, f"{reads} reads for one batch of {calls} calls"
        finally:
            await client.aclose()
