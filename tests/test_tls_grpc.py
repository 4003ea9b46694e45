"""gRPC over TLS: both services serve TLS, clients verify the server, mutual TLS refuses strangers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from authmesh._auth_service.app import AuthApp
from authmesh._resource_service.app import ResourceApp
from authmesh._shared.errors import ConfigurationError
from authmesh._shared.grpc_server import RunningServer, start_grpc_server
from authmesh._shared.settings import ResourceSettings
from authmesh._shared.tls import TlsFiles, grpc_channel_credentials, open_channel
from authmesh.certs import LOCAL_HOSTS, CertificateAuthority
from authmesh.client import AuthApi, ResourceApi, check_health
from authmesh.processes import NatsServer
from tests.auth_support import ADMIN, SERVICE, auth_settings
from tests.waiting import eventually

CALL_TIMEOUT = 5.0


@asynccontextmanager
async def health_server(tls: TlsFiles) -> AsyncIterator[RunningServer]:
    """A server with nothing but the standard health service."""
    server = await start_grpc_server("127.0.0.1:0", register=lambda _: None, service_names=(), tls=tls)
    try:
        yield server
    finally:
        await server.stop(0)


async def health(target: str, tls: TlsFiles) -> str:
    """The health status at ``target``, called over a channel built from ``tls``."""
    async with open_channel(target, tls) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


async def refused(target: str, tls: TlsFiles) -> grpc.StatusCode:
    """The status of a health call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health(target, tls)
    return info.value.code()


async def test_a_tls_server_answers_a_client_that_trusts_its_ca(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    server_files = ca.write_issued(tmp_path / "server", "server", LOCAL_HOSTS)
    async with health_server(server_files) as server:
        assert await health(f"127.0.0.1:{server.port}", TlsFiles(ca_file=server_files.ca_file)) == "SERVING"


async def test_a_plaintext_client_is_refused_by_a_tls_server(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    async with health_server(ca.write_issued(tmp_path, "server", LOCAL_HOSTS)) as server:
        assert await refused(f"127.0.0.1:{server.port}", TlsFiles.none()) == grpc.StatusCode.UNAVAILABLE


async def test_a_server_certificate_from_another_ca_is_refused_by_the_client(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    impostor = other_ca.write_issued(tmp_path / "impostor", "server", LOCAL_HOSTS)
    trusted = ca.write_ca(tmp_path / "client")
    async with health_server(impostor) as server:
        assert await refused(f"127.0.0.1:{server.port}", TlsFiles(ca_file=trusted)) == (
            grpc.StatusCode.UNAVAILABLE
        )


async def test_a_server_certificate_for_another_host_is_refused_by_the_client(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    elsewhere = ca.write_issued(tmp_path, "server", ("auth.example",))
    async with health_server(elsewhere) as server:
        assert await refused(f"127.0.0.1:{server.port}", TlsFiles(ca_file=elsewhere.ca_file)) == (
            grpc.StatusCode.UNAVAILABLE
        )


async def test_mutual_tls_refuses_a_client_without_a_certificate_or_with_another_cas(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    server_files = ca.write_issued(tmp_path / "server", "server", LOCAL_HOSTS, require_client_cert=True)
    trusted = server_files.ca_file
    stranger = other_ca.write_issued(tmp_path / "stranger", "client", LOCAL_HOSTS)
    member = ca.write_issued(tmp_path / "member", "client", LOCAL_HOSTS)
    async with health_server(server_files) as server:
        target = f"127.0.0.1:{server.port}"
        assert await refused(target, TlsFiles(ca_file=trusted)) == grpc.StatusCode.UNAVAILABLE
        foreign = TlsFiles(ca_file=trusted, cert_file=stranger.cert_file, key_file=stranger.key_file)
        assert await refused(target, foreign) == grpc.StatusCode.UNAVAILABLE
        assert await health(target, member) == "SERVING"


def test_a_half_configured_server_pair_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="go together"):
        TlsFiles(cert_file=tmp_path / "cert.pem")
    with pytest.raises(ValueError, match="go together"):
        ResourceSettings(tls_cert_file=tmp_path / "cert.pem")


async def test_an_unreadable_tls_file_names_the_file(tmp_path: Path) -> None:
    missing = TlsFiles(cert_file=tmp_path / "absent.pem", key_file=tmp_path / "absent-key.pem")
    with pytest.raises(ConfigurationError, match=r"absent-key\.pem"):
        await start_grpc_server("127.0.0.1:0", register=lambda _: None, service_names=(), tls=missing)


async def test_both_services_run_on_mutual_tls_end_to_end(
    tmp_path: Path, ca: CertificateAuthority, redis_url: str
) -> None:
    # A service with a CA speaks TLS to NATS too (TLS first): its NATS is on TLS.
    nats_files = ca.write_issued(tmp_path / "nats", "nats", LOCAL_HOSTS)
    async with NatsServer(tmp_path / "nats-data", tls=nats_files) as nats_server:
        await _both_services_on_mutual_tls(tmp_path, ca, redis_url, nats_server.url)


async def _both_services_on_mutual_tls(
    tmp_path: Path, ca: CertificateAuthority, redis_url: str, nats_url: str
) -> None:
    auth_files = ca.write_issued(tmp_path / "auth", "auth", LOCAL_HOSTS, require_client_cert=True)
    replica_files = ca.write_issued(tmp_path / "replica", "replica", LOCAL_HOSTS, require_client_cert=True)
    client_files = ca.write_issued(tmp_path / "client", "client", LOCAL_HOSTS)
    settings = auth_settings(
        redis_url,
        [nats_url],
        tls_ca_file=auth_files.ca_file,
        tls_cert_file=auth_files.cert_file,
        tls_key_file=auth_files.key_file,
        tls_require_client_cert=True,
    )
    async with AuthApp(settings) as auth_app:
        replica_settings = ResourceSettings(
            nats_urls=[nats_url],
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            auth_target=auth_app.grpc_address,
            service_account=SecretStr(":".join(SERVICE)),
            instance="replica-tls",
            shutdown_grace=0.2,
            tls_ca_file=replica_files.ca_file,
            tls_cert_file=replica_files.cert_file,
            tls_key_file=replica_files.key_file,
            tls_require_client_cert=True,
        )
        async with (
            ResourceApp(replica_settings) as replica,
            AuthApi(auth_app.grpc_address, credentials=grpc_channel_credentials(client_files)) as auth,
            ResourceApi(replica.grpc_address, tls=client_files) as resource,
        ):
            # The replica serves only once it has the snapshot, fetched from the auth service over mTLS.
            await eventually(lambda: _serving(resource), within=20, what="the replica serving over TLS")
            admin = await auth.admin_login(*ADMIN)
            subject = await auth.create_user(admin.access_token, "alice", "alice-password-1", ("docs:read",))
            alice = await auth.login("alice", "alice-password-1")
            assert (await resource.whoami(alice.access_token)).subject == subject


async def _serving(resource: ResourceApi) -> bool:
    return (await check_health(resource.channel, resource.target, CALL_TIMEOUT)).status == "SERVING"
