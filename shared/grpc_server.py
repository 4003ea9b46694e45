"""The gRPC server every authmesh service runs: limits, keepalive, health, reflection, graceful stop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from authmesh._shared.errors import ConfigurationError, InvalidRequest
from authmesh._shared.grpc_errors import abort_with_error
from authmesh._shared.grpc_handlers import RpcHandler, WrappedHandlers, replace_handler
from authmesh._shared.tls import TlsFiles, grpc_server_credentials

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


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """Stands in for a request body that did not parse, so the call can be refused properly."""


class UndecodableRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT (``MALFORMED_REQUEST``) to a body that is not a valid message.

    grpc deserialises requests before any handler or interceptor code runs and answers ``UNKNOWN`` when
    that fails (bytes that are no message, a string field that is not UTF-8); this wraps the
    deserialiser of unary requests so such a call is refused as the bad input it is.
    """

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers(_tolerant)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[RpcHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> RpcHandler | None:
        """Wrap the handler's deserialiser and behaviour."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        return self._wrapped.get(handler, handler_call_details.method)


def _tolerant(handler: RpcHandler, method: str) -> RpcHandler:
    """``handler`` with a deserialiser that cannot fail and a behaviour that refuses what did not parse."""
    deserialize = handler.request_deserializer
    assert deserialize is not None  # checked by the interceptor
    behavior = cast(Callable[..., Any], handler.unary_unary or handler.unary_stream)
    error = InvalidRequest("request is not a valid message", code="MALFORMED_REQUEST")

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, UnicodeDecodeError):
            return _Undecodable()

    if handler.response_streaming:

        async def guarded_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Undecodable):
                await abort_with_error(context, error)
            async for response in behavior(request, context):
                yield response

        return replace_handler(
            handler,
            guarded_stream,
            request_deserializer=tolerant,
            response_serializer=handler.response_serializer,
        )

    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Undecodable):
            await abort_with_error(context, error)
        return await behavior(request, context)

    return replace_handler(
        handler, guarded, request_deserializer=tolerant, response_serializer=handler.response_serializer
    )


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
    tls: TlsFiles = TlsFiles(),  # noqa: B008  # frozen, so one shared default is safe
) -> RunningServer:
    """Build, bind and start a server with health and reflection.

    Args:
        listen: ``host:port`` (port 0 picks a free one).
        register: Adds the service's servicers to the server.
        service_names: Full names of those services (for health and reflection).
        interceptors: Server interceptors, outermost first (after the one that refuses undecodable
            request bodies, which always comes first).
        serving: The initial health status.
        tls: The server's certificate, key and client-certificate policy; plaintext without a
            certificate.

    Raises:
        ConfigurationError: The address cannot be bound, or a TLS file cannot be read.
    """
    server = grpc.aio.server(
        interceptors=[UndecodableRequestInterceptor(), *interceptors], options=grpc_server_options()
    )
    register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    credentials = grpc_server_credentials(tls)
    if credentials is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise ConfigurationError(f"cannot listen on {listen}")
    running = RunningServer(server, health, tuple(service_names), port)
    await running.set_serving(serving)
    await server.start()
    return running
