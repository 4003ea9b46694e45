"""The HTTP side on HTTPS: served with the service's certificate, fetched only over verified TLS."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from authmesh._shared.auth_metadata import METADATA_PATH, fetch_token_rules, server_metadata_extensions
from authmesh._shared.errors import ConfigurationError, Unavailable
from authmesh._shared.guard import ResourceGuard
from authmesh._shared.http_server import HttpServer
from authmesh._shared.settings import AuthSettings, CommonSettings
from authmesh._shared.tls import TlsFiles, client_ssl_context
from authmesh.certs import LOCAL_HOSTS, CertificateAuthority


def _metadata_routes() -> list[web.RouteDef]:
    document = {
        "issuer": "authmesh",
        **server_metadata_extensions(
            CommonSettings.model_construct(audience="authmesh-resources", access_token_ttl=300, leeway=5.0)
        ),
    }

    async def metadata(_: web.Request) -> web.Response:
        return web.json_response(document)

    async def moved(_: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.1:1" + METADATA_PATH)

    return [web.get(METADATA_PATH, metadata), web.get("/moved" + METADATA_PATH, moved)]


@pytest.fixture
def server_files(tmp_path: Path, ca: CertificateAuthority) -> TlsFiles:
    return ca.write_issued(tmp_path / "server", "auth", LOCAL_HOSTS)


@pytest.fixture
def member(tmp_path: Path, ca: CertificateAuthority) -> TlsFiles:
    """A client of the fleet: the CA, no certificate of its own (the HTTP side asks for none)."""
    return TlsFiles(ca_file=ca.write_issued(tmp_path / "client", "client", LOCAL_HOSTS).ca_file)


async def http_status(url: str, context: ssl.SSLContext | bool) -> int | None:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
            session.get(url, ssl=context) as response,
        ):
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def fetch_json(url: str, context: ssl.SSLContext) -> Any:
    """The JSON document at ``url``, fetched over TLS verified with ``context``."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
        session.get(url, ssl=context) as response,
    ):
        return await response.json()


async def test_the_http_side_serves_https_only_and_asks_no_client_certificate(
    server_files: TlsFiles, member: TlsFiles
) -> None:
    async with HttpServer("127.0.0.1:0", _metadata_routes(), CollectorRegistry(), tls=server_files) as http:
        assert http.url.startswith("https://")
        context = client_ssl_context(member)
        assert context is not None
        assert await http_status(f"{http.url}/metrics", context) == 200
        assert await http_status(f"http://{http.address}/metrics", False) is None, "plaintext got an answer"


async def test_a_plaintext_http_side_says_http(server_files: TlsFiles) -> None:
    async with HttpServer("127.0.0.1:0", [], CollectorRegistry()) as http:
        assert http.url == f"http://{http.address}"


async def test_metadata_is_read_over_https_verified_against_the_ca(
    server_files: TlsFiles, member: TlsFiles
) -> None:
    async with HttpServer("127.0.0.1:0", _metadata_routes(), CollectorRegistry(), tls=server_files) as http:
        rules = await fetch_token_rules(http.url, within=5, tls=member)

    assert rules.audience == "authmesh-resources"
    assert rules.access_token_ttl == 300


async def test_metadata_from_a_server_of_another_ca_is_refused(
    server_files: TlsFiles, tmp_path: Path, other_ca: CertificateAuthority
) -> None:
    stranger = TlsFiles(ca_file=other_ca.write_issued(tmp_path / "other", "client", LOCAL_HOSTS).ca_file)
    async with HttpServer("127.0.0.1:0", _metadata_routes(), CollectorRegistry(), tls=server_files) as http:
        with pytest.raises(Unavailable, match="Certificate"):
            await fetch_token_rules(http.url, within=0.5, tls=stranger)


async def test_a_redirect_is_not_followed_off_the_configured_url(
    server_files: TlsFiles, member: TlsFiles
) -> None:
    async with HttpServer("127.0.0.1:0", _metadata_routes(), CollectorRegistry(), tls=server_files) as http:
        with pytest.raises(Unavailable, match=r"moved.*ValueError"):
            await fetch_token_rules(f"{http.url}/moved", within=0.5, tls=member)


async def test_an_http_auth_url_is_refused_when_the_service_has_a_ca(member: TlsFiles) -> None:
    with pytest.raises(ConfigurationError, match=r"http:// but this service speaks TLS"):
        await fetch_token_rules("http://127.0.0.1:1", within=0.1, tls=member)
    with pytest.raises(ConfigurationError, match=r"http:// but this service speaks TLS"):
        ResourceGuard(
            auth_target="127.0.0.1:1",
            auth_url="http://127.0.0.1:1",
            unsafe_without_revocation=True,
            tls=member,
        )


async def test_an_https_auth_url_without_a_ca_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="AUTHMESH_TLS_CA_FILE is unset"):
        await fetch_token_rules("https://127.0.0.1:1", within=0.1)
    with pytest.raises(ConfigurationError, match="http:// or https://"):
        await fetch_token_rules("ftp://127.0.0.1:1", within=0.1)


def test_a_plaintext_public_url_is_refused_when_the_http_side_serves_https(server_files: TlsFiles) -> None:
    tls = {"tls_cert_file": server_files.cert_file, "tls_key_file": server_files.key_file}
    with pytest.raises(ValidationError, match="AUTHMESH_PUBLIC_URL is http://"):
        AuthSettings(public_url="http://auth.example", **tls)  # type: ignore[arg-type]
    assert AuthSettings(public_url="https://auth.example", **tls).public_url == "https://auth.example"  # type: ignore[arg-type]
