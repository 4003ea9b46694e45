"""A service with a CA never speaks plaintext to NATS, and a failed TLS attempt leaves no socket open."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from authmesh._shared.errors import Unavailable
from authmesh._shared.nats_wiring import connect_nats
from authmesh._shared.settings import CommonSettings
from authmesh._shared.tls import TlsFiles
from authmesh.certs import LOCAL_HOSTS, CertificateAuthority
from authmesh.processes import NatsServer
from tests.waiting import eventually


def _settings(url: str, files: TlsFiles, *, connect_timeout: float = 1.5) -> CommonSettings:
    return CommonSettings(
        nats_urls=[url],
        nats_user="auth",
        nats_password="nats-password-1",  # type: ignore[arg-type]  # pydantic makes it a SecretStr
        tls_ca_file=files.ca_file,
        tls_cert_file=files.cert_file,
        tls_key_file=files.key_file,
        connect_timeout=connect_timeout,
    )


@pytest.fixture
def member(tmp_path: Path, ca: CertificateAuthority) -> TlsFiles:
    return ca.write_issued(tmp_path / "member", "auth", LOCAL_HOSTS)


async def test_a_nats_url_with_a_ca_speaks_tls_first(
    tmp_path: Path, ca: CertificateAuthority, member: TlsFiles
) -> None:
    server_files = ca.write_issued(tmp_path / "server", "nats", LOCAL_HOSTS)
    async with NatsServer(tmp_path / "nats", tls=server_files) as server:
        client = await connect_nats(_settings(f"nats://127.0.0.1:{server.port}", member), name="test")
        try:
            await client.flush(timeout=2)
            assert client.is_connected
        finally:
            await client.close()


async def test_a_plaintext_nats_server_is_refused_when_the_service_has_a_ca(
    tmp_path: Path, member: TlsFiles
) -> None:
    # A nats:// URL and a server that does not ask for TLS: nats-py alone would send the password in the
    # clear (it upgrades only when the server's INFO asks); TLS first cannot be talked down.
    async with NatsServer(tmp_path / "nats") as server:
        for url in (server.url, f"tls://127.0.0.1:{server.port}"):
            with pytest.raises(Unavailable, match="SSL"):
                await connect_nats(_settings(url, member), name="test")


async def test_a_failed_tls_first_connection_leaves_no_socket_open(
    tmp_path: Path, ca: CertificateAuthority, member: TlsFiles
) -> None:
    # A server that sends INFO first: the client's handshake waits until the deadline cuts it short.
    server_files = ca.write_issued(tmp_path / "server", "nats", LOCAL_HOSTS)
    async with NatsServer(tmp_path / "nats", tls=server_files, tls_first=False) as server:
        with pytest.raises(Unavailable, match="cannot reach NATS"):
            await connect_nats(_settings(server.url, member, connect_timeout=1.0), name="test")

        # The client object may live on (the event loop still knows its socket): look at the sockets.
        async def all_closed() -> bool:
            return not sockets_to(server.port)

        await eventually(all_closed, within=2.0, what="the failed attempt's socket to close")


def sockets_to(port: int) -> list[str]:
    """This process's open TCP sockets whose peer is 127.0.0.1:``port`` (from ``/proc``)."""
    inodes: set[str] = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    peer = f"0100007F:{port:04X}"
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == peer and fields[9] in inodes:
            found.append(fields[1])
    return found
