"""Composition root of a resource-service replica.

It builds, in order: the auth-service client, the key cache, the denylist, the staleness monitor and the
``Introspect`` fallback, the revocation consumer, the verifier and interceptor, the gRPC server (service,
health, reflection, and with ``ext_authz`` Envoy's ``Authorization/Check`` over the same verifier) and the
HTTP side (``/metrics``, ``/healthz``). Background loops (the revocation consumer, the service-token
refresher, the readiness watcher) run under one ``asyncio.TaskGroup``.

Health stays ``NOT_SERVING`` (and every protected call ``UNAVAILABLE``) until the revocation state has
caught up with the stream. On stop: health ``NOT_SERVING``, gRPC drains for ``shutdown_grace``, then the
loops are cancelled and the connections closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import grpc
import structlog
from aiohttp import web
from prometheus_client import Gauge

from authmesh._resource_service.documents import sample_documents
from authmesh._resource_service.ext_authz import CHECK_METHOD, ExtAuthzServicer, add_ext_authz_to_server
from authmesh._resource_service.ext_authz import SERVICE_NAME as EXT_AUTHZ_SERVICE_NAME
from authmesh._resource_service.servicer import REQUIRED_SCOPES, SERVICE_NAME, ResourceServicer
from authmesh._shared.auth_client import AuthClient
from authmesh._shared.consumer import RevocationConsumer
from authmesh._shared.denylist import Denylist
from authmesh._shared.grpc_server import RunningServer, start_grpc_server
from authmesh._shared.http_server import HttpServer, join_host_port, split_host_port
from authmesh._shared.interceptor import Authenticator, AuthInterceptor
from authmesh._shared.key_cache import KeyCache
from authmesh._shared.lifecycle import Startable, run_until_signalled
from authmesh._shared.logs import configure_logging
from authmesh._shared.metrics import RevocationMetrics, ServiceMetrics, VerificationMetrics, gauge_function
from authmesh._shared.nats_wiring import connect_nats
from authmesh._shared.settings import ResourceSettings, credentials
from authmesh._shared.staleness import IntrospectionFallback, StalenessMonitor
from authmesh._shared.verifier import TokenVerifier, VerifierPolicy
from authmesh.resource.v1 import resource_pb2_grpc

_log = structlog.get_logger(__name__)
# While a replica is not ready, it says every this many seconds what it is waiting for.
READY_REPORT_SECONDS = 5.0


class ResourceApp(Startable):
    """A running resource-service replica (an async context manager).

    Args:
        settings: Its settings.
    """

    def __init__(self, settings: ResourceSettings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics("resource", settings.instance)
        self.denylist = Denylist(access_token_ttl=settings.access_token_ttl, leeway=settings.leeway)
        self.staleness = StalenessMonitor(settings.staleness_bound)
        account = credentials(settings.service_account) if settings.service_account else None
        self.auth = AuthClient(settings.auth_target, service_account=account)
        self.keys = KeyCache(self.auth.get_jwks)
        self.fallback = (
            IntrospectionFallback(
                self.auth, max_age=settings.staleness_bound, timeout=min(1.0, settings.staleness_bound)
            )
            if account is not None
            else None
        )
        self.consumer = RevocationConsumer(
            settings,
            self.denylist,
            self.keys,
            self.staleness,
            snapshot=self.auth if account is not None else None,
            observer=RevocationMetrics(self.metrics.registry),
            name=f"resource-service {settings.instance}",
        )
        self._stack = contextlib.AsyncExitStack()
        self._grpc: RunningServer | None = None
        self._http: HttpServer | None = None
        self._loops: asyncio.Task[None] | None = None
        self._register_gauges()

    @property
    def grpc_address(self) -> str:
        """Where gRPC listens (with the real port)."""
        host, _ = split_host_port(self.settings.grpc_listen)
        return join_host_port(host, self._grpc.port if self._grpc else 0)

    @property
    def http_address(self) -> str:
        """Where HTTP listens (with the real port)."""
        return self._http.address if self._http is not None else self.settings.http_listen

    @property
    def ready(self) -> bool:
        """Whether the revocation state has caught up and calls are served."""
        return self.consumer.ready

    async def aclose(self) -> None:
        """Graceful stop: health NOT_SERVING, drain gRPC, stop the loops, close connections."""
        await self._stack.aclose()

    async def _start(self) -> None:
        settings = self.settings
        # Fail at start, in one line, when NATS is not reachable within the connect timeout; once up, the
        # consumer reconnects for ever.
        probe = await connect_nats(settings, name=f"resource-service {settings.instance} (start)")
        await probe.close()
        await self._stack.enter_async_context(self.auth)
        self._stack.push_async_callback(self.keys.aclose)
        if self.fallback is not None:
            self._stack.push_async_callback(self.fallback.aclose)

        self._http = await self._stack.enter_async_context(
            HttpServer(settings.http_listen, [web.get("/healthz", self._healthz)], self.metrics.registry)
        )
        servicer = ResourceServicer(settings.instance, sample_documents())
        authenticator = self._authenticator()
        gateway = ExtAuthzServicer(authenticator) if settings.ext_authz else None

        def register(server: grpc.aio.Server) -> None:
            resource_pb2_grpc.add_ResourceServiceServicer_to_server(servicer, server)
            if gateway is not None:
                add_ext_authz_to_server(gateway, server)

        self._grpc = await start_grpc_server(
            settings.grpc_listen,
            register=register,
            service_names=(SERVICE_NAME, EXT_AUTHZ_SERVICE_NAME) if gateway else (SERVICE_NAME,),
            interceptors=(
                self.metrics.grpc_interceptor(),
                # Envoy's Check carries the token to judge in its request, not as the caller's credential.
                AuthInterceptor(authenticator, required_scopes=REQUIRED_SCOPES, open_methods=(CHECK_METHOD,)),
            ),
            serving=False,
        )
        # Loops start once the server exists (readiness flips its health); on stop, gRPC drains first
        # (pushed last), while the consumer keeps applying revocations.
        self._loops = asyncio.get_running_loop().create_task(self._run_loops(), name="resource-loops")
        self._stack.push_async_callback(self._stop_loops)
        self._stack.push_async_callback(self._stop_grpc)
        _log.info("resource service started", grpc=self.grpc_address, http=self.http_address)

    def _authenticator(self) -> Authenticator:
        settings = self.settings
        verifier = TokenVerifier(
            self.keys,
            self.denylist,
            VerifierPolicy(issuer=settings.issuer, audience=settings.audience, leeway=settings.leeway),
        )
        return Authenticator(
            verifier,
            self.keys,
            staleness=self.staleness,
            fallback=self.fallback,
            ready=lambda: self.consumer.ready,
            metrics=VerificationMetrics(self.metrics.registry),
        )

    async def _run_loops(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.consumer.run(), name="revocation-consumer")
            group.create_task(self.auth.run_token_refresher(), name="service-token-refresher")
            group.create_task(self._serve_when_ready(), name="readiness")

    async def _serve_when_ready(self) -> None:
        while True:
            try:
                async with asyncio.timeout(READY_REPORT_SECONDS):
                    await self.consumer.wait_ready()
                break
            except TimeoutError:
                _log.warning("resource service not ready yet", waiting_for=self.consumer.waiting_for)
        assert self._grpc is not None  # the loops start after the server
        await self._grpc.set_serving(True)
        _log.info("resource service serving", instance=self.settings.instance)

    async def _stop_grpc(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(self.settings.shutdown_grace)

    async def _stop_loops(self) -> None:
        loops, self._loops = self._loops, None
        if loops is None:
            return
        loops.cancel()
        try:
            await loops
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:
            _log.exception("background loop failed")

    async def _healthz(self, request: web.Request) -> web.Response:
        state = {
            "instance": self.settings.instance,
            "ready": self.consumer.ready,
            "degraded": self.staleness.degraded,
            "staleness_seconds": round(self.staleness.seconds, 3),
            "nats_connected": self.consumer.connected,
            "denylist_entries": len(self.denylist),
        }
        return web.json_response(state, status=200 if self.consumer.ready else 503)

    def _denylist_size(self, kind: str) -> Callable[[], float]:
        return lambda: float(getattr(self.denylist.sizes(), kind))

    def _register_gauges(self) -> None:
        registry = self.metrics.registry
        entries = Gauge(
            "authmesh_denylist_entries", "Revocations held in memory, by kind.", ["kind"], registry=registry
        )
        for kind in ("tokens", "sessions", "users", "keys"):
            entries.labels(kind).set_function(self._denylist_size(kind))
        gauge_function(
            registry,
            "authmesh_revocation_staleness_seconds",
            "Seconds since the last heartbeat from the auth service.",
            lambda: self.staleness.seconds,
        )
        gauge_function(
            registry,
            "authmesh_revocation_degraded",
            "1 while the revocation state is stale and tokens are checked with Introspect.",
            lambda: float(self.staleness.degraded),
        )
        gauge_function(
            registry,
            "authmesh_revocation_ready",
            "1 once the revocation state has caught up with the stream.",
            lambda: float(self.consumer.ready),
        )


def run(settings: ResourceSettings) -> None:
    """Run a replica until SIGTERM or SIGINT, then stop gracefully."""
    configure_logging(settings.log_level, settings.log_format)
    run_until_signalled(lambda: ResourceApp(settings))
