"""Prometheus metrics: one registry per service instance, and the metric families authmesh exports.

Nothing here is module-level state: a :class:`ServiceMetrics` owns its ``CollectorRegistry``, so two
services (or two test instances) in one process never share a counter.

* :class:`ServiceMetrics`: the registry and the async gRPC server interceptor with the names of
  go-grpc-prometheus (``grpc_server_started_total``, ``grpc_server_handled_total``,
  ``grpc_server_msg_received_total``, ``grpc_server_msg_sent_total``, ``grpc_server_handling_seconds``),
  which ``py-grpc-prometheus`` cannot provide for ``grpc.aio`` servers.
* :class:`VerificationMetrics`: token verifications by result and reason.
* :class:`RevocationMetrics`: revocation events applied and rejected, stream gaps, propagation lag.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from authmesh._shared.grpc_handlers import Continuation, RpcHandler, WrappedHandlers, rebuild_handler

_Metric = TypeVar("_Metric", Counter, Histogram)

# go-grpc-prometheus's default buckets, so dashboards written for Go services work unchanged.
GRPC_HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Propagation is expected in milliseconds; the upper buckets catch a replica that fell behind.
PROPAGATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` → (``pkg.Service``, ``Method``)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def grpc_type(handler: RpcHandler) -> str:
    """The go-grpc-prometheus ``grpc_type`` label of a handler."""
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class LabelledChildren(Generic[_Metric]):
    """A labelled metric's children, each looked up once.

    ``labels()`` takes a lock and validates the label values on every call; on paths that count every
    call or event, a dict hit is far cheaper. The label values must come from a small fixed set (codes,
    types), since every one seen is kept.

    Args:
        metric: The labelled counter or histogram.
    """

    def __init__(self, metric: _Metric) -> None:
        self._metric: _Metric = metric
        self._children: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *labels: str) -> _Metric:
        """The child for ``labels``."""
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


class ServiceMetrics:
    """The metrics registry of one service instance.

    Args:
        service_name: The service's name (``auth``, ``resource``), exported as ``authmesh_service_info``.
        instance: The replica's name, exported beside it.
    """

    def __init__(self, service_name: str, instance: str = "") -> None:
        self.service_name = service_name
        self.registry = CollectorRegistry()
        info = Gauge(
            "authmesh_service_info",
            "Which authmesh service this is (always 1).",
            ["service", "instance"],
            registry=self.registry,
        )
        info.labels(service_name, instance).set(1)
        self._grpc = _GrpcInstruments.register(self.registry)

    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        """An interceptor that records every RPC; put it first, so it sees rejected calls too."""
        return _GrpcMetricsInterceptor(self._grpc)


@dataclass(frozen=True, slots=True)
class _GrpcInstruments:
    started: Counter
    handled: Counter
    received: Counter
    sent: Counter
    seconds: Histogram

    @classmethod
    def register(cls, registry: CollectorRegistry) -> _GrpcInstruments:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        return cls(
            started=Counter(
                "grpc_server_started_total", "RPCs started on the server.", labels, registry=registry
            ),
            handled=Counter(
                "grpc_server_handled_total",
                "RPCs completed on the server, whatever their outcome.",
                [*labels, "grpc_code"],
                registry=registry,
            ),
            received=Counter(
                "grpc_server_msg_received_total",
                "Stream messages received on the server.",
                labels,
                registry=registry,
            ),
            sent=Counter(
                "grpc_server_msg_sent_total", "Stream messages sent by the server.", labels, registry=registry
            ),
            seconds=Histogram(
                "grpc_server_handling_seconds",
                "Time the server took to handle an RPC.",
                labels,
                buckets=GRPC_HANDLING_BUCKETS,
                registry=registry,
            ),
        )


class _GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, instruments: _GrpcInstruments) -> None:
        self._instruments = instruments
        self._wrapped = WrappedHandlers(self._measured)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> RpcHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrapped.get(handler, handler_call_details.method)

    def _measured(self, handler: RpcHandler, full_method: str) -> RpcHandler:
        """``handler`` with every call counted and timed (built once per handler)."""
        # The stubs type behaviours as synchronous; under grpc.aio they are coroutines or async generators.
        behavior = cast(
            Callable[..., Any] | None,
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream,
        )
        if behavior is None:
            return handler
        service, method = split_method(full_method)
        labels = (grpc_type(handler), service, method)
        meter = self._instruments
        # Label lookups take a lock and hash the labels: done once here, not on every call.
        started_total, seconds = meter.started.labels(*labels), meter.seconds.labels(*labels)
        received, sent = meter.received.labels(*labels), meter.sent.labels(*labels)
        handled = LabelledChildren(meter.handled)
        request_streaming = handler.request_streaming

        def begin() -> float:
            started_total.inc()
            return time.perf_counter()

        def end(code: grpc.StatusCode, started: float) -> None:
            handled(*labels, code.name).inc()
            seconds.observe(time.perf_counter() - started)

        async def count_requests(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                received.inc()
                yield request

        def counted(request: Any) -> Any:
            if request_streaming:
                return count_requests(request)
            received.inc()
            return request

        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started, code = begin(), grpc.StatusCode.OK
            try:
                result = behavior(counted(request), context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        sent.inc()
                        yield response
                else:  # a handler that writes with context.write() instead of yielding
                    await result
                code = _final_code(context, None)
            except BaseException as error:
                code = _final_code(context, error)
                raise
            finally:
                end(code, started)

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started, code = begin(), grpc.StatusCode.OK
            try:
                result = behavior(counted(request), context)
                response = await result if inspect.isawaitable(result) else result
                sent.inc()
                code = _final_code(context, None)
                return response
            except BaseException as error:
                code = _final_code(context, error)
                raise
            finally:
                end(code, started)

        return rebuild_handler(handler, streaming if handler.response_streaming else unary)


def _final_code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> grpc.StatusCode:
    code = cast(grpc.StatusCode | None, context.code())
    if code is not None:
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class VerificationMetrics:
    """Token verifications by outcome.

    Args:
        registry: Where the counter is registered.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._verifications = Counter(
            "authmesh_token_verifications_total",
            "Access-token verifications by result (accepted, rejected, unavailable) and reason.",
            ["result", "reason"],
            registry=registry,
        )
        self._child = LabelledChildren(self._verifications)

    def accepted(self, degraded: bool) -> None:
        """A token was accepted (``degraded`` when Introspect had to confirm it)."""
        self._child("accepted", "INTROSPECTED" if degraded else "LOCAL").inc()

    def rejected(self, reason: str) -> None:
        """A token was rejected with a stable reason code."""
        self._child("rejected", reason).inc()

    def unavailable(self, reason: str) -> None:
        """A token could not be decided (keys or revocation state unavailable)."""
        self._child("unavailable", reason).inc()


