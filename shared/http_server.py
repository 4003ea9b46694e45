"""The small HTTP side every service runs beside gRPC (metrics, health, JWKS), on the same event loop.

aiohttp's ``AppRunner``/``TCPSite`` installs no signal handlers, so the service's own graceful shutdown
stays in charge. With a certificate it serves HTTPS only (see
:func:`authmesh._shared.tls.server_ssl_context`).
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.tls import TlsFiles, server_ssl_context


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port).

    Raises:
        ConfigurationError: Not an address with a port.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigurationError(f"listen address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    """The inverse of :func:`split_host_port`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HttpServer:
    """An aiohttp server for a few routes plus ``/metrics``.

    Args:
        listen: ``host:port`` (port 0 picks a free one).
        routes: The service's own routes.
        registry: Served at ``/metrics``.
        tls: HTTPS with this service's certificate when it has one (no client certificate asked for).

    Raises:
        ConfigurationError: The address is not ``host:port`` or a TLS file cannot be loaded.
    """

    def __init__(
        self,
        listen: str,
        routes: list[web.RouteDef],
        registry: CollectorRegistry,
        *,
        tls: TlsFiles = TlsFiles(),  # noqa: B008  # frozen, so one shared default is safe
    ) -> None:
        self._host, self._port = split_host_port(listen)
        self._ssl = server_ssl_context(tls)
        app = web.Application()
        app.add_routes([*routes, web.get("/metrics", make_aiohttp_handler(registry))])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._bound_port = 0

    @property
    def address(self) -> str:
        """Where it listens, with the real port."""
        return join_host_port(self._host, self._bound_port)

    @property
    def scheme(self) -> str:
        """``https`` when it serves TLS, else ``http``."""
        return "https" if self._ssl is not None else "http"

    @property
    def url(self) -> str:
        """Its base URL (``scheme://host:port``)."""
        return f"{self.scheme}://{self.address}"

    async def __aenter__(self) -> Self:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True, ssl_context=self._ssl)
        await site.start()
        server = site._server  # aiohttp exposes the bound socket only here
        sockets = getattr(server, "sockets", None) or []
        self._bound_port = int(sockets[0].getsockname()[1]) if sockets else self._port
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop serving."""
        await self._runner.cleanup()
