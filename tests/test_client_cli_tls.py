"""The command-line client over TLS (and mutual TLS), and over several auth processes at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import SecretStr

from authmesh._auth_service.app import AuthApp
from authmesh._shared.tls import TlsFiles, open_channel
from authmesh.certs import LOCAL_HOSTS, CertificateAuthority
from authmesh.processes import LOOPBACK, free_port
from tests.auth_support import SERVICE, AuthClient
from tests.test_certificate_login import mtls_auth_settings
from tests.test_client_cli import ALICE, Services, assert_failed_with, running_replica
from tests.test_tls_grpc import health_server

SERVICE_CERT = "resource-cli"


@dataclass
class TlsServices(Services):
    """Services on mutual TLS and the files of the command line's own certificate."""

    client_files: TlsFiles = field(default_factory=TlsFiles)

    def plain(self) -> list[str]:
        """Target and token file, no TLS flag (the stored login's files apply)."""
        return super().common()

    def common(self) -> list[str]:
        return [*self.plain(), *tls_flags(self.client_files)]


def tls_flags(files: TlsFiles) -> list[str]:
    flags = ["--tls-ca-file", str(files.ca_file)]
    if files.cert_file is not None and files.key_file is not None:
        flags += ["--tls-cert-file", str(files.cert_file), "--tls-key-file", str(files.key_file)]
    return flags


@pytest_asyncio.fixture(loop_scope="session")
async def tls_services(
    redis_url: str, tls_nats_url: str, tmp_path: Path, ca: CertificateAuthority
) -> AsyncIterator[TlsServices]:
    """An auth service that demands client certificates, whose replica logs in by its certificate."""
    replica_files = ca.write_issued(tmp_path / "replica", SERVICE_CERT, LOCAL_HOSTS, require_client_cert=True)
    client_files = ca.write_issued(tmp_path / "client", "client", LOCAL_HOSTS)
    accounts = [f"{SERVICE_CERT}={SERVICE[0]}"]
    settings = mtls_auth_settings(tmp_path, ca, redis_url, tls_nats_url, certificate_accounts=accounts)
    async with AuthApp(settings) as auth, open_channel(auth.grpc_address, client_files) as channel:
        client = AuthClient(channel)
        await client.create_user(*ALICE)
        async with running_replica(
            auth,
            tls_nats_url,
            service_account=SecretStr(SERVICE[0]),
            tls_ca_file=replica_files.ca_file,
            tls_cert_file=replica_files.cert_file,
            tls_key_file=replica_files.key_file,
            tls_require_client_cert=True,
        ) as replica:
            token_file = tmp_path / "state" / "authmesh" / "tokens.json"
            yield TlsServices(auth, client, replica, token_file, client_files=client_files)


async def test_a_login_over_mutual_tls_is_remembered_by_the_commands_after_it(
    tls_services: TlsServices,
) -> None:
    services = tls_services
    assert (await services.login(*ALICE)).exit_code == 0
    assert services.stored().tls == services.client_files

    whoami = await services.run("whoami", "--resource", services.replica.grpc_address, *services.plain())
    assert whoami.exit_code == 0, whoami.output
    assert "replica-cli" in whoami.stdout
    refreshed = await services.run("refresh", *services.plain())
    assert refreshed.exit_code == 0, refreshed.output
    assert services.stored().tls == services.client_files
    status = await services.run("status", "--resource", services.replica.grpc_address, *services.plain())
    assert status.exit_code == 0, status.output
    logout = await services.run("logout", *services.plain())
    assert logout.exit_code == 0, logout.output


async def test_the_admin_commands_run_over_mutual_tls(tls_services: TlsServices) -> None:
    services = tls_services
    assert (await services.admin_login()).exit_code == 0

    created = await services.run(
        "user", "create", "bob", "--password-stdin", *services.plain(), stdin="bob-password-1\n"
    )
    assert created.exit_code == 0, created.output
    listed = await services.run("user", "list", "--json", *services.plain())
    assert "bob" in listed.stdout, listed.output
    assert (await services.run("rotate-key", *services.plain())).exit_code == 0
    assert (await services.run("jwks", *services.plain())).exit_code == 0


async def test_the_tls_files_may_come_from_the_environment(tls_services: TlsServices) -> None:
    services = tls_services
    files = services.client_files
    env = {
        "AUTHMESH_TLS_CA_FILE": str(files.ca_file),
        "AUTHMESH_TLS_CERT_FILE": str(files.cert_file),
        "AUTHMESH_TLS_KEY_FILE": str(files.key_file),
    }
    result = await services.run(
        "login", ALICE[0], "--password-stdin", *services.plain(), stdin=f"{ALICE[1]}\n", env=dict(env)
    )

    assert result.exit_code == 0, result.output
    assert services.stored().tls == files


async def test_a_server_from_another_ca_is_one_clear_line_naming_the_target(
    tls_services: TlsServices, tmp_path: Path, other_ca: CertificateAuthority
) -> None:
    services = tls_services
    stranger = other_ca.write_issued(tmp_path / "stranger", "client", LOCAL_HOSTS)
    result = await services.login(*ALICE, *tls_flags(stranger))

    assert_failed_with(result, f"cannot reach {services.auth.grpc_address}", "TLS")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not services.token_file.exists()


async def test_a_plaintext_client_of_a_tls_server_is_refused_clearly(tls_services: TlsServices) -> None:
    services = tls_services
    result = await services.run(
        "login", ALICE[0], "--password-stdin", *services.plain(), "--timeout", "3", stdin=f"{ALICE[1]}\n"
    )

    assert_failed_with(result, f"cannot reach {services.auth.grpc_address}", "UNAVAILABLE")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_a_tls_client_of_a_plaintext_server_is_refused_clearly(tls_services: TlsServices) -> None:
    services = tls_services
    async with health_server(TlsFiles.none()) as plaintext:
        target = f"{LOOPBACK}:{plaintext.port}"
        result = await services.run(
            "login", ALICE[0], "--password-stdin", "--target", target, "--token-file",
            str(services.token_file), *tls_flags(services.client_files), stdin=f"{ALICE[1]}\n",
        )  # fmt: skip

    assert_failed_with(result, f"cannot reach {target}", "TLS")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-ca-file", "ca.pem", "--tls-cert-file", "c.pem"], "go together"),
        (["--tls-cert-file", "c.pem", "--tls-key-file", "k.pem"], "needs --tls-ca-file"),
    ],
)
async def test_a_half_given_client_certificate_is_an_error(
    tls_services: TlsServices, flags: list[str], message: str
) -> None:
    result = await tls_services.run(
        "login", ALICE[0], "--password-stdin", *tls_services.plain(), *flags, stdin=f"{ALICE[1]}\n"
    )

    assert_failed_with(result, message)


async def test_an_unreadable_ca_file_is_named(tls_services: TlsServices, tmp_path: Path) -> None:
    missing = tmp_path / "absent-ca.pem"
    result = await tls_services.run(
        "login", ALICE[0], "--password-stdin", *tls_services.plain(), "--tls-ca-file", str(missing),
        "--target", f"{LOOPBACK}:{free_port()}", stdin=f"{ALICE[1]}\n",
    )  # fmt: skip

    assert_failed_with(result, "absent-ca.pem")