class RevocationMetrics:
    """The revocation pipeline: events in, events refused, gaps, how fast revocations arrive.

    Args:
        registry: Where the metrics are registered.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._applied = Counter(
            "authmesh_revocation_events_applied_total",
            "Verified events applied to the local revocation state, by type.",
            ["type"],
            registry=registry,
        )
        self._rejected = Counter(
            "authmesh_revocation_events_rejected_total",
            "Events dropped because they could not be verified, by reason.",
            ["reason"],
            registry=registry,
        )
        self._gaps = Counter(
            "authmesh_revocation_stream_gaps_total",
            "Jumps in the AUTH_EVENTS sequence (events missed), each followed by a resynchronisation.",
            registry=registry,
        )
        self._resyncs = Counter(
            "authmesh_revocation_resyncs_total",
            "Times the revocation state was (re)loaded, by source (snapshot or replay).",
            ["source"],
            registry=registry,
        )
        self._lag = Histogram(
            "authmesh_revocation_propagation_lag_seconds",
            "Time from a revocation to its application here (apply time minus the event's time).",
            ["type"],
            buckets=PROPAGATION_BUCKETS,
            registry=registry,
        )
        self._applied_by_type = LabelledChildren(self._applied)
        self._lag_by_type = LabelledChildren(self._lag)

    def event_applied(self, event_type: str, lag_seconds: float | None) -> None:
        """An event was verified and applied; ``lag_seconds`` for a live revocation, else None."""
        self._applied_by_type(event_type).inc()
        if lag_seconds is not None:
            self._lag_by_type(event_type).observe(max(0.0, lag_seconds))

    def event_rejected(self, reason: str) -> None:
        """An event was dropped."""
        self._rejected.labels(reason).inc()

    def gap_detected(self) -> None:
        """Events were missed."""
        self._gaps.inc()

    def resynchronised(self, source: str) -> None:
        """The state was loaded from ``snapshot`` or ``replay``."""
        self._resyncs.labels(source).inc()


def gauge_function(
    registry: CollectorRegistry, name: str, documentation: str, read: Callable[[], float]
) -> Gauge:
    """A gauge read at scrape time (for state another object owns)."""
    gauge = Gauge(name, documentation, registry=registry)
    gauge.set_function(read)
    return gauge
