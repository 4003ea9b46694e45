"""What the server interceptors share: handler types, rebuilding a handler, and a cache of wrapped ones.

A ``grpc.aio`` interceptor runs for every call and may return a new handler each time. Building one
(closures, a ``RpcMethodHandler``, metric children) costs more than a cheap RPC's own work, yet it
depends only on the handler it wraps: :class:`WrappedHandlers` builds it once per handler and reuses it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc

if TYPE_CHECKING:  # the stubs make the handler generic; grpc's runtime class is not subscriptable
    RpcHandler = grpc.RpcMethodHandler[Any, Any]
else:
    RpcHandler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["RpcHandler | None"]]

# Handlers come from the registered services (a few dozen methods) and from per-reason refusals; more
# than this means something builds a fresh handler per call, and the cache starts over rather than grow.
MAX_CACHED_HANDLERS = 1024

_Key = TypeVar("_Key")
_Value = TypeVar("_Value")


def rebuild_handler(handler: RpcHandler, behavior: Callable[..., Any]) -> RpcHandler:
    """A handler of the same kind and serialisers as ``handler`` with another behaviour."""
    return replace_handler(
        handler,
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def replace_handler(
    handler: RpcHandler,
    behavior: Callable[..., Any],
    *,
    request_deserializer: Callable[[bytes], Any] | None,
    response_serializer: Callable[[Any], bytes] | None,
) -> RpcHandler:
    """A handler of the same kind as ``handler`` with another behaviour and serialisers."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    rebuilt: RpcHandler = make(
        behavior, request_deserializer=request_deserializer, response_serializer=response_serializer
    )
    return rebuilt


class BoundedCache(Generic[_Key, _Value]):
    """Values built once per key; past ``limit`` keys it starts over rather than grow.

    Args:
        limit: How many keys it holds at the most.
    """

    def __init__(self, limit: int = MAX_CACHED_HANDLERS) -> None:
        self._limit = limit
        self._values: dict[_Key, _Value] = {}

    def get(self, key: _Key) -> _Value | None:
        """The value kept for ``key``, if any."""
        return self._values.get(key)

    def keep(self, key: _Key, value: _Value) -> _Value:
        """Keep ``value`` for ``key``; returns it."""
        if len(self._values) >= self._limit:
            self._values.clear()
        self._values[key] = value
        return value


class WrappedHandlers:
    """Wrapped handlers by the handler they wrap, built once each.

    Args:
        wrap: Builds the wrapper of a handler; it must depend on nothing but the handler (and the
            method name, which is part of the key because two methods' handlers can be equal).
    """

    def __init__(self, wrap: Callable[[RpcHandler, str], RpcHandler]) -> None:
        self._wrap = wrap
        self._wrapped: BoundedCache[tuple[str, RpcHandler], RpcHandler] = BoundedCache()

    def get(self, handler: RpcHandler, method: str) -> RpcHandler:
        """The wrapper of ``handler`` (serving ``method``), built now if it is new."""
        key = (method, handler)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped.keep(key, self._wrap(handler, method))
        return wrapped
