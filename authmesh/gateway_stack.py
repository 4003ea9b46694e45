"""Envoy with authmesh's ext_authz in front of a service with no authmesh code, beside a local stack.

``authmesh up --gateway`` and the demo's gateway act run this next to a
:class:`~authmesh.stack.LocalStack` whose replicas answer ``Authorization/Check``
(``AUTHMESH_EXT_AUTHZ=true``, :data:`GATEWAY_STACK_ENV`): the echo service of
:mod:`authmesh.echo_upstream`, and one Envoy whose ext_authz filter balances over every replica. On a
TLS stack Envoy serves HTTPS with the stack's ``gateway`` certificate and reaches the replicas over
TLS; the echo service behind it stays plaintext on loopback.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.http_server import split_host_port
from authmesh._shared.lifecycle import Startable
from authmesh.envoy_gateway import (
    EchoUpstream,
    EnvoyServer,
    GatewayPorts,
    Route,
    ext_authz_config,
    find_envoy,
)
from authmesh.processes import LOOPBACK, free_ports
from authmesh.stack import GATEWAY_CERT_NAME, LocalStack

GATEWAY_STACK_ENV = {"AUTHMESH_EXT_AUTHZ": "true"}
# The echo service's routes: /docs/ needs docs:read, anything else a valid token.
GATEWAY_ROUTES = (Route("/docs/", ("docs:read",)), Route("/"))


class LocalGateway(Startable):
    """The echo service and an Envoy guarding it with ext_authz on ``stack``'s replicas.

    Args:
        stack: A started stack whose replicas run with :data:`GATEWAY_STACK_ENV`.
        data_dir: Where the two keep their configuration and logs.
    """

    def __init__(self, stack: LocalStack, data_dir: Path) -> None:
        self._stack_parts = contextlib.AsyncExitStack()
        listen, admin = free_ports(2)
        self.upstream = EchoUpstream(data_dir / "upstream")
        authz_ports = [split_host_port(replica.grpc)[1] for replica in stack.replicas]
        self.tls = stack.tls_files(GATEWAY_CERT_NAME)
        self.envoy = EnvoyServer(
            data_dir / "envoy",
            ext_authz_config(
                GatewayPorts(listen, admin, self.upstream.port, routes=GATEWAY_ROUTES),
                *authz_ports,
                tls=self.tls,
            ),
            admin_port=admin,
        )
        self.port = listen

    @property
    def url(self) -> str:
        """The gateway's base URL (``http://127.0.0.1:PORT``, ``https://`` on a TLS stack)."""
        return f"{'https' if self.tls is not None else 'http'}://{LOOPBACK}:{self.port}"

    def describe(self) -> dict[str, Any]:
        """Where the gateway, its admin interface and the upstream listen."""
        return {
            "url": self.url,
            "admin": f"http://{LOOPBACK}:{self.envoy.admin_port}",
            "upstream": f"http://{LOOPBACK}:{self.upstream.port}",
            "routes": {route.prefix: " ".join(route.scopes) for route in GATEWAY_ROUTES},
        }

    async def _start(self) -> None:
        for part in (self.upstream, self.envoy):
            await part.start()
            self._stack_parts.push_async_callback(part.stop)

    async def aclose(self) -> None:
        """Stop Envoy, then the upstream."""
        await self._stack_parts.aclose()


@contextlib.asynccontextmanager
async def gateway_if_available(stack: LocalStack) -> AsyncIterator[str | None]:
    """A :class:`LocalGateway` on ``stack`` when the Envoy binary is installed; yields its URL, else None."""
    try:
        find_envoy()
    except ConfigurationError:
        yield None
        return
    async with LocalGateway(stack, stack.data_dir / "gateway") as gateway:
        yield gateway.url
