"""The cache of wrapped handlers the server interceptors share."""

from __future__ import annotations

from typing import Any

import grpc

from authmesh._shared.grpc_handlers import MAX_CACHED_HANDLERS, RpcHandler, WrappedHandlers, rebuild_handler


async def _behavior(request: Any, context: Any) -> Any:
    return request


def _handler() -> RpcHandler:
    handler: RpcHandler = grpc.unary_unary_rpc_method_handler(_behavior)
    return handler


def test_a_handler_is_wrapped_once_and_the_wrapper_reused() -> None:
    built: list[str] = []

    def wrap(handler: RpcHandler, method: str) -> RpcHandler:
        built.append(method)
        return rebuild_handler(handler, _behavior)

    wrapped = WrappedHandlers(wrap)
    handler = _handler()
    first = wrapped.get(handler, "/pkg.S/A")
    assert all(wrapped.get(handler, "/pkg.S/A") is first for _ in range(5))
    assert built == ["/pkg.S/A"]


def test_equal_handlers_of_two_methods_get_their_own_wrappers() -> None:
    wrapped = WrappedHandlers(lambda handler, method: rebuild_handler(handler, _behavior))
    handler = _handler()
    assert wrapped.get(handler, "/pkg.S/A") is not wrapped.get(handler, "/pkg.S/B")


def test_the_cache_starts_over_instead_of_growing_without_bound() -> None:
    built = 0

    def wrap(handler: RpcHandler, method: str) -> RpcHandler:
        nonlocal built
        built += 1
        return handler

    wrapped = WrappedHandlers(wrap)
    handler = _handler()
    for index in range(MAX_CACHED_HANDLERS + 10):
        wrapped.get(handler, f"/pkg.S/M{index}")
    assert built == MAX_CACHED_HANDLERS + 10
    # The first method's wrapper was dropped when the cache started over, so it is built again.
    wrapped.get(handler, "/pkg.S/M0")
    assert built == MAX_CACHED_HANDLERS + 11
