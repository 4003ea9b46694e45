"""The gRPC server every authmesh service runs: limits, keepalive, health, reflection, graceful stop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from shared.errors import ConfigurationError

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Requests are a few short strings; anything near this size is hostile and refused unread.
MAX_REQUEST_BYTES = 64 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_server_options() -> list[tuple[str, int]]:
    """Message limits and keepalive (clients must not ping more often than this allows)."""
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_metadata_size", 16 * 1024),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


@dataclass(slots=True)
class RunningServer:
    """A started gRPC server with its health service.

    Attributes:
        server: The grpc.aio server.
        health: Its standard health servicer.
        service_names: The services whose health it reports (besides the overall "").
        port: The bound port.
    """

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    service_names: tuple[str, ...]
    port: int

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the server and each of its services."""
        status = SERVING if serving else NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING for every service, then drain in-flight calls for up to ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_grpc_server(
    listen: str,
    *,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    serving: bool = True,
) -> RunningServer:
    """Build, bind and start a server with health and reflection.

    Args:
        listen: ``host:port`` (port 0 picks a free one).
        register: Adds the service's servicers to the server.
        service_names: Full names of those services (for health and reflection).
        interceptors: Server interceptors, outermost first.
        serving: The initial health status.

    Raises:
        ConfigurationError: The address cannot be bound.
    """
    server = grpc.aio.server(interceptors=list(interceptors), options=grpc_server_options())
    register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise ConfigurationError(f"cannot listen on {listen}")
    running = RunningServer(server, health, tuple(service_names), port)
    await running.set_serving(serving)
    await server.start()
    return running
