"""Redis Sentinel on TLS: ``rediss+sentinel://`` reaches the Sentinels and the data nodes over TLS."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authmesh._auth_service.app import AuthApp
from authmesh._auth_service.redis_client import connect_redis
from authmesh._shared.errors import Unavailable
from authmesh._shared.tls import TlsFiles, grpc_channel_credentials, redis_tls_options
from authmesh.certs import LOCAL_HOSTS, CertificateAuthority
from authmesh.client import AuthApi, ResourceApi
from authmesh.redis_sentinel import SentinelGroup
from authmesh.stack import LocalStack
from tests.auth_support import auth_settings
from tests.test_stack import FAST_ENV

# Needs a redis-server built with TLS (the embedded valkey-server has none).
pytestmark = pytest.mark.redis_tls


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tls_group(
    tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority
) -> AsyncIterator[SentinelGroup]:
    base = tmp_path_factory.mktemp("tls-sentinel")
    files = ca.write_issued(base / "tls", "redis", LOCAL_HOSTS)
    async with SentinelGroup(base / "group", replicas=1, tls=files) as group:
        yield group


@pytest.fixture
def member(tmp_path: Path, ca: CertificateAuthority) -> TlsFiles:
    return ca.write_issued(tmp_path / "member", "auth", LOCAL_HOSTS)


async def test_a_rediss_sentinel_url_reaches_the_primary_over_tls(
    tls_group: SentinelGroup, member: TlsFiles
) -> None:
    assert tls_group.url.startswith("rediss+sentinel://")
    connection = connect_redis(tls_group.url, timeout=3, options=redis_tls_options(tls_group.url, member))
    try:
        await connection.client.set("tls-sentinel", "1")
        assert await connection.client.get("tls-sentinel") == b"1"
        assert connection.replicated
    finally:
        await connection.aclose()


async def test_a_plaintext_sentinel_url_to_tls_nodes_fails_with_a_clear_error(
    tls_group: SentinelGroup, member: TlsFiles
) -> None:
    plaintext = tls_group.url.replace("rediss+sentinel://", "redis+sentinel://")
    settings = auth_settings(
        plaintext,
        ["tls://127.0.0.1:1"],
        tls_ca_file=member.ca_file,
        tls_cert_file=member.cert_file,
        tls_key_file=member.key_file,
        connect_timeout=1.0,
    )
    with pytest.raises(Unavailable, match=r"the URL is plaintext: a Redis on TLS needs rediss://") as caught:
        async with AuthApp(settings):
            pass
    assert caught.value.code == "STORE_UNAVAILABLE"
    assert "redis+sentinel://127.0.0.1:" in caught.value.message


async def test_the_auth_service_runs_on_a_tls_sentinel_topology(tmp_path: Path) -> None:
    async with (
        LocalStack(replicas=1, base_dir=tmp_path, env=FAST_ENV, tls=True, redis_sentinel=True) as stack,
        AuthApi(stack.auth_grpc, credentials=grpc_channel_credentials(stack.client_tls)) as auth,
    ):
        assert stack.redis_url.startswith("rediss+sentinel://")
        assert stack.describe()["redis"]["url"] == stack.redis_url
        admin = await auth.admin_login(*stack.admin_credentials)
        user = f"user-{uuid.uuid4().hex[:8]}"
        await auth.create_user(admin.access_token, user, "correct horse battery staple", ("docs:read",))
        tokens = await auth.login(user, "correct horse battery staple")
        async with ResourceApi(stack.replicas[0].grpc, tls=stack.client_tls) as resource:
            assert (await resource.whoami(tokens.access_token)).subject
