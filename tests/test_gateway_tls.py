"""``authmesh up --tls --gateway``: Envoy serves HTTPS and asks the replicas over TLS."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import aiohttp
import pytest
from rich.console import Console

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.tls import TlsFiles, client_ssl_context
from authmesh._shared.tls import grpc_channel_credentials as credentials
from authmesh.client import AuthApi
from authmesh.envoy_gateway import GatewayPorts, ext_authz_config, upstream_tls_socket
from authmesh.gateway_stack import GATEWAY_STACK_ENV, LocalGateway
from authmesh.stack import LocalStack
from authmesh.stack_commands import print_stack
from tests.test_stack import FAST_ENV

# A TLS stack's Redis needs a redis-server built with TLS (the embedded valkey-server has none).
pytestmark = pytest.mark.redis_tls
PASSWORD = "correct horse battery staple"


async def test_the_gateway_of_a_tls_stack_serves_https_and_checks_tokens_over_tls(tmp_path: Path) -> None:
    env = {**FAST_ENV, **GATEWAY_STACK_ENV}
    async with (
        LocalStack(replicas=1, base_dir=tmp_path / "stack", env=env, tls=True) as stack,
        LocalGateway(stack, tmp_path / "gateway") as gateway,
        AuthApi(stack.auth_grpc, credentials=credentials(stack.client_tls)) as auth,
    ):
        assert gateway.url.startswith("https://")
        description = stack.describe()
        description["gateway"] = gateway.describe()
        output = io.StringIO()
        print_stack(Console(file=output, width=200, force_terminal=False), description)
        printed = output.getvalue()
        assert f"export AUTHMESH_AUTH_URL=https://{stack.auth_http}" in printed
        assert "Envoy + ext_authz (https)" in printed
        assert description["auth"]["jwks_uri"].startswith("https://")
        admin = (await auth.admin_login(*stack.admin_credentials)).access_token
        user = f"user-{uuid.uuid4().hex[:8]}"
        subject = await auth.create_user(admin, user, PASSWORD, ("docs:read",))
        token = (await auth.login(user, PASSWORD)).access_token
        context = client_ssl_context(stack.client_tls)
        assert context is not None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            # A 200 with the identity means Envoy reached the replica's Check, which speaks only TLS.
            async with session.get(
                f"{gateway.url}/docs/1", headers={"authorization": f"Bearer {token}"}, ssl=context
            ) as reply:
                assert reply.status == 200
                body = await reply.json()
            assert body["headers"]["x-authmesh-subject"] == [subject]
            async with session.get(f"{gateway.url}/docs/1", ssl=context) as reply:
                assert reply.status == 401
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{gateway.port}/docs/1"):
                    pass
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with session.get(f"{gateway.url}/docs/1"):  # the system's roots know no such CA
                    pass


def test_a_tls_cluster_without_a_ca_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="CA"):
        upstream_tls_socket(TlsFiles())
    with pytest.raises(ConfigurationError, match="certificate"):
        ext_authz_config(GatewayPorts(1, 2, 3), 4, tls=TlsFiles(ca_file=Path("ca.pem")))
