"""Composition root of a resource-service replica: the worked example of :class:`ResourceGuard`.

One :class:`~authmesh._shared.guard.ResourceGuard` builds everything that verifies tokens and follows
revocations (token rules from the auth service's metadata, key cache, denylist, revocation consumer with
snapshot and catch-up, staleness and the ``Introspect`` fallback, verifier); this module adds what a
service of its own has: its servicer and policy, the gRPC server (service, health, reflection, and with
``ext_authz`` Envoy's ``Authorization/Check`` over the same guard) and the HTTP side (``/metrics``,
``/healthz``).

Health stays ``NOT_SERVING`` (and every protected call ``UNAVAILABLE``) until the revocation state has
caught up with the stream. On stop: health ``NOT_SERVING``, gRPC drains for ``shutdown_grace``, then the
guard stops following revocations and closes its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

import grpc
import structlog
from aiohttp import web
from prometheus_client import Gauge

from authmesh._resource_service.documents import sample_documents
from authmesh._resource_service.ext_authz import CHECK_METHOD, ExtAuthzServicer, add_ext_authz_to_server
from authmesh._resource_service.ext_authz import SERVICE_NAME as EXT_AUTHZ_SERVICE_NAME
from authmesh._resource_service.revocation_health import report_revocation_state
from authmesh._resource_service.servicer import POLICY, SERVICE_NAME, ResourceServicer
from authmesh._shared.consumer import RevocationConsumer
from authmesh._shared.denylist import Denylist
from authmesh._shared.errors import Unavailable
from authmesh._shared.grpc_server import RunningServer, start_grpc_server
from authmesh._shared.guard import GUARD_NOT_STARTED, ResourceGuard
from authmesh._shared.http_server import HttpServer, join_host_port, split_host_port
from authmesh._shared.key_cache import KeyCache
from authmesh._shared.lifecycle import Startable, run_until_signalled
from authmesh._shared.logs import configure_logging
from authmesh._shared.metrics import ServiceMetrics, gauge_function
from authmesh._shared.nats_wiring import connect_nats
from authmesh._shared.settings import ResourceSettings
from authmesh._shared.staleness import StalenessMonitor
from authmesh.resource.v1 import resource_pb2_grpc

_T = TypeVar("_T")
READY_REPORT_SECONDS = 5.0
# The longest a change of the revocation state waits to show in gRPC health.
REVOCATION_HEALTH_INTERVAL_SECONDS = 0.25
_log = structlog.get_logger(__name__)


class ResourceApp(Startable):
    """A running resource-service replica (an async context manager).

    Args:
        settings: Its settings.
    """

    def __init__(self, settings: ResourceSettings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics("resource", settings.instance)
        # The replica reports readiness through its health service, so it enters the guard at once.
        self.guard = ResourceGuard.from_env(settings, wait_ready=False, registry=self.metrics.registry)
        self._stack = contextlib.AsyncExitStack()
        self._grpc: RunningServer | None = None
        self._http: HttpServer | None = None
        self._readiness: asyncio.Task[None] | None = None
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
    def consumer(self) -> RevocationConsumer:
        """The guard's revocation consumer."""
        return _started(self.guard.consumer)

    @property
    def denylist(self) -> Denylist:
        """The guard's denylist."""
        return _started(self.guard.denylist)

    @property
    def staleness(self) -> StalenessMonitor:
        """The guard's staleness monitor."""
        return _started(self.guard.staleness)

    @property
    def keys(self) -> KeyCache:
        """The guard's key cache."""
        return _started(self.guard.keys)

    @property
    def ready(self) -> bool:
        """Whether the revocation state has caught up and calls are served."""
        return self.guard.ready

    async def aclose(self) -> None:
        """Graceful stop: health NOT_SERVING, drain gRPC, stop the guard, close connections."""
        await self._stack.aclose()

    async def _start(self) -> None:
        settings = self.settings
        # Fail at start, in one line, when NATS is not reachable within the connect timeout; once up, the
        # consumer reconnects for ever.
        probe = await connect_nats(settings, name=f"resource-service {settings.instance} (start)")
        await probe.close()
        await self._stack.enter_async_context(self.guard)
        self._http = await self._stack.enter_async_context(
            HttpServer(
                settings.http_listen,
                [web.get("/healthz", self._healthz)],
                self.metrics.registry,
                tls=settings.tls,
            )
        )
        servicer = ResourceServicer(settings.instance, sample_documents())
        gateway = ExtAuthzServicer(self.guard) if settings.ext_authz else None

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
                self.guard.aio_interceptor(POLICY, open_methods=(CHECK_METHOD,)),
            ),
            serving=False,
            tls=settings.tls,
        )
        # On stop, gRPC drains first (pushed last), while the guard keeps applying revocations.
        self._readiness = asyncio.get_running_loop().create_task(self._report_health(), name="readiness")
        self._stack.push_async_callback(self._stop_readiness)
        self._stack.push_async_callback(self._stop_grpc)
        _log.info("resource service started", grpc=self.grpc_address, http=self.http_address)

    async def _report_health(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._serve_when_ready())
            group.create_task(self._report_revocation_state())

    async def _report_revocation_state(self) -> None:
        assert self._grpc is not None  # the readiness task starts after the server
        await report_revocation_state(
            self._grpc.health,
            self.staleness,
            lambda: self.guard.ready,
            interval=min(self.staleness.bound / 4, REVOCATION_HEALTH_INTERVAL_SECONDS),
        )

    async def _serve_when_ready(self) -> None:
        while True:
            try:
                async with asyncio.timeout(READY_REPORT_SECONDS):
                    await self.guard.wait_ready()
                break
            except TimeoutError:
                _log.warning("resource service not ready yet", waiting_for=self.consumer.waiting_for)
        assert self._grpc is not None  # the readiness task starts after the server
        await self._grpc.set_serving(True)
        _log.info("resource service serving", instance=self.settings.instance)

    async def _stop_grpc(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(self.settings.shutdown_grace)

    async def _stop_readiness(self) -> None:
        readiness, self._readiness = self._readiness, None
        if readiness is not None:
            readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await readiness

    async def _healthz(self, request: web.Request) -> web.Response:
        guard = self.guard
        state = {
            "instance": self.settings.instance,
            "ready": guard.ready,
            "degraded": guard.staleness is not None and guard.staleness.degraded,
            "staleness_seconds": round(guard.staleness.seconds, 3) if guard.staleness else None,
            "nats_connected": guard.consumer is not None and guard.consumer.connected,
            "denylist_entries": len(guard.denylist) if guard.denylist is not None else 0,
        }
        return web.json_response(state, status=200 if guard.ready else 503)

    def _denylist_size(self, kind: str) -> Callable[[], float]:
        def size() -> float:
            denylist = self.guard.denylist
            return 0.0 if denylist is None else float(getattr(denylist.sizes(), kind))

        return size

    def _register_gauges(self) -> None:
        registry = self.metrics.registry
        entries = Gauge(
            "authmesh_denylist_entries", "Revocations held in memory, by kind.", ["kind"], registry=registry
        )
        for kind in ("tokens", "sessions", "users", "key_bindings"):
            entries.labels(kind).set_function(self._denylist_size(kind))
        # Retired keys are the key cache's: the gauge keeps its "keys" series.
        entries.labels("keys").set_function(
            lambda: float(len(self.guard.keys.retired)) if self.guard.keys is not None else 0.0
        )
        gauge_function(
            registry,
            "authmesh_revocation_staleness_seconds",
            "Seconds since the last heartbeat from the auth service.",
            lambda: self.guard.staleness.seconds if self.guard.staleness is not None else 0.0,
        )
        gauge_function(
            registry,
            "authmesh_revocation_degraded",
            "1 while the revocation state is stale and tokens are checked with Introspect.",
            lambda: float(self.guard.staleness is not None and self.guard.staleness.degraded),
        )
        gauge_function(
            registry,
            "authmesh_revocation_ready",
            "1 once the revocation state has caught up with the stream.",
            lambda: float(self.guard.ready),
        )


def _started(part: _T | None) -> _T:
    if part is None:
        raise Unavailable("the resource service is not started", code=GUARD_NOT_STARTED)
    return part


def run(settings: ResourceSettings) -> None:
    """Run a replica until SIGTERM or SIGINT, then stop gracefully."""
    configure_logging(settings.log_level, settings.log_format, service="resource", instance=settings.instance)
    run_until_signalled(lambda: ResourceApp(settings))
