"""Clients of several auth processes at once: calls balanced over those that are up, TLS included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import pytest_asyncio
from typer.testing import CliRunner, Result

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.sync_token_session import SyncTokenSession
from authmesh._shared.tls import TlsFiles, grpc_channel_credentials
from authmesh._shared.token_session import TokenSession
from authmesh.certs import LOCAL_HOSTS, CertificateAuthority
from authmesh.client import TokenFile
from authmesh.stack_children import ServiceProcess
from tests.auth_support import ADMIN, ADMIN_SCOPE
from tests.faults import auth_process
from tests.test_client_cli import cli

# Enough renewals that round-robin would have picked the dead process at least once.
RENEWALS = 4


@pytest_asyncio.fixture(loop_scope="session")
async def two_auth_processes(
    tmp_path: Path, ca: CertificateAuthority, redis_url: str, tls_nats_url: str
) -> AsyncIterator[tuple[list[ServiceProcess], TlsFiles]]:
    """Two auth-service processes on one Redis and one NATS, both on TLS; and what a client trusts."""
    server = ca.write_issued(tmp_path / "tls", "auth", LOCAL_HOSTS)
    client = TlsFiles(ca_file=server.ca_file)
    tls_env = {
        "AUTHMESH_TLS_CA_FILE": str(server.ca_file),
        "AUTHMESH_TLS_CERT_FILE": str(server.cert_file),
        "AUTHMESH_TLS_KEY_FILE": str(server.key_file),
    }
    processes = [
        auth_process(tmp_path / f"auth-{index}", redis_url, [tls_nats_url], **tls_env) for index in (1, 2)
    ]
    async with AsyncExitStack() as stack:
        for process in processes:
            process.probe_tls = client
            stack.push_async_callback(process.stop)
            await process.start()
        yield processes, client


def targets(processes: list[ServiceProcess]) -> str:
    return ",".join(process.grpc_address for process in processes)


async def run(*args: str, stdin: str | None = None) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, cli(), list(args), input=stdin)


async def test_the_cli_refreshes_through_the_auth_process_still_up(
    two_auth_processes: tuple[list[ServiceProcess], TlsFiles], tmp_path: Path
) -> None:
    processes, client = two_auth_processes
    token_file = tmp_path / "tokens.json"
    common = ["--token-file", str(token_file)]
    login = await run(
        "login", ADMIN[0], "--password-stdin", "--target", targets(processes), "--tls-ca-file",
        str(client.ca_file), *common, stdin=f"{ADMIN[1]}\n",
    )  # fmt: skip
    assert login.exit_code == 0, login.output
    stored = TokenFile(token_file).load()
    assert stored is not None
    assert stored.auth_target == targets(processes)

    processes[0].kill()
    for _ in range(RENEWALS):
        refreshed = await run("refresh", *common)
        assert refreshed.exit_code == 0, refreshed.output
    status = await run("status", *common)
    assert status.exit_code == 1, status.output
    assert processes[0].grpc_address in status.stdout
    assert "UNREACHABLE" in status.stdout


async def test_a_token_session_renews_through_the_auth_process_still_up(
    two_auth_processes: tuple[list[ServiceProcess], TlsFiles],
) -> None:
    processes, client = two_auth_processes
    session = TokenSession.login(
        targets(processes), *ADMIN, scopes=(ADMIN_SCOPE,), credentials=grpc_channel_credentials(client)
    )
    async with session:
        first = session.tokens
        assert first is not None
        processes[1].kill()
        for _ in range(RENEWALS):
            renewed = await session.renew()
            assert renewed.session_id == first.session_id


async def test_a_sync_token_session_renews_through_the_auth_process_still_up(
    two_auth_processes: tuple[list[ServiceProcess], TlsFiles],
) -> None:
    processes, client = two_auth_processes
    credentials = grpc_channel_credentials(client)

    def renew_with_one_down() -> None:
        with SyncTokenSession.login(
            targets(processes), *ADMIN, scopes=(ADMIN_SCOPE,), credentials=credentials
        ) as session:
            processes[0].kill()
            for _ in range(RENEWALS):
                session.renew()

    await asyncio.to_thread(renew_with_one_down)


def test_several_auth_targets_must_be_literal_addresses_of_one_family() -> None:
    with pytest.raises(ConfigurationError, match="literal"):
        TokenSession.login("auth-a:50051,auth-b:50051", "alice", "password")
