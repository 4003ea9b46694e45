"""Service accounts identified by their client certificate: ``Login`` without a password over mTLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr

from authmesh import SyncTokenSession, TokenSession
from authmesh._auth_service.app import AuthApp
from authmesh._resource_service.app import ResourceApp
from authmesh._shared.certificate_identity import CertificateAccounts, peer_certificate_names
from authmesh._shared.errors import ConfigurationError
from authmesh._shared.settings import AuthSettings, ResourceSettings
from authmesh._shared.tls import TlsFiles, grpc_channel_credentials
from authmesh.certs import LOCAL_HOSTS, CertificateAuthority
from authmesh.client import AuthApi, ResourceApi, check_health
from tests.auth_support import ADMIN, SERVICE, SERVICE_SCOPE, auth_settings, expect_error
from tests.waiting import eventually

CALL_TIMEOUT = 5.0
# The name on the replicas' certificates that the auth service maps to the service account.
SERVICE_CERT = "resource-a"
CERTIFICATE_NOT_ACCEPTED = "CERTIFICATE_NOT_ACCEPTED"


def mtls_auth_settings(
    tmp_path: Path, ca: CertificateAuthority, redis_url: str, tls_nats_url: str, **overrides: object
) -> AuthSettings:
    files = ca.write_issued(tmp_path / "auth", "auth", LOCAL_HOSTS, require_client_cert=True)
    values: dict[str, object] = {
        "tls_ca_file": files.ca_file,
        "tls_cert_file": files.cert_file,
        "tls_key_file": files.key_file,
        "tls_require_client_cert": True,
        "certificate_accounts": [f"{SERVICE_CERT}={SERVICE[0]}"],
    }
    return auth_settings(redis_url, [tls_nats_url], **(values | overrides))


@asynccontextmanager
async def mtls_auth(
    tmp_path: Path, ca: CertificateAuthority, redis_url: str, tls_nats_url: str, **overrides: object
) -> AsyncIterator[AuthApp]:
    async with AuthApp(mtls_auth_settings(tmp_path, ca, redis_url, tls_nats_url, **overrides)) as app:
        yield app


@asynccontextmanager
async def calling_as(target: str, files: TlsFiles) -> AsyncIterator[AuthApi]:
    async with AuthApi(target, timeout=CALL_TIMEOUT, credentials=grpc_channel_credentials(files)) as api:
        yield api


async def test_a_mapped_certificate_logs_in_as_its_service_account_without_a_password(
    tmp_path: Path, ca: CertificateAuthority, redis_url: str, tls_nats_url: str
) -> None:
    service = ca.write_issued(tmp_path / "svc", SERVICE_CERT, LOCAL_HOSTS)
    async with (
        mtls_auth(tmp_path, ca, redis_url, tls_nats_url) as app,
        calling_as(app.grpc_address, service) as auth,
    ):
        tokens = await auth.login(SERVICE[0], "", (SERVICE_SCOPE,))
        assert tokens.scopes == (SERVICE_SCOPE,)
        assert (await auth.refresh(tokens.refresh_token)).session_id == tokens.session_id
        # Passwords still work on the same connection, for every account.
        assert (await auth.admin_login(*ADMIN)).scopes == ("admin",)
        assert (await auth.login(SERVICE[0], SERVICE[1], (SERVICE_SCOPE,))).scopes == (SERVICE_SCOPE,)


async def test_the_librarys_sessions_log_in_a_bare_service_account_by_its_certificate(
    tmp_path: Path, ca: CertificateAuthority, redis_url: str, tls_nats_url: str
) -> None:
    service = ca.write_issued(tmp_path / "svc", SERVICE_CERT, LOCAL_HOSTS)
    credentials = grpc_channel_credentials(service)
    async with mtls_auth(tmp_path, ca, redis_url, tls_nats_url) as app:
        async with TokenSession.from_service_account(
            app.grpc_address, SERVICE[0], credentials=credentials, scopes=(SERVICE_SCOPE,)
        ) as session:
            assert (await session.access_token()).count(".") == 2
            assert session.tokens is not None
            assert session.tokens.scopes == (SERVICE_SCOPE,)

        def sync_login() -> str:
            with SyncTokenSession.from_service_account(
                app.grpc_address, SERVICE[0], credentials=credentials, scopes=(SERVICE_SCOPE,)
            ) as sync_session:
                return sync_session.access_token()

        # In a thread: the blocking client must not stop the loop the auth service answers on.
        assert (await asyncio.to_thread(sync_login)).count(".") == 2


def test_a_bare_service_account_for_a_session_needs_tls_credentials() -> None:
    with pytest.raises(ConfigurationError, match="client certificate"):
        TokenSession.from_service_account("127.0.0.1:50051", SERVICE[0])


async def test_a_certificate_with_another_name_is_refused(
    tmp_path: Path, ca: CertificateAuthority, redis_url: str, tls_nats_url: str
) -> None:
    stranger = ca.write_issued(tmp_path / "client", "client", LOCAL_HOSTS)
    async with (
        mtls_auth(tmp_path, ca, redis_url, tls_nats_url) as app,
        calling_as(app.grpc_address, stranger) as auth,
    ):
        await expect_error(
            auth.login(SERVICE[0], "", (SERVICE_SCOPE,)),
            grpc.StatusCode.UNAUTHENTICATED,
            CERTIFICATE_NOT_ACCEPTED,
        )


async def test_a_certificate_may_log_in_only_as_the_account_it_is_mapped_to(
    tmp_path: Path, ca: CertificateAuthority, redis_url: str, tls_nats_url: str
) -> None:
    service = ca.write_issued(tmp_path / "svc", SERVICE_CERT, LOCAL_HOSTS)
    ghost = f"{SERVICE_CERT}-2"
    overrides = {"certificate_accounts": [f"{SERVICE_CERT}={SERVICE[0]}", f"{ghost}=nobody"]}
    ghost_files = ca.write_issued(tmp_path / "ghost", ghost, LOCAL_HOSTS)
    async with mtls_auth(tmp_path, ca, redis_url, tls_nats_url, **overrides) as app:
        async with calling_as(app.grpc_address, service) as auth:
            await expect_error(
                auth.login(ADMIN[0], "", ("admin",)),
                grpc.StatusCode.UNAUTHENTICATED,
                CERTIFICATE_NOT_ACCEPTED,
            )
        async with calling_as(app.grpc_address, ghost_files) as auth:
            # Mapped, but to an account that does not exist.
            await expect_error(
                auth.login("nobody", ""), grpc.StatusCode.UNAUTHENTICATED, CERTIFICATE_NOT_ACCEPTED
            )


async def test_another_cas_certificate_and_plaintext_get_no_token(
    tmp_path: Path,
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    redis_url: str,
    tls_nats_url: str,
) -> None:
    impostor = other_ca.write_issued(tmp_path / "impostor", SERVICE_CERT, LOCAL_HOSTS)
    trusted_ca = ca.write_ca(tmp_path / "trusted")
    foreign = TlsFiles(ca_file=trusted_ca, cert_file=impostor.cert_file, key_file=impostor.key_file)
    async with mtls_auth(tmp_path, ca, redis_url, tls_nats_url) as app:
        async with calling_as(app.grpc_address, foreign) as auth:
            await expect_error(auth.login(SERVICE[0], "", (SERVICE_SCOPE,)), grpc.StatusCode.UNAVAILABLE)
        async with calling_as(app.grpc_address, TlsFiles(ca_file=trusted_ca)) as auth:
            await expect_error(auth.login(SERVICE[0], "", (SERVICE_SCOPE,)), grpc.StatusCode.UNAVAILABLE)
        async with AuthApi(app.grpc_address, timeout=CALL_TIMEOUT) as plaintext:
            await expect_error(plaintext.login(SERVICE[0], "", (SERVICE_SCOPE,)), grpc.StatusCode.UNAVAILABLE)


async def test_without_certificate_accounts_an_empty_password_stays_a_malformed_request(
    tmp_path: Path, ca: CertificateAuthority, redis_url: str, tls_nats_url: str
) -> None:
    service = ca.write_issued(tmp_path / "svc", SERVICE_CERT, LOCAL_HOSTS)
    async with (
        mtls_auth(tmp_path, ca, redis_url, tls_nats_url, certificate_accounts=[]) as app,
        calling_as(app.grpc_address, service) as auth,
    ):
        await expect_error(auth.login(SERVICE[0], "", (SERVICE_SCOPE,)), grpc.StatusCode.INVALID_ARGUMENT)


async def test_a_replica_whose_service_account_has_no_password_logs_in_by_its_certificate(
    tmp_path: Path, ca: CertificateAuthority, redis_url: str, tls_nats_url: str
) -> None:
    # The auth service creates the certificate-only account itself (with a password nobody knows).
    overrides = {"service_account": SERVICE[0]}
    replica_files = ca.write_issued(tmp_path / "replica", SERVICE_CERT, LOCAL_HOSTS)
    client_files = ca.write_issued(tmp_path / "client", "client", LOCAL_HOSTS)
    async with mtls_auth(tmp_path, ca, redis_url, tls_nats_url, **overrides) as app:
        replica_settings = ResourceSettings(
            nats_urls=[tls_nats_url],
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            auth_target=app.grpc_address,
            service_account=SecretStr(SERVICE[0]),
            instance="replica-by-certificate",
            shutdown_grace=0.2,
            tls_ca_file=replica_files.ca_file,
            tls_cert_file=replica_files.cert_file,
            tls_key_file=replica_files.key_file,
        )
        async with (
            ResourceApp(replica_settings) as replica,
            ResourceApi(replica.grpc_address, tls=client_files) as api,
        ):
            # A replica serves only once it has the snapshot, which needs its service login.
            await eventually(lambda: _serving(api), within=20, what="the replica serving")
            async with calling_as(app.grpc_address, client_files) as auth:
                await expect_error(
                    auth.login(SERVICE[0], SERVICE[1], (SERVICE_SCOPE,)), grpc.StatusCode.UNAUTHENTICATED
                )


async def _serving(api: ResourceApi) -> bool:
    return (await check_health(api.channel, api.target, CALL_TIMEOUT)).serving


def test_certificate_accounts_need_a_server_that_demands_client_certificates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="AUTHMESH_TLS_REQUIRE_CLIENT_CERT"):
        AuthSettings(key_encryption_key=SecretStr("k" * 20), certificate_accounts=["resource-a=svc"])


def test_a_bare_service_account_is_refused_without_certificates_or_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="client certificate"):
        ResourceSettings(service_account=SecretStr("svc"))
    with pytest.raises(ValueError, match="username:password"):
        AuthSettings(service_account=SecretStr("svc"))


def test_the_mapping_reads_name_equals_account_and_bare_names() -> None:
    accounts = CertificateAccounts.parse(["resource-a=svc", " svc-b "])
    assert accounts.by_name == {"resource-a": "svc", "svc-b": "svc-b"}
    assert accounts.allows("svc", {"resource-a", "localhost"})
    assert not accounts.allows("svc", {"svc-b"})
    with pytest.raises(ConfigurationError, match="twice"):
        CertificateAccounts.parse(["a=x", "a=y"])
    with pytest.raises(ConfigurationError, match="certificate-name=username"):
        CertificateAccounts.parse(["=svc"])


def test_only_a_verified_certificates_names_count() -> None:
    context = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"resource-a"],
        "x509_subject_alternative_name": [b"localhost"],
    }
    assert peer_certificate_names(context, [b"localhost"]) == {"resource-a", "localhost"}
    assert peer_certificate_names(context, None) == frozenset()
    assert (
        peer_certificate_names({**context, "transport_security_type": [b"insecure"]}, [b"x"]) == frozenset()
    )
